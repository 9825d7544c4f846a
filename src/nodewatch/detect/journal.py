"""What the coordinator must write: events minted in one id sequence, the nodes changed since
the last write (transitions at once, routine observations on a slow refresh, ``RoutineRefresh``);
and for readers, the revision of every node's last change."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

from nodewatch.model import Event, NodeState, event_id, event_number

__all__ = ["DirtyNodes", "EVENT_SLOTS", "EventSequence", "ROUTINE_FIELDS", "Revisions",
           "RoutineRefresh"]

EVENT_SLOTS = 1024  # coordinators that may mint events into one store at once

# What a routine observation changes and nobody but the owner needs at once: a reader on another
# coordinator or a coordinator taking the node over restarts its own deadlines from its own
# clock, so a last_seen or a seq up to a refresh old is fine (a stale seq is behind what the
# agent claims, never ahead; review judges a coordinator's own gap, detect/review.py). Every
# other NodeState field (health, status, reasons, admin, drain, outlier, identity, actions_due,
# address, labels, incarnation, ...) is material: changed, it is written at once.
ROUTINE_FIELDS = frozenset({"seq", "last_ts", "last_seen", "consecutive_failures",
                            "consecutive_successes", "system", "load", "revision"})


class EventSequence:
    """Mints events with consecutive ids, continuing from the store's last one.

    With several coordinators writing one store, each mints in its own ``slot``: numbers are
    a hybrid logical clock, ``milliseconds * EVENT_SLOTS + slot``, never below one more than
    the highest number seen (``witness``), so that ids stay unique without talking and sort
    by time across coordinators.
    """

    def __init__(self, next_number: int = 1) -> None:
        self.next_number = next_number
        self.slot: int | None = None

    def use_slot(self, slot: int) -> None:
        if not 0 <= slot < EVENT_SLOTS:
            raise ValueError(f"event slot {slot} outside 0..{EVENT_SLOTS - 1}")
        self.slot = slot
        self.witness(self.next_number - 1)

    def witness(self, number: int) -> None:
        """An event number minted elsewhere: ours come after it."""
        if self.slot is None:
            self.next_number = max(self.next_number, number + 1)
            return
        self.next_number = max(self.next_number, self._aligned(number + 1))

    def _aligned(self, number: int) -> int:
        assert self.slot is not None
        return number + (self.slot - number) % EVENT_SLOTS

    def mint(self, now: float, node_id: str, kind: str, from_: str = "", to: str = "",
             reason: str = "", evidence: dict[str, Any] | None = None) -> Event:
        if self.slot is not None:
            self.next_number = max(self.next_number, int(now * 1000) * EVENT_SLOTS + self.slot)
        event = Event(
            id=event_id(self.next_number),
            ts=now,
            node_id=node_id,
            kind=kind,
            from_=from_,
            to=to,
            reason=reason,
            evidence=evidence or {},
        )
        self.next_number += 1 if self.slot is None else EVENT_SLOTS
        return event

    def take_back(self, events: Sequence[Event]) -> None:
        """Events minted last and then discarded (their write failed): reuse their numbers,
        so that the ids stay consecutive. Events minted after them keep theirs (a gap)."""
        if events and event_number(events[-1].id) + 1 == self.next_number:
            self.next_number = event_number(events[0].id)


class DirtyNodes:
    """Node ids to persist: ``changed`` ones must be written at once, ``touched`` ones (routine
    observations: new seq, load, counters) may wait: the coordinator sorts them with a
    ``RoutineRefresh`` (a material change is written at once, the rest on a slow refresh)."""

    def __init__(self, changed: Iterable[str] = (), revisions: Revisions | None = None) -> None:
        self._changed: set[str] = set(changed)
        self._routine: set[str] = set()
        self._pushed: set[str] = set()  # only routine pushes (``pushed``) since the last take
        self.revisions = revisions if revisions is not None else Revisions("")
        for node_id in sorted(self._changed):
            self.revisions.note(node_id)

    def changed(self, node_id: str) -> None:
        self._changed.add(node_id)
        self.revisions.note(node_id)

    def touched(self, node_id: str) -> None:
        self._routine.add(node_id)
        self.revisions.note(node_id)

    def pushed(self, node_id: str) -> None:
        """``touched`` by a routine push (``Cluster.routine_push``), which by its conditions
        changes no health, status, admin, drain, outlier or label: readers of those alone
        (the fleet summary) may pass over it, and so may the material digest
        (``RoutineRefresh.sort``): ``ROUTINE_FIELDS`` are all it changes."""
        self._pushed.add(node_id)
        self.revisions.note(node_id, routine=True)

    def take(self, routine: bool = True) -> set[str]:
        dirty, self._changed = self._changed, set()
        if routine:
            dirty |= self._routine | self._pushed
            self._routine, self._pushed = set(), set()
        return dirty

    def take_routine(self) -> tuple[set[str], set[str]]:
        """The routine part alone, in two: nodes touched otherwise (which may have changed
        something material), and nodes only pushed since the last take."""
        touched, pushed = self._routine, self._pushed - self._routine
        self._routine, self._pushed = set(), set()
        return touched, pushed

    def mark(self, node_ids: Iterable[str], known: Container[str]) -> None:
        """Write these again (after a failed or lost write), if still ``known``."""
        self._changed.update(i for i in node_ids if i in known)

    def forget(self, node_id: str) -> None:
        self._changed.discard(node_id)
        self._routine.discard(node_id)
        self._pushed.discard(node_id)
        self.revisions.drop(node_id)

    def forget_pending(self, node_id: str) -> None:
        """Nothing of this node is to be written (it is another coordinator's mirror)."""
        self._changed.discard(node_id)
        self._routine.discard(node_id)
        self._pushed.discard(node_id)


class RoutineRefresh:
    """When a node that saw only routine observations is written again, as Kubernetes' node
    Leases do: at most once per ``interval``, at the node's own place in the cycle (a hash of
    its id), so a fleet's refreshes are spread evenly over the interval, never one burst, even
    after a restart that stored every node at once. A node is due at the first time at least
    ``interval`` after its last write where ``(t - phase) % interval == 0``: within
    ``[interval, 2 * interval)`` of a write that was a change, and one interval after its last
    refresh (the tick that writes it is at most one tick late).

    ``digest(node)`` hashes the node's material fields (everything but ``ROUTINE_FIELDS``); a
    touched node whose digest differs from the one last written changed in a way a reader or a
    takeover needs and is written at once. The caller reports every write (or load) with
    ``stored``, taken when the content is taken to be written."""

    def __init__(self, interval: float, digest: Callable[[NodeState], int]) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.interval = interval
        self._digest = digest
        self._stored: dict[str, tuple[float, int]] = {}  # node id -> (written at, digest)
        self._due: dict[str, float] = {}  # node id waiting for its refresh -> when due
        self._heap: list[tuple[float, str]] = []
        self._phases: dict[str, float] = {}
        self._slots: dict[str, float] = {}  # taken by ``due``: the place in the cycle it was due

    def __len__(self) -> int:
        """Nodes waiting for their refresh."""
        return len(self._due)

    def phase(self, node_id: str) -> float:
        """The node's place in the cycle, in ``[0, interval)``: FNV-1a of its id with
        MurmurHash3's finalizer (FNV alone leaves ids that differ in their last character
        bunched), the same in every process (a pure core has no zlib)."""
        phase = self._phases.get(node_id)
        if phase is None:
            mask = 0xFFFFFFFFFFFFFFFF
            value = 0xCBF29CE484222325
            for byte in node_id.encode():
                value = ((value ^ byte) * 0x100000001B3) & mask
            value = ((value ^ (value >> 33)) * 0xFF51AFD7ED558CCD) & mask
            value = ((value ^ (value >> 33)) * 0xC4CEB9FE1A85EC53) & mask
            value ^= value >> 33
            phase = self._phases[node_id] = value / 2**64 * self.interval
        return phase

    def due_after(self, node_id: str, written_at: float) -> float:
        earliest = written_at + self.interval
        return earliest + (self.phase(node_id) - earliest) % self.interval

    def stored(self, nodes: Iterable[NodeState], now: float) -> None:
        """These nodes' current content is (being) stored: written now, or loaded. A refresh
        counts from its place in the cycle, not from the tick that wrote it, so a node keeps
        its place: one write per interval, not one per interval plus a tick."""
        digest, slots = self._digest, self._slots
        for node in nodes:
            self._stored[node.node_id] = (slots.pop(node.node_id, now), digest(node))
            self._due.pop(node.node_id, None)

    def sort(self, touched: Iterable[str], nodes: Mapping[str, NodeState],
             pushed: bool = False) -> set[str]:
        """Of nodes that saw routine observations, those to write at once (a material change,
        or never stored by this process); the others wait for their refresh (``due``).
        ``pushed``: nodes only routine pushes changed since they were stored (every change a
        ``ROUTINE_FIELDS`` one), so no digest is taken."""
        now_ids: set[str] = set()
        digest = self._digest
        for node_id in touched:
            node = nodes.get(node_id)
            if node is None:
                continue
            prior = self._stored.get(node_id)
            if prior is None or (not pushed and prior[1] != digest(node)):
                now_ids.add(node_id)
            elif node_id not in self._due:
                due = self.due_after(node_id, prior[0])
                self._due[node_id] = due
                heapq.heappush(self._heap, (due, node_id))
        return now_ids

    def due(self, now: float, nodes: Container[str]) -> set[str]:
        """Nodes waiting whose refresh is due by ``now`` (taken: no longer waiting)."""
        found: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, node_id = heapq.heappop(heap)
            if self._due.get(node_id) != due:
                continue  # written meanwhile, or scheduled again
            del self._due[node_id]
            if node_id in nodes:
                found.add(node_id)
                self._slots[node_id] = due
            else:
                self.forget(node_id)
        return found

    def take_all(self) -> set[str]:
        """Every node waiting (a full write: on stop, or a leadership confirmed)."""
        waiting = set(self._due)
        self._due.clear()
        self._heap.clear()
        return waiting

    def forget(self, node_id: str) -> None:
        self._stored.pop(node_id, None)
        self._due.pop(node_id, None)
        self._phases.pop(node_id, None)
        self._slots.pop(node_id, None)


class Revisions:
    """A change counter for readers (the dashboard's ``?changed_since=``): every change or
    removal of a node takes the next revision, so "what changed since R" costs what changed,
    not the fleet. ``epoch`` names this counter (a new cluster starts another one); removals
    are remembered up to ``max_removed``, past which an older reader must start over."""

    def __init__(self, epoch: str, max_removed: int = 10_000,
                 members: Container[str] | None = None) -> None:
        self.epoch = epoch
        self._members = members  # a note about an id not (or no longer) among them is a drop
        self.revision = 0
        self.members = 0  # bumped when the set of node ids changes (for cached id orders)
        self.max_removed = max_removed
        self.floor = 0  # readers at or below this revision may have missed a removal
        self._latest: dict[str, int] = {}  # node id -> its revision, oldest first
        self._removed: dict[str, int] = {}  # removed ids -> revision, oldest first
        # node id -> the revision of its last change that was not a routine push
        self._material: dict[str, int] = {}

    def note(self, node_id: str, routine: bool = False) -> None:
        """A change of the node; ``routine``: a routine push's (see ``DirtyNodes.pushed``)."""
        if self._members is not None and node_id not in self._members:
            self.drop(node_id)
            return
        self.revision += 1
        if self._latest.pop(node_id, None) is None:
            self.members += 1
        self._removed.pop(node_id, None)
        self._latest[node_id] = self.revision
        if not routine:
            self._material[node_id] = self.revision

    def drop(self, node_id: str) -> None:
        self._material.pop(node_id, None)
        if self._latest.pop(node_id, None) is None:
            return
        self.revision += 1
        self.members += 1
        self._removed[node_id] = self.revision
        while len(self._removed) > self.max_removed:
            oldest = next(iter(self._removed))
            self.floor = self._removed.pop(oldest)

    def of(self, node_id: str) -> int:
        """The revision of a node's last change (0 when unknown)."""
        return self._latest.get(node_id, 0)

    def since(self, revision: int) -> tuple[list[str], list[str]] | None:
        """Ids changed and ids removed after ``revision``; None when the answer is not known
        (removals forgotten, or a revision this counter never gave): read everything."""
        if revision < self.floor or revision > self.revision:
            return None
        changed = _newer(self._latest, revision)
        removed = _newer(self._removed, revision)
        return changed, removed

    def material_since(self, revision: int) -> tuple[list[str], list[str]] | None:
        """``since`` without the nodes whose every change after ``revision`` was a routine
        push: at 100,000 pushing nodes, the fleet summary's counts would otherwise rebuild
        every node's mark every second to find it unchanged."""
        found = self.since(revision)
        if found is None:
            return None
        material = self._material
        changed, removed = found
        return [i for i in changed if material.get(i, 0) > revision], removed


def _newer(revisions: dict[str, int], revision: int) -> list[str]:
    found: list[str] = []
    for node_id in reversed(revisions):
        if revisions[node_id] <= revision:
            break
        found.append(node_id)
    return found
