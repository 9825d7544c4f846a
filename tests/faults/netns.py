"""Real faults for real processes: hosts in network namespaces on a bridge, nftables drops,
signals, CPU hogs, a full tmpfs and clocks that are off.

Every name this module creates (namespaces, links, mount points) starts with
``nwf<pid>`` of the pytest process that made it, so :func:`sweep` can remove what a crashed
session left behind without touching a concurrent session's. Addresses are in 198.18.0.0/15
(RFC 2544, benchmarking) only: one /24 per :class:`Network`, the harness at ``.254`` on the
bridge (in the root namespace), hosts from ``.1``.

Faults are nftables rules in the hosts' own namespaces (table ``inet nwfault``), so deleting a
namespace removes its rules too; :meth:`Network.heal` removes them all while the processes run.
Needs root, ``ip`` (iproute2), ``nft``, ``taskset``; ``faketime``'s library for skewed clocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodewatch.cli.processes import Proc

__all__ = ["FAKETIME_LIBS", "Host", "Network", "TmpfsDisk", "can_run", "faketime_env",
           "faketime_lib", "missing_tools", "network", "prefix", "sweep"]

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/faketime/libfaketime.so.1")
_PR_SET_PDEATHSIG = 1
_TABLE = "nwfault"


def prefix(pid: int | None = None) -> str:
    """The unique name prefix of everything one pytest session creates."""
    return f"nwf{os.getpid() if pid is None else pid}"


def _run(*argv: str, check: bool = True, ns: str | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    done = subprocess.run(full, capture_output=True, text=True, check=False, input=stdin,
                          timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def missing_tools() -> list[str]:
    """What this machine lacks to run the fault suite (empty when it can)."""
    missing = [] if os.geteuid() == 0 else ["root"]
    for tool in ("ip", "nft", "taskset"):
        if _which(tool) is None:
            missing.append(tool)
    if faketime_lib() is None:
        missing.append("faketime")
    return missing


def can_run() -> bool:
    return not missing_tools()


def _which(tool: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        path = Path(d) / tool
        if path.exists() and os.access(path, os.X_OK):
            return str(path)
    return None


def faketime_lib() -> str | None:
    return next((lib for lib in FAKETIME_LIBS if Path(lib).exists()), None)


def faketime_env(offset: str) -> dict[str, str]:
    """Environment for a process whose wall clock is ``offset`` off (``"+2h"``, ``"-2h"``).

    The monotonic clock stays true (as on a host whose NTP is wrong): only ``time.time()`` and
    friends are skewed. The library is preloaded directly rather than through the ``faketime``
    wrapper, which forks and would keep signals from reaching the real process.
    """
    lib = faketime_lib()
    if lib is None:
        raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
    return {"LD_PRELOAD": lib, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


@dataclass
class Host:
    """One test host: a network namespace with one address on the bridge."""

    name: str
    netns: str
    ip: str
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, *,
              env: dict[str, str] | None = None, cpu: int | None = None,
              cwd: Path | None = None) -> Proc:
        """Run ``argv`` inside this host (``ip netns exec``), pinned to ``cpu`` if given.

        ``ip netns exec`` and ``taskset`` both exec, so the Proc's pid is the program's own and
        SIGSTOP / SIGKILL reach it directly.
        """
        full = ["ip", "netns", "exec", self.netns]
        if cpu is not None:
            full += ["taskset", "-c", str(cpu)]
        full += list(argv)
        proc = Proc(name, full, log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc.popen = subprocess.Popen(
                full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                preexec_fn=_die_with_parent, cwd=cwd)
        self.procs.append(proc)
        return proc

    def cpu_hog(self, cpu: int, log_path: Path) -> Proc:
        """A busy loop pinned to ``cpu``: takes a core away from whatever else is pinned there."""
        return self.spawn(f"hog-{self.name}-{len(self.procs)}",
                          [sys.executable, "-c", "while True: pass"], log_path, cpu=cpu)

    def nft(self, rule: str) -> int:
        """Add one rule to this host's fault table; returns its handle."""
        done = _run("nft", "--echo", "--handle", "add", "rule", "inet", _TABLE, *rule.split(),
                    ns=self.netns)
        match = re.search(r"# handle (\d+)", done.stdout)
        if match is None:
            raise RuntimeError(f"nft gave no handle for {rule!r}: {done.stdout!r}")
        return int(match.group(1))

    def nft_delete(self, chain: str, handle: int) -> None:
        _run("nft", "delete", "rule", "inet", _TABLE, chain, "handle", str(handle),
             ns=self.netns, check=False)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(OSError):
                proc.signal(signal.SIGCONT)
                if proc.popen is not None and proc.popen.poll() is None:
                    proc.popen.kill()
                    proc.popen.wait(5)
        self.procs.clear()


@dataclass
class _Rule:
    host: Host
    chain: str
    handle: int


