"""History in two tiers: every sample for the last ``full_resolution``, then one rollup per node
per ``rollup`` seconds for the rest of ``history_ttl`` (README "History at fleet size").

A rollup keeps the mean of each figure (the trend a chart draws), its maximum in ``peak`` (the
spike an operator looks back for, which a mean or the last value would hide) and the worst
health seen (a flap within the minute stays visible); its ``ts`` is the last sample's, ``seq``
the last seq, ``span`` the rollup interval. Means are rounded to 4 significant digits: the
figures are percentages and counts, and a rollup costs about a raw sample's bytes, not twice.
Each node's rollup boundaries are shifted by a hash of its id, so a fleet's rollups are written
spread over the interval, not all at the turn of each minute.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nodewatch.config import Config
from nodewatch.model import HistorySample

__all__ = ["HistoryTiers", "Rollups"]

# Worse health ranks higher: a rollup keeps the worst of its samples.
_HEALTH_RANK = {"healthy": 0, "unknown": 1, "suspect": 2, "unhealthy": 3, "dead": 4}


@dataclass(frozen=True, slots=True)
class HistoryTiers:
    """How a store keeps history: raw samples for ``full_resolution`` seconds (0: none),
    rollups of ``rollup`` seconds for ``ttl`` (none when raw samples cover the whole ttl)."""

    ttl: float
    full_resolution: float
    rollup: float

    @classmethod
    def from_config(cls, config: Config, etcd: bool = False) -> HistoryTiers:
        det = config.detection
        if etcd:
            return cls(float(det.history_ttl), float(det.etcd_history_full_resolution),
                       float(det.etcd_history_rollup))
        return cls(float(det.history_ttl), float(det.history_full_resolution),
                   float(det.history_rollup))

    @property
    def raw(self) -> bool:
        return self.full_resolution > 0

    @property
    def rolled(self) -> bool:
        return self.rollup > 0 and self.full_resolution < self.ttl

    @property
    def raw_ttl(self) -> float:
        """How long a raw sample is kept."""
        return min(self.full_resolution, self.ttl)

    def points_per_node(self, sample_interval: float) -> float:
        """Points one node holds at any time (raw samples plus rollups)."""
        raw = self.raw_ttl / sample_interval if self.raw else 0.0
        rolled = (self.ttl - self.raw_ttl) / self.rollup if self.rolled else 0.0
        if self.rolled and not self.raw:
            rolled = self.ttl / self.rollup
        return raw + rolled


class _Open:
    """One node's rollup being gathered: sums then maxima of each figure, in ``names`` order."""

    __slots__ = ("bucket", "count", "health", "names", "node_id", "seq", "ts", "values")

    def __init__(self, sample: HistorySample, bucket: int, names: tuple[str, ...]) -> None:
        self.node_id = sample.node_id
        self.bucket = bucket
        self.names = names
        self.count = 0
        self.health = sample.health
        self.seq = sample.seq
        self.ts = sample.ts
        self.values = array("d", [0.0] * len(names) + [-math.inf] * len(names))


def _figures(sample: HistorySample) -> tuple[tuple[str, ...], list[float]]:
    names = tuple(sample.system) + tuple(f"load.{k}" for k in sample.load)
    return names, [*sample.system.values(), *sample.load.values()]


def _round(value: float) -> float:
    return float(f"{value:.4g}")


class Rollups:
    """Gathers raw samples into one point per node per ``interval``; ``add`` returns the
    rollups its samples closed."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.interval = interval
        self._open: dict[str, _Open] = {}
        self._offsets: dict[str, float] = {}
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per key set

    def __len__(self) -> int:
        return len(self._open)

    def _bucket(self, node_id: str, ts: float) -> int:
        offset = self._offsets.get(node_id)
        if offset is None:
            offset = self._offsets[node_id] = zlib.crc32(node_id.encode()) / 2**32 * self.interval
        return math.floor((ts - offset) / self.interval)

    def add(self, samples: Iterable[HistorySample]) -> list[HistorySample]:
        closed: list[HistorySample] = []
        for sample in samples:
            if sample.span:
                continue  # already a rollup
            names, values = _figures(sample)
            names = self._names.setdefault(names, names)
            bucket = self._bucket(sample.node_id, sample.ts)
            current = self._open.get(sample.node_id)
            if current is not None and (current.bucket != bucket or current.names is not names):
                if sample.ts < current.ts:
                    continue  # older than what is gathered: a replay
                closed.append(self._close(current))
                current = None
            if current is None:
                current = self._open[sample.node_id] = _Open(sample, bucket, names)
            acc, width = current.values, len(names)
            for i, value in enumerate(values):
                acc[i] += value
                if value > acc[width + i]:
                    acc[width + i] = value
            current.count += 1
            current.ts, current.seq = sample.ts, sample.seq
            if _HEALTH_RANK.get(sample.health, 1) > _HEALTH_RANK.get(current.health, 1):
                current.health = sample.health
        return closed

    def close_ended(self, now: float) -> list[HistorySample]:
        """Rollups whose interval ended by ``now`` (nodes that stopped sampling)."""
        ended = [o for o in self._open.values()
                 if self._bucket(o.node_id, now) > o.bucket]
        return [self._close(o) for o in ended]

    def close_all(self) -> list[HistorySample]:
        """Every rollup being gathered, as it is (on stop)."""
        return [self._close(o) for o in list(self._open.values())]

    def forget(self, node_ids: Sequence[str]) -> None:
        for node_id in node_ids:
            self._open.pop(node_id, None)
            self._offsets.pop(node_id, None)

    def _close(self, current: _Open) -> HistorySample:
        del self._open[current.node_id]
        width, acc, count = len(current.names), current.values, current.count
        system: dict[str, float] = {}
        load: dict[str, float] = {}
        peak: dict[str, float] = {}
        for i, name in enumerate(current.names):
            mean = _round(acc[i] / count)
            if name.startswith("load."):
                load[name[5:]] = mean
            else:
                system[name] = mean
            peak[name] = acc[width + i]
        return HistorySample(current.node_id, current.ts, current.seq, current.health, system,
                             load, self.interval, peak)
