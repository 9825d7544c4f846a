"""Readers of ``/proc`` for the agent's system block; each takes the proc root as an argument
so tests can point it at fixture files (``tests/fixtures/proc/``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TCP_ESTABLISHED", "count_established", "count_established_psutil", "read_load1"]

TCP_ESTABLISHED = b"01"  # the kernel's TCP_ESTABLISHED, as printed in the ``st`` column


def count_state(table: bytes, state: bytes = TCP_ESTABLISHED) -> int:
    """Count the rows of one ``/proc/net/tcp``-style table whose ``st`` column is ``state``."""
    count = 0
    lines = table.split(b"\n")
    for line in lines[1:]:  # the first line is the column header
        fields = line.split(None, 4)
        if len(fields) > 3 and fields[3] == state:
            count += 1
    return count


def count_established(proc_root: str | Path = "/proc") -> int:
    """ESTABLISHED TCP connections over IPv4 and IPv6 (blocking: call it off the event loop).

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
        total += count_state(data)
    if not found:
        raise FileNotFoundError(f"{net}/tcp and {net}/tcp6 are missing")
    return total


def count_established_psutil() -> int:
    """The fallback where /proc is absent (macOS, BSD); slower and may need privileges."""
    import psutil

    try:
        return sum(1 for conn in psutil.net_connections("tcp")
                   if conn.status == psutil.CONN_ESTABLISHED)
    except (psutil.AccessDenied, OSError):
        return 0


def read_load1(proc_root: str | Path = "/proc") -> float:
    """The one-minute load average from ``/proc/loadavg``."""
    with open(Path(proc_root) / "loadavg", "rb") as loadavg:
        return float(loadavg.read().split(None, 1)[0])
