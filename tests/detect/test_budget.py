"""The disruption budget: a fraction of the watched nodes out at once, a rate per minute, and
the cleanups held while it is spent."""

from __future__ import annotations

from nodewatch.detect.budget import Budget, RateLimiter
from nodewatch.detect.policy import Policy
from nodewatch.testing import FakeClock


def test_the_rate_limiter_forgets_acts_older_than_its_period() -> None:
    clock, limiter = FakeClock(), RateLimiter(2, per=60.0)
    limiter.record(clock())
    limiter.record(clock.advance(10.0))
    assert limiter.saturated(clock())
    assert limiter.saturated(clock.advance(49.0))
    assert not limiter.saturated(clock.advance(1.0))  # the first act is 60 s old


def test_the_budget_blocks_at_the_rate_with_the_limiter_passed_in() -> None:
    clock = FakeClock()
    budget = Budget(Policy(max_rate=1.0, max_fraction=1.0), RateLimiter(1, per=60.0))
    assert budget.block(clock(), watched=10, out=0) == ""
    budget.spend("n0", clock())
    assert budget.block(clock(), watched=10, out=1) == "held: budget (rate 1/min reached)"
    assert budget.block(clock.advance(60.0), watched=10, out=1) == ""


def test_the_budget_blocks_at_the_fraction_never_below_one_node() -> None:
    clock, budget = FakeClock(), Budget(Policy(max_rate=100.0, max_fraction=0.2))
    assert budget.block(clock(), watched=3, out=0) == ""  # 20 % of 3 rounds down, to one
    assert budget.block(clock(), watched=3, out=1) == "held: budget (1 of 3 nodes already out)"
    assert budget.block(clock(), watched=10, out=1) == ""


def test_held_cleanups_are_kept_until_spent_or_released() -> None:
    clock, budget = FakeClock(), Budget(Policy())
    budget.hold("n0", "e1")
    budget.hold("n1", "e2")
    assert dict(budget.held) == {"n0": "e1", "n1": "e2"}
    budget.spend("n0", clock())
    budget.release("n1")
    assert dict(budget.held) == {}


def test_a_coordinator_holding_part_of_the_shares_spends_that_part_of_the_rate() -> None:
    clock, budget = FakeClock(), Budget(Policy(max_rate=9.0, max_fraction=1.0))
    budget.share(1 / 3)
    for i in range(3):
        assert budget.block(clock(), watched=100, out=i) == ""
        budget.spend(f"n{i}", clock())
    assert budget.block(clock(), watched=100, out=3) == (
        "held: budget (this coordinator's part, 3 of 9/min, reached)")
    budget.share(0.0)  # no share: still one a minute once the last has aged out
    assert budget.block(clock.advance(60.0), watched=100, out=3) == ""
    budget.share(1.0)
    assert budget.limiter.rate == 9.0
