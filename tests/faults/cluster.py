"""A coordinator, agents and store servers, each process on its own test host (namespace).

The harness talks to them over the bridge from the root namespace; every wait is on a
condition with a bound (``tests.helpers.wait_until``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodewatch.cli.processes import Proc, http_json, reachable
from tests.faults.netns import Host, Network

__all__ = ["ADMIN", "AGENT_PORT", "COORD_PORT", "FAST", "FaultCluster", "action_lines",
           "etcd_leader", "start_etcd", "start_redis"]

COORD_PORT = 7300
AGENT_PORT = 7301
ADMIN = "fault-admin-token"

#: The demo's fast profile: checks every 1 s while healthy, 250 ms while failing, fall 3.
FAST = """
[coordinator]
admin_token = "{admin}"
{coordinator}

[detection]
healthy_interval = "1s"
unhealthy_interval = "250ms"
timeout = "500ms"
connect_timeout = "250ms"
fall = 3
rise = 2
startup_grace = "2s"
dead_after = "10m"
{detection}

[budget]
max_fraction = 1.0
max_rate = 100

[agent]
sample_interval = "1s"
{agent}

[[actions]]
type = "exec"
on = ["unhealthy"]
command = ["sh", "-c", "echo {{node_id}} {{event}} {{event_id}} >> {actions}"]
timeout = "5s"
"""


def config(actions: Path, *, coordinator: str = "", detection: str = "", agent: str = "") -> str:
    return FAST.format(admin=ADMIN, coordinator=coordinator, detection=detection, agent=agent,
                       actions=actions)


def action_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@dataclass
class FaultCluster:
    net: Network
    workdir: Path
    config_text: str
    coordinators: dict[str, tuple[Host, Proc]] = field(default_factory=dict)
    agents: dict[str, tuple[Host, Proc]] = field(default_factory=dict)
    python: str = sys.executable

    def config_path(self) -> Path:
        path = self.workdir / "nodewatch.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_text)
        return path

    # -- processes -----------------------------------------------------------------------

    def start_coordinator(self, host: Host, *extra: str, name: str = "coordinator",
                          cpu: int | None = None, wait: float = 30.0) -> Proc:
        argv = [self.python, "-m", "nodewatch", "coordinator", "--listen",
                f"{host.ip}:{COORD_PORT}", "--config", str(self.config_path()), *extra]
        proc = host.spawn(name, argv, self.workdir / f"{name}.log", cpu=cpu, cwd=self.workdir)
        self.coordinators[name] = (host, proc)
        self._wait_up(proc, f"http://{host.ip}:{COORD_PORT}/healthz", wait)
        return proc

    def start_agent(self, node_id: str, host: Host, *extra: str, coordinator: str = "coordinator",
                    env: dict[str, str] | None = None, wait: float = 30.0) -> Proc:
        argv = [self.python, "-m", "nodewatch", "agent", "--node-id", node_id, "--listen",
                f"{host.ip}:{AGENT_PORT}", "--state-dir", str(self.workdir / "agents" / node_id),
                "--config", str(self.config_path())]
        if coordinator:
            argv += ["--coordinator", self.url(coordinator)]
        argv += list(extra)
        proc = host.spawn(node_id, argv, self.workdir / f"agent-{node_id}.log", env=env,
                          cwd=self.workdir)
        self.agents[node_id] = (host, proc)
        self._wait_up(proc, f"http://{host.ip}:{AGENT_PORT}/health", wait)
        return proc

    def restart_agent(self, node_id: str, *extra: str, **kwargs: Any) -> Proc:
        host, _ = self.agents[node_id]
        return self.start_agent(node_id, host, *extra, **kwargs)

    @staticmethod
    def _wait_up(proc: Proc, url: str, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not reachable(url):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not up after {wait}s:\n{proc.log()[-3000:]}")
            time.sleep(0.05)

    def agent(self, node_id: str) -> Proc:
        return self.agents[node_id][1]

    def coordinator(self, name: str = "coordinator") -> Proc:
        return self.coordinators[name][1]

    # -- API -----------------------------------------------------------------------------

    def url(self, name: str = "coordinator") -> str:
        return f"http://{self.coordinators[name][0].ip}:{COORD_PORT}"

    def get(self, path: str, name: str = "coordinator", timeout: float = 3.0) -> Any:
        try:
            status, body = http_json(f"{self.url(name)}{path}", timeout=timeout)
        except (OSError, ValueError):
            return None
        return body if status == 200 else None

    def command(self, path: str, body: dict[str, Any] | None = None,
                name: str = "coordinator", timeout: float = 15.0) -> tuple[int, Any]:
        """An admin command; (0, error text) when no answer came within ``timeout``."""
        try:
            return http_json(f"{self.url(name)}{path}", "POST", body or {}, timeout=timeout,
                             token=ADMIN)
        except (OSError, ValueError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    def nodes(self, name: str = "coordinator") -> list[dict[str, Any]]:
        body = self.get("/v1/nodes", name)
        return list(body["nodes"]) if isinstance(body, dict) else []

    def node(self, node_id: str, name: str = "coordinator") -> dict[str, Any]:
        body = self.get(f"/v1/nodes/{node_id}", name)
        return body if isinstance(body, dict) else {}

    def health(self, node_id: str, name: str = "coordinator") -> str:
        return str(self.node(node_id, name).get("health", "?"))

    def events(self, name: str = "coordinator", after: str | None = None) -> list[dict[str, Any]]:
        """The coordinator's events (up to 10,000), after ``after`` if given."""
        query = "?limit=10000" + (f"&after={after}" if after else "")
        body = self.get(f"/v1/events{query}", name)
        return list(body["events"]) if isinstance(body, dict) else []

    def last_event_id(self, name: str = "coordinator") -> str | None:
        events = self.events(name)
        return str(events[-1]["id"]) if events else None

    def healthz(self, name: str = "coordinator") -> dict[str, Any]:
        try:
            _, body = http_json(f"{self.url(name)}/healthz", timeout=3.0)
        except (OSError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def all_healthy(self, count: int, name: str = "coordinator") -> bool:
        nodes = self.nodes(name)
        return len(nodes) == count and all(n["health"] == "healthy" for n in nodes)


def start_redis(host: Host, workdir: Path, port: int = 6379) -> tuple[Proc, str]:
    """redis-server on ``host`` with an fsync-always append-only file: a kill -9 loses no
    acknowledged write (what "nothing acknowledged lost" can ask of Redis at all)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", host.ip, "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(workdir), "--protected-mode", "no"]
    proc = host.spawn(f"redis-{host.name}", argv, workdir / "redis.log")
    _wait_port(proc, host, port)
    return proc, f"redis://{host.ip}:{port}/0"


def start_etcd(hosts: list[Host], workdir: Path, *, existing: bool = False,
               only: Host | None = None) -> tuple[dict[str, Proc], str]:
    """One etcd member per host (client 2379, peer 2380); returns members and store URL."""
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    initial = ",".join(f"{h.name}=http://{h.ip}:2380" for h in hosts)
    procs: dict[str, Proc] = {}
    for h in hosts:
        if only is not None and h is not only:
            continue
        data = workdir / f"{h.name}.etcd"
        argv = [binary, "--name", h.name, "--data-dir", str(data),
                "--listen-client-urls", f"http://{h.ip}:2379",
                "--advertise-client-urls", f"http://{h.ip}:2379",
                "--listen-peer-urls", f"http://{h.ip}:2380",
                "--initial-advertise-peer-urls", f"http://{h.ip}:2380",
                "--initial-cluster", initial,
                "--initial-cluster-state", "existing" if existing else "new",
                "--initial-cluster-token", f"nwf-{workdir.name}",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--logger", "zap", "--log-level", "warn"]
        procs[h.name] = h.spawn(f"etcd-{h.name}", argv, workdir / f"{h.name}.log")
    for h in hosts:
        if h.name in procs:
            _wait_port(procs[h.name], h, 2379)
    url = "etcd://" + ",".join(f"{h.ip}:2379" for h in hosts) + "/nodewatch"
    return procs, url


def etcd_leader(hosts: list[Host]) -> Host | None:
    """The member that leads raft now, asked of every member over the bridge."""
    etcdctl = shutil.which("etcdctl") or "/usr/bin/etcdctl"
    endpoints = ",".join(f"{h.ip}:2379" for h in hosts)
    done = subprocess.run([etcdctl, "--endpoints", endpoints, "--command-timeout", "1s",
                           "endpoint", "status", "-w", "json"], capture_output=True, text=True,
                          env={"ETCDCTL_API": "3"}, check=False, timeout=10)
    try:
        status = json.loads(done.stdout)
    except ValueError:
        return None
    for entry in status:
        header = entry["Status"]["header"]
        if entry["Status"]["leader"] == header["member_id"]:
            return next((h for h in hosts if h.ip in entry["Endpoint"]), None)
    return None


def _wait_port(proc: Proc, host: Host, port: int, wait: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host.ip, port), timeout=0.3):
                return
        except OSError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not start:\n{proc.log()[-2000:]}")
        time.sleep(0.05)
