"""The disruption budget: how many nodes may be out (cleaned up) at once, and how fast cleanups
may happen; cleanups over budget wait, held, until it allows them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from nodewatch.detect.policy import Policy

__all__ = ["Budget", "RateLimiter"]


class RateLimiter:
    """At most ``rate`` acts within any ``per`` seconds; the time is passed in with each call."""

    def __init__(self, rate: float, per: float = 60.0) -> None:
        self.rate = rate
        self.per = per
        self._times: deque[float] = deque()

    def saturated(self, now: float) -> bool:
        """True while another act now would exceed the rate."""
        while self._times and self._times[0] <= now - self.per:
            self._times.popleft()
        return len(self._times) >= self.rate

    def record(self, now: float) -> None:
        self._times.append(now)


class Budget:
    """``max_fraction`` of the watched nodes out at once, ``max_rate`` cleanups a minute."""

    def __init__(self, policy: Policy, limiter: RateLimiter | None = None) -> None:
        self.policy = policy
        self.limiter = limiter or RateLimiter(policy.max_rate, 60.0)
        self._held: dict[str, str] = {}  # node_id -> event id of the unhealthy event
        self.fraction = 1.0  # of the fleet this coordinator decides for (shares)

    @property
    def held(self) -> Mapping[str, str]:
        """Nodes whose cleanup waits for the budget, with the event that asked for it."""
        return self._held

    def block(self, now: float, watched: int, out: int) -> str:
        """Why a cleanup must wait now ('' when it may go ahead).

        ``watched`` counts the nodes not dead, ``out`` the nodes cleaned up and not dead: dead
        nodes are gone for good, so they neither use the budget nor size it, and a cluster
        that lost nodes long ago can still clean up a new failure.
        """
        if self.limiter.saturated(now):
            if self.limiter.rate != self.policy.max_rate:
                return (f"held: budget (this coordinator's part, {self.limiter.rate:.3g} of "
                        f"{self.policy.max_rate:g}/min, reached)")
            return f"held: budget (rate {self.policy.max_rate:g}/min reached)"
        limit = self.policy.budget_limit(watched)
        if out >= limit:
            return f"held: budget ({limit} of {watched} nodes already out)"
        return ""

    def share(self, fraction: float) -> None:
        """This coordinator decides for ``fraction`` of the fleet (its shares): it may spend
        that part of the per-minute rate, so that the coordinators together stay within it
        (at least one a minute each: a share is never starved of cleanups). How many nodes
        may be out at once needs no split: every coordinator counts the whole fleet."""
        self.fraction = max(0.0, min(1.0, fraction))
        rate = self.policy.max_rate
        self.limiter.rate = max(min(1.0, rate), rate * self.fraction)

    def block_part(self, own_out: int, watched: int) -> str:
        """With shared coordinators, the nodes out at once are capped per coordinator too, at
        its part of the fleet's limit (at least one): each sees the others' cleanups only
        once they are mirrored, so without a part of its own two could fill the limit at
        the same moment. ``own_out`` counts this coordinator's nodes out."""
        limit = self.policy.budget_limit(watched)
        part = max(1, math.floor(limit * self.fraction))
        if own_out >= part:
            return (f"held: budget (this coordinator's part: {own_out} of its {part} of "
                    f"{limit} nodes already out)")
        return ""

    def spend(self, node_id: str, now: float) -> None:
        """A cleanup goes ahead now: it counts against the rate and is no longer held."""
        self._held.pop(node_id, None)
        self.limiter.record(now)

    def note_ejection(self, now: float) -> None:
        """An outlier was ejected: it counts against the rate like a cleanup."""
        self.limiter.record(now)

    def hold(self, node_id: str, event_id: str) -> None:
        self._held[node_id] = event_id

    def release(self, node_id: str) -> None:
        """The node no longer needs its cleanup (it recovered or is gone)."""
        self._held.pop(node_id, None)
