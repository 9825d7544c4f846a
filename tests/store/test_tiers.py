"""History tiers: raw samples for the last minutes, one rollup per node per interval after."""

from __future__ import annotations

import pytest

from nodewatch.config import load_config
from nodewatch.model import HistorySample
from nodewatch.store.tiers import CHUNK_SECONDS, HistoryTiers, Rollups, SampleChunks


def sample(ts: float, cpu: float, qps: float = 1.0, health: str = "healthy",
           node_id: str = "web-1") -> HistorySample:
    return HistorySample(node_id, ts, int(ts), health, {"cpu_percent": cpu}, {"qps": qps})


def minute_of(rollups: Rollups, node_id: str, start: float) -> list[float]:
    """Timestamps every 5 s that fall in one whole rollup interval of ``node_id``."""
    whole = rollups._bucket(node_id, start + 60.0)
    return [t for t in (start + 5.0 * i for i in range(40))
            if rollups._bucket(node_id, t) == whole]


def test_a_rollup_keeps_the_mean_the_peak_the_worst_health_and_the_last_seq() -> None:
    rollups = Rollups(60.0)
    times = minute_of(rollups, "web-1", 1000.0)
    cpus = [10.0 + i for i in range(len(times))]
    closed = rollups.add(sample(t, c, health="suspect" if i == 2 else "healthy")
                         for i, (t, c) in enumerate(zip(times, cpus, strict=True)))
    assert closed == [] and len(rollups) == 1
    (point,) = rollups.add([sample(times[-1] + 60.0, 99.0)])  # the next interval closes it
    assert point.ts == times[-1] and point.seq == int(times[-1]) and point.span == 60.0
    assert point.system == {"cpu_percent": round(sum(cpus) / len(cpus), 4)}
    assert point.load == {"qps": 1.0}
    assert point.peak == {"cpu_percent": max(cpus), "load.qps": 1.0}
    assert point.health == "suspect"  # a flap within the interval stays visible


def test_means_are_rounded_to_four_significant_digits() -> None:
    rollups = Rollups(60.0)
    times = minute_of(rollups, "web-1", 0.0)[:3]
    rollups.add([sample(times[0], 1.0), sample(times[1], 2.0), sample(times[2], 2.0)])
    (point,) = rollups.close_all()
    assert point.system["cpu_percent"] == 1.667


def test_rollup_boundaries_are_spread_by_node() -> None:
    rollups = Rollups(60.0)
    turns = {next(t for t in range(1, 62)
                  if rollups._bucket(f"n{i}", t) != rollups._bucket(f"n{i}", 0.0))
             for i in range(200)}
    assert len(turns) > 40  # each node's minute turns at its own second, not all at :00


def test_a_node_that_stops_sampling_has_its_rollup_closed_once_the_interval_ended() -> None:
    rollups = Rollups(60.0)
    rollups.add([sample(1000.0, 5.0)])
    assert rollups.close_ended(1000.0) == []
    (point,) = rollups.close_ended(1000.0 + 60.0)
    assert point.system == {"cpu_percent": 5.0} and len(rollups) == 0


def test_a_new_figure_closes_the_rollup_being_gathered() -> None:
    rollups = Rollups(60.0)
    times = minute_of(rollups, "web-1", 0.0)
    rollups.add([sample(times[0], 5.0)])
    extra = HistorySample("web-1", times[1], 99, "healthy", {"cpu_percent": 7.0},
                          {"qps": 1.0, "pending_tasks": 3.0})
    (point,) = rollups.add([extra])
    assert point.system == {"cpu_percent": 5.0}
    (second,) = rollups.close_all()
    assert second.load == {"qps": 1.0, "pending_tasks": 3.0}


def test_rollups_and_replays_are_not_gathered_again() -> None:
    rollups = Rollups(60.0)
    rollups.add([sample(1000.0, 5.0)])
    rolled = HistorySample("web-1", 2000.0, 1, "healthy", {}, {}, 60.0, {})
    assert rollups.add([rolled, sample(900.0, 1.0)]) == []
    (point,) = rollups.close_all()
    assert point.system == {"cpu_percent": 5.0}


