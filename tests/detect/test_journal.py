"""Event ids in one sequence, and which nodes must be written when."""

from __future__ import annotations

import pytest

from nodewatch.detect.journal import EVENT_SLOTS, DirtyNodes, EventSequence, Revisions
from nodewatch.model import event_id, event_number
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
