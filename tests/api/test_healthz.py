"""/healthz tells the truth: ok, degraded or failing with reasons, 503 when failing; the same
in /metrics. The store's health is a stand-in for ``Coordinator.store_health``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api import schemas
from nodewatch.api.app import build_app
from nodewatch.cli.client import Client
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.test_app import AGENT, make_config, reg_body


@dataclass
class StoreHealth:
    """A stand-in for ``Coordinator.store_health`` (the store's failure handling)."""

    available: bool = True
    since: float | None = None
    cause: str = ""
    queued_events: int = 0
    dropped_events: int = 0
    writes_failed: int = 0


class NoElection:
    """Stands in for ``Leadership``: an election exists, nothing campaigns."""

    def start(self, led: object) -> None:
        pass

    async def stop(self) -> None:
        pass


Api = tuple[TestClient[Any, Any], Coordinator]
MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(tmp_path: Path) -> AsyncIterator[MakeApi]:
    made: list[Api] = []

    async def factory(**overrides: Any) -> Api:
        cfg = make_config(tmp_path, **overrides)
        coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                            probe=FakeProbe(time.time))  # type: ignore[arg-type]
        await coord.start()
        client = TestClient(TestServer(build_app(coord)))
        await client.start_server()
        made.append((client, coord))
        return client, coord

    yield factory
    for client, coord in made:
        await client.close()
        await coord.stop()


async def healthz(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/healthz")
    body = await resp.read()
    msgspec.json.decode(body, type=schemas.CoordinatorHealth)  # the documented shape
    return resp.status, msgspec.json.decode(body)


async def test_a_store_down_past_store_timeout_is_failing_with_503(make_api: MakeApi) -> None:
    client, coord = await make_api()
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    status, body = await healthz(client)
    assert (status, body["status"], body["reasons"]) == (200, "ok", [])
    coord.store_health = StoreHealth(  # type: ignore[attr-defined]
        available=False, since=time.time() - 1.0, cause="[Errno 28] No space left on device",
        queued_events=3, writes_failed=2)
    status, body = await healthz(client)
    assert (status, body["status"]) == (200, "degraded")  # within store_timeout (3 s)
    coord.store_health.since = time.time() - 10  # type: ignore[attr-defined]
    status, body = await healthz(client)
    assert (status, body["status"]) == (503, "failing")
    assert body["reasons"][0].startswith("store sqlite (")  # the coordinator's store
    assert " unavailable since " in body["reasons"][0]
    assert "No space left on device (3 events queued)" in body["reasons"][0]
    assert body["store"]["available"] is False and body["store"]["queued_events"] == 3
    assert body["store"]["unavailable_for"] >= 10
    text = await (await client.get("/metrics")).text()
    for line in ('nodewatch_coordinator_status{status="failing"} 1.0',
                 'nodewatch_coordinator_status{status="ok"} 0.0',
                 "nodewatch_store_available 0.0", "nodewatch_events_queued 3.0",
                 "nodewatch_store_writes_failed_total 2.0", "nodewatch_leader 1.0",
                 "nodewatch_in_grace 0.0", "nodewatch_guard_on 0.0"):
        assert line in text, line
    # The CLI's client reads the 503's body rather than failing.
    answer = await asyncio.to_thread(Client(str(client.make_url(""))).healthz)
    assert answer.status == "failing" and answer.reasons == body["reasons"]
    coord.store_health = StoreHealth()  # type: ignore[attr-defined]
    status, body = await healthz(client)
    assert (status, body["status"]) == (200, "ok")


async def test_startup_grace_is_degraded_not_failing(make_api: MakeApi) -> None:
    client, _ = await make_api(**{"detection.startup_grace": "30s"})
    status, body = await healthz(client)
    assert (status, body["status"]) == (200, "degraded")
    assert len(body["reasons"]) == 1
    assert body["reasons"][0].startswith("in startup grace until ")
    assert body["in_grace"] is True and body["store"]["available"] is True
    text = await (await client.get("/metrics")).text()
    assert 'nodewatch_coordinator_status{status="degraded"} 1.0' in text
    assert "nodewatch_in_grace 1.0" in text
    assert "nodewatch_store_available 1.0" in text


async def test_a_lost_lease_with_nobody_leading_is_failing(make_api: MakeApi) -> None:
    # What was seen with etcd hung: the leader lost its lease, "leader": "", poller.nodes: 0.
    client, coord = await make_api(**{"coordinator.leader_ttl": "5s"})
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    coord.leadership = NoElection()  # type: ignore[assignment]
    await coord.become_follower("")
    status, body = await healthz(client)
    assert (status, body["status"], body["leader"], body["poller"]["nodes"]) == (
        200, "degraded", "", 0)
    assert body["reasons"][0].endswith("election in progress")
    coord.leaderless_since = time.time() - 30
    status, body = await healthz(client)
    assert (status, body["status"]) == (503, "failing")
    assert body["reasons"] == [body["reasons"][0]]
    assert body["reasons"][0].startswith("no leader since ")
    assert body["reasons"][0].endswith("nobody holds the election lease")
    assert "nodewatch_leader 0.0" in await (await client.get("/metrics")).text()
    await coord.become_follower("10.0.0.5:7300")
    status, body = await healthz(client)
    assert (status, body["status"]) == (200, "ok")


async def test_a_leader_not_polling_its_nodes_is_failing(make_api: MakeApi) -> None:
    client, coord = await make_api()
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    coord.poller.remove("web-1")  # a leader whose poller lost its nodes
    status, body = await healthz(client)
    assert (status, body["reasons"]) == (503, ["poller watches 0 of 1 nodes while leading"])
