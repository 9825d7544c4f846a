"""The self-health gate: startup grace and loop lag hold confirmation, each with one reason."""

from __future__ import annotations

from nodewatch.detect.gate import Gate
from nodewatch.detect.policy import Policy
from nodewatch.testing import FakeClock


def test_the_gate_holds_through_the_startup_grace_then_opens() -> None:
    clock = FakeClock()
    gate = Gate(Policy(startup_grace=30.0), now=clock())
    assert gate.hold_reason(clock()) == "held: startup grace"
    assert gate.evidence(clock())["grace_left"] == 30.0
    clock.advance(30.0)
    assert gate.hold_reason(clock()) == ""
    assert gate.evidence(clock())["grace_left"] == 0.0


def test_a_restart_starts_the_grace_again() -> None:
    clock = FakeClock()
    gate = Gate(Policy(startup_grace=10.0), now=clock())
    clock.advance(60.0)
    gate.restart(clock())
    assert gate.in_grace(clock())
    assert gate.hold_reason(clock()) == "held: startup grace"


def test_loop_lag_over_the_limit_holds_and_keeps_one_reason_as_it_grows() -> None:
    clock = FakeClock()
    gate = Gate(Policy(startup_grace=0.0, max_loop_lag=1.0), now=clock())
    gate.set_loop_lag(1.0)
    assert gate.hold_reason(clock()) == ""
    gate.set_loop_lag(1.5)
    reason = gate.hold_reason(clock())
    gate.set_loop_lag(4.0)
    assert gate.hold_reason(clock()) == reason == "held: coordinator loop lag"
    assert gate.evidence(clock())["loop_lag"] == 4.0
