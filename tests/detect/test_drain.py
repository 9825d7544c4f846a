"""Drains: complete when no tasks are pending, or at the deadline."""

from __future__ import annotations

from nodewatch.detect.drain import Drains
from nodewatch.detect.policy import Policy
from nodewatch.model import NodeState
from nodewatch.testing import FakeClock


def node(pending: float | None) -> NodeState:
    state = NodeState(node_id="n0", address="10.0.0.1:7301")
    if pending is not None:
        state.load = {"pending_tasks": pending}
    return state


def test_a_drain_with_no_pending_tasks_completes_at_once() -> None:
    clock, drains, n = FakeClock(), Drains(Policy()), node(0.0)
    drains.start(n, "maintenance", clock())
    end = drains.check(n, clock())
    assert end is not None and end.kind == "drain_complete" and end.reason == "no pending tasks"
    assert n.drain is not None and n.drain.complete and drains.waiting() == []


def test_a_drain_waits_for_pending_tasks_until_the_deadline() -> None:
    clock, drains, n = FakeClock(), Drains(Policy(drain_deadline=60.0)), node(3.0)
    drain = drains.start(n, "maintenance", clock(), by="node")
    assert drain.by == "node" and drain.deadline == clock() + 60.0
    assert drains.check(n, clock.advance(59.0)) is None
    assert drains.waiting() == ["n0"]
    end = drains.check(n, clock.advance(1.0))
    assert end is not None and end.kind == "drain_deadline" and end.pending == 3.0
    assert drains.check(n, clock.advance(1.0)) is None  # ends once


def test_stopping_a_drain_clears_it() -> None:
    clock, drains, n = FakeClock(), Drains(Policy()), node(3.0)
    drains.start(n, "maintenance", clock())
    drains.stop(n)
    assert n.drain is None and drains.waiting() == []
