"""Event ids in one sequence, and which nodes must be written when."""

from __future__ import annotations

import pytest

from nodewatch.detect.journal import (
    EVENT_SLOTS,
    DirtyNodes,
    EventSequence,
    Revisions,
    RoutineRefresh,
)
from nodewatch.model import NodeState, NodeStatus, event_id, event_number
from nodewatch.testing import FakeClock


def test_events_are_numbered_in_one_sequence_from_where_the_store_left_off() -> None:
    clock, sequence = FakeClock(), EventSequence(41)
    first = sequence.mint(clock(), "n0", "suspect", "healthy", "suspect", "check failed")
    second = sequence.mint(clock.advance(1.0), "", "guard_on")
    assert first.id == event_id(41) and event_number(second.id) == 42
    assert second.ts == clock() and second.evidence == {}
    assert sequence.next_number == 43


def test_routine_observations_wait_for_a_full_write() -> None:
    dirty = DirtyNodes(["restored"])
    dirty.changed("n0")
    dirty.touched("n1")
    assert dirty.take(routine=False) == {"restored", "n0"}
    assert dirty.take() == {"n1"}
    assert dirty.take() == set()


def test_marking_again_skips_unknown_nodes_and_forget_drops_pending_ones() -> None:
    dirty = DirtyNodes()
    dirty.mark(["n0", "gone"], known={"n0", "n1"})
    dirty.touched("n1")
    dirty.forget("n1")
    assert dirty.take() == {"n0"}


def test_revisions_tell_what_changed_and_what_was_removed_since_a_revision() -> None:
    revisions = Revisions("e1")
    for node_id in ("a", "b", "c"):
        revisions.note(node_id)
    start = revisions.revision
    assert revisions.since(0) == (["c", "b", "a"], [])
    revisions.note("a")
    revisions.drop("b")
    revisions.drop("ghost")  # never known: no revision taken
    assert revisions.since(start) == (["a"], ["b"])
    assert revisions.of("a") == start + 1 and revisions.of("b") == 0
    revisions.note("b")  # back again: changed, no longer removed
    assert revisions.since(start) == (["b", "a"], [])
    assert revisions.since(revisions.revision) == ([], [])
    assert revisions.since(revisions.revision + 1) is None  # not a revision of this counter


def test_material_readers_pass_over_routine_pushes_but_never_a_change_before_one() -> None:
    revisions = Revisions("e1")
    for node_id in ("a", "b", "c"):
        revisions.note(node_id)
    start = revisions.revision
    revisions.note("a", routine=True)  # only pushes since start: nothing material
    revisions.note("b")
    revisions.note("b", routine=True)  # a change, then a push: the change still counts
    revisions.drop("c")
    assert revisions.since(start) == (["b", "a"], ["c"])
    assert revisions.material_since(start) == (["b"], ["c"])
    assert revisions.material_since(revisions.revision) == ([], [])
    assert revisions.material_since(revisions.revision + 1) is None
    dirty = DirtyNodes()
    dirty.pushed("n1")
    assert dirty.take() == {"n1"}  # written with the routine refresh like any touch
    assert dirty.revisions.material_since(0) == ([], [])


def test_revisions_forget_old_removals_and_send_older_readers_to_a_full_read() -> None:
    revisions = Revisions("e1", max_removed=2)
    for node_id in ("a", "b", "c"):
        revisions.note(node_id)
    for node_id in ("a", "b", "c"):
        revisions.drop(node_id)
    assert revisions.since(3) is None  # a's removal is forgotten
    assert revisions.since(4) == ([], ["c", "b"])


def test_dirty_nodes_give_every_change_a_revision() -> None:
    dirty = DirtyNodes(["restored"])
    before = dirty.revisions.revision
    dirty.changed("n0")
    dirty.touched("n1")
    dirty.take()
    dirty.forget("restored")
    assert dirty.revisions.since(before) == (["n1", "n0"], ["restored"])


def test_coordinators_sharing_a_store_mint_unique_ids_that_sort_by_time() -> None:
    clock = FakeClock(1_700_000_000.0)
    one, two = EventSequence(1), EventSequence(1)
    one.use_slot(3)
    two.use_slot(700)
    a = one.mint(clock(), "n1", "suspect")
    b = two.mint(clock(), "n2", "suspect")  # the same millisecond: different ids
    c = one.mint(clock(), "n1", "unhealthy")  # the same millisecond again: later than a
    assert len({a.id, b.id, c.id}) == 3
    assert event_number(a.id) % EVENT_SLOTS == 3 and event_number(b.id) % EVENT_SLOTS == 700
    assert a.id < c.id
    later = two.mint(clock.advance(0.002), "n2", "healthy")
    assert later.id > c.id  # ids follow time across coordinators
    # An id seen from another coordinator pushes ours past it (a clock behind stays ordered).
    behind = EventSequence(1)
    behind.use_slot(5)
    behind.witness(event_number(later.id))
    assert behind.mint(clock() - 10.0, "n3", "suspect").id > later.id


def test_a_slot_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside 0..1023"):
        EventSequence(1).use_slot(EVENT_SLOTS)
# -- the slow refresh of routine-only nodes ---------------------------------------------------


def _digest(node: NodeState) -> int:
    """What the coordinator's digest sees, for the test: the fields a reader needs."""
    return hash((node.health, node.node_status, tuple(node.reasons), node.admin))


