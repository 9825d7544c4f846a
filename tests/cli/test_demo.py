"""``nodewatch demo`` as a user runs it: real processes, commands on stdin (no TTY), and no
process left behind however it stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.demo import Demo, DemoError, Traffic
from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, interruptible, wait_until

pytestmark = pytest.mark.slow


def processes_under(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path``: the demo's coordinator and agents."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline and " demo " not in cmdline:
            found.append(int(entry.name))
    return found


class DemoProcess:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir / "demo"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.out = workdir / "demo.out"
        with self.out.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nodewatch", "demo", "--nodes", "3", "--listen",
                 self.url.removeprefix("http://"), "--dir", str(self.workdir), *args],
                stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                preexec_fn=interruptible)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def nodes(self) -> dict[str, dict[str, Any]]:
        try:
            status, body = http_json(f"{self.url}/v1/nodes", timeout=1)
        except OSError:
            return {}
        return {n["node_id"]: n for n in body["nodes"]} if status == 200 else {}

    def health(self, node_id: str) -> str:
        return str(self.nodes().get(node_id, {}).get("health", "?"))


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoProcess]:
    running = DemoProcess(tmp_path, "--duration", "2m")
    try:
        wait_until(lambda: len(running.nodes()) == 3 and all(
            n["health"] == "healthy" for n in running.nodes().values()),
            timeout=30, message="three healthy demo nodes")
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.send_signal(signal.SIGINT)
            running.proc.wait(20)


def test_demo_prints_the_dashboard_url_and_detects_kill_and_recovery(
    demo: DemoProcess,
) -> None:
    assert f"{demo.url}/" in demo.output()
    demo.send("kill web-2")
    wait_until(lambda: demo.health("web-2") == "unhealthy", timeout=10,
               message="killed web-2 confirmed unhealthy")
    demo.send("restart web-2")
    wait_until(lambda: demo.health("web-2") == "healthy", timeout=15,
               message="restarted web-2 healthy again")
    demo.send("hang web-3")
    wait_until(lambda: demo.health("web-3") == "unhealthy", timeout=10,
               message="hung web-3 unhealthy")
    demo.send("resume web-3")
    wait_until(lambda: demo.health("web-3") == "healthy", timeout=10,
               message="resumed web-3 healthy")
    demo.send("degrade web-1 disk full")
    wait_until(lambda: demo.nodes()["web-1"]["node_status"] == "degraded", timeout=10,
               message="web-1 degraded")
    demo.send("load web-1 500")
    wait_until(lambda: demo.nodes()["web-1"]["load"].get("qps", 0) > 300, timeout=10,
               message="web-1 under load")
    demo.send("frobnicate web-1")
    wait_until(lambda: "unknown command 'frobnicate'" in demo.output(), timeout=5,
               message="a clear message for a typo")
    # The live timeline in the terminal shows the story.
    for kind in ("suspect", "unhealthy", "recovered", "degraded"):
        assert kind in demo.output()
    pids = processes_under(demo.workdir)
    assert len(pids) == 4, pids  # coordinator + 3 agents
    demo.send("quit")
    assert demo.proc.wait(20) == 0
    assert processes_under(demo.workdir) == []
    assert "Traceback" not in demo.output()


def test_ctrl_c_stops_everything(demo: DemoProcess) -> None:
    assert len(processes_under(demo.workdir)) == 4
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(20) == 0
    assert processes_under(demo.workdir) == []
    assert "Traceback" not in demo.output()


def test_duration_without_a_tty_ends_by_itself(tmp_path: Path) -> None:
    running = DemoProcess(tmp_path, "--duration", "3s")
    assert running.proc.stdin is not None
    running.proc.stdin.close()  # no TTY and no input: it runs until --duration
    assert running.proc.wait(40) == 0
    assert "--duration reached" in running.output()
    assert processes_under(running.workdir) == []


def child_logs(workdir: Path) -> dict[str, list[str]]:
    return {log.name: [line for line in log.read_text().splitlines() if line.strip()]
            for log in [workdir / "coordinator.log", *sorted(workdir.glob("agent-*.log"))]}


@pytest.mark.parametrize(("args", "env"), [(("--log-format", "json"), {}),
                                           ((), {"NODEWATCH_LOG_FORMAT": "json"})],
                         ids=["flag", "environment"])
def test_log_format_reaches_the_coordinator_and_every_agent(
        tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    import json

    running = DemoProcess(tmp_path, "--duration", "3s", *args, env=env)
    assert running.proc.stdin is not None
    running.proc.stdin.close()
    assert running.proc.wait(40) == 0, running.output()
    logs = child_logs(running.workdir)
    assert len(logs) == 4 and all(logs.values()), logs
    for name, lines in logs.items():
        for line in lines:  # one JSON object a line, from every child
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(record), (name, line)


def test_a_wrong_log_format_in_the_environment_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nodewatch", "demo", "--listen", f"127.0.0.1:{free_port()}",
         "--dir", str(tmp_path / "d"), "--duration", "1s"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, "NODEWATCH_LOG_FORMAT": "xml"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "NODEWATCH_LOG_FORMAT" in result.stderr and "'xml'" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "nodewatch", "demo", "--listen", f"127.0.0.1:{port}",
             "--dir", str(tmp_path / "d"), "--duration", "1s"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "in use" in result.stderr


def test_demo_refuses_to_wipe_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    from nodewatch.cli.demo import _prepare_workdir

    with pytest.raises(DemoError, match="not a demo directory"):
        _prepare_workdir(precious)
    assert (precious / "keep.txt").exists()


def test_commands_validate_their_arguments(tmp_path: Path) -> None:
    from rich.console import Console

    demo = Demo(LocalCluster(workdir=tmp_path), Console(quiet=True))
    for line, words in (("kill", "usage: kill NODE"), ("kill web-9", "no demo node"),
                        ("load web-1", "usage: load NODE QPS"), ('hang "web-1', "quotation")):
        with pytest.raises(DemoError, match=words):
            demo.run(line)
    assert "kill NODE" in demo.run("help")


def test_traffic_follows_the_level_set_by_load() -> None:
    traffic = Traffic(base={"web-1": 100.0})
    samples = [traffic.sample("web-1", t)["qps"] for t in range(0, 200, 7)]
    assert 60 <= min(samples) and max(samples) <= 130
    assert traffic.sample("web-2", 0)["qps"] < 30  # the default level
