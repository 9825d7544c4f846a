"""Fixtures for agent tests: a scripted sampler and in-process agents on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nodewatch.collect.agent import Agent
from nodewatch.collect.sampler import SystemSample
from nodewatch.testing import FakeClock
from tests.helpers import free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


class FakeSampler:
    """Answers whatever the test last set; counts how often it was asked."""

    def __init__(self) -> None:
        self.next = SystemSample(cpu_percent=10.0, mem_percent=40.0, load1=0.5, connections=7)
        self.calls = 0

    def prime(self) -> None:
        pass

    def set(self, **values: float) -> None:
        current = self.next.as_dict() | values
        self.next = SystemSample(float(current["cpu_percent"]), float(current["mem_percent"]),
                                 float(current["load1"]), int(current["connections"]))

    async def sample(self) -> SystemSample:
        self.calls += 1
        return self.next


@pytest.fixture
def sampler() -> FakeSampler:
    return FakeSampler()


AgentFactory = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def make_agent(tmp_path: Path, sampler: FakeSampler,
                     clock: FakeClock) -> AsyncIterator[AgentFactory]:
    """Start agents on 127.0.0.1 and a free port, with a fake sampler and clock by default;
    every agent is stopped at the end of the test."""
    started: list[Agent] = []

    async def factory(**kwargs: Any) -> Agent:
        kwargs.setdefault("node_id", "node-a")
        kwargs.setdefault("listen", f"127.0.0.1:{free_port()}")
        kwargs.setdefault("state_dir", tmp_path / "state")
        kwargs.setdefault("sampler", sampler)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("run_sampler", False)
        agent = Agent(**kwargs)
        await agent.start()
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        await agent.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
