"""Outlier groups across coordinators: what one coordinator tells the others of each group.

With shared coordinators every coordinator holds the evidence of its own shares' nodes only,
but a group's centre and its ``max_ejection_fraction`` belong to the whole group. So each
publishes, per group, a ``GroupSummary``: how many of its nodes were judged, in service, out
and far from the median, and histograms of the in-service nodes' error rates and latencies on
fixed log-spaced buckets (about 5 % apart). Histograms merge by adding counts, so the fleet's
median is read from the sum of everybody's histograms, within half a bucket (~2.5 %) of the
exact one: small beside the rule's factor and margin. Pure, with a JSON shape for the edge.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GroupSummary", "LATENCY_EDGES", "RATE_EDGES", "histogram", "merged_median"]


def _geometric(low: float, high: float, ratio: float) -> tuple[float, ...]:
    count = math.ceil(math.log(high / low) / math.log(ratio))
    return tuple(low * ratio ** i for i in range(count + 1))


# Bucket i holds values in [edges[i-1], edges[i]); bucket 0 holds everything under edges[0]
# (an error rate of 0, the common case, is exact there).
RATE_EDGES = _geometric(1e-5, 1.0 + 1e-9, 1.05)
LATENCY_EDGES = _geometric(0.1, 600_000.0, 1.05)


def histogram(values: Iterable[float], edges: Sequence[float]) -> tuple[int, ...]:
    counts = [0] * (len(edges) + 1)
    for value in values:
        counts[bisect.bisect_right(edges, value)] += 1
    return tuple(counts)


def merged_median(histograms: Iterable[Sequence[int]], edges: Sequence[float]) -> float | None:
    """The median of the values behind the summed histograms (None without any), as the
    geometric middle of its bucket; the bottom bucket reads as 0."""
    total: list[int] = [0] * (len(edges) + 1)
    for counts in histograms:
        if len(counts) != len(total):
            continue  # a peer on another bucket layout: not comparable, left out
        for i, n in enumerate(counts):
            total[i] += n
    n = sum(total)
    if n == 0:
        return None
    rank = (n - 1) / 2  # the middle (the mean of the two middles' buckets when n is even)
    lower = upper = None
    seen = 0
    for i, count in enumerate(total):
        if count == 0:
            continue
        if lower is None and seen + count > math.floor(rank):
            lower = i
        if seen + count > math.ceil(rank):
            upper = i
            break
        seen += count
    assert lower is not None and upper is not None
    return (_middle(lower, edges) + _middle(upper, edges)) / 2


def _middle(bucket: int, edges: Sequence[float]) -> float:
    if bucket == 0:
        return 0.0
    if bucket >= len(edges):
        return edges[-1]
    return math.sqrt(edges[bucket - 1] * edges[bucket])


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One coordinator's part of one outlier group."""

    judged: int  # nodes with enough evidence to judge
    in_service: int  # of those, not ejected: they make the centre
    size: int  # judged, plus the ejected ones (what max_ejection_fraction is a fraction of)
    out: int  # ejected for real (dry runs excluded)
    candidates: int  # judged nodes far from the median now (for the group-rise hold)
    rates: tuple[int, ...]
    latencies: tuple[int, ...]
    # The error rate of its worst candidate still in service (0: none): the coordinator
    # with the worst one ejects first, so two never fill max_ejection_fraction at once.
    worst: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"judged": self.judged, "in_service": self.in_service, "size": self.size,
                "out": self.out, "candidates": self.candidates,
                "rates": _sparse(self.rates), "latencies": _sparse(self.latencies),
                "worst": self.worst}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupSummary:
        """A peer's summary; raises ValueError (or KeyError, TypeError) when malformed."""
        judged, in_service, size, out, candidates = (
            int(data[k]) for k in ("judged", "in_service", "size", "out", "candidates"))
        if min(judged, in_service, size, out, candidates) < 0:
            raise ValueError("negative count in a group summary")
        worst = float(data.get("worst", 0.0))
        if not 0.0 <= worst <= 1.0:
            raise ValueError(f"worst rate {worst} outside 0..1")
        return cls(judged, in_service, size, out, candidates,
                   _dense(data["rates"], len(RATE_EDGES) + 1),
                   _dense(data["latencies"], len(LATENCY_EDGES) + 1), worst)


def _sparse(counts: Sequence[int]) -> dict[str, int]:
    return {str(i): n for i, n in enumerate(counts) if n}


def _dense(sparse: dict[str, Any], size: int) -> tuple[int, ...]:
    counts = [0] * size
    for key, value in sparse.items():
        index, count = int(key), int(value)
        if not 0 <= index < size or count < 0:
            raise ValueError(f"bucket {key}={value} out of range")
        counts[index] = count
    return tuple(counts)
