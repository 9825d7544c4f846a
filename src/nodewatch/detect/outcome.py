"""What the detection core hands back for one input (events, probe and action requests), and the
two errors its commands raise."""

from __future__ import annotations

from dataclasses import dataclass, field

from nodewatch.model import Event

__all__ = ["ActionRequest", "Conflict", "Outcome", "ProbeRequest", "UnknownNode"]


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """Ask these healthy peers whether they can still reach a suspect node."""

    node_id: str
    address: str
    peers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """Run the actions configured for ``kind`` on this node (the respond stage's input)."""

    kind: str
    node_id: str
    address: str
    event_id: str
    reason: str


@dataclass(slots=True)
class Outcome:
    """What one input caused; empty for the common case of a healthy node staying healthy."""

    events: list[Event] = field(default_factory=list)
    probes: list[ProbeRequest] = field(default_factory=list)
    actions: list[ActionRequest] = field(default_factory=list)
    check_now: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: bool = False

    def __bool__(self) -> bool:
        return bool(self.events or self.probes or self.actions or self.check_now or self.removed)

    def merge(self, other: Outcome) -> None:
        self.events += other.events
        self.probes += other.probes
        self.actions += other.actions
        self.check_now += other.check_now
        self.removed += other.removed


class UnknownNode(KeyError):
    """The node id is not known to the coordinator."""


class Conflict(ValueError):
    """The command does not apply to the node's current state."""
