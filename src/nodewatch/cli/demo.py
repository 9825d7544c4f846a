"""``nodewatch demo``: a coordinator and N agents as real local processes, to try things live.

A newcomer runs one command, opens the dashboard, and breaks nodes on purpose (kill, hang,
degrade, load) from a prompt or from commands piped on stdin. The fast detection profile
makes each change visible within seconds; every child dies with the demo (PR_SET_PDEATHSIG
via :class:`~nodewatch.cli.processes.LocalCluster`), whether it stops by Ctrl-C, ``quit``,
``--duration`` or a crash.
"""

from __future__ import annotations

import math
import queue
import random
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.markup import escape

from nodewatch.cli.client import Client, ClientError
from nodewatch.cli.processes import LocalCluster, Proc, http_json
from nodewatch.errors import ConfigError
from nodewatch.logs import resolve_format
from nodewatch.protocol import split_host_port

__all__ = ["Demo", "DemoError", "FAST_PROFILE", "HELP", "MARKER", "Traffic", "run_demo"]

#: About 1 s while healthy, 250 ms while failing: a kill is confirmed in about 2 s.
FAST_PROFILE = """\
[coordinator]
store = "sqlite:///{store}"

[detection]
healthy_interval = "1s"
unhealthy_interval = "250ms"
timeout = "500ms"
connect_timeout = "250ms"
fall = 3
rise = 2
startup_grace = "2s"
dead_after = "10m"

[budget]
drain_deadline = "30s"

[agent]
sample_interval = "1s"
"""

MARKER = ".nodewatch-demo"
HELP = """\
commands (NODE is e.g. web-2):
  kill NODE          SIGKILL the agent: confirmed unhealthy after fall failed checks
  hang NODE          SIGSTOP the agent: checks time out (resume NODE sends SIGCONT)
  resume NODE        SIGCONT a hung agent: healthy again after rise good checks
  restart NODE       start a killed agent again (same state dir: it rejoins)
  degrade NODE [WHY] the node reports itself degraded (ok NODE clears it)
  ok NODE            clear a self-reported degraded status
  load NODE QPS      set the node's business load (qps; pending tasks follow)
  drain NODE | undrain NODE | approve NODE   operator commands via the coordinator
  status             the node table;  help;  quit"""


