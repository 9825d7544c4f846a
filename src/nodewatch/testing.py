"""Public test helpers: a fake clock and a scripted probe, used by our tests and by users'."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodewatch.detect.types import CheckResult, FailureClass

if TYPE_CHECKING:
    from aiohttp import web

    from nodewatch.collect.agent import Agent
    from nodewatch.coordinator import Coordinator


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
    """A probe that answers from a script per node: True (ok) or a FailureClass."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.script: dict[str, deque[bool | FailureClass]] = defaultdict(deque)
        self.default: dict[str, bool | FailureClass] = {}
        self.calls: list[str] = []

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
        from nodewatch.coordinator import Coordinator
        from nodewatch.store.base import open_store

        self.workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port("127.0.0.1")
        cfg = load_config(None, {"coordinator.store": f"sqlite:///{self.workdir}/state.db",
                                 "coordinator.listen": f"127.0.0.1:{port}", **self.overrides})
        self.coordinator = Coordinator(cfg, open_store(cfg.coordinator.store))
        await self.coordinator.start()
        self._runner = aioweb.AppRunner(build_app(self.coordinator), access_log=None)
        await self._runner.setup()
        await aioweb.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        for i in range(1, self.size + 1):
            host = f"127.0.{self.subnet}.{i}"
            agent = Agent(node_id=f"node-{i}", listen=f"{host}:{_free_port(host)}",
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


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
