"""History in two tiers: every sample for the last ``full_resolution``, then one rollup per node
per ``rollup`` seconds for the rest of ``history_ttl`` (README "History at fleet size").

A rollup keeps the mean of each figure (the trend a chart draws), its maximum in ``peak`` (the
spike an operator looks back for, which a mean or the last value would hide) and the worst
health seen (a flap within the minute stays visible); its ``ts`` is the last sample's, ``seq``
the last seq, ``span`` the rollup interval. Means are rounded to 4 significant digits: the
figures are percentages and counts, and a rollup costs about a raw sample's bytes, not twice.
Each node's rollup boundaries are shifted by a hash of its id, so a fleet's rollups are written
spread over the interval, not all at the turn of each minute.

Raw samples are gathered the same way (``SampleChunks``): column-wise per node for up to
``CHUNK_SECONDS``, then written as one ``SampleChunk`` (one store row) and folded into the
rollup once per chunk. One SQLite row and one Python object per sample were about a fifth of
what a pushing node cost the coordinator (bench/fleet_udp.py); a sample is now a few array
appends. The price: the chunk being gathered is in memory only, so a ``kill -9`` loses up to a
minute of raw samples, as it loses the rollup being gathered (readers see it: ``samples``).
"""

from __future__ import annotations

import heapq
import math
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nodewatch.config import Config
from nodewatch.model import HEALTH_CODES, HistorySample, SampleChunk

__all__ = ["CHUNK_SECONDS", "HistoryTiers", "Rollups", "SampleChunks"]

# Worse health ranks higher: a rollup keeps the worst of its samples.
_HEALTH_RANK = {health: rank for rank, health in enumerate(HEALTH_CODES)}
_UNKNOWN = _HEALTH_RANK["unknown"]
# The longest one node's raw samples are gathered before they are written as one chunk: about
# 12 samples at the agent's 5 s, about 1 KB held per node.
CHUNK_SECONDS = 60.0


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

    def __init__(self, node_id: str, bucket: int, names: tuple[str, ...], health: int) -> None:
        self.node_id = node_id
        self.bucket = bucket
        self.names = names
        self.count = 0
        self.health = health
        self.seq = 0
        self.ts = -math.inf
        self.values = array("d", [0.0] * len(names) + [-math.inf] * len(names))


def _figures(system: Iterable[str], load: Iterable[str]) -> tuple[str, ...]:
    return (*system, *(f"load.{k}" for k in load))


def _round(value: float) -> float:
    return float(f"{value:.4g}")


