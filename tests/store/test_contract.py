"""The contract every Store backend keeps; parametrized over backends by ``store_factory``."""

from __future__ import annotations

import asyncio
from array import array
from typing import Any

from nodewatch.model import (
    Admin,
    DrainState,
    Event,
    Health,
    HistorySample,
    NodeState,
    SampleChunk,
    event_id,
)
from nodewatch.store.base import Store

from .conftest import StoreFactory


def node(node_id: str, **fields: Any) -> NodeState:
    return NodeState(node_id=node_id, address=f"{node_id}.example:7301", **fields)


def event(number: int, node_id: str = "web-1", kind: str = "suspect") -> Event:
    return Event(id=event_id(number), ts=1000.0 + number, node_id=node_id, kind=kind,
                 from_="healthy", to="suspect", reason="timeout", evidence={"checks": [number]})


def sample(node_id: str, ts: float, seq: int = 0) -> HistorySample:
    return HistorySample(node_id=node_id, ts=ts, seq=seq or int(ts), health="healthy",
                         system={"cpu_percent": 12.5}, load={"qps": 42.0})


async def reopen(store: Store, store_factory: StoreFactory, **options: object) -> Store:
    await store.close()
    fresh = store_factory(**options)
    await fresh.open()
    return fresh


# -- nodes --------------------------------------------------------------------------------


async def test_new_node_is_saved_and_gets_a_revision(store: Store) -> None:
    web = node("web-1", health=Health.HEALTHY, labels={"zone": "a"},
               drain=DrainState(reason="deploy", started=1.0, deadline=601.0))
    assert await store.save_nodes([web]) == []
    assert web.revision > 0
    assert await store.get_node("web-1") == web
    assert await store.get_node("nope") is None


async def test_each_successful_save_increases_the_revision(store: Store) -> None:
    web = node("web-1")
    await store.save_nodes([web])
    first = web.revision
    web.seq = 7
    assert await store.save_nodes([web]) == []
    assert web.revision > first
    stored = await store.get_node("web-1")
    assert stored is not None and stored.seq == 7 and stored.revision == web.revision


async def test_stale_writer_loses_and_changes_nothing(store: Store) -> None:
    web = node("web-1")
    await store.save_nodes([web])
    other = await store.get_node("web-1")
    assert other is not None
    other.health = Health.SUSPECT
    assert await store.save_nodes([other]) == []
    web.admin = Admin.DRAINED  # still at the old revision
    old_revision = web.revision
    assert await store.save_nodes([web]) == ["web-1"]
    assert web.revision == old_revision
    stored = await store.get_node("web-1")
    assert stored is not None
    assert stored.health is Health.SUSPECT and stored.admin is Admin.ACTIVE


async def test_new_node_must_not_exist_yet(store: Store) -> None:
    await store.save_nodes([node("web-1", seq=1)])
    assert await store.save_nodes([node("web-1", seq=2)]) == ["web-1"]
    stored = await store.get_node("web-1")
    assert stored is not None and stored.seq == 1


async def test_writing_the_same_state_twice_is_safe(store: Store) -> None:
    web = node("web-1", seq=3)
    await store.save_nodes([web])
    replay = node("web-1", seq=3)  # e.g. a retry after a lost acknowledgement, revision 0
    assert await store.save_nodes([replay]) == []
    assert replay.revision == web.revision
    assert await store.save_nodes([web]) == []  # same state at the current revision
    assert await store.load_nodes() == [web]


async def test_batch_writes_the_winners_and_reports_the_losers(store: Store) -> None:
    a, b = node("a"), node("b")
    await store.save_nodes([a, b])
    stale_b = node("b", seq=1, revision=b.revision)
    b.seq = 2
    await store.save_nodes([b])
    a.seq, c = 5, node("c")
    assert await store.save_nodes([a, stale_b, c]) == ["b"]
    stored = {n.node_id: n for n in await store.load_nodes()}
    assert stored["a"].seq == 5 and stored["b"].seq == 2 and "c" in stored
    assert stored["a"].revision == a.revision and stored["c"].revision == c.revision


async def test_recreated_node_does_not_accept_a_writer_from_before_the_delete(
    store: Store,
) -> None:
    old = node("web-1")
    await store.save_nodes([old])
    assert await store.delete_node("web-1") is True
    assert await store.delete_node("web-1") is False
    assert await store.get_node("web-1") is None
    await store.save_nodes([node("web-1", seq=9)])
    old.seq = 1
    assert await store.save_nodes([old]) == ["web-1"]


async def test_restart_restores_every_node(store: Store, store_factory: StoreFactory) -> None:
    nodes = [node(f"web-{i:03d}", seq=i, health=Health.HEALTHY, system={"cpu_percent": i})
             for i in range(50)]
    await store.save_nodes(nodes)
    store = await reopen(store, store_factory)
    try:
        assert await store.load_nodes() == sorted(nodes, key=lambda n: n.node_id)
        again = await store.get_node("web-007")
        assert again is not None
        again.seq = 100
        assert await store.save_nodes([again]) == []  # revisions survive the restart
    finally:
        await store.close()


