"""POST /v1/observations: its own token and limits, validation that names the problem, unknown
nodes reported back, and the effect: a node whose callers see errors becomes an outlier."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api.app import build_app
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient
from tests.api.test_app import ADMIN, AGENT, beat, make_config, reg_body
from tests.helpers import async_wait_until

OBSERVER = {"Authorization": "Bearer observer-secret"}
NODES = [f"web-{i}" for i in range(10)]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Any, Coordinator]]:
    cfg = make_config(tmp_path, **{"coordinator.observer_token": ["observer-secret"],
                                   "coordinator.max_observations": 20,
                                   "outliers.eject_after": "200ms",
                                   "outliers.base_ejection_time": "1s",
                                   "outliers.clear_after": "200ms"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    client = CarryingClient(TestClient(TestServer(build_app(coord))))
    await client.start_server()
    try:
        yield client, coord
    finally:
        await client.close()
        await coord.stop()


async def healthy_fleet(client: Any) -> None:
    for node_id in NODES:
        assert (await client.post("/v1/register", json=reg_body(node_id),
                                  headers=AGENT)).status == 200
        for seq in (1, 2):
            resp = await client.post("/v1/heartbeat", json=beat(node_id, seq), headers=AGENT)
            assert resp.status == 204


def batch(bad: str = "", errors: float = 40.0, **extra: Any) -> dict[str, Any]:
    return {"source": "lb-1", "window": 1.0, **extra, "observations": [
        {"node_id": n, "requests": 100, "errors": errors if n == bad else 0,
         "latency_p99_ms": 30.0} for n in NODES]}


async def test_the_observer_token_or_the_admin_token_is_required(api: Any) -> None:
    client, _ = api
    for headers in ({}, AGENT, {"Authorization": "Bearer nope"}):
        resp = await client.post("/v1/observations", json=batch(), headers=headers)
        assert resp.status == 401
        assert "observer token required" in (await resp.json())["error"]
    for headers in (OBSERVER, ADMIN):
        assert (await client.post("/v1/observations", json=batch(), headers=headers)).status \
            == 200


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"observations": [{"node_id": "web-1", "requests": 10, "errors": 11}]}, 422,
     "observations[0].errors: 11 errors is more than its 10 requests"),
    ({"observations": [{"node_id": "web-1", "requests": -1, "errors": 0}]}, 422,
     "observations[0].requests"),
    ({"observations": [{"node_id": "bad id!", "requests": 1, "errors": 0}]}, 422,
     "observations[0].node_id"),
    ({"observations": [], "window": 0}, 422, "window"),
    ({"observations": [], "color": "red"}, 422, "unknown field `color`"),
    ({"observations": [{"node_id": "web-1", "requests": 1, "errors": 0}] * 21}, 413,
     "21 observations in one batch; the limit is 20"),
])
async def test_bad_batches_are_refused_naming_the_problem_and_change_nothing(
        api: Any, body: dict[str, Any], status: int, message: str) -> None:
    client, coord = api
    resp = await client.post("/v1/observations", json=body, headers=OBSERVER)
    assert resp.status == status
    assert message in (await resp.json())["error"]
    assert not coord.cluster.outliers.active


async def test_unknown_nodes_are_reported_back_not_fatal(api: Any) -> None:
    client, _ = api
    await healthy_fleet(client)
    body = batch()
    body["observations"].append({"node_id": "ghost", "requests": 5, "errors": 0})
    resp = await client.post("/v1/observations", json=body, headers=OBSERVER)
    assert resp.status == 200
    assert await resp.json() == {"accepted": 10, "unknown": ["ghost"], "source": "lb-1"}


async def test_a_follower_refuses_observations_with_503(api: Any) -> None:
    client, coord = api
    await coord.become_follower("http://10.0.0.9:7300")
    resp = await client.post("/v1/observations", json=batch(), headers=OBSERVER)
    assert resp.status == 503 and "10.0.0.9" in (await resp.json())["error"]


async def test_callers_errors_make_a_healthy_node_an_unschedulable_outlier_and_back(
        api: Any) -> None:
    client, coord = api
    await healthy_fleet(client)

    async def ejected() -> bool:
        assert (await client.post("/v1/observations", json=batch("web-3"),
                                  headers=OBSERVER)).status == 200
        node = await (await client.get("/v1/nodes/web-3")).json()
        return node["outlier"] is not None

    await async_wait_until(ejected, within=10.0, interval=0.2, message="web-3 ejected")
    node = await (await client.get("/v1/nodes/web-3")).json()
    assert node["health"] == "healthy" and node["schedulable"] is False
    assert node["outlier"]["ejections"] == 1
    assert node["outlier"]["reason"] == ("errors 40 % vs group median 0 % over 5s, 1 observer "
                                         "(lb-1)")
    listed = await (await client.get("/v1/nodes?schedulable=false")).json()
    assert [n["node_id"] for n in listed["nodes"]] == ["web-3"]
    events = (await (await client.get("/v1/events")).json())["events"]
    [event] = [e for e in events if e.get("kind") == "outlier"]
    assert event["node_id"] == "web-3" and event["evidence"]["error_rate"] == 0.4

    async def back() -> bool:
        await client.post("/v1/observations", json=batch(), headers=OBSERVER)
        return (await (await client.get("/v1/nodes/web-3")).json())["schedulable"]

    # Its figures come back in line; the 40 % samples leave the 5 s window, then it returns.
    await async_wait_until(back, within=20.0, interval=0.25, message="web-3 back")
    events = (await (await client.get("/v1/events")).json())["events"]
    assert [e["kind"] for e in events if e["kind"].startswith("outlier")] == [
        "outlier", "outlier_cleared"]