class DemoError(Exception):
    """The demo cannot start; the message says why in one line."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _agent_port(host: str, preferred: int = 7301) -> int:
    if _port_free(host, preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _prepare_workdir(workdir: Path) -> None:
    """Start from a clean slate, but only ever delete a directory the demo itself created."""
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise DemoError(f"{workdir} exists and is not a demo directory; choose --dir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("state of `nodewatch demo`; deleted on the next run\n")


@dataclass
class Traffic:
    """Synthetic business load per node so the qps charts move; ``load`` sets the level."""

    base: dict[str, float] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)

    def sample(self, node_id: str, now: float) -> dict[str, float]:
        level = self.base.get(node_id, 20.0)
        phase = (hash(node_id) % 100) / 10.0
        qps = max(0.0, level * (1 + 0.25 * math.sin(now / 20.0 + phase))
                  + random.uniform(-1, 1))
        return {"qps": round(qps, 1), "pending_tasks": float(int(qps // 10)),
                "error_rate": 0.001}


class Demo:
    """The running demo: the cluster, the synthetic traffic, and the commands a user types."""

    def __init__(self, cluster: LocalCluster, console: Console) -> None:
        self.cluster = cluster
        self.console = console
        self.traffic = Traffic()
        self.client = Client(cluster.url, token=cluster.env.get("NODEWATCH_ADMIN_TOKEN", ""))
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, count: int) -> None:
        self.cluster.start_coordinator()
        for i in range(1, count + 1):
            host = f"127.0.1.{i}"
            self.cluster.start_agent(f"web-{i}", f"{host}:{_agent_port(host)}")
        for target in (self._traffic_loop, self._event_loop):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stop_event.set()
        self.cluster.stop()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def _traffic_loop(self) -> None:
        while not self.stop_event.wait(1.0):
            now = time.time()
            for node_id, proc in list(self.cluster.agents.items()):
                if not proc.alive() or node_id in self.traffic.paused:
                    continue
                try:
                    http_json(f"http://{proc.address}/metrics/load", "PUT",
                              self.traffic.sample(node_id, now), timeout=0.5)
                except (OSError, ValueError):
                    pass  # the agent is being killed or restarted; the next tick retries

    def _event_loop(self) -> None:
        """Print every event as the coordinator emits it: the terminal's live timeline."""
        from nodewatch.cli.render import event_line

        try:
            for event in Client(self.cluster.url).stream_events():
                if self.stop_event.is_set():
                    return
                self.console.print(event_line(event))
        except ClientError:
            return  # the coordinator stopped: the demo is ending

    # ------------------------------------------------------------------ commands

    def _agent(self, node_id: str) -> Proc:
        proc = self.cluster.agents.get(node_id)
        if proc is None:
            known = ", ".join(sorted(self.cluster.agents))
            raise DemoError(f"no demo node {node_id!r} (nodes: {known})")
        return proc

    def run(self, line: str) -> str:
        """Execute one typed command; returns what to print. Raises DemoError on misuse."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        if not words:
            return ""
        verb, args = words[0].lower(), words[1:]
        handler = self._handlers().get(verb)
        if handler is None:
            raise DemoError(f"unknown command {verb!r}; type help")
        return handler(args)

    def _handlers(self) -> dict[str, Callable[[list[str]], str]]:
        return {"help": lambda _: HELP, "?": lambda _: HELP, "status": self._status,
                "kill": self._kill, "hang": self._hang, "resume": self._resume,
                "restart": self._restart, "degrade": self._degrade, "ok": self._ok,
                "load": self._load, "drain": self._admin("drain"),
                "undrain": self._admin("undrain"), "approve": self._admin("approve")}

    @staticmethod
    def _one(args: list[str], usage: str) -> str:
        if len(args) != 1:
            raise DemoError(f"usage: {usage}")
        return args[0]

    def _status(self, args: list[str]) -> str:
        from nodewatch.cli.render import nodes_table, summary_line

        nodes = self.client.nodes()
        self.console.print(nodes_table(nodes, time.time()))
        return summary_line(nodes)

    def _kill(self, args: list[str]) -> str:
        node_id = self._one(args, "kill NODE")
        proc = self._agent(node_id)
        if not proc.alive():
            return f"{node_id} is not running (restart {node_id})"
        proc.signal(signal.SIGKILL)
        assert proc.popen is not None
        proc.popen.wait(5)
        return f"killed {node_id} (pid {proc.pid}); watch it go suspect, then unhealthy"

    def _hang(self, args: list[str]) -> str:
        node_id = self._one(args, "hang NODE")
        self._agent(node_id).signal(signal.SIGSTOP)
        self.traffic.paused.add(node_id)
        return f"stopped {node_id} with SIGSTOP; its checks will time out (resume {node_id})"

    def _resume(self, args: list[str]) -> str:
        node_id = self._one(args, "resume NODE")
        self._agent(node_id).signal(signal.SIGCONT)
        self.traffic.paused.discard(node_id)
        return f"resumed {node_id}; it returns to healthy after rise good checks"

    def _restart(self, args: list[str]) -> str:
        node_id = self._one(args, "restart NODE")
        proc = self._agent(node_id)
        proc.stop()
        self.traffic.paused.discard(node_id)
        self.cluster.start_agent(node_id, proc.address)
        return f"restarted {node_id} on {proc.address}; it registers again (rejoin)"

    def _put_health(self, node_id: str, body: dict[str, str]) -> None:
        proc = self._agent(node_id)
        try:
            status, reply = http_json(f"http://{proc.address}/health", "PUT", body, timeout=1.0)
        except (OSError, ValueError):
            raise DemoError(f"{node_id} does not answer (is it killed or hung?)") from None
        if status != 200:
            raise DemoError(f"{node_id} refused: {reply}")

    def _degrade(self, args: list[str]) -> str:
        if not args:
            raise DemoError("usage: degrade NODE [REASON]")
        reason = " ".join(args[1:]) or "demo: degraded by hand"
        self._put_health(args[0], {"status": "degraded", "reason": reason})
        return f"{args[0]} now reports degraded: no new work, still healthy"

    def _ok(self, args: list[str]) -> str:
        node_id = self._one(args, "ok NODE")
        self._put_health(node_id, {"status": "ok"})
        return f"{node_id} reports ok again"

    def _load(self, args: list[str]) -> str:
        if len(args) != 2:
            raise DemoError("usage: load NODE QPS")
        node_id = args[0]
        self._agent(node_id)
        try:
            qps = float(args[1])
        except ValueError:
            raise DemoError(f"QPS must be a number, got {args[1]!r}") from None
        if not 0 <= qps <= 1e6:
            raise DemoError("QPS must be between 0 and 1000000")
        self.traffic.base[node_id] = qps
        return f"{node_id} load set to about {qps:g} qps; `nodewatch status` sorts by it"

    def _admin(self, name: str) -> Callable[[list[str]], str]:
        def command(args: list[str]) -> str:
            node_id = self._one(args, f"{name} NODE")
            node = self.client.command(name, node_id, "demo").node
            if node is None:
                return f"{node_id}: the coordinator did not say"
            return (f"{node_id}: admin {node.admin}, schedulable "
                    f"{'yes' if node.schedulable else 'no'}")

        return command


def _stdin_reader(lines: queue.Queue[str | None]) -> None:
    """Feed stdin lines to the main thread; None marks end of input (no TTY, or Ctrl-D)."""
    try:
        for line in sys.stdin:
            lines.put(line)
    except (OSError, ValueError):
        pass
    lines.put(None)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(count: int, listen: str, workdir: Path, duration: float | None,
             console: Console | None = None, log_format: str | None = None) -> int:
    """Run until ``quit``, Ctrl-C, SIGTERM or ``duration``; returns the exit status. The
    coordinator and agents get ``--log-format log_format`` (without it they inherit
    ``NODEWATCH_LOG_FORMAT``, else log text)."""
    from nodewatch.cli.render import make_console

    console = console or make_console()
    try:  # a wrong NODEWATCH_LOG_FORMAT is one line here, not a child that died at start
        resolve_format(log_format)
    except ConfigError as exc:
        raise DemoError(str(exc)) from None
    try:
        host, port = split_host_port(listen)
    except ValueError:
        host, port = "", 0
    if not host.startswith("127."):
        raise DemoError(f"--listen must be a loopback HOST:PORT such as 127.0.0.1:7300, "
                        f"got {listen!r}")
    if not _port_free(host, port):
        raise DemoError(f"{listen} is in use (another coordinator or demo?); use --listen")
    workdir = workdir.resolve()
    _prepare_workdir(workdir)
    cluster = LocalCluster(workdir=workdir, coordinator_listen=listen,
                           config_text=FAST_PROFILE.format(store=workdir / "state.db"),
                           log_format=log_format)
    demo = Demo(cluster, console)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        console.print(f"[bold]nodewatch demo[/]: starting a coordinator and {count} agents "
                      f"(state and logs in {escape(str(workdir))})")
        try:
            demo.start(count)
        except RuntimeError as exc:
            raise DemoError(str(exc).splitlines()[0]) from None
        console.print(f"\n  dashboard  [bold cyan]http://{listen}/[/]\n"
                      f"  CLI        nodewatch status --coordinator http://{listen}\n")
        console.print(HELP, markup=False)
        console.print("[dim]Ctrl-C stops everything.[/]\n")
        _interact(demo, console, duration)
    except KeyboardInterrupt:
        console.print("\n[dim]interrupted[/]")
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.stop()
        console.print("nodewatch demo: stopped the coordinator and every agent")
    return 0


def _interact(demo: Demo, console: Console, duration: float | None) -> None:
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_stdin_reader, args=(lines,), daemon=True).start()
    interactive = sys.stdin.isatty()
    deadline = time.monotonic() + duration if duration is not None else math.inf
    stdin_open = prompt = True
    while time.monotonic() < deadline:
        if interactive and stdin_open and prompt:
            console.print("[bold]demo>[/] ", end="")
            prompt = False
        try:
            line = lines.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            continue
        prompt = True
        if line is None:
            stdin_open = False
            if duration is None and interactive:
                return  # Ctrl-D at the prompt
            continue  # no TTY: run until --duration or a signal
        if line.strip().lower() in {"quit", "exit", "q"}:
            return
        try:
            message = demo.run(line)
        except (DemoError, ClientError) as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            continue
        if message:
            console.print(escape(message))
    console.print("[dim]--duration reached[/]")