async def test_close_flushes_writes_issued_before_it(
    store: Store, store_factory: StoreFactory
) -> None:
    await asyncio.gather(
        store.save_nodes([node("web-1")]),
        store.append_events([event(1)]),
        store.add_samples([sample("web-1", 10.0)]),
        store.put_meta("leader", "c-1"),
        store.close(),
    )
    store = store_factory()
    await store.open()
    try:
        assert [n.node_id for n in await store.load_nodes()] == ["web-1"]
        assert await store.last_event_id() == event_id(1)
        assert len(await store.history("web-1", 0.0)) == 1
        assert await store.get_meta("leader") == "c-1"
    finally:
        await store.close()


# -- events -------------------------------------------------------------------------------


async def test_events_come_back_in_id_order_after_a_cursor(store: Store) -> None:
    assert await store.last_event_id() is None
    assert await store.events_after(None) == []
    await store.append_events([event(i) for i in range(1, 6)])
    await store.append_events([event(i) for i in range(6, 11)])
    assert await store.events_after(None) == [event(i) for i in range(1, 11)]
    assert await store.events_after(event_id(7)) == [event(8), event(9), event(10)]
    assert await store.events_after(event_id(2), limit=2) == [event(3), event(4)]
    assert await store.events_after(event_id(10)) == []
    assert await store.last_event_id() == event_id(10)


async def test_appending_an_event_twice_keeps_one(store: Store) -> None:
    await store.append_events([event(1), event(2)])
    await store.append_events([event(2), event(3)])
    assert [e.id for e in await store.events_after(None)] == [event_id(i) for i in (1, 2, 3)]


async def test_events_beyond_retention_drop_the_oldest(
    store: Store, store_factory: StoreFactory
) -> None:
    store = await reopen(store, store_factory, events_retained=100)
    try:
        for start in range(0, 250, 25):
            await store.append_events([event(i) for i in range(start + 1, start + 26)])
        kept = await store.events_after(None, limit=1000)
        assert [e.id for e in kept] == [event_id(i) for i in range(151, 251)]
        store = await reopen(store, store_factory, events_retained=100)
        await store.append_events([event(251)])
        assert (await store.events_after(None, limit=1))[0].id == event_id(152)
        assert await store.last_event_id() == event_id(251)
    finally:
        await store.close()


# -- history ------------------------------------------------------------------------------


async def test_history_is_one_node_since_a_time_in_ts_order(store: Store) -> None:
    await store.add_samples([sample("a", t) for t in (30.0, 10.0, 20.0)])
    await store.add_samples([sample("b", 15.0), sample("a", 40.0)])
    assert [s.ts for s in await store.history("a", 0.0)] == [10.0, 20.0, 30.0, 40.0]
    assert await store.history("a", 20.0) == [sample("a", t) for t in (20.0, 30.0, 40.0)]
    assert await store.history("b", 0.0) == [sample("b", 15.0)]
    assert await store.history("nobody", 0.0) == []


async def test_adding_a_sample_twice_keeps_one(store: Store) -> None:
    await store.add_samples([sample("a", 10.0)])
    await store.add_samples([sample("a", 10.0), sample("a", 11.0)])
    assert [s.ts for s in await store.history("a", 0.0)] == [10.0, 11.0]


async def test_prune_deletes_only_samples_older_than_the_ttl(store: Store) -> None:
    # 12,000 rows over 30 nodes: more than one prune step for every backend.
    nodes = [f"n{i:02d}" for i in range(30)]
    await store.add_samples([sample(n, float(t)) for n in nodes for t in range(400)])
    deleted = await store.prune(now=3900.0, history_ttl=3600.0)  # keeps ts >= 300
    assert deleted == 30 * 300
    for n in (nodes[0], nodes[17], nodes[-1]):
        assert [s.ts for s in await store.history(n, 0.0)] == [float(t) for t in range(300, 400)]
    assert await store.prune(now=3900.0, history_ttl=3600.0) == 0


def chunk(node_id: str, times: list[float]) -> SampleChunk:
    """``sample`` at each of ``times``, gathered as one chunk."""
    return SampleChunk(node_id, ("cpu_percent",), ("qps",), array("d", times),
                       array("q", [int(t) for t in times]), bytes(len(times)),
                       array("d", [v for _ in times for v in (12.5, 42.0)]))


async def test_a_chunk_reads_back_as_the_samples_it_holds(store: Store) -> None:
    await store.add_chunks([chunk("a", [10.0, 15.0, 20.0]), chunk("b", [12.0])])
    await store.add_samples([sample("a", 25.0)])
    assert await store.history("a", 0.0) == [sample("a", t) for t in (10.0, 15.0, 20.0, 25.0)]
    # A chunk that began before ``since`` gives the samples from it on.
    assert await store.history("a", 15.0) == [sample("a", t) for t in (15.0, 20.0, 25.0)]
    assert await store.history("b", 0.0) == [sample("b", 12.0)]
    await store.add_chunks([])