class Rollups:
    """Gathers raw samples into one point per node per ``interval``; ``add`` (samples) and
    ``fold`` (a chunk) return the rollups they closed."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.interval = interval
        self._open: dict[str, _Open] = {}
        self._offsets: dict[str, float] = {}
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per key set
        # A chunk's (system, load) key tuples -> its figure names, and figure names -> where
        # each lands in a rollup: worked out once per key set, not once per chunk.
        self._layouts: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}
        self._splits: dict[tuple[str, ...], tuple[tuple[tuple[int, str], ...],
                                                  tuple[tuple[int, str], ...]]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def offset(self, node_id: str) -> float:
        """Where ``node_id``'s intervals start, past each multiple of the interval."""
        offset = self._offsets.get(node_id)
        if offset is None:
            offset = self._offsets[node_id] = zlib.crc32(node_id.encode()) / 2**32 * self.interval
        return offset

    def _bucket(self, node_id: str, ts: float) -> int:
        return math.floor((ts - self.offset(node_id)) / self.interval)

    def add(self, samples: Iterable[HistorySample]) -> list[HistorySample]:
        closed: list[HistorySample] = []
        for sample in samples:
            if sample.span:
                continue  # already a rollup
            values = [*sample.system.values(), *sample.load.values()]
            self._gather(closed, sample.node_id, self._bucket(sample.node_id, sample.ts),
                         _figures(sample.system, sample.load), 1, values, values,
                         _HEALTH_RANK.get(sample.health, _UNKNOWN), sample.ts, sample.seq)
        return closed

    def fold(self, chunk: SampleChunk) -> list[HistorySample]:
        """A chunk's samples at once: one pass per figure over its column, not one per sample.
        The chunk lies within one interval (``SampleChunks`` closes it at the turn)."""
        layout = (chunk.system, chunk.load)
        names = self._layouts.get(layout)
        if names is None:
            figures = _figures(chunk.system, chunk.load)
            names = self._layouts[layout] = self._names.setdefault(figures, figures)
        width, values, count = len(names), chunk.values, len(chunk)
        columns = [values[i::width] for i in range(width)]
        last = chunk.last_ts
        closed: list[HistorySample] = []
        self._gather(closed, chunk.node_id, self._bucket(chunk.node_id, last), names, count,
                     [math.fsum(c) for c in columns], [max(c) for c in columns],
                     max(chunk.health), last, chunk.last_seq)
        return closed

    def _gather(self, closed: list[HistorySample], node_id: str, bucket: int,
                names: tuple[str, ...], count: int, sums: Sequence[float],
                maxima: Sequence[float], health: int, ts: float, seq: int) -> None:
        names = self._names.setdefault(names, names)
        current = self._open.get(node_id)
        if current is not None and (current.bucket != bucket or current.names is not names):
            if ts < current.ts:
                return  # older than what is gathered: a replay
            closed.append(self._close(current))
            current = None
        if current is None:
            current = self._open[node_id] = _Open(node_id, bucket, names, health)
        acc, width = current.values, len(names)
        for i in range(width):
            acc[i] += sums[i]
            if maxima[i] > acc[width + i]:
                acc[width + i] = maxima[i]
        current.count += count
        if ts >= current.ts:
            current.ts, current.seq = ts, seq
        if health > current.health:
            current.health = health

    def close_ended(self, now: float) -> list[HistorySample]:
        """Rollups whose interval ended by ``now`` (nodes that stopped sampling)."""
        ended = [o for o in self._open.values()
                 if self._bucket(o.node_id, now) > o.bucket]
        return [self._close(o) for o in ended]

    def close_all(self) -> list[HistorySample]:
        """Every rollup being gathered, as it is (on stop)."""
        return [self._close(o) for o in list(self._open.values())]

    def close_nodes(self, node_ids: Iterable[str]) -> list[HistorySample]:
        """These nodes' rollups being gathered, as they are (their shares are handed over)."""
        return [self._close(self._open[i]) for i in node_ids if i in self._open]

    def forget(self, node_ids: Iterable[str]) -> None:
        for node_id in node_ids:
            self._open.pop(node_id, None)
            self._offsets.pop(node_id, None)

    def _close(self, current: _Open) -> HistorySample:
        del self._open[current.node_id]
        names, acc, count = current.names, current.values, current.count
        split = self._splits.get(names)
        if split is None:
            split = self._splits[names] = (
                tuple((i, n) for i, n in enumerate(names) if not n.startswith("load.")),
                tuple((i, n[5:]) for i, n in enumerate(names) if n.startswith("load.")))
        width = len(names)
        system = {name: _round(acc[i] / count) for i, name in split[0]}
        load = {name: _round(acc[i] / count) for i, name in split[1]}
        peak = {name: acc[width + i] for i, name in enumerate(names)}
        return HistorySample(current.node_id, current.ts, current.seq,
                             HEALTH_CODES[current.health], system, load, self.interval, peak)


class _Gathering:
    """One node's chunk being gathered: its columns, and the window ``[start, until)`` it
    covers (within one rollup interval)."""

    __slots__ = ("ends_rollup", "health", "last", "load", "node_id", "seq", "start", "system",
                 "ts", "until", "values")

    def __init__(self, node_id: str, system: tuple[str, ...], load: tuple[str, ...],
                 start: float, until: float, ends_rollup: bool = False) -> None:
        self.node_id = node_id
        self.system = system
        self.load = load
        self.start = start
        self.until = until
        self.ends_rollup = ends_rollup  # ``until`` is the end of the node's rollup interval
        self.last = -math.inf
        self.ts: array[float] = array("d")
        self.seq: array[int] = array("q")
        self.health = bytearray()
        self.values: array[float] = array("d")

    def chunk(self) -> SampleChunk:
        return SampleChunk(self.node_id, self.system, self.load, self.ts, self.seq,
                           bytes(self.health), self.values)