def test_tiers_from_the_config_and_what_one_node_holds() -> None:
    cfg = load_config(None)
    tiers = HistoryTiers.from_config(cfg)
    assert (tiers.ttl, tiers.full_resolution, tiers.rollup) == (3600.0, 300.0, 60.0)
    assert tiers.raw and tiers.rolled
    assert tiers.points_per_node(5.0) == pytest.approx(60 + 55)
    etcd = HistoryTiers.from_config(cfg, etcd=True)
    assert not etcd.raw and etcd.rolled and etcd.points_per_node(5.0) == pytest.approx(12)
    full = HistoryTiers(3600.0, 3600.0, 60.0)
    assert full.raw and not full.rolled and full.points_per_node(5.0) == pytest.approx(720)


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Rollups(0.0)


def gather(chunks: SampleChunks, samples: list[HistorySample]) -> None:
    for s in samples:
        chunks.add(s.node_id, s.ts, s.seq, s.health, s.system, s.load)


def test_chunks_fold_into_the_rollups_that_samples_one_at_a_time_make() -> None:
    samples = [sample(1000.0 + 5 * i, 10.0 + (i * 7) % 13, qps=float(i % 4),
                      health="suspect" if i == 17 else "healthy") for i in range(60)]
    one_by_one = Rollups(60.0)
    expected = one_by_one.add(samples) + one_by_one.close_all()
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    gather(chunks, samples)
    raw, points = chunks.take(1300.0, final=True)
    assert points == expected
    assert [s for c in raw for s in c.samples()] == samples  # the raw tier gets every sample
    assert all(len(c) <= 12 for c in raw)  # 5 s apart, within a minute


def test_a_chunk_lies_within_one_rollup_interval_and_at_most_a_minute() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 300.0))
    rollups = chunks.rollups
    assert rollups is not None and chunks.interval == CHUNK_SECONDS
    gather(chunks, [sample(1000.0 + 5 * i, 1.0) for i in range(200)])
    raw, _ = chunks.take(0.0, final=True)
    for c in raw:
        assert max(c.ts) - min(c.ts) < CHUNK_SECONDS
        assert len({rollups._bucket("web-1", t) for t in c.ts}) == 1
    assert sum(len(c) for c in raw) == 200


def test_a_new_figure_or_a_late_sample_starts_a_chunk() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 3600.0, 60.0))  # raw only: no rollups
    assert chunks.rollups is None
    gather(chunks, [sample(1000.0, 1.0), sample(1001.0, 2.0)])
    extra = HistorySample("web-1", 1002.0, 1002, "healthy", {"cpu_percent": 3.0},
                          {"qps": 1.0, "pending_tasks": 3.0})
    late = sample(999.0, 9.0)  # older than what is gathered (a clock step back)
    gather(chunks, [extra, late])
    raw, points = chunks.take(0.0, final=True)
    assert points == [] and [len(c) for c in raw] == [2, 1, 1]
    assert raw[1].samples() == [extra] and raw[2].samples() == [late]


def test_handing_nodes_over_closes_what_is_gathered_for_them_alone() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    gather(chunks, [sample(1000.0 + 5 * i, 1.0) for i in range(3)])
    gather(chunks, [sample(1000.0, 2.0, node_id="web-2")])
    raw, points = chunks.close(["web-1"])
    assert sum(len(c) for c in raw) == 3 and {c.node_id for c in raw} == {"web-1"}
    assert points and {p.node_id for p in points} == {"web-1"}
    assert chunks.samples("web-1", 0.0) == [] and len(chunks.samples("web-2", 0.0)) == 1
    raw, points = chunks.take(0.0, final=True)
    assert [c.node_id for c in raw] == [p.node_id for p in points] == ["web-2"]


def test_a_node_that_stops_sampling_has_its_chunk_closed_once_its_window_ended() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    gather(chunks, [sample(1000.0, 5.0)])
    assert chunks.take(1000.0) == ([], []) and len(chunks) == 1
    raw, points = chunks.take(1000.0 + 2 * CHUNK_SECONDS)
    assert [c.samples() for c in raw] == [[sample(1000.0, 5.0)]]
    assert [p.system for p in points] == [{"cpu_percent": 5.0}] and len(chunks) == 0