def _stored(refresh: RoutineRefresh, count: int, now: float) -> dict[str, NodeState]:
    nodes = {f"n{i:05d}": NodeState(f"n{i:05d}", "a:1") for i in range(count)}
    refresh.stored(nodes.values(), now)
    return nodes


def test_a_routine_only_node_is_refreshed_after_the_interval_and_not_before() -> None:
    clock, refresh = FakeClock(), RoutineRefresh(60.0, _digest)
    nodes = _stored(refresh, 1, clock())
    (node_id,) = nodes
    nodes[node_id].seq, nodes[node_id].load = 7, {"qps": 3.0}  # routine
    assert refresh.sort([node_id], nodes) == set()
    due = refresh.due_after(node_id, clock())
    assert clock() + 60.0 <= due < clock() + 120.0
    assert refresh.due(due - 0.01, nodes) == set()
    assert refresh.due(due, nodes) == {node_id}
    assert refresh.due(due + 500, nodes) == set() and len(refresh) == 0  # taken once


def test_a_material_change_is_written_at_once_and_restarts_the_refresh() -> None:
    clock, refresh = FakeClock(), RoutineRefresh(60.0, _digest)
    nodes = _stored(refresh, 2, clock())
    a, b = sorted(nodes)
    assert refresh.sort([a, b], nodes) == set()
    nodes[a].reasons = ["cpu_percent > 95 for 30s"]  # the agent's reasons: material
    nodes[b].node_status = NodeStatus.DEGRADED
    assert refresh.sort([a, b], nodes) == {a, b}
    written_at = clock.advance(10.0)
    refresh.stored([nodes[a], nodes[b]], written_at)  # written: no longer waiting
    assert refresh.due(written_at + 120.0, nodes) == set()
    assert refresh.sort([a], nodes) == set()  # the same content again: routine
    assert refresh.due(refresh.due_after(a, written_at), nodes) == {a}


def test_nodes_only_pushed_wait_for_their_refresh_without_a_digest() -> None:
    clock = FakeClock()
    digests: list[str] = []

    def counting(node: NodeState) -> int:
        digests.append(node.node_id)
        return _digest(node)

    refresh = RoutineRefresh(60.0, counting)
    nodes = _stored(refresh, 3, clock())
    a, b, c = sorted(nodes)
    digests.clear()
    dirty = DirtyNodes()
    dirty.pushed(a)
    dirty.pushed(b)
    dirty.touched(b)  # touched otherwise too: it may have changed something material
    dirty.pushed("never-stored")
    touched, pushed = dirty.take_routine()
    assert (touched, pushed) == ({b}, {a, "never-stored"})
    assert dirty.take() == set()
    nodes["never-stored"] = NodeState("never-stored", "a:1")
    assert refresh.sort(touched, nodes) == set() and digests == [b]
    assert refresh.sort(pushed, nodes, pushed=True) == {"never-stored"}  # never stored: now
    assert digests == [b]  # no digest for a pushed-only node
    assert refresh.due(refresh.due_after(a, clock()), nodes) >= {a}
    assert c not in refresh.due(clock() + 500, nodes)


def test_a_node_never_stored_is_written_at_once() -> None:
    refresh = RoutineRefresh(60.0, _digest)
    nodes = {"new": NodeState("new", "a:1")}
    assert refresh.sort(["new", "gone"], nodes) == {"new"}


def test_refreshes_of_a_fleet_stored_at_once_are_spread_over_the_interval() -> None:
    clock, refresh = FakeClock(), RoutineRefresh(60.0, _digest)
    start = clock()
    nodes = _stored(refresh, 20_000, start)
    assert refresh.sort(nodes, nodes) == set()
    per_second: list[int] = []
    for second in range(1, 121):
        per_second.append(len(refresh.due(start + second, nodes)))
    assert sum(per_second[:60]) == 0  # none before the interval
    assert sum(per_second) == 20_000  # all within two intervals
    busy = per_second[60:]
    mean = 20_000 / 60
    assert max(busy) < 1.3 * mean and min(busy) > 0.7 * mean  # no burst, no hole


def test_a_full_write_takes_every_waiting_node_and_removed_nodes_are_dropped() -> None:
    clock, refresh = FakeClock(), RoutineRefresh(5.0, _digest)
    nodes = _stored(refresh, 3, clock())
    assert refresh.sort(nodes, nodes) == set() and len(refresh) == 3
    gone = sorted(nodes)[0]
    assert refresh.take_all() == set(nodes) and len(refresh) == 0
    refresh.sort(nodes, nodes)
    del nodes[gone]
    assert refresh.due(clock() + 10.0, nodes) == set(nodes)
    assert refresh.sort([gone], nodes) == set()


def test_the_refresh_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RoutineRefresh(0.0, _digest)


def test_a_refreshed_node_keeps_its_place_in_the_cycle() -> None:
    clock, refresh = FakeClock(), RoutineRefresh(60.0, _digest)
    nodes = _stored(refresh, 1, clock())
    (node_id,) = nodes
    refresh.sort(nodes, nodes)
    first = refresh.due_after(node_id, clock())
    written = []
    at = clock()
    while len(written) < 3:
        at += 0.25  # the ticker: a write up to one tick after the node is due
        if refresh.due(at, nodes):
            refresh.stored(nodes.values(), at)
            written.append(at)
            refresh.sort(nodes, nodes)
    assert 0 <= written[0] - first < 0.25
    assert [round(b - a, 2) for a, b in zip(written, written[1:], strict=False)] == [60.0, 60.0]