class SampleChunks:
    """A coordinator's history on its way to the store: each node's raw samples gathered into
    chunks of up to ``chunk`` seconds, each closed chunk kept for the raw tier (when the tiers
    keep raw samples) and folded into the node's rollup (when they keep rollups). ``take``
    hands over what closed; ``samples`` is what a reader has not been written yet."""

    def __init__(self, tiers: HistoryTiers, chunk: float = CHUNK_SECONDS) -> None:
        self.raw = tiers.raw
        self.raw_ttl = tiers.raw_ttl
        self.rollups = Rollups(tiers.rollup) if tiers.rolled else None
        # Never gathered for longer than a rollup interval, nor than raw samples are kept.
        self.interval = min(chunk, tiers.rollup) if self.rollups is not None else chunk
        if self.raw:
            self.interval = min(self.interval, self.raw_ttl)
        self._open: dict[str, _Gathering] = {}
        self._offsets: dict[str, float] = {}
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per key set
        self._chunks: list[SampleChunk] = []  # closed, for the raw tier, not taken yet
        self._points: list[HistorySample] = []  # rollups closed, not taken yet
        self._last_sweep = -math.inf
        # When gathered chunks end, by whole second: second -> the node ids whose chunk ends
        # in it (a node may be listed again after its chunk moved on), with a heap of those
        # seconds. ``take`` closes what ended without looking at every node's chunk.
        self._ends: dict[int, list[str]] = {}
        self._end_keys: list[int] = []

    def __len__(self) -> int:
        """Samples gathered or closed and not taken."""
        return sum(len(g.ts) for g in self._open.values()) + sum(len(c) for c in self._chunks)

    def add(self, node_id: str, ts: float, seq: int, health: str, system: dict[str, float],
            load: dict[str, float]) -> None:
        """One sample; its figures are copied (the dicts may change afterwards)."""
        current = self._open.get(node_id)
        if current is not None and not (
                current.start <= ts < current.until and current.system == tuple(system)
                and current.load == tuple(load)):
            # Also a sample older than the chunk (a clock step back, a poll's result after a
            # push): a chunk of its own; a replay of a stored one is deduplicated by readers.
            self._close(current, ended=ts >= current.until)
            current = None
        if current is None:
            current = self._open[node_id] = self._gathering(node_id, ts, system, load)
            end = math.floor(current.until)
            ends = self._ends.get(end)
            if ends is None:
                self._ends[end] = [node_id]
                heapq.heappush(self._end_keys, end)
            else:
                ends.append(node_id)
        try:
            current.seq.append(seq)
        except OverflowError:  # past 2**63: not a seq an agent sends; never stored
            return
        current.ts.append(ts)
        current.health.append(_HEALTH_RANK.get(health, _UNKNOWN))
        values = current.values
        values.extend(system.values())
        values.extend(load.values())
        if ts > current.last:
            current.last = ts

    def _gathering(self, node_id: str, ts: float, system: dict[str, float],
                   load: dict[str, float]) -> _Gathering:
        names = self._names
        sys_names, load_names = tuple(system), tuple(load)
        sys_names = names.setdefault(sys_names, sys_names)
        load_names = names.setdefault(load_names, load_names)
        interval = self.interval
        if self.rollups is not None:  # chunks nest in the node's rollup intervals
            offset = self.rollups.offset(node_id)
            span = self.rollups.interval
            first = offset + math.floor((ts - offset) / span) * span
            start = first + math.floor((ts - first) / interval) * interval
            until = min(start + interval, first + span)
            return _Gathering(node_id, sys_names, load_names, start, until,
                              ends_rollup=until >= first + span)
        else:
            known = self._offsets.get(node_id)
            if known is None:
                known = self._offsets[node_id] = zlib.crc32(node_id.encode()) / 2**32 * interval
            offset = known
            start = offset + math.floor((ts - offset) / interval) * interval
            until = start + interval
        return _Gathering(node_id, sys_names, load_names, start, until)

    def _close(self, current: _Gathering, ended: bool = False) -> None:
        """``ended``: the chunk's window is over (a later sample came, or the sweep). When
        that window was the last of its rollup interval, the rollup is complete and closes
        now, at the node's own turn, rather than at the next sweep with every other node's:
        once a minute, that sweep closed the whole fleet's rollups in one loop turn (a third
        of a second at 20,000 nodes, seconds at 100,000, while heartbeats piled up in the
        kernel)."""
        del self._open[current.node_id]
        if not current.ts:
            return
        chunk = current.chunk()
        if self.raw:
            self._chunks.append(chunk)
        rollups = self.rollups
        if rollups is not None:
            self._points.extend(rollups.fold(chunk))
            if ended and current.ends_rollup:
                self._points.extend(rollups.close_nodes((current.node_id,)))

    def take(self, now: float, final: bool = False) -> tuple[list[SampleChunk],
                                                             list[HistorySample]]:
        """The chunks and rollups closed since the last take, with the chunks whose window
        ended by ``now`` without a later sample (nodes that stopped sampling, or have not
        sampled since); once an interval, the rollups of nodes that stopped; ``final`` (on
        stop): everything being gathered. A chunk whose every sample is past the raw tier's
        retention already is not handed over."""
        if final:
            for current in list(self._open.values()):
                self._close(current)
            self._ends.clear()
            self._end_keys.clear()
            if self.rollups is not None:
                self._points.extend(self.rollups.close_all())
        else:
            self._close_ended(now)
            if self.rollups is not None and now - self._last_sweep >= self.interval:
                self._last_sweep = now
                self._points.extend(self.rollups.close_ended(now))
        chunks, self._chunks = self._chunks, []
        points, self._points = self._points, []
        expired = now - self.raw_ttl
        return [c for c in chunks if c.last_ts >= expired], points

    def _close_ended(self, now: float) -> None:
        """Close the chunks whose window is over: only those listed in the seconds past."""
        keys, ends, gathered = self._end_keys, self._ends, self._open
        limit = math.floor(now)
        while keys and keys[0] < limit:
            for node_id in ends.pop(heapq.heappop(keys)):
                current = gathered.get(node_id)
                if current is not None and current.until <= now:
                    self._close(current, ended=True)

    def samples(self, node_id: str, since: float) -> list[HistorySample]:
        """The node's raw samples at or after ``since`` not taken yet (none when the tiers
        keep no raw samples)."""
        if not self.raw:
            return []
        out = [s for c in self._chunks if c.node_id == node_id for s in c.samples()]
        current = self._open.get(node_id)
        if current is not None and current.ts:
            out.extend(current.chunk().samples())
        return [s for s in out if s.ts >= since]

    def close(self, node_ids: Iterable[str]) -> tuple[list[SampleChunk], list[HistorySample]]:
        """Everything gathered for these nodes, closed and taken now (their shares are being
        handed over: written with the last write, not a minute later or never)."""
        gone = set(node_ids)
        for node_id in gone:
            current = self._open.get(node_id)
            if current is not None:
                self._close(current)
        if self.rollups is not None:
            self._points.extend(self.rollups.close_nodes(gone))
        chunks = [c for c in self._chunks if c.node_id in gone]
        points = [p for p in self._points if p.node_id in gone]
        self._chunks = [c for c in self._chunks if c.node_id not in gone]
        self._points = [p for p in self._points if p.node_id not in gone]
        for node_id in gone:
            self._offsets.pop(node_id, None)
        return chunks, points

    def forget(self, node_ids: Iterable[str]) -> None:
        """Drop what is gathered for these nodes (their share went to another coordinator
        without a hand-over, or they were removed)."""
        gone = set(node_ids)
        for node_id in gone:
            self._open.pop(node_id, None)
            self._offsets.pop(node_id, None)
        self._chunks = [c for c in self._chunks if c.node_id not in gone]
        self._points = [p for p in self._points if p.node_id not in gone]
        if self.rollups is not None:
            self.rollups.forget(gone)
