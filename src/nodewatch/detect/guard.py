"""The guard: when many distinct nodes go suspect within one window, the fault is assumed to be
on the coordinator's side and nothing is confirmed until it clears."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodewatch.detect.policy import Policy
from nodewatch.model import Health, NodeState

__all__ = ["Guard", "GuardChange"]


@dataclass(frozen=True, slots=True)
class GuardChange:
    """The guard turned on or off, and why."""

    on: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


class Guard:
    """Counts nodes (not flaps of one node) that went suspect within ``guard_window``."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.on = False
        # Entries into suspect within the guard window: (time, node), and each node's latest
        # entry, so that the guard counts nodes rather than flaps of one node.
        self._went_suspect: deque[tuple[float, str]] = deque()
        self._suspect_entry: dict[str, float] = {}
        # Health of the nodes in _suspect_entry, counted, so the guard never scans nodes.
        self._recent_health: Counter[Health] = Counter()

    @property
    def recent(self) -> Mapping[str, float]:
        """Nodes that went suspect within the window, with their latest entry time."""
        return self._suspect_entry

    @property
    def recent_health(self) -> Mapping[Health, int]:
        """The health of the recent nodes, counted."""
        return self._recent_health

    def note_suspect(self, node_id: str, now: float) -> None:
        """The node just went suspect (its health already counted as suspect if recent)."""
        self._went_suspect.append((now, node_id))
        if node_id not in self._suspect_entry:
            self._recent_health[Health.SUSPECT] += 1
        self._suspect_entry[node_id] = now

    def note_health(self, node_id: str, before: Health, after: Health) -> None:
        """A node's health changed: keep the count of the recent ones in step."""
        if node_id in self._suspect_entry:
            self._recent_health[before] -= 1
            self._recent_health[after] += 1

    def forget(self, node_id: str, health: Health) -> None:
        """The node is gone (removed); ``health`` is what it is counted as."""
        if node_id in self._suspect_entry:
            del self._suspect_entry[node_id]
            self._recent_health[health] -= 1

    def keep(self, node_id: str, entry: float, health: Health) -> None:
        """A node replaced by its mirrored copy keeps its recent entry (``entry`` is what
        ``recent`` held before it was forgotten; its place in the window stays)."""
        self._suspect_entry[node_id] = entry
        self._recent_health[health] += 1

    def update(self, now: float, nodes: Mapping[str, NodeState], watched: int,
               suspects: int) -> GuardChange | None:
        """Slide the window to ``now`` and decide; returns the change, if any.

        ``watched`` is the number of nodes not dead, ``suspects`` the number now suspect.
        """
        p = self.policy
        window_start = now - p.guard_window
        while self._went_suspect and self._went_suspect[0][0] < window_start:
            at, node_id = self._went_suspect.popleft()
            if self._suspect_entry.get(node_id) == at:
                del self._suspect_entry[node_id]
                node = nodes.get(node_id)
                if node is not None:
                    self._recent_health[node.health] -= 1
        total = watched
        if total < p.guard_min_nodes:
            if self.on:
                self.on = False
                return GuardChange(False, f"only {total} nodes watched "
                                          f"(min_nodes {p.guard_min_nodes})")
            return None
        # Nodes that went suspect within the window and are still failing (suspect, or
        # confirmed before the guard could see them): distinct nodes, not flaps of one.
        recent_unhealthy = self._recent_health[Health.UNHEALTHY]
        if not self.on:
            recent = self._recent_health[Health.SUSPECT] + recent_unhealthy
            if recent and recent >= p.guard_fraction * total:
                self.on = True
                return GuardChange(True, f"{recent} of {total} nodes went suspect within "
                                         f"{p.guard_window:g}s: assuming a fault on the "
                                         "coordinator's side",
                                   {"suspect": recent, "total": total,
                                    "fraction": p.guard_fraction})
            return None
        # Every suspect node (held ones stay suspect past the window), plus the recent ones
        # already confirmed: never fewer than turned the guard on.
        failing = suspects + recent_unhealthy
        if failing < p.guard_fraction * total:
            self.on = False
            return GuardChange(False, f"{failing} of {total} nodes failing, below "
                                      f"{p.guard_fraction:g}",
                               {"suspect": failing, "total": total})
        return None
