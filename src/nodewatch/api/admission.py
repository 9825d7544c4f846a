"""Admission control of registrations: a token bucket, the clock passed in.

A coordinator restart makes every agent register at once; a flood of registrations may come
from anywhere. Past ``rate`` per second (once ``burst`` is spent) a registration is refused
with the seconds to wait, and each refusal is given a later slot than the one before it, so
that the refused callers come back spread over time at about the rate the bucket refills
instead of all together again (the agents add their own jitter on top).
"""

from __future__ import annotations

import math

__all__ = ["MAX_RETRY_AFTER", "RegistrationBucket", "retry_after_header"]

# The longest wait handed out: a caller is never told to stay away for longer than this.
MAX_RETRY_AFTER = 60.0


class RegistrationBucket:
    """``admit(now)`` is 0.0 when a registration may go ahead, else the seconds to wait."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._updated: float | None = None
        # Until when refused callers have been given slots: the next refusal waits past it.
        self._promised = 0.0
        self.admitted = 0
        self.refused = 0

    def _refill(self, now: float) -> None:
        if self._updated is None:
            self._updated = now
            return
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = max(self._updated, now)

    def admit(self, now: float) -> float:
        self._refill(now)
        if self._tokens >= 1.0 - 1e-9:  # a whole token, give or take float rounding
            self._tokens = max(0.0, self._tokens - 1.0)
            self.admitted += 1
            return 0.0
        self.refused += 1
        # The first slot is when the next token arrives; each further refusal one token later.
        start = max(self._promised, now + (1.0 - self._tokens) / self.rate)
        self._promised = min(start + 1.0 / self.rate, now + MAX_RETRY_AFTER)
        return min(MAX_RETRY_AFTER, max(start - now, 1.0 / self.rate))


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds (HTTP allows no fraction), at least 1."""
    return str(max(1, math.ceil(seconds)))
