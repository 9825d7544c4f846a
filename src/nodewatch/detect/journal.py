"""What the coordinator must write: events minted in one id sequence, and the nodes changed
since the last write (transitions at once, routine observations at the next full write)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Any

from nodewatch.model import Event, event_id, event_number

__all__ = ["DirtyNodes", "EventSequence"]


class EventSequence:
    """Mints events with consecutive ids, continuing from the store's last one."""

    def __init__(self, next_number: int = 1) -> None:
        self.next_number = next_number

    def mint(self, now: float, node_id: str, kind: str, from_: str = "", to: str = "",
             reason: str = "", evidence: dict[str, Any] | None = None) -> Event:
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
        self.next_number += 1
        return event

    def take_back(self, events: Sequence[Event]) -> None:
        """Events minted last and then discarded (their write failed): reuse their numbers,
        so that the ids stay consecutive. Events minted after them keep theirs (a gap)."""
        if events and event_number(events[-1].id) + 1 == self.next_number:
            self.next_number = event_number(events[0].id)


class DirtyNodes:
    """Node ids to persist: ``changed`` ones must be written at once, ``touched`` ones (routine
    observations: new seq, load, counters) may wait for the next full write."""

    def __init__(self, changed: Iterable[str] = ()) -> None:
        self._changed: set[str] = set(changed)
        self._routine: set[str] = set()

    def changed(self, node_id: str) -> None:
        self._changed.add(node_id)

    def touched(self, node_id: str) -> None:
        self._routine.add(node_id)

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
