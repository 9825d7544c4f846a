"""Issue 13 with real failing stores: a hung Redis or etcd (SIGSTOP), a full SQLite.

Commands answer 503 naming the store within a hang bound and say whether they may have been
applied; after the store returns the coordinator converges to what it holds. Detection goes on
from memory while the store fails, actions wait for their transitions to be stored, the event
queue is bounded, registration is refused, and /healthz judges the real failure.

Time is only asserted as hang bounds (10x the expected figure); everything else waits on
conditions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api.app import build_app
from nodewatch.config import Config
from nodewatch.coordinator.service import Coordinator
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Event, FailureClass
from nodewatch.store.base import Store
from nodewatch.store.open import open_store
from nodewatch.store.sqlite import SqliteStore
from nodewatch.testing import EtcdCluster, FakeProbe, RedisServer
from tests.api.credentials import CarryingClient
from tests.api.test_app import ADMIN, AGENT, make_config, reg_body
from tests.api.test_store_unavailable import _fill, _unfill
from tests.helpers import async_wait_until, require_binary

TIMEOUT = 0.5  # store_timeout in these tests
HANG_BOUND = 10 * TIMEOUT

Client = Any  # a CarryingClient around a TestClient


class RecordingActions:
    """Records each action handed on, and whether the store was available at that moment."""

    def __init__(self) -> None:
        self.coord: Coordinator | None = None
        self.submitted: list[str] = []
        self.while_down: list[str] = []

    def submit(self, request: ActionRequest, event: Event | None) -> None:
        name = f"{request.kind}:{request.node_id}"
        self.submitted.append(name)
        if self.coord is not None and not self.coord.store_health.available:
            self.while_down.append(name)

    async def aclose(self) -> None:
        return None


@asynccontextmanager
async def running(cfg: Config, *, probe: FakeProbe | None = None,
                  actions: RecordingActions | None = None
                  ) -> AsyncIterator[tuple[Client, Coordinator]]:
    store = open_store(cfg.coordinator.store, timeout=cfg.coordinator.store_timeout)
    coord = Coordinator(cfg, store, probe=probe or FakeProbe(time.time),  # type: ignore[arg-type]
                        actions=actions)
    if actions is not None:
        actions.coord = coord
    await coord.start()
    client = CarryingClient(TestClient(TestServer(build_app(coord))))
    await client.start_server()
    try:
        yield client, coord
    finally:
        await client.close()
        await coord.stop()


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process hangs (SIGSTOP) for the block, and always continues after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def read_back(url: str, read: Callable[[Store], Awaitable[Any]]) -> Any:
    """Open a second store on the same data (what a restarted coordinator would see)."""
    store = open_store(url)
    await store.open()
    try:
        return await read(store)
    finally:
        await store.close()


async def timed_post(client: Client, path: str, **kwargs: Any) -> tuple[int, str, float]:
    began = time.monotonic()
    resp = await client.post(path, **kwargs)
    return resp.status, await resp.text(), time.monotonic() - began


async def wait_for(condition: Callable[[], object], within: float = 30.0,
                   message: str = "condition") -> None:
    async def check() -> object:
        return condition()
    await async_wait_until(check, within=within, message=message)


# ---------------------------------------------------------------------- 1. a hung server


@pytest.fixture(params=["redis", "etcd"])
def hung_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    """(store URL, the label's kind, the server's pid) for one throwaway server."""
    if request.param == "redis":
        with RedisServer(tmp_path / "redis", binary=require_binary("redis-server")) as redis:
            assert redis.popen is not None
            yield redis.url(prefix="hung"), "redis", redis.popen.pid
    else:
        with EtcdCluster(tmp_path / "etcd", binary=require_binary("etcd")) as etcd:
            member = etcd.members[0]
            assert member.popen is not None
            yield etcd.url("/hung"), "etcd", member.popen.pid


async def test_a_hung_server_answers_503_within_the_bound_then_converges(
        tmp_path: Path, hung_store: tuple[str, str, int]) -> None:
    url, kind, pid = hung_store
    cfg = make_config(tmp_path, **{"coordinator.store": url,
                                   "coordinator.store_timeout": f"{TIMEOUT}s"})
    async with running(cfg) as (client, coord):
        for node_id in ("n1", "n2"):
            resp = await client.post("/v1/register", json=reg_body(node_id), headers=AGENT)
            assert resp.status == 200, await resp.text()
        with stopped(pid):
            status, text, took = await timed_post(client, "/v1/nodes/n1/drain",
                                                  json={"reason": "hung"}, headers=ADMIN)
            assert status == 503, text
            assert took < HANG_BOUND, f"the command took {took:.1f}s"
            assert f"store {kind} (" in text
            assert "may have been applied; check GET /v1/nodes/n1" in text
            # A second command while it hangs: bounded the same way, whatever the first left
            # behind (a background write may hold the persist lock).
            status, text, took = await timed_post(client, "/v1/nodes/n2/drain",
                                                  json={"reason": "hung"}, headers=ADMIN)
            assert status == 503 and took < HANG_BOUND, (status, text, took)
            assert not coord.store_health.available
        # Back: the coordinator adopts what the store holds, for both nodes.

        async def agreed() -> bool:
            stored = await read_back(url, lambda s: s.load_nodes())
            held = {n.node_id: n.admin.value for n in stored}
            mine = {i: coord.cluster.nodes[i].admin.value for i in ("n1", "n2")}
            return coord.store_health.available and held == mine
        await async_wait_until(agreed, within=30, message="memory == store after SIGCONT")
        # Either drain may have landed (both reached the server before it stopped answering):
        # the next command turns n1 over, whichever way it now stands.
        target = "n1"
        verb, after, why = (("drain", "drained", "after")
                            if coord.cluster.nodes[target].admin.value == "active"
                            else ("undrain", "active", "operator undrain"))
        status, text, _ = await timed_post(client, f"/v1/nodes/{target}/{verb}",
                                           json={"reason": "after"}, headers=ADMIN)
        assert status == 200, text
    # The acknowledged command is in the store, with its event, and every event id once.
    stored_node = await read_back(url, lambda s: s.get_node(target))
    assert stored_node is not None and stored_node.admin.value == after
    events = await read_back(url, lambda s: s.events_after(None, 10_000))
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert any(e.kind == f"{verb}ed" and e.node_id == target and e.reason == why
               for e in events), [(e.kind, e.node_id, e.reason) for e in events]


# ---------------------------------------------------------------------- helpers for SQLite


async def make_full(client: Client, coord: Coordinator, spare: str) -> None:
    """Fill the SQLite store, then use up the room left in its pages with commands on
    ``spare`` until one is refused: from then on every write fails."""
    store = coord.store
    assert isinstance(store, SqliteStore)
    await _fill(store)
    for attempt in range(400):
        verb = "drain" if attempt % 2 == 0 else "undrain"
        resp = await client.post(f"/v1/nodes/{spare}/{verb}", json={"reason": "fill"},
                                 headers=ADMIN)
        if resp.status == 503:
            break
        assert resp.status == 200, await resp.text()
    assert not coord.store_health.available


def fast(tmp_path: Path, **extra: Any) -> Config:
    return make_config(tmp_path, **{
        "coordinator.store_timeout": f"{TIMEOUT}s",
        "detection.healthy_interval": "100ms", "detection.unhealthy_interval": "50ms",
        "detection.fall": 2, "detection.rise": 2, "detection.jitter": 0,
        "guard.indirect_probes": 0, "budget.max_fraction": 1.0, **extra})


# ---------------------------------------------------------------------- 2. detection goes on


async def test_detection_goes_on_from_memory_while_the_store_is_full(tmp_path: Path) -> None:
    probe = FakeProbe(time.time)
    sink = RecordingActions()
    async with running(fast(tmp_path), probe=probe, actions=sink) as (client, coord):
        for node_id in ("n1", "spare"):
            assert (await client.post("/v1/register", json=reg_body(node_id),
                                      headers=AGENT)).status == 200
        await wait_for(lambda: coord.cluster.nodes["n1"].health.value == "healthy",
                       message="n1 healthy")
        await coord.persist()
        sink.submitted.clear()
        await make_full(client, coord, "spare")
        store = coord.store
        assert isinstance(store, SqliteStore)
        probe.set("n1", FailureClass.REFUSED)
        await wait_for(lambda: coord.cluster.nodes["n1"].health.value == "unhealthy",
                       message="n1 unhealthy in memory")
        view = await (await client.get("/v1/nodes/n1")).json()
        assert view["health"] == "unhealthy"
        resp = await client.get("/v1/events")
        assert resp.status == 200, await resp.text()
        served = [(e["node_id"], e["kind"]) for e in (await resp.json())["events"]]
        assert ("n1", "suspect") in served and ("n1", "unhealthy") in served, served
        # Its action waits for the transition to be stored.
        assert "unhealthy:n1" not in sink.submitted
        assert not coord.store_health.available
        await _unfill(store)
        await wait_for(lambda: "unhealthy:n1" in sink.submitted, message="the action")
        await coord.persist()
        assert sink.while_down == []
        assert sink.submitted.count("unhealthy:n1") == 1
        memory = [e.id for e in coord.recent]
        stored = await store.events_after(None, 10_000)
    ids = [e.id for e in stored]
    assert ids == sorted(set(ids)) and set(memory) <= set(ids)
    kinds = [e.kind for e in stored if e.node_id == "n1"]
    assert kinds.index("suspect") < kinds.index("unhealthy"), kinds
    assert sink.submitted.count("unhealthy:n1") == 1


# ---------------------------------------------------------------------- 3. the queue is bounded


async def test_a_full_queue_drops_the_oldest_and_tells_on_recovery(tmp_path: Path) -> None:
    limit = 5
    cfg = fast(tmp_path, **{"coordinator.max_queued_events": limit})
    async with running(cfg) as (client, coord):
        assert (await client.post("/v1/register", json=reg_body("spare"),
                                  headers=AGENT)).status == 200
        # No other event while the notes queue: the spare node settles first.
        await wait_for(lambda: coord.cluster.nodes["spare"].health.value == "healthy",
                       message="spare healthy")
        await make_full(client, coord, "spare")
        store = coord.store
        assert isinstance(store, SqliteStore)
        for i in range(3 * limit):
            coord.record_event("note", "", f"note {i}", {"i": i})
        health = coord.store_health
        assert health.queued_events == limit
        dropped = health.dropped_events
        assert dropped >= 2 * limit
        await _unfill(store)
        await wait_for(lambda: coord.store_health.available and coord._pending_events == [],
                       message="the queue written")

        async def told() -> list[Event]:
            # The recovery's events_lost may be written one write after the queue drained.
            events = await store.events_after(None, 10_000)
            return events if any(e.kind == "events_lost" for e in events) else []

        stored = await async_wait_until(told, within=30, message="events_lost stored")
    notes = [e.reason for e in stored if e.kind == "note"]
    # The newest are stored, in order; every one of the others was dropped and counted (an
    # event of the spare node's checks or drain may have taken a place in the queue too).
    assert notes and notes == [f"note {i}" for i in range(3 * limit - len(notes), 3 * limit)]
    assert len(notes) >= limit - 1, [(e.kind, e.node_id) for e in stored]
    assert health.dropped_events >= dropped + (limit - len(notes))
    lost = [e for e in stored if e.kind == "events_lost"]
    # Every drop is told once: in one events_lost, or in one per spell when the full disk
    # refused a write again after the first recovery (seen on a loaded machine).
    assert lost and sum(e.evidence["dropped"] for e in lost) == health.dropped_events
    assert lost[0].id > max(e.id for e in stored if e.kind == "note")


# ---------------------------------------------------------------------- 4. registration


async def test_registration_while_the_store_is_full_is_refused(tmp_path: Path) -> None:
    async with running(fast(tmp_path)) as (client, coord):
        assert (await client.post("/v1/register", json=reg_body("spare"),
                                  headers=AGENT)).status == 200
        await make_full(client, coord, "spare")
        # A full SQLite file still has room in its pages for some small writes: register new
        # nodes until one is refused (it must be soon), then check that one changed nothing.
        for i in range(50):
            resp = await client.post("/v1/register", json=reg_body(f"new-{i}"), headers=AGENT)
            if resp.status != 200:
                break
        refused = f"new-{i}"
        assert resp.status == 503, await resp.text()
        error = (await resp.json())["error"]
        assert error.startswith("store sqlite (") and "nothing was changed" in error
        assert refused not in coord.cluster.nodes and refused not in coord.poller
        assert (await client.get(f"/v1/nodes/{refused}")).status == 404
        await _unfill(coord.store)  # type: ignore[arg-type]
        resp = await client.post("/v1/register", json=reg_body(refused), headers=AGENT)
        assert resp.status == 200, await resp.text()
        assert refused in coord.cluster.nodes


# ---------------------------------------------------------------------- 5. one bound per command


async def test_a_command_behind_a_hung_background_write_is_bounded_by_store_timeout(
        tmp_path: Path) -> None:
    """A background write that hangs holds the persist lock; a command queued behind it gives
    up within its own store_timeout (its one deadline covers the wait for the lock), saying
    that nothing changed, instead of waiting for that write and then for its own."""
    async with running(fast(tmp_path)) as (client, coord):
        assert (await client.post("/v1/register", json=reg_body("n1"),
                                  headers=AGENT)).status == 200
        await coord._persist_lock.acquire()  # the hung background write
        try:
            async with asyncio.timeout(2 * HANG_BOUND):  # a hang fails, not stalls, the test
                status, text, took = await timed_post(client, "/v1/nodes/n1/drain",
                                                      json={"reason": "x"}, headers=ADMIN)
        finally:
            coord._persist_lock.release()
        assert status == 503, text
        assert "previous write got no answer" in text and "nothing was changed" in text
        assert took < HANG_BOUND, f"the command took {took:.1f}s"
        assert coord.cluster.nodes["n1"].admin.value == "active"
        resp = await client.post("/v1/nodes/n1/drain", json={"reason": "x"}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.admin.value == "drained"


# ---------------------------------------------------------------------- 6. /healthz


async def test_healthz_with_a_full_sqlite_degraded_then_failing_then_ok(tmp_path: Path) -> None:
    async with running(fast(tmp_path)) as (client, coord):
        assert (await client.post("/v1/register", json=reg_body("spare"),
                                  headers=AGENT)).status == 200
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
        await make_full(client, coord, "spare")
        since = coord.store_health.since
        assert since is not None
        resp = await client.get("/healthz")
        body = await resp.json()
        if time.time() - since < TIMEOUT:  # a slow runner may already be past it
            assert (resp.status, body["status"]) == (200, "degraded"), body

        async def failing() -> bool:
            resp = await client.get("/healthz")
            return resp.status == 503 and (await resp.json())["status"] == "failing"
        await async_wait_until(failing, within=30, message="failing")
        body = await (await client.get("/healthz")).json()
        reason = body["reasons"][0]
        assert reason.startswith(f"store sqlite ({tmp_path}/state.db) unavailable since "), \
            reason
        assert "full" in reason, reason
        assert body["store"]["available"] is False
        # The full disk still takes a node's state rewritten in place, so a tiny probe write
        # passed and /healthz said ok again within a second, for a disk that kept refusing
        # new data. Three more retries go by, and it says failing throughout.
        tried = coord.store_health.writes_failed

        async def retried_while_failing() -> bool:
            resp = await client.get("/healthz")
            assert resp.status == 503, await resp.text()
            return coord.store_health.writes_failed >= tried + 3
        await async_wait_until(retried_while_failing, within=30,
                               message="three more failed retries")
        assert coord.store_health.since == since  # one outage, not a new one per retry
        await _unfill(coord.store)  # type: ignore[arg-type]

        async def ok() -> bool:
            resp = await client.get("/healthz")
            return resp.status == 200 and (await resp.json())["status"] == "ok"
        await async_wait_until(ok, within=30, message="ok again")
