"""Event ids in one sequence, and which nodes must be written when."""

from __future__ import annotations

from nodewatch.detect.journal import DirtyNodes, EventSequence
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
