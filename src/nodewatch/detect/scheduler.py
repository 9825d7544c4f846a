"""The check scheduler: which node is due for a health check next, with no I/O and no asyncio.

One binary heap of due times for every node (not a sleeping task per node), so that the poller
needs a single timer however many nodes it watches, and the simulation can drive the very same
object from a virtual clock. Nodes whose checks pushed heartbeats keep putting off wait in a
``DeferralWheel`` instead, where moving one on costs a list append, not two heap operations.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from itertools import count

__all__ = ["CheckScheduler", "DeferralWheel", "LatenessStats", "jittered"]


def jittered(interval: float, jitter: float, rng: random.Random) -> float:
    """``interval`` scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``.

    Jitter keeps nodes that failed (or started) together from being checked in lock-step for
    ever after, which would turn a steady load into bursts.
    """
    if jitter <= 0:
        return interval
    return interval * (1.0 + rng.uniform(-jitter, jitter))


class LatenessStats:
    """How late checks started compared to their due time, in a bounded ring of samples.

    Bounded so that a coordinator running for weeks keeps constant memory; the ring holds the
    most recent ``capacity`` samples, which is what a p99 over "recently" needs.
    """

    __slots__ = ("_samples", "_capacity", "_next", "count", "total", "max", "_sorted")

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._samples: list[float] = []
        self._capacity = capacity
        self._next = 0
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self._sorted: tuple[int, list[float]] = (-1, [])  # (count when sorted, the samples)

    def record(self, lateness: float) -> None:
        """Record one sample; early starts (negative lateness) count as zero."""
        if lateness < 0.0:
            lateness = 0.0
        self.count += 1
        self.total += lateness
        if lateness > self.max:
            self.max = lateness
        if len(self._samples) < self._capacity:
            self._samples.append(lateness)
        else:
            self._samples[self._next] = lateness
            self._next = (self._next + 1) % self._capacity

    def samples(self) -> list[float]:
        """The retained samples, oldest first."""
        return self._samples[self._next:] + self._samples[: self._next]

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the retained samples; 0 if none."""
        if not 0.0 <= q <= 100.0:
            raise ValueError("q must be between 0 and 100")
        if not self._samples:
            return 0.0
        # Sorted once per new sample count: /healthz asks for p50 and p99 together, and a
        # sort of the full ring (65,536) held the loop for tens of ms each time.
        if self._sorted[0] != self.count:
            self._sorted = (self.count, sorted(self._samples))
        ordered = self._sorted[1]
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        return ordered[rank - 1]

    def reset(self) -> None:
        """Forget every sample (a benchmark resets after its warm-up)."""
        self._samples.clear()
        self._sorted = (-1, [])
        self._next = 0
        self.count = 0
        self.total = 0.0
        self.max = 0.0


