"""systemd notify: a real datagram socket (as systemd binds it), real coordinator and agent
processes started with NOTIFY_SOCKET and WATCHDOG_USEC: READY=1 once serving, WATCHDOG=1 at
half the interval from the event loop (none while the process is frozen), STATUS= lines,
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewatch.systemd import MAX_STATUS, Notifier, watchdog_interval
from tests.helpers import free_port, port_open, wait_until

FAST = """
[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
startup_grace = "0"

[agent]
sample_interval = "1s"
"""
WATCHDOG_USEC = 400_000  # 0.4 s: WATCHDOG=1 every 0.2 s


class NotifySocket:
    """The receiving end systemd binds: one AF_UNIX datagram socket; each datagram is a
    message of KEY=VALUE lines, stamped on arrival by a reader thread."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in raw.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m and value in (None, m[key])]

    def wait_for(self, key: str, value: str | None = None,
                 timeout: float = 5.0) -> list[tuple[float, dict[str, str]]]:
        return wait_until(lambda: self.with_key(key, value), timeout=timeout,  # type: ignore[return-value]
                          message=f"{key}={value or '...'}")

    def close(self) -> None:
        self._closed.set()
        self._reader.join(1)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket path must fit in 108 bytes: pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="nw-sd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- the sender


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_named_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 42) is None
    assert watchdog_interval({}, 42) is None


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000"})
    assert not notifier.enabled and notifier.watchdog is None
    assert notifier.notify("READY=1") is False
    await asyncio.wait_for(notifier.supervise(lambda: "x"), 1)  # returns at once


def test_datagrams_reach_a_path_and_an_abstract_socket(short_dir: Path) -> None:
    path = NotifySocket(str(short_dir / "notify"))
    name = f"nodewatch-test-{os.getpid()}"
    abstract = NotifySocket(b"\0" + name.encode())
    try:
        Notifier(str(short_dir / "notify")).ready("up")
        Notifier("@" + name).stopping()
        [(_, ready)] = path.wait_for("READY", "1")
        assert ready["STATUS"] == "up" and ready["MAINPID"] == str(os.getpid())
        [(_, stopping)] = abstract.wait_for("STOPPING", "1")
        assert stopping["STATUS"] == "stopping"
    finally:
        path.close()
        abstract.close()


