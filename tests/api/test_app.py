"""The coordinator HTTP API against a real Coordinator on a temporary SQLite store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api.app import build_app
from nodewatch.config import Config, load_config
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient
from tests.helpers import async_wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}
AGENT = {"Authorization": "Bearer agent-secret"}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    base = {
        "coordinator.store": f"sqlite:///{tmp_path}/state.db",
        "coordinator.admin_token": "admin-secret",
        "coordinator.agent_token": "agent-secret",
        "detection.startup_grace": "0",
    }
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Any, Coordinator]]:
    cfg = make_config(tmp_path)
    store = open_store(cfg.coordinator.store)
    probe = FakeProbe(time.time)  # type: ignore[arg-type]
    coord = Coordinator(cfg, store, probe=probe)
    await coord.start()
    client = CarryingClient(TestClient(TestServer(build_app(coord))))
    await client.start_server()
    try:
        yield client, coord
    finally:
        await client.close()
        await coord.stop()


def reg_body(node_id: str = "web-1", **extra: Any) -> dict[str, Any]:
    body = {"node_id": node_id, "address": "127.0.0.1:7301", "incarnation": 1, "last_seq": 0,
            "last_ts": time.time(), "version": "0.1.0", "labels": {"zone": "a"}}
    body.update(extra)
    return body


def beat(node_id: str = "web-1", seq: int = 1, **extra: Any) -> dict[str, Any]:
    body = {"node_id": node_id, "incarnation": 1, "seq": seq, "ts": time.time(), "status": "ok",
            "system": {"cpu_percent": 10.0, "mem_percent": 20.0, "load1": 0.1,
                       "connections": 3},
            "load": {"qps": 5, "pending_tasks": 2, "error_rate": 0.0}}
    body.update(extra)
    return body


async def test_register_new_node_then_rejoin_on_restart(api: Any) -> None:
    client, coord = api
    resp = await client.post("/v1/register", json=reg_body(), headers=AGENT)
    assert resp.status == 200
    data = await resp.json()
    assert data["decision"] == "new"
    assert data["node"]["node_id"] == "web-1"
    assert "heartbeat_phase" in data
    resp = await client.post("/v1/register", json=reg_body(incarnation=2), headers=AGENT)
    assert (await resp.json())["decision"] == "rejoin"


async def test_register_with_older_incarnation_goes_to_review(api: Any) -> None:
    client, _ = api
    await client.post("/v1/register", json=reg_body(incarnation=5), headers=AGENT)
    resp = await client.post("/v1/register", json=reg_body(incarnation=1), headers=AGENT)
    data = await resp.json()
    assert data["decision"] == "review"
    assert data["node"]["admin"] == "review" and data["node"]["schedulable"] is False


async def test_heartbeat_applies_and_stale_one_is_refused(api: Any) -> None:
    client, coord = api
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    assert (await client.post("/v1/heartbeat", json=beat(seq=3), headers=AGENT)).status == 204
    node = (await (await client.get("/v1/nodes/web-1")).json())
    assert node["seq"] == 3 and node["load"]["qps"] == 5
    before = coord.cluster.nodes["web-1"].to_json()
    resp = await client.post("/v1/heartbeat", json=beat(seq=3, load={"qps": 999}), headers=AGENT)
    assert resp.status == 409
    assert "stale" in (await resp.json())["error"]
    assert coord.cluster.nodes["web-1"].to_json() == before


async def test_heartbeat_for_unknown_node_is_404(api: Any) -> None:
    client, _ = api
    resp = await client.post("/v1/heartbeat", json=beat("ghost"), headers=AGENT)
    assert resp.status == 404
    assert "ghost" in (await resp.json())["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/register", b"{not json", 400, "malformed JSON"),
        ("/v1/register", b"[1, 2]", 400, "JSON object"),
        ("/v1/register", b"", 400, "empty"),
        ("/v1/register", b'{"node_id": "bad id!", "address": "h:1", "incarnation": 1}', 422,
         "node_id"),
        ("/v1/register", b'{"node_id": "a", "address": "h:1", "incarnation": -1}', 422,
         "incarnation"),
        ("/v1/register", b'{"node_id": "a", "address": "nope", "incarnation": 1}', 422,
         "address"),
        ("/v1/register", b'{"node_id": "a", "address": "h:1", "incarnation": 1, "x": 1}', 422,
         "unknown field"),
        ("/v1/heartbeat", b'{"node_id": "a", "incarnation": 1, "seq": 1, "ts": 1,'
         b' "status": "sleepy"}', 422, "status"),
        ("/v1/heartbeat", b'{"node_id": "a", "incarnation": 1, "seq": 1, "ts": 1,'
         b' "load": {"qps": "lots"}}', 422, "load"),
    ],
)
async def test_bad_input_is_4xx_naming_the_problem_and_changes_nothing(
    api: Any, path: str, body: bytes, status: int, words: str
) -> None:
    client, coord = api
    before = len(coord.cluster.nodes)
    events_before = coord.cluster.next_event_number
    resp = await client.post(path, data=body, headers={**AGENT,
                                                        "Content-Type": "application/json"})
    assert resp.status == status
    message = (await resp.json())["error"]
    assert words in message
    assert len(coord.cluster.nodes) == before
    assert coord.cluster.next_event_number == events_before


async def test_oversized_body_is_413(api: Any) -> None:
    client, coord = api
    big = b'{"node_id": "a", "labels": {"x": "' + b"y" * 70_000 + b'"}}'
    resp = await client.post("/v1/register", data=big, headers=AGENT)
    assert resp.status == 413
    assert "limit" in (await resp.json())["error"]
    assert not coord.cluster.nodes


async def test_tokens_are_required_and_never_echoed(api: Any) -> None:
    client, coord = api
    resp = await client.post("/v1/register", json=reg_body(),
                             headers={"Authorization": "Bearer wrong-token"})
    assert resp.status == 401
    text = await resp.text()
    assert "agent-secret" not in text and "wrong-token" not in text
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    # The agent token is not the admin token.
    assert (await client.post("/v1/nodes/web-1/drain", headers=AGENT)).status == 401
    assert coord.cluster.nodes["web-1"].admin.value == "active"


async def test_a_follower_refuses_writes_with_503_naming_the_leader(api: Any) -> None:
    client, coord = api
    assert (await client.post("/v1/register", json=reg_body(), headers=AGENT)).status == 200
    await coord.become_follower("10.0.0.5:7000")
    expected = "this coordinator is a follower; the leader is 10.0.0.5:7000"
    for resp in (await client.post("/v1/register", json=reg_body(), headers=AGENT),
                 await client.post("/v1/heartbeat", json=beat(), headers=AGENT),
                 await client.post("/v1/nodes/web-1/drain", headers=ADMIN)):
        assert resp.status == 503
        assert (await resp.json()) == {"error": expected}
    health = await (await client.get("/healthz")).json()
    assert health["role"] == "follower" and health["leader"] == "10.0.0.5:7000"


async def test_node_filters_and_sort_by_load(api: Any) -> None:
    client, coord = api
    for i, cpu in enumerate((80.0, 10.0, 50.0)):
        node_id = f"n{i}"
        await client.post("/v1/register", json=reg_body(node_id, labels={"zone": "ab"[i % 2]}),
                          headers=AGENT)
        await client.post("/v1/heartbeat", json=beat(node_id, system={"cpu_percent": cpu}),
                          headers=AGENT)
    data = await (await client.get("/v1/nodes?sort=load")).json()
    assert [n["node_id"] for n in data["nodes"]] == ["n1", "n2", "n0"]
    data = await (await client.get("/v1/nodes?label=zone=a")).json()
    assert sorted(n["node_id"] for n in data["nodes"]) == ["n0", "n2"]
    # The fake probe answers ok: each node turns healthy after `rise` good observations.
    async def all_healthy() -> bool:
        nodes = (await (await client.get("/v1/nodes?health=healthy")).json())["nodes"]
        return len(nodes) == 3

    await async_wait_until(all_healthy, message="three healthy nodes")
    await client.post("/v1/nodes/n1/drain", headers=ADMIN)
    data = await (await client.get("/v1/nodes?schedulable=true")).json()
    assert sorted(n["node_id"] for n in data["nodes"]) == ["n0", "n2"]
    data = await (await client.get("/v1/nodes?schedulable=false&health=healthy,suspect")).json()
    assert [n["node_id"] for n in data["nodes"]] == ["n1"]
    fields = {"node_id", "address", "health", "node_status", "admin", "schedulable",
              "incarnation", "seq", "last_seen", "since", "consecutive_failures", "system",
              "load", "labels", "reasons"}
    assert fields <= set(data["nodes"][0])
    for bad in ("?health=zombie", "?schedulable=maybe", "?sort=age", "?label=zone"):
        resp = await client.get("/v1/nodes" + bad)
        assert resp.status == 400, bad
        assert (await resp.json())["error"]


async def test_drain_undrain_approve_remove(api: Any) -> None:
    client, coord = api
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    resp = await client.post("/v1/nodes/web-1/drain", json={"reason": "kernel upgrade"},
                             headers=ADMIN)
    assert resp.status == 200
    node = (await resp.json())["node"]
    assert node["admin"] == "drained" and node["schedulable"] is False
    assert node["drain"]["reason"] == "kernel upgrade"
    resp = await client.post("/v1/nodes/web-1/approve", headers=ADMIN)
    assert resp.status == 409 and "not in review" in (await resp.json())["error"]
    resp = await client.post("/v1/nodes/web-1/undrain", headers=ADMIN)
    assert (await resp.json())["node"]["admin"] == "active"
    resp = await client.post("/v1/nodes/ghost/drain", headers=ADMIN)
    assert resp.status == 404
    resp = await client.post("/v1/nodes/web-1/drain", data=b"{oops", headers=ADMIN)
    assert resp.status == 400
    assert coord.cluster.nodes["web-1"].admin.value == "active"
    resp = await client.delete("/v1/nodes/web-1", headers=ADMIN)
    assert resp.status == 200
    assert (await client.get("/v1/nodes/web-1")).status == 404
    assert "web-1" not in coord.poller


async def test_events_long_poll_and_after(api: Any) -> None:
    client, coord = api
    data = await (await client.get("/v1/events")).json()
    assert data["events"] == []
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    data = await (await client.get("/v1/events")).json()
    kinds = [e["kind"] for e in data["events"]]
    assert kinds == ["registered"]
    last = data["last_id"]

    async def later() -> None:
        await asyncio.sleep(0.1)
        await client.post("/v1/nodes/web-1/drain", headers=ADMIN)

    task = asyncio.create_task(later())
    started = time.monotonic()
    data = await (await client.get(f"/v1/events?after={last}&wait=60")).json()
    await task
    # Answered by the event, long before the 60 s wait ran out (the event comes after 0.1 s).
    assert time.monotonic() - started < 30
    # No pending_tasks reported: the drain completes at once.
    assert [e["kind"] for e in data["events"]] == ["drained", "drain_complete"]
    assert data["events"][0]["id"] > last
    assert set(data["events"][0]) >= {"id", "ts", "node_id", "kind", "from", "to", "reason"}
    resp = await client.get("/v1/events?after=abc")
    assert resp.status == 400
    resp = await client.get("/v1/events?wait=600")
    assert resp.status == 400


async def test_event_stream_sends_server_sent_events(api: Any) -> None:
    client, coord = api
    resp = await client.get("/v1/events/stream")
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    seen = b""
    async with asyncio.timeout(5):
        while b"event: registered" not in seen:
            seen += await resp.content.readany()
    assert b"id: " in seen and b'"kind":"registered"' in seen
    resp.close()


async def test_history_returns_pushed_samples(api: Any) -> None:
    client, coord = api
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    for seq in (1, 2, 3):
        await client.post("/v1/heartbeat", json=beat(seq=seq), headers=AGENT)
    data = await (await client.get("/v1/nodes/web-1/history")).json()
    assert [s["seq"] for s in data["samples"]] == [1, 2, 3]
    assert data["samples"][0]["system"]["cpu_percent"] == 10.0
    data = await (await client.get(f"/v1/nodes/web-1/history?since={time.time() + 60}")).json()
    assert data["samples"] == []
    assert (await client.get("/v1/nodes/web-1/history?since=yesterday")).status == 400
    assert (await client.get("/v1/nodes/nope/history")).status == 404


async def test_healthz_and_metrics(api: Any) -> None:
    client, coord = api
    await client.post("/v1/register", json=reg_body(), headers=AGENT)
    data = await (await client.get("/healthz")).json()
    assert data["status"] == "ok" and data["nodes"]["total"] == 1
    text = await (await client.get("/metrics")).text()
    assert 'nodewatch_nodes{health="unknown"} 1.0' in text
    assert "nodewatch_loop_lag_seconds" in text


async def test_register_answer_spreads_heartbeat_phases(api: Any) -> None:
    client, _ = api
    phases = []
    for i in range(8):
        resp = await client.post("/v1/register", json=reg_body(f"hb-{i}", heartbeat_interval=5),
                                 headers=AGENT)
        data = await resp.json()
        assert data["heartbeat_interval"] == 5
        assert 0 <= data["heartbeat_phase"] < 5
        phases.append(data["heartbeat_phase"])
    assert len(set(phases)) == 8  # never synchronized


async def test_pushed_heartbeats_stand_in_for_polls(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"detection.unhealthy_interval": "500ms",
                                   "detection.healthy_interval": "500ms"})
    probe = FakeProbe(time.time)  # type: ignore[arg-type]
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), probe=probe)
    await coord.start()
    client = CarryingClient(TestClient(TestServer(build_app(coord))))
    await client.start_server()
    try:
        await client.post("/v1/register", json=reg_body(), headers=AGENT)
        await async_wait_until(lambda: _polled(probe), message="the first poll")
        polls_before = len(probe.calls)
        # Push every 20 ms for 1.5 s (three intervals): no poll is due while pushes arrive.
        for seq in range(1, 76):
            resp = await client.post("/v1/heartbeat", json=beat(seq=seq), headers=AGENT)
            assert resp.status == 204
            await asyncio.sleep(0.02)
        assert len(probe.calls) == polls_before
        assert coord.pushes == 75
        # When pushes stop, polling takes over again.
        await async_wait_until(lambda: _polled(probe, polls_before + 1), within=5,
                               message="a poll after the pushes stopped")
    finally:
        await client.close()
        await coord.stop()


async def _polled(probe: FakeProbe, count: int = 1) -> bool:
    return len(probe.calls) >= count