async def test_adding_a_chunk_twice_keeps_each_sample_once(store: Store) -> None:
    await store.add_chunks([chunk("a", [10.0, 15.0])])
    await store.add_chunks([chunk("a", [10.0, 15.0]), chunk("a", [15.0, 20.0])])
    assert [s.ts for s in await store.history("a", 0.0)] == [10.0, 15.0, 20.0]


async def test_prune_deletes_chunks_whose_samples_all_aged_out(store: Store) -> None:
    nodes = [f"n{i:02d}" for i in range(30)]
    await store.add_chunks([chunk(n, [float(t) for t in range(start, start + 60, 5)])
                            for n in nodes for start in range(0, 600, 60)])
    assert await store.prune(now=3900.0, history_ttl=3600.0) > 0  # keeps ts >= 300
    for n in (nodes[0], nodes[-1]):
        assert [s.ts for s in await store.history(n, 0.0)] == [float(t) for t in range(300, 600, 5)]
    assert await store.prune(now=3900.0, history_ttl=3600.0) == 0


def rollup(node_id: str, ts: float, seq: int = 0, health: str = "healthy") -> HistorySample:
    return HistorySample(node_id=node_id, ts=ts, seq=seq or int(ts), health=health,
                         system={"cpu_percent": 20.0}, load={"qps": 40.0}, span=60.0,
                         peak={"cpu_percent": 35.0, "load.qps": 55.0})


async def test_rollups_come_back_whole_before_the_oldest_raw_sample(store: Store) -> None:
    # The hour: rollups every minute from 60 to 600, raw samples for the last two minutes.
    await store.add_samples([rollup("a", float(t)) for t in range(60, 601, 60)])
    await store.add_samples([sample("a", float(t)) for t in range(480, 601, 5)])
    await store.add_samples([rollup("b", 60.0)])
    points = await store.history("a", 0.0)
    assert [p.ts for p in points] == [float(t) for t in range(60, 480, 60)] + [
        float(t) for t in range(480, 601, 5)]
    assert points[0] == rollup("a", 60.0) and points[0].peak["load.qps"] == 55.0
    assert all(p.span == 0.0 and p.peak == {} for p in points[7:])
    assert [p.ts for p in await store.history("a", 500.0)] == [float(t) for t in range(500, 601, 5)]
    assert await store.history("b", 0.0) == [rollup("b", 60.0)]


async def test_a_rollup_and_a_raw_sample_with_the_same_key_are_both_kept(store: Store) -> None:
    await store.add_samples([sample("a", 60.0), rollup("a", 60.0)])
    await store.add_samples([rollup("a", 60.0)])
    assert await store.history("a", 0.0) == [sample("a", 60.0)]  # raw covers it
    await store.prune(now=200.0, history_ttl=3600.0, full_resolution=100.0)
    assert await store.history("a", 0.0) == [rollup("a", 60.0)]  # the raw one aged out


async def test_prune_keeps_each_tier_for_its_own_time(store: Store) -> None:
    nodes = [f"n{i:02d}" for i in range(20)]
    await store.add_samples([rollup(n, float(t)) for n in nodes for t in range(60, 3601, 60)])
    await store.add_samples([sample(n, float(t)) for n in nodes for t in range(3000, 3601, 5)])
    # An hour of rollups kept from ts 600 on, raw samples for the last 5 minutes (from 3300).
    deleted = await store.prune(now=4200.0, history_ttl=3600.0, full_resolution=900.0)
    assert deleted == 20 * (9 + 60)
    points = await store.history("n07", 0.0)
    assert [p.ts for p in points if p.span] == [float(t) for t in range(600, 3300, 60)]
    assert [p.ts for p in points if not p.span] == [float(t) for t in range(3300, 3601, 5)]
    assert await store.prune(now=4200.0, history_ttl=3600.0, full_resolution=900.0) == 0


# -- meta ---------------------------------------------------------------------------------


async def test_meta_keeps_the_last_value_per_key(store: Store) -> None:
    assert await store.get_meta("guard") is None
    await store.put_meta("guard", "off")
    await store.put_meta("guard", "on")
    await store.put_meta("last_event", "42")
    assert await store.get_meta("guard") == "on"
    assert await store.get_meta("last_event") == "42"


async def test_a_probe_write_is_stored_and_leaves_only_its_mark(
        store: Store, store_factory: StoreFactory) -> None:
    await store.put_meta("guard", "on")
    await store.probe_write(1234.5)
    store = await reopen(store, store_factory)
    try:
        assert await store.get_meta("store_probe") == "1234.5"
        assert await store.get_meta("guard") == "on"
    finally:
        await store.close()
