"""What the coordinator must write: events minted in one id sequence, and the nodes changed
since the last write (transitions at once, routine observations at the next full write); and
for readers, the revision of every node's last change."""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Any

from nodewatch.model import Event, event_id, event_number

__all__ = ["DirtyNodes", "EVENT_SLOTS", "EventSequence", "Revisions"]


EVENT_SLOTS = 1024  # coordinators that may mint events into one store at once


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
    observations: new seq, load, counters) may wait for the next full write."""

    def __init__(self, changed: Iterable[str] = (), revisions: Revisions | None = None) -> None:
        self._changed: set[str] = set(changed)
        self._routine: set[str] = set()
        self.revisions = revisions if revisions is not None else Revisions("")
        for node_id in sorted(self._changed):
            self.revisions.note(node_id)

    def changed(self, node_id: str) -> None:
        self._changed.add(node_id)
        self.revisions.note(node_id)

    def touched(self, node_id: str) -> None:
        self._routine.add(node_id)
        self.revisions.note(node_id)

    def take(self, routine: bool = True) -> set[str]:
        dirty, self._changed = self._changed, set()
        if routine:
            dirty |= self._routine
            self._routine = set()
        return dirty

    def mark(self, node_ids: Iterable[str], known: Container[str]) -> None:
        """Write these again (after a failed or lost write), if still ``known``."""
        self._changed.update(i for i in node_ids if i in known)

    def forget(self, node_id: str) -> None:
        self._changed.discard(node_id)
        self._routine.discard(node_id)
        self.revisions.drop(node_id)

    def forget_pending(self, node_id: str) -> None:
        """Nothing of this node is to be written (it is another coordinator's mirror)."""
        self._changed.discard(node_id)
        self._routine.discard(node_id)


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

    def note(self, node_id: str) -> None:
        if self._members is not None and node_id not in self._members:
            self.drop(node_id)
            return
        self.revision += 1
        if self._latest.pop(node_id, None) is None:
            self.members += 1
        self._removed.pop(node_id, None)
        self._latest[node_id] = self.revision

    def drop(self, node_id: str) -> None:
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


def _newer(revisions: dict[str, int], revision: int) -> list[str]:
    found: list[str] = []
    for node_id in reversed(revisions):
        if revisions[node_id] <= revision:
            break
        found.append(node_id)
    return found
