"""Readers of ``/proc`` for the agent's system block; each takes the proc root as an argument
so tests can point it at fixture files (``tests/fixtures/proc/``)."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CURR_ESTAB_STATES",
    "count_curr_estab_psutil",
    "count_curr_estab_tables",
    "count_states",
    "read_curr_estab",
    "read_load1",
]

# What the kernel's CurrEstab counts (RFC 1213 tcpCurrEstab): ESTABLISHED (01) and CLOSE-WAIT
# (08), as printed in the ``st`` column of /proc/net/tcp; the fallbacks count the same.
CURR_ESTAB_STATES = frozenset({b"01", b"08"})


def read_curr_estab(proc_root: str | Path = "/proc") -> int:
    """The TCP MIB counter ``CurrEstab`` from ``/proc/net/snmp``, IPv4 and IPv6 together.

    One short read whatever the number of sockets, unlike the tables. Raises
    ``FileNotFoundError`` without the file and ``ValueError`` when it has no ``Tcp:`` counter.
    """
    with open(Path(proc_root) / "net" / "snmp", "rb") as snmp:
        data = snmp.read()
    # Two "Tcp:" lines: the names, then the values in the same order.
    rows = [line.split() for line in data.split(b"\n") if line.startswith(b"Tcp:")]
    if len(rows) < 2 or b"CurrEstab" not in rows[0] or len(rows[1]) != len(rows[0]):
        raise ValueError("/proc/net/snmp has no Tcp CurrEstab counter")
    return int(rows[1][rows[0].index(b"CurrEstab")])


def count_states(table: bytes, states: frozenset[bytes] = CURR_ESTAB_STATES) -> int:
    """Count the rows of one ``/proc/net/tcp``-style table whose ``st`` column is in
    ``states``."""
    count = 0
    lines = table.split(b"\n")
    for line in lines[1:]:  # the first line is the column header
        fields = line.split(None, 4)
        if len(fields) > 3 and fields[3] in states:
            count += 1
    return count


def count_curr_estab_tables(proc_root: str | Path = "/proc") -> int:
    """``CurrEstab`` the slow way, from ``/proc/net/tcp`` and ``tcp6`` (blocking, and costs
    milliseconds per few hundred sockets): for kernels without ``/proc/net/snmp``.

    Raises ``FileNotFoundError`` only when neither table exists (no /proc: use psutil).
    """
    net = Path(proc_root) / "net"
    found = False
    total = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(net / name, "rb") as table:
                data = table.read()
        except FileNotFoundError:
            continue
        found = True
        total += count_states(data)
    if not found:
        raise FileNotFoundError(f"{net}/tcp and {net}/tcp6 are missing")
    return total


def count_curr_estab_psutil() -> int:
    """The fallback where /proc is absent (macOS, BSD); slower and may need privileges."""
    import psutil

    counted = {psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT}
    try:
        return sum(1 for conn in psutil.net_connections("tcp") if conn.status in counted)
    except (psutil.AccessDenied, OSError):
        return 0


def read_load1(proc_root: str | Path = "/proc") -> float:
    """The one-minute load average from ``/proc/loadavg``."""
    with open(Path(proc_root) / "loadavg", "rb") as loadavg:
        return float(loadavg.read().split(None, 1)[0])
