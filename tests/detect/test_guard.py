"""The guard: distinct nodes going suspect within the window turn it on; it turns off when the
failing nodes fall below the fraction or too few nodes are watched."""

from __future__ import annotations

from nodewatch.detect.guard import Guard
from nodewatch.detect.policy import Policy
from nodewatch.model import Health, NodeState
from nodewatch.testing import FakeClock

POLICY = Policy(guard_fraction=0.5, guard_min_nodes=4)


def nodes(count: int, suspect: int = 0) -> dict[str, NodeState]:
    table = {f"n{i}": NodeState(node_id=f"n{i}", address="") for i in range(count)}
    for i in range(suspect):
        table[f"n{i}"].health = Health.SUSPECT
    return table


def test_half_the_nodes_going_suspect_turns_the_guard_on() -> None:
    clock, guard, table = FakeClock(), Guard(POLICY), nodes(4, suspect=2)
    guard.note_suspect("n0", clock())
    assert guard.update(clock(), table, watched=4, suspects=1) is None
    guard.note_suspect("n1", clock())
    change = guard.update(clock(), table, watched=4, suspects=2)
    assert change is not None and change.on and guard.on
    assert change.evidence == {"suspect": 2, "total": 4, "fraction": 0.5}


def test_one_node_flapping_counts_once() -> None:
    clock, guard, table = FakeClock(), Guard(POLICY), nodes(4, suspect=1)
    for _ in range(3):
        guard.note_suspect("n0", clock())
        clock.advance(1.0)
    assert guard.update(clock(), table, watched=4, suspects=1) is None
    assert guard.recent_health[Health.SUSPECT] == 1


def test_entries_older_than_the_window_are_forgotten() -> None:
    clock, guard, table = FakeClock(), Guard(POLICY), nodes(4, suspect=1)
    guard.note_suspect("n0", clock())
    clock.advance(POLICY.guard_window + 1.0)
    guard.update(clock(), table, watched=4, suspects=1)
    assert dict(guard.recent) == {}
    assert guard.recent_health[Health.SUSPECT] == 0


def test_the_guard_turns_off_when_the_failing_nodes_recover() -> None:
    clock, guard, table = FakeClock(), Guard(POLICY), nodes(4, suspect=2)
    guard.note_suspect("n0", clock())
    guard.note_suspect("n1", clock())
    assert guard.update(clock(), table, watched=4, suspects=2) is not None
    for node_id in ("n0", "n1"):
        guard.note_health(node_id, Health.SUSPECT, Health.HEALTHY)
        table[node_id].health = Health.HEALTHY
    change = guard.update(clock(), table, watched=4, suspects=0)
    assert change is not None and not change.on and not guard.on


def test_too_few_watched_nodes_turn_the_guard_off() -> None:
    clock, guard, table = FakeClock(), Guard(POLICY), nodes(4, suspect=2)
    guard.note_suspect("n0", clock())
    guard.note_suspect("n1", clock())
    guard.update(clock(), table, watched=4, suspects=2)
    change = guard.update(clock(), table, watched=3, suspects=2)
    assert change is not None and not change.on
    assert "min_nodes 4" in change.reason