def test_a_missing_socket_is_reported_once_and_never_raises(
    short_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier(str(short_dir / "absent"))
    assert notifier.notify("WATCHDOG=1") is False
    assert notifier.notify("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


async def test_supervise_sends_watchdog_each_period_and_status_only_when_it_changes(
    short_dir: Path,
) -> None:
    receiver = NotifySocket(str(short_dir / "notify"))
    lines = iter(["a", "a", "a", "b", "b"] + ["b " + "x" * 300] * 100)
    notifier = Notifier(str(short_dir / "notify"), watchdog=0.05)
    task = asyncio.create_task(notifier.supervise(lambda: next(lines)))
    try:
        await asyncio.sleep(0.4)
    finally:
        task.cancel()
        await asyncio.sleep(0.1)
        receiver.close()
    watchdogs = receiver.with_key("WATCHDOG", "1")
    statuses = [m["STATUS"] for _, m in receiver.with_key("STATUS")]
    assert len(watchdogs) >= 4
    assert statuses[:2] == ["a", "b"] and len(statuses) == 3
    assert len(statuses[2]) == MAX_STATUS


# ---------------------------------------------------------------------- real processes


def _spawn(argv: list[str], cwd: Path, notify: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": str(WATCHDOG_USEC),
           "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nodewatch", *argv], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(5)


def _ready_once_serving(receiver: NotifySocket, proc: subprocess.Popen[bytes], host: str,
                        port: int, log: Path) -> dict[str, str]:
    """Wait for READY=1; the moment it arrives, the port must already accept connections."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = receiver.with_key("READY", "1")
        if ready:
            assert port_open(host, port), "READY=1 before the port was open"
            assert len(ready) == 1
            return ready[0][1]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.005)
    raise AssertionError(f"no READY=1 within 30s:\n{log.read_text()[-2000:]}")


def _watchdog_cadence(receiver: NotifySocket, after: float) -> list[float]:
    times = [t for t, _ in receiver.with_key("WATCHDOG", "1") if t >= after]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _stopping_then_exit(receiver: NotifySocket, proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    receiver.wait_for("STOPPING", "1", timeout=2)


def test_coordinator_notifies_ready_watchdog_status_and_stopping(
    short_dir: Path, tmp_path: Path,
) -> None:
    receiver = NotifySocket(str(short_dir / "coordinator"))
    (tmp_path / "c.toml").write_text(FAST)
    port = free_port()
    log = tmp_path / "coordinator.log"
    proc = _spawn(["coordinator", "--listen", f"127.0.0.1:{port}", "--config",
                   str(tmp_path / "c.toml")], tmp_path, short_dir / "coordinator", log)
    try:
        ready = _ready_once_serving(receiver, proc, "127.0.0.1", port, log)
        assert ready["STATUS"].startswith("watching 0 nodes; store ok"), ready
        assert ready["MAINPID"] == str(proc.pid)
        since = time.monotonic()
        wait_until(lambda: len(_watchdog_cadence(receiver, since)) >= 5, timeout=10,
                   message="five WATCHDOG=1 intervals")
        gaps = _watchdog_cadence(receiver, since)
        # Half of WATCHDOG_USEC (0.2 s), never as late as the whole of it.
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
        assert sum(gaps) / len(gaps) > 0.15, gaps
        _stopping_then_exit(receiver, proc)
    finally:
        _stop(proc)
        receiver.close()


def test_agent_notifies_and_its_watchdog_stops_while_it_is_frozen(
    short_dir: Path, tmp_path: Path,
) -> None:
    c_receiver = NotifySocket(str(short_dir / "coordinator"))
    a_receiver = NotifySocket(str(short_dir / "agent"))
    (tmp_path / "c.toml").write_text(FAST)
    c_port = free_port()
    host = "127.0.7.1"
    a_port = free_port(host)
    coordinator = _spawn(["coordinator", "--listen", f"127.0.0.1:{c_port}", "--config",
                          str(tmp_path / "c.toml")], tmp_path, short_dir / "coordinator",
                         tmp_path / "coordinator.log")
    agent: subprocess.Popen[bytes] | None = None
    try:
        _ready_once_serving(c_receiver, coordinator, "127.0.0.1", c_port,
                            tmp_path / "coordinator.log")
        log = tmp_path / "agent.log"
        agent = _spawn(["agent", "--node-id", "web-1", "--listen", f"{host}:{a_port}",
                        "--state-dir", str(tmp_path / "state"), "--config",
                        str(tmp_path / "c.toml"), "--coordinator", f"http://127.0.0.1:{c_port}"],
                       tmp_path, short_dir / "agent", log)
        ready = _ready_once_serving(a_receiver, agent, host, a_port, log)
        assert ready["STATUS"].startswith("node web-1 ok"), ready
        wait_until(lambda: any("registered (new)" in m["STATUS"]
                               for _, m in a_receiver.with_key("STATUS")),
                   timeout=10, message="the agent's STATUS says it registered")
        # The coordinator's STATUS follows its fleet.
        wait_until(lambda: any(m["STATUS"].startswith("watching 1 nodes: 1 healthy")
                               for _, m in c_receiver.with_key("STATUS")),
                   timeout=10, message="the coordinator's STATUS counts the healthy node")
        # A frozen process sends no WATCHDOG=1 (systemd would kill and restart it)...
        agent.send_signal(signal.SIGSTOP)
        time.sleep(0.1)  # a datagram sent just before the stop may still be in flight
        frozen = time.monotonic()
        time.sleep(1.0)  # five watchdog periods
        assert not [t for t, _ in a_receiver.with_key("WATCHDOG", "1") if t > frozen]
        # ... and sends them again once it runs.
        agent.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: len(_watchdog_cadence(a_receiver, resumed)) >= 2, timeout=5,
                   message="WATCHDOG=1 again after SIGCONT")
        _stopping_then_exit(a_receiver, agent)
        _stopping_then_exit(c_receiver, coordinator)
    finally:
        if agent is not None:
            _stop(agent)
        _stop(coordinator)
        a_receiver.close()
        c_receiver.close()
