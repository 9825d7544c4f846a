"""The pure check scheduler: due order, lazy deletion, spreading, jitter and lateness."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodewatch.detect.scheduler import CheckScheduler, DeferralWheel, LatenessStats, jittered
from nodewatch.testing import FakeClock


def make(clock: FakeClock, seed: int = 7) -> CheckScheduler:
    return CheckScheduler(clock, random.Random(seed))


def test_pop_due_returns_due_nodes_earliest_first(clock: FakeClock) -> None:
    sched = make(clock)
    now = clock()
    sched.schedule("c", now + 3)
    sched.schedule("a", now + 1)
    sched.schedule("b", now + 2)
    assert sched.pop_due(now + 0.5, 10) == []
    assert sched.pop_due(now + 2, 10) == ["a", "b"]
    assert sched.next_due() == now + 3
    assert "a" not in sched and "c" in sched


def test_pop_due_respects_limit_and_keeps_the_rest(clock: FakeClock) -> None:
    sched = make(clock)
    for i in range(5):
        sched.schedule(f"n{i}", clock() + i)
    assert sched.pop_due(clock() + 10, 2) == ["n0", "n1"]
    assert sched.pop_due(clock() + 10, 10) == ["n2", "n3", "n4"]
    assert sched.next_due() is None


def test_reschedule_replaces_the_earlier_due_time(clock: FakeClock) -> None:
    sched = make(clock)
    sched.schedule("a", clock() + 1)
    sched.schedule("a", clock() + 5)
    assert sched.pop_due(clock() + 2, 10) == []
    assert sched.next_due() == clock() + 5
    assert len(sched) == 1


def test_schedule_soon_only_moves_a_node_earlier(clock: FakeClock) -> None:
    sched = make(clock)
    sched.schedule("a", clock() + 1)
    sched.schedule_soon("a", clock() + 5)
    assert sched.due_of("a") == clock() + 1
    sched.schedule_soon("a", clock())
    assert sched.due_of("a") == clock()


def test_removed_node_is_never_popped(clock: FakeClock) -> None:
    sched = make(clock)
    sched.schedule("a", clock())
    sched.schedule("b", clock())
    assert sched.remove("a") is True
    assert sched.remove("a") is False
    assert sched.pop_due(clock() + 1, 10) == ["b"]
    assert sched.next_due() is None


def test_pop_one_is_the_single_entry_hot_path(clock: FakeClock) -> None:
    sched = make(clock)
    sched.schedule("a", clock() + 1)
    assert sched.pop_one(clock()) is None
    assert sched.pop_one(clock() + 1) == ("a", clock() + 1)
    assert sched.pop_one(clock() + 1) is None


def test_heap_is_compacted_when_stale_entries_pile_up(clock: FakeClock) -> None:
    sched = make(clock)
    for i in range(100):
        sched.schedule(f"n{i}", clock() + i)
    for _ in range(50):
        for i in range(100):
            sched.schedule(f"n{i}", clock() + i + 1)
    assert len(sched._heap) <= 2 * len(sched) + 1
    assert sched.pop_due(clock() + 1000, 1000) == [f"n{i}" for i in range(100)]


def test_spread_never_synchronises_a_fresh_node_set(clock: FakeClock) -> None:
    sched = make(clock)
    nodes = [f"n{i}" for i in range(1000)]
    sched.spread(nodes, interval=5.0)
    dues = [sched.due_of(n) for n in nodes]
    assert all(d is not None and clock() <= d <= clock() + 5.0 for d in dues)
    # Roughly uniform: each of the five 1 s slices gets a fair share, none gets them all.
    buckets = [0] * 5
    for d in dues:
        assert d is not None
        buckets[min(4, int(d - clock()))] += 1
    assert all(120 < b < 280 for b in buckets), buckets


def test_spread_is_deterministic_with_a_seeded_rng(clock: FakeClock) -> None:
    first, second = make(clock, seed=3), make(clock, seed=3)
    first.spread(["a", "b", "c"], 10.0)
    second.spread(["a", "b", "c"], 10.0)
    assert [first.due_of(n) for n in "abc"] == [second.due_of(n) for n in "abc"]


def test_jittered_stays_within_bounds_and_varies() -> None:
    rng = random.Random(1)
    values = [jittered(10.0, 0.1, rng) for _ in range(2000)]
    assert all(9.0 <= v <= 11.0 for v in values)
    assert min(values) < 9.2 and max(values) > 10.8
    assert jittered(10.0, 0.0, rng) == 10.0


def test_lateness_is_measured_from_the_due_time(clock: FakeClock) -> None:
    sched = make(clock)
    due = clock()
    clock.advance(0.25)
    assert sched.record_start(due) == pytest.approx(0.25)
    assert sched.record_start(due + 1.0) == 0.0  # early start counts as on time
    assert sched.lateness.count == 2
    assert sched.lateness.max == pytest.approx(0.25)


def test_lateness_percentiles_and_ring_bound() -> None:
    stats = LatenessStats(capacity=100)
    for i in range(1, 201):
        stats.record(i / 1000)
    assert stats.count == 200
    assert len(stats.samples()) == 100
    assert stats.samples()[0] == pytest.approx(0.101)  # oldest retained first
    assert stats.percentile(50) == pytest.approx(0.150)
    assert stats.percentile(99) == pytest.approx(0.199)
    assert stats.percentile(100) == pytest.approx(0.200)
    stats.reset()
    assert stats.percentile(99) == 0.0 and stats.count == 0


# A random mix of operations: schedule(node, offset), remove(node), pop(advance, limit).
NODES = st.sampled_from([f"n{i}" for i in range(8)])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), NODES, st.floats(0, 10)),
        st.tuples(st.just("remove"), NODES, st.just(0.0)),
        st.tuples(st.just("pop"), st.integers(1, 5), st.floats(0, 3)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_pop_due_properties(ops: list[tuple[str, object, float]]) -> None:
    """Never before its due time, never a removed node, each node at most once per pop,
    and the model (dict of live due times) always agrees with the scheduler."""
    clock = FakeClock()
    sched = make(clock)
    model: dict[str, float] = {}
    for kind, arg, number in ops:
        if kind == "schedule":
            assert isinstance(arg, str)
            sched.schedule(arg, clock() + number)
            model[arg] = clock() + number
        elif kind == "remove":
            assert isinstance(arg, str)
            sched.remove(arg)
            model.pop(arg, None)
        else:
            assert isinstance(arg, int)
            clock.advance(number)
            popped = sched.pop_due_entries(clock(), arg)
            ids = [node_id for node_id, _ in popped]
            assert len(ids) == len(set(ids))
            for node_id, due in popped:
                assert node_id in model, "popped a removed or never-scheduled node"
                assert model[node_id] == due <= clock()
                del model[node_id]
            due_left = sorted(d for d in model.values() if d <= clock())
            if len(ids) < arg:
                assert due_left == [], "left a due node behind although below the limit"
            dues = [due for _, due in popped]
            assert dues == sorted(dues)
            if dues and due_left:
                assert dues[-1] <= due_left[0], "popped a later node before an earlier one"
        assert len(sched) == len(model)
        assert sched.next_due() == (min(model.values()) if model else None)


def test_the_deferral_wheel_hands_out_each_node_once_when_its_slot_begins() -> None:
    wheel = DeferralWheel(0.1)
    wheel.park("a", 10.05)
    wheel.park("b", 10.25)
    wheel.park("c", 10.0)
    wheel.park("a", 10.35)  # moved on: its old slot skips it
    wheel.park("a", 10.36)  # the same slot: nothing changes
    assert len(wheel) == 3 and "a" in wheel and wheel.next_due() == pytest.approx(10.0)
    assert wheel.parked_from("a") == pytest.approx(10.3) and wheel.parked_from("x") is None
    assert wheel.take(9.99) == []
    assert wheel.take(10.09) == ["c"]
    assert wheel.take(10.29) == ["b"]
    assert wheel.unpark("a") and not wheel.unpark("a")
    assert wheel.take(11.0) == [] and len(wheel) == 0 and wheel.next_due() is None


def test_a_node_parked_back_and_forth_comes_out_once() -> None:
    wheel = DeferralWheel(1.0)
    for due in (5.0, 7.0, 5.5, 9.0, 5.2):
        wheel.park("n", due)
    assert wheel.take(8.0) == ["n"] and wheel.take(100.0) == []
    with pytest.raises(ValueError):
        DeferralWheel(0.0)