def test_a_rollup_closes_at_its_own_turn_not_with_the_fleets_at_the_sweep() -> None:
    """A fleet sampling every 5 s: each take hands over only the rollups whose interval just
    ended, never every node's at once (once a minute, that was a third of a second of one
    loop turn at 20,000 nodes)."""
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    nodes = [f"n{i}" for i in range(600)]
    closed: list[int] = []
    for step in range(60):  # 5 minutes, a take every 5 s as ticks do (more often, really)
        now = 1000.0 + 5.0 * step
        for k, node_id in enumerate(nodes):
            ts = now + 5.0 * k / len(nodes)
            chunks.add(node_id, ts, step, "healthy", {"cpu_percent": 1.0}, {"qps": 1.0})
        raw, points = chunks.take(now + 5.0)
        if step >= 13:  # past the first whole minute: every node has closed a rollup
            closed.append(len(points))
            assert {c.node_id for c in raw} == {p.node_id for p in points}
    assert sum(closed) >= 3 * len(nodes)
    assert max(closed) < len(nodes) / 4  # spread over the minute: no burst
    assert all(p.span == 60.0 and p.system == {"cpu_percent": 1.0} for p in points)


def test_a_chunk_that_ended_is_closed_by_the_next_take_without_waiting_for_a_sweep() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    gather(chunks, [sample(1000.0, 5.0)])
    gather(chunks, [sample(1000.0, 6.0, node_id="web-2")])
    chunks.take(1001.0)  # the interval's sweep is done here: the next is a minute away
    until = chunks._open["web-1"].until
    assert chunks.take(until - 0.5) == ([], [])
    raw, points = chunks.take(until + 1.5)  # within a second of its end, not at the sweep
    assert [c.node_id for c in raw if c.node_id == "web-1"] == ["web-1"]
    assert "web-1" in {p.node_id for p in points} and "web-1" not in chunks._open


def test_readers_see_the_samples_not_taken_yet_and_a_lost_share_is_forgotten() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 300.0, 60.0))
    gather(chunks, [sample(1000.0 + 5 * i, float(i)) for i in range(30)])
    gather(chunks, [sample(1000.0, 1.0, node_id="web-2")])
    assert [s.ts for s in chunks.samples("web-1", 1100.0)] == [1000.0 + 5 * i
                                                               for i in range(20, 30)]
    assert len(chunks.samples("web-1", 0.0)) == 30
    chunks.forget(["web-1"])
    assert chunks.samples("web-1", 0.0) == [] and len(chunks.samples("web-2", 0.0)) == 1
    raw, points = chunks.take(0.0, final=True)
    assert {c.node_id for c in raw} == {p.node_id for p in points} == {"web-2"}


def test_without_a_raw_tier_only_rollups_are_kept() -> None:
    chunks = SampleChunks(HistoryTiers(3600.0, 0.0, 300.0))
    gather(chunks, [sample(1000.0 + 5 * i, 2.0) for i in range(100)])
    assert chunks.samples("web-1", 0.0) == []
    raw, points = chunks.take(0.0, final=True)
    assert raw == [] and sum(1 for _ in points) >= 1
    assert all(p.span == 300.0 and p.system == {"cpu_percent": 2.0} for p in points)


def test_a_short_retention_gathers_no_longer_than_it_keeps_and_drops_what_expired() -> None:
    chunks = SampleChunks(HistoryTiers(2.0, 300.0, 60.0))  # raw for 2 s: the whole ttl
    assert chunks.interval == 2.0
    gather(chunks, [sample(1000.0 + 0.5 * i, 1.0) for i in range(3)])
    assert chunks.take(1001.0)[0] == []  # still within its window
    raw, _ = chunks.take(1010.0)  # closed by the sweep, but every sample is past 2 s
    assert raw == [] and len(chunks) == 0