class Network:
    """A bridge in the root namespace and one namespace per host, joined by veth pairs."""

    _count = 0

    def __init__(self) -> None:
        Network._count += 1
        index = Network._count
        self.tag = f"{prefix()}n{index}"
        slot = (os.getpid() * 7 + index) % 512
        self.subnet = f"198.{18 + slot // 256}.{slot % 256}"
        self.harness_ip = f"{self.subnet}.254"
        self.bridge = f"{self.tag}b"
        self.hosts: dict[str, Host] = {}
        self._rules: list[_Rule] = []
        self._closed = False
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.harness_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        if number > 250:
            raise ValueError("at most 250 hosts per network")
        netns = f"{self.tag}-{name}"
        veth = f"{self.tag}v{number}"
        host = Host(name, netns, f"{self.subnet}.{number}")
        _run("ip", "netns", "add", netns)
        self.hosts[name] = host  # from here on close() removes it
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0", ns=netns)
        _run("ip", "link", "set", "eth0", "up", ns=netns)
        _run("ip", "link", "set", "lo", "up", ns=netns)
        _run("nft", "-f", "-", ns=netns, stdin=(
            f"table inet {_TABLE} {{\n"
            "  chain input { type filter hook input priority 0; policy accept; }\n"
            "  chain output { type filter hook output priority 0; policy accept; }\n"
            "}\n"))
        return host

    # -- faults ------------------------------------------------------------------------------

    def _add(self, host: Host, chain: str, rule: str) -> None:
        self._rules.append(_Rule(host, chain, host.nft(f"{chain} {rule}")))

    def drop(self, src: Host, dst: Host) -> None:
        """One-way: packets from ``src`` to ``dst`` vanish (dropped at both ends)."""
        self._add(src, "output", f"ip daddr {dst.ip} drop")
        self._add(dst, "input", f"ip saddr {src.ip} drop")

    def cut(self, a: Host, b: Host) -> None:
        """Both ways: ``a`` and ``b`` no longer reach each other; everyone else still does."""
        self.drop(a, b)
        self.drop(b, a)

    def isolate(self, host: Host, *, keep_harness: bool = True) -> None:
        """``host`` reaches no other host (the harness still reaches it unless told)."""
        for other in self.hosts.values():
            if other is not host:
                self.cut(host, other)
        if not keep_harness:
            self._add(host, "input", f"ip saddr {self.harness_ip} drop")
            self._add(host, "output", f"ip daddr {self.harness_ip} drop")

    def loss(self, percent: int, hosts: Sequence[Host] | None = None) -> None:
        """Random loss of ``percent`` % of the packets each host receives from other hosts.

        Every link between two hosts loses about that much each way; the harness's own
        requests are spared so that what it observes is not itself the fault.
        """
        if not 0 < percent < 100:
            raise ValueError("percent must be in 1..99")
        for host in hosts or list(self.hosts.values()):
            self._add(host, "input", f"ip saddr {self.subnet}.0/24 ip saddr != {self.harness_ip}"
                                     f" numgen random mod 100 < {percent} drop")

    def heal(self) -> None:
        """Remove every fault rule added so far; the processes keep running."""
        rules, self._rules = self._rules, []
        for rule in reversed(rules):
            rule.host.nft_delete(rule.chain, rule.handle)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            host.stop_all()
        for host in self.hosts.values():
            _kill_netns_pids(host.netns)
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_netns_pids(netns: str) -> None:
    done = _run("ip", "netns", "pids", netns, check=False)
    for word in done.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(word), signal.SIGKILL)


class TmpfsDisk:
    """A small tmpfs: a disk that a test can fill to the last byte and empty again."""

    def __init__(self, parent: Path, size_kib: int = 1024) -> None:
        self.path = parent / f"{prefix()}-disk"
        self.path.mkdir(parents=True, exist_ok=True)
        self._filler = self.path / "filler"
        _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs",
             str(self.path))
        self._mounted = True

    def fill(self) -> int:
        """Write until ENOSPC; returns the bytes written."""
        written = 0
        chunk = b"\0" * 4096
        with self._filler.open("ab", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        # The last partial block too: sqlite must not find even one free page.
        with contextlib.suppress(OSError), self._filler.open("ab", buffering=0) as f:
            while f.write(b"\0"):
                written += 1
        return written

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self._mounted:
            _run("umount", "-l", str(self.path), check=False)
            self._mounted = False

    def __enter__(self) -> TmpfsDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep(only_own: bool = False) -> list[str]:
    """Remove namespaces, links and mounts that a fault session left behind.

    Without ``only_own`` it removes those of every session whose pytest process is gone (a
    crash, a ``kill -9``), never a live concurrent session's; with it, this session's own.
    Returns what it removed.
    """
    own = prefix()

    def stale(name: str) -> bool:
        match = re.match(r"nwf(\d+)", name)
        if match is None:
            return False
        if only_own:
            return name.startswith(own) and not name[len(own):len(own) + 1].isdigit()
        return not _pid_alive(int(match.group(1)))

    removed: list[str] = []
    netns_list = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in netns_list:
        name = line.split(" ")[0].strip()
        if name and stale(name):
            _kill_netns_pids(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    links = _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        parts = line.split(": ")
        if len(parts) < 2:
            continue
        name = parts[1].split("@")[0]
        if stale(name):
            _run("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if line.strip()]
    for point in mounts:
        base = Path(point).name
        if base.endswith("-disk") and stale(base):
            _run("umount", "-l", point, check=False)
            removed.append(f"mount {point}")
    if removed:
        time.sleep(0.05)
    return removed


@contextlib.contextmanager
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()
