"""φ accrual suspicion of pushed heartbeats (Hayashibara et al. 2004, as Akka and Cassandra use
it): how long a node's silence may last before it is improbable by the node's own history.

φ(now) = −log10(1 − F(now − last)), with F the normal CDF of the node's recent inter-arrival
times (mean plus ``phi_pause``, standard deviation floored at ``phi_min_std``), approximated by
the logistic function Akka uses. φ only grows with the silence, so instead of evaluating φ on a
timer the threshold is turned into a deadline once per arrival (:meth:`PhiAccrual.allowed_silence`):
the coordinator's poll deferral and the simulation then need nothing more than they do for the
fixed deadline.
"""

from __future__ import annotations

import math
from array import array

from nodewatch.detect.policy import Policy

__all__ = ["ArrivalHistory", "PhiAccrual", "phi", "phi_quantile"]

# The logistic approximation of the standard normal CDF (Bowling et al. 2009):
# F(y) ≈ 1 / (1 + exp(−y (A + B y²))), within 1.4e-4 of the normal CDF everywhere.
_A, _B = 1.5976, 0.070566
_LN10 = math.log(10.0)


def _g(y: float) -> float:
    return y * (_A + _B * y * y)


def phi(elapsed: float, mean: float, std: float) -> float:
    """φ of a silence of ``elapsed`` seconds for arrivals ``mean`` ± ``std`` apart.

    1 − F = 1 / (1 + e^g), so φ = log10(1 + e^g); written so that it neither overflows for long
    silences nor loses precision for short ones.
    """
    g = _g((elapsed - mean) / std)
    if g > 30.0:
        return (g + math.log1p(math.exp(-g))) / _LN10
    return math.log1p(math.exp(g)) / _LN10


def phi_quantile(threshold: float) -> float:
    """The standardised silence y at which φ reaches ``threshold``: the real root of
    B y³ + A y = ln(10^threshold − 1) (the cubic has one, being monotonic), by Cardano."""
    c = threshold * _LN10 + math.log(-math.expm1(-threshold * _LN10))
    p, q = _A / _B, -c / _B
    root = math.sqrt(q * q / 4.0 + p * p * p / 27.0)
    return math.cbrt(-q / 2.0 + root) + math.cbrt(-q / 2.0 - root)


class ArrivalHistory:
    """One node's last arrival and a bounded ring of its inter-arrival times, with running sums
    so that the mean and deviation cost O(1) per heartbeat (recomputed each time the ring wraps,
    so that rounding never accumulates). An ``array`` of doubles: 8 bytes a sample, not the 32
    of a list of floats, for 100,000 nodes × ``phi_window`` samples."""

    __slots__ = ("last", "_samples", "_capacity", "_next", "_sum", "_sumsq")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.last: float | None = None
        self._samples = array("d")
        self._capacity = capacity
        self._next = 0
        self._sum = 0.0
        self._sumsq = 0.0

    def __len__(self) -> int:
        return len(self._samples)

    def note(self, at: float) -> None:
        """A heartbeat arrived at ``at``; the interval since the previous one is a sample."""
        last, self.last = self.last, at
        if last is None or at < last:
            return  # the first arrival (or a clock step back): no interval to learn from
        interval = at - last
        samples = self._samples
        if len(samples) < self._capacity:
            samples.append(interval)
            self._sum += interval
            self._sumsq += interval * interval
            return
        old = samples[self._next]
        samples[self._next] = interval
        self._next = (self._next + 1) % self._capacity
        if self._next == 0:
            self._sum = math.fsum(samples)
            self._sumsq = math.fsum(x * x for x in samples)
        else:
            self._sum += interval - old
            self._sumsq += interval * interval - old * old

    def restart(self) -> None:
        """The node started again: the gap since its last arrival is downtime, not a sample;
        what it showed before (its jitter) is kept."""
        self.last = None

    @property
    def mean(self) -> float:
        return self._sum / len(self._samples) if self._samples else 0.0

    @property
    def std(self) -> float:
        n = len(self._samples)
        if n == 0:
            return 0.0
        mean = self._sum / n
        return math.sqrt(max(0.0, self._sumsq / n - mean * mean))

    def samples(self) -> list[float]:
        """The retained intervals, oldest first."""
        return list(self._samples[self._next:]) + list(self._samples[: self._next])


class PhiAccrual:
    """Every pushing node's arrival history and the silence φ allows it.

    Soft state: nothing of it is stored, so after a coordinator restart or a leader change a
    node is judged by the fixed deadline until ``phi_min_samples`` intervals are seen again.
    """

    __slots__ = ("_policy", "_z", "_histories")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._z = phi_quantile(policy.phi_threshold)
        self._histories: dict[str, ArrivalHistory] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._histories

    def history(self, node_id: str) -> ArrivalHistory | None:
        return self._histories.get(node_id)

    def note(self, node_id: str, at: float) -> None:
        """An accepted push from the node arrived at ``at`` (the coordinator's clock)."""
        history = self._histories.get(node_id)
        if history is None:
            history = self._histories[node_id] = ArrivalHistory(self._policy.phi_window)
        history.note(at)

    def restart(self, node_id: str) -> None:
        """The node registered again: its next arrival starts a new interval."""
        history = self._histories.get(node_id)
        if history is not None:
            history.restart()

    def forget(self, node_id: str) -> None:
        self._histories.pop(node_id, None)

    def _estimate(self, node_id: str) -> tuple[float, float, float] | None:
        """(last arrival, mean with the pause margin, floored deviation), or None before
        ``phi_min_samples`` intervals: too few to say what is normal for the node."""
        history = self._histories.get(node_id)
        p = self._policy
        if history is None or history.last is None or len(history) < p.phi_min_samples:
            return None
        return history.last, history.mean + p.phi_pause, max(history.std, p.phi_min_std)

    def phi(self, node_id: str, now: float) -> float | None:
        """The node's φ at ``now``, or None while too few intervals are known."""
        estimate = self._estimate(node_id)
        if estimate is None:
            return None
        last, mean, std = estimate
        return phi(now - last, mean, std)

    def allowed_silence(self, node_id: str) -> float | None:
        """Seconds after its last arrival at which the node's φ reaches ``phi_threshold``, or
        None while too few intervals are known (the caller then uses the fixed deadline)."""
        estimate = self._estimate(node_id)
        if estimate is None:
            return None
        _, mean, std = estimate
        return max(0.0, mean + self._z * std)