class CheckScheduler:
    """Due times of node checks: a heap with lazy deletion plus a map of current entries.

    ``schedule`` and ``remove`` are O(log n) / O(1): a replaced or removed entry stays in the heap
    and is skipped when it surfaces (its sequence number no longer matches the node's current
    one). The heap is rebuilt when stale entries outnumber live ones, so memory stays O(nodes)
    even when ``check_now`` or address changes reschedule nodes many times.

    A popped node is no longer scheduled: the caller (the poller) schedules it again when its
    check completes, so a node is never checked twice at once.
    """

    __slots__ = ("_clock", "_rng", "_heap", "_current", "_seq", "lateness")

    def __init__(self, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._heap: list[tuple[float, int, str]] = []
        # node_id -> (due, seq) of the one live heap entry of that node.
        self._current: dict[str, tuple[float, int]] = {}
        self._seq = count()
        self.lateness = LatenessStats()

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._current

    @property
    def rng(self) -> random.Random:
        return self._rng

    def due_of(self, node_id: str) -> float | None:
        """When the node is due, or None when it is not scheduled (unknown or being checked)."""
        entry = self._current.get(node_id)
        return None if entry is None else entry[0]

    def schedule(self, node_id: str, due: float) -> None:
        """Schedule (or reschedule, replacing any earlier due time) the node's next check."""
        seq = next(self._seq)
        self._current[node_id] = (due, seq)
        heapq.heappush(self._heap, (due, seq, node_id))
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._current):
            self._compact()

    def schedule_soon(self, node_id: str, due: float) -> None:
        """Schedule at ``due`` unless the node is already due earlier (for ``check_now``)."""
        entry = self._current.get(node_id)
        if entry is None or due < entry[0]:
            self.schedule(node_id, due)

    def spread(self, node_ids: Iterable[str], interval: float, now: float | None = None) -> None:
        """Schedule each node's first check at a uniformly random point of the next interval.

        A freshly loaded node set (start-up, restore from the store) must not be checked all at
        once, which would be a burst of N requests and then N results landing together.
        """
        start = self._clock() if now is None else now
        uniform = self._rng.uniform
        for node_id in node_ids:
            self.schedule(node_id, start + uniform(0.0, interval))

    def remove(self, node_id: str) -> bool:
        """Unschedule the node; True if it was scheduled. Its heap entry dies lazily."""
        return self._current.pop(node_id, None) is not None

    def next_due(self) -> float | None:
        """The earliest due time of any scheduled node, or None when nothing is scheduled."""
        heap = self._heap
        current = self._current
        while heap:
            due, seq, node_id = heap[0]
            entry = current.get(node_id)
            if entry is not None and entry[1] == seq:
                return due
            heapq.heappop(heap)
        return None

    def pop_due_entries(self, now: float, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` nodes due at ``now`` with their due times, earliest first; each popped
        node is unscheduled. The due time lets the caller account for lateness."""
        heap = self._heap
        current = self._current
        out: list[tuple[str, float]] = []
        heappop = heapq.heappop
        while heap and len(out) < limit:
            due, seq, node_id = heap[0]
            if due > now:
                break
            heappop(heap)
            entry = current.get(node_id)
            if entry is None or entry[1] != seq:
                continue  # stale: the node was removed or rescheduled since
            del current[node_id]
            out.append((node_id, due))
        return out

    def pop_due(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` node ids due at ``now``, earliest first; each is unscheduled."""
        return [node_id for node_id, _ in self.pop_due_entries(now, limit)]

    def pop_one(self, now: float) -> tuple[str, float] | None:
        """The single earliest due node and its due time, or None: the poller's hot path, which
        avoids building a list per check."""
        heap = self._heap
        current = self._current
        heappop = heapq.heappop
        while heap:
            due, seq, node_id = heap[0]
            if due > now:
                return None
            heappop(heap)
            entry = current.get(node_id)
            if entry is not None and entry[1] == seq:
                del current[node_id]
                return node_id, due
        return None

    def record_start(self, due: float, started: float | None = None) -> float:
        """Account one check that started at ``started`` (default: now) for a ``due`` time;
        returns its lateness in seconds (never negative)."""
        lateness = (self._clock() if started is None else started) - due
        self.lateness.record(lateness)
        return lateness if lateness > 0.0 else 0.0

    def _compact(self) -> None:
        current = self._current
        self._heap = [(due, seq, node_id) for node_id, (due, seq) in current.items()]
        heapq.heapify(self._heap)


class DeferralWheel:
    """Nodes parked until a due time, in slots of ``slot`` seconds: the nodes whose checks
    pushed heartbeats stand in for (coordinator/poller.py). A pushing fleet moves every
    node's check on by a push interval every push interval; on the heap that was a pop and a
    push per node each time (at 20,000 pushing nodes, about a tenth of what the coordinator
    did), here it is one append to the slot of the new due time. A node is parked at most
    once: parking it again moves it, and the slot it left skips it when its time comes.
    """

    __slots__ = ("slot", "_keys", "_parked", "_slots")

    def __init__(self, slot: float = 0.1) -> None:
        if slot <= 0:
            raise ValueError("slot must be greater than 0")
        self.slot = slot
        self._slots: dict[int, list[str]] = {}  # slot number -> node ids parked in it (or once)
        self._keys: list[int] = []  # heap of the slot numbers in _slots
        self._parked: dict[str, int] = {}  # node id -> its slot number

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._parked

    def park(self, node_id: str, due: float) -> None:
        """Park (or move) the node in the slot holding ``due``."""
        key = math.floor(due / self.slot)
        parked = self._parked
        if parked.get(node_id) == key:
            return
        parked[node_id] = key
        ids = self._slots.get(key)
        if ids is None:
            self._slots[key] = [node_id]
            heapq.heappush(self._keys, key)
        else:
            ids.append(node_id)

    def unpark(self, node_id: str) -> bool:
        """True if the node was parked; its slot skips it."""
        return self._parked.pop(node_id, None) is not None

    def parked_from(self, node_id: str) -> float | None:
        """When the node's slot begins (it is handed out then), or None when not parked."""
        key = self._parked.get(node_id)
        return None if key is None else key * self.slot

    def next_due(self) -> float | None:
        """When the earliest slot begins, or None when nothing is parked."""
        keys = self._keys
        return keys[0] * self.slot if keys else None

    def take(self, now: float) -> list[str]:
        """The nodes of every slot that began by ``now``, unparked, earliest slot first."""
        keys, slots, parked = self._keys, self._slots, self._parked
        limit = math.floor(now / self.slot)
        out: list[str] = []
        while keys and keys[0] <= limit:
            key = heapq.heappop(keys)
            for node_id in slots.pop(key):
                if parked.get(node_id) == key:
                    del parked[node_id]
                    out.append(node_id)
        return out
