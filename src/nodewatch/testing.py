"""Public test helpers, used by our tests and by users': a fake clock and a scripted probe for
the pure core, an in-process cluster, throwaway etcd (one member or a cluster), redis-server
and haproxy processes on loopback, application backends with a settable error rate and a
bounded load loop to send through a load balancer, and free ports.

The servers keep their data in a given directory; every process is stopped (SIGTERM, then
SIGKILL) by ``stop()`` or the context manager."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nodewatch.model import CheckResult, FailureClass, PeerVote

if TYPE_CHECKING:
    from aiohttp import web

    from nodewatch.collect.agent import Agent
    from nodewatch.coordinator.service import Coordinator


__all__ = ["ErrorBackends", "EtcdCluster", "EtcdMember", "FakeClock", "FakeProbe",
           "HaproxyServer", "InProcessCluster", "LoadLoop", "RedisServer", "find_binary",
           "free_port", "port_open"]

class FakeClock:
    """A clock that only moves when told to; pass ``clock`` wherever a time source is taken."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds
        return self.now


class FakeProbe:
    """A probe that answers from a script per node: True (ok) or a FailureClass; and peer
    probes from a script per (peer, target address): the peer's ``reachable`` (True, False,
    or None for a peer the coordinator cannot reach, which is what an unscripted peer is)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.script: dict[str, deque[bool | FailureClass]] = defaultdict(deque)
        self.default: dict[str, bool | FailureClass] = {}
        self.calls: list[str] = []
        self.votes: dict[tuple[str, str], bool | None] = {}
        self.peer_calls: list[tuple[str, str]] = []

    def set(self, node_id: str, outcome: bool | FailureClass) -> None:
        self.default[node_id] = outcome

    def queue(self, node_id: str, outcomes: Iterable[bool | FailureClass]) -> None:
        self.script[node_id].extend(outcomes)

    async def check(self, node_id: str, address: str) -> CheckResult:
        self.calls.append(node_id)
        queued = self.script[node_id]
        outcome = queued.popleft() if queued else self.default.get(node_id, True)
        if outcome is True:
            return CheckResult(node_id=node_id, ok=True, at=self.clock())
        failure = outcome if isinstance(outcome, FailureClass) else FailureClass.ERROR
        return CheckResult(node_id=node_id, ok=False, at=self.clock(), failure=failure,
                           detail=f"scripted {failure.value}")

    def set_peer_vote(self, peer_id: str, target_address: str, reachable: bool | None) -> None:
        """What ``peer_id`` answers when asked to probe ``target_address`` (until changed)."""
        self.votes[(peer_id, target_address)] = reachable

    async def peer_check(self, peer_id: str, peer_address: str,
                         target_address: str) -> PeerVote | None:
        self.peer_calls.append((peer_id, target_address))
        key = (peer_id, target_address)
        if key not in self.votes:
            return PeerVote(peer_id=peer_id, reachable=None, detail="peer unreachable: unscripted")
        reachable = self.votes[key]
        detail = "" if reachable else ("scripted refused" if reachable is False
                                       else "peer unreachable: scripted")
        return PeerVote(peer_id=peer_id, reachable=reachable, detail=detail)


class InProcessCluster:
    """A real coordinator and real agents in the running event loop, on loopback addresses.

    For tests (ours and users'): everything speaks real HTTP, nothing forks, and everything is
    stopped on exit. Agents listen on 127.0.<subnet>.<i>; ``overrides`` are dotted config keys,
    applied over a fast detection profile.
    """

    FAST = {
        "detection.healthy_interval": "500ms",
        "detection.unhealthy_interval": "200ms",
        "detection.timeout": "300ms",
        "detection.connect_timeout": "200ms",
        "detection.startup_grace": "0",
    }

    def __init__(self, workdir: str | Path, nodes: int = 3, *, subnet: int = 42,
                 overrides: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.size = nodes
        self.subnet = subnet
        self.overrides = {**self.FAST, **(overrides or {})}
        self.coordinator: Coordinator | None = None
        self.agents: dict[str, Agent] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> InProcessCluster:
        from aiohttp import web as aioweb

        from nodewatch.api.app import build_app
        from nodewatch.collect.agent import Agent
        from nodewatch.config import load_config
        from nodewatch.coordinator.service import Coordinator
        from nodewatch.store.open import open_store

        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port("127.0.0.1")
        cfg = load_config(None, {"coordinator.store": f"sqlite:///{self.workdir}/state.db",
                                 "coordinator.listen": f"127.0.0.1:{port}", **self.overrides})
        self.coordinator = Coordinator(cfg, open_store(cfg.coordinator.store,
                                                            timeout=cfg.coordinator.store_timeout))
        await self.coordinator.start()
        self._runner = aioweb.AppRunner(build_app(self.coordinator), access_log=None)
        await self._runner.setup()
        await aioweb.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        for i in range(1, self.size + 1):
            host = f"127.0.{self.subnet}.{i}"
            agent = Agent(node_id=f"node-{i}", listen=f"{host}:{free_port(host)}",
                          coordinator=self.url, state_dir=self.workdir / f"node-{i}",
                          sample_interval=1.0)
            await agent.start()
            self.agents[agent.node_id] = agent
        return self

    async def __aexit__(self, *exc: object) -> None:
        for agent in self.agents.values():
            await agent.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.coordinator is not None:
            await self.coordinator.stop()

    def health(self, node_id: str) -> str:
        assert self.coordinator is not None
        node = self.coordinator.cluster.nodes.get(node_id)
        return node.health.value if node is not None else "?"

    async def wait_for(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        """Wait on a condition (never a fixed sleep); TimeoutError after ``within`` seconds."""
        async with asyncio.timeout(within):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.02)


_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str) -> str | None:
    """A server binary on PATH or in the sbin directories Debian installs daemons to."""
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in _SBIN if (Path(d) / name).exists()), None)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port on ``host`` that nothing is bound to right now (TCP, or UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(popen: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if popen is None or popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout)


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """kill -9: the member is lost, as a crashed machine would be."""
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback (one cluster), member i on 127.0.0.(i+1) when
    ``spread``. Without a ``workdir`` the members live in a temporary directory that ``stop``
    removes. A start that fails stops every member it started (and removes that directory)
    before it raises."""

    workdir: Path | None = None
    size: int = 1
    spread: bool = False
    binary: str = "etcd"
    members: list[EtcdMember] = field(default_factory=list)
    _own_dir: Path | None = field(default=None, repr=False)

    def url(self, prefix: str = "/nodewatch") -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members) + prefix

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, wait: float = 20.0) -> EtcdCluster:
        try:
            return self._start(wait)
        except BaseException:
            self.stop()
            raise

    def _start(self, wait: float) -> EtcdCluster:
        if self.workdir is None:
            self.workdir = self._own_dir = Path(tempfile.mkdtemp(prefix="nodewatch-etcd-"))
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            host = f"127.0.0.{i + 1}" if self.spread else "127.0.0.1"
            self.members.append(EtcdMember(
                f"m{i}", host, free_port(host), free_port(host), workdir / f"m{i}.etcd",
                workdir / f"m{i}.log"))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            argv = [self.binary, "--name", m.name, "--data-dir", str(m.data_dir),
                    "--listen-client-urls", f"http://{m.endpoint}",
                    "--advertise-client-urls", f"http://{m.endpoint}",
                    "--listen-peer-urls", m.peer_url,
                    "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"nodewatch-{workdir.name}",
                    # Fast elections on loopback: the loss of a member costs about a second.
                    "--heartbeat-interval", "50", "--election-timeout", "500",
                    "--logger", "zap", "--log-level", "warn"]
            with m.log_path.open("ab") as log:
                m.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + wait
        for m in self.members:
            while not port_open(m.host, m.client_port):
                if not m.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} did not start:\n"
                                       f"{m.log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
        self._wait_leader(deadline)
        return self

    def _wait_leader(self, deadline: float) -> None:
        """A cluster answers writes only once it elected a raft leader."""
        etcdctl = find_binary("etcdctl")
        if etcdctl is None:
            return
        endpoints = ",".join(m.endpoint for m in self.members if m.alive())
        while True:
            done = subprocess.run(
                [etcdctl, "--endpoints", endpoints, "--command-timeout", "1s",
                 "put", "/nodewatch-probe", "1"],
                capture_output=True, env={"ETCDCTL_API": "3"}, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster has no leader: {done.stderr.decode()[-500:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for m in self.members:
            _stop(m.popen)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1 without persistence (``--save '' --appendonly no``)."""

    workdir: Path
    binary: str = "redis-server"
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, prefix: str = "") -> str:
        query = f"?prefix={prefix}" if prefix else ""
        return f"redis://127.0.0.1:{self.port}/{db}{query}"

    def start(self, wait: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"]
        log_path = self.workdir / "redis.log"
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + wait
        while not port_open("127.0.0.1", self.port):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            _stop(self.popen)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# srv_admin_state bits in `show servers state`: forced maintenance, forced drain.
_ADMIN_FMAINT = 0x01
_ADMIN_FDRAIN = 0x08


@dataclass
class HaproxyServer:
    """One haproxy in the foreground: an admin socket, an HTTP frontend on 127.0.0.1 and one
    backend whose servers are named as given (name -> HOST:PORT), round robin, no checks."""

    workdir: Path
    servers: dict[str, str]
    backend: str = "be"
    binary: str = "haproxy"
    frontend_port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "admin.sock"

    @property
    def url(self) -> str:
        """The frontend: requests sent here are balanced over the backend's servers."""
        return f"http://127.0.0.1:{self.frontend_port}"

    def start(self, wait: float = 10.0) -> HaproxyServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.frontend_port = self.frontend_port or free_port()
        lines = "\n".join(f"  server {name} {addr}" for name, addr in self.servers.items())
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            f"global\n  stats socket {self.socket} mode 600 level admin\n"
            "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n"
            "  timeout server 5s\n"
            f"frontend fe\n  bind 127.0.0.1:{self.frontend_port}\n"
            f"  default_backend {self.backend}\n"
            f"backend {self.backend}\n{lines}\n")
        log_path = self.workdir / "haproxy.log"
        binary = find_binary(self.binary) or self.binary
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.states():
                    return self
            except OSError:
                pass
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not start:\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def command(self, command: str, timeout: float = 2.0) -> str:
        """One blocking runtime-API command (for tests and benches; the product has its own)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """server name -> READY / DRAIN / MAINT (the admin state bits of show servers state)."""
        states: dict[str, str] = {}
        for line in self.command(f"show servers state {self.backend}").splitlines():
            parts = line.split()
            if len(parts) < 7 or line.startswith("#"):
                continue
            admin = int(parts[6])
            states[parts[3]] = ("MAINT" if admin & _ADMIN_FMAINT
                                else "DRAIN" if admin & _ADMIN_FDRAIN else "READY")
        return states

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            _stop(self.popen)

    def __enter__(self) -> HaproxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ErrorBackends:
    """Application backends on one host (one thread, one event loop): each answers ``GET /``
    with 200, or 500 for a settable fraction of requests (``rates[name]``): the service of a
    node with a gray failure, to put behind a load balancer. ``served`` counts answers."""

    def __init__(self, names: Iterable[str], host: str = "127.0.0.1", seed: int = 1) -> None:
        self.host = host
        self.names = list(names)
        self.rates: dict[str, float] = {name: 0.0 for name in self.names}
        self.addresses: dict[str, str] = {}
        self.served: dict[tuple[str, int], int] = defaultdict(int)
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, wait: float = 10.0) -> ErrorBackends:
        from aiohttp import web as aioweb

        ready = threading.Event()
        ports = {name: free_port(self.host) for name in self.names}

        def handler(name: str) -> Callable[[aioweb.Request], Any]:
            async def answer(request: aioweb.Request) -> aioweb.Response:
                status = 500 if self._rng.random() < self.rates[name] else 200
                self.served[(name, status)] += 1
                return aioweb.Response(status=status, text=name)
            return answer

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runners = []
            for name, port in ports.items():
                app = aioweb.Application()
                app.router.add_get("/", handler(name))
                runner = aioweb.AppRunner(app, access_log=None)
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(aioweb.TCPSite(runner, self.host, port).start())
                runners.append(runner)
            ready.set()
            loop.run_forever()
            for runner in runners:
                loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="error-backends")
        self._thread.start()
        if not ready.wait(wait):
            raise RuntimeError("the backends did not start")
        self.addresses = {name: f"{self.host}:{port}" for name, port in ports.items()}
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> ErrorBackends:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoadLoop:
    """Requests through a load balancer at about ``rate`` a second from ``workers`` threads
    (kept-alive connections), bounded in count and in time; ``statuses`` counts answers
    (0: no answer). Stopped by ``stop()`` or the context manager."""

    def __init__(self, url: str, rate: float, *, workers: int = 4, max_requests: int = 100_000,
                 max_seconds: float = 120.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rate, self.workers = rate, workers
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.statuses: dict[int, int] = defaultdict(int)
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"load-{i}")
                         for i in range(workers)]

    def _work(self) -> None:
        pause = self.workers / self.rate
        deadline = time.monotonic() + self.max_seconds
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.sent >= self.max_requests:
                    break
                self.sent += 1
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
                status = 0
            with self._lock:
                self.statuses[status] += 1
            next_at = max(next_at + pause, time.monotonic() - pause)
            self._stop.wait(max(0.0, next_at - time.monotonic()))  # pacing, not a wait on state
        conn.close()

    def start(self) -> LoadLoop:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> LoadLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
