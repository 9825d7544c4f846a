"""Drains: a soft offline that waits for a node's pending tasks, up to ``drain_deadline``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nodewatch.detect.policy import Policy
from nodewatch.model import DrainState, NodeState

__all__ = ["DrainEnd", "Drains"]


@dataclass(frozen=True, slots=True)
class DrainEnd:
    """A drain finished: ``drain_complete`` (no tasks left) or ``drain_deadline``."""

    kind: Literal["drain_complete", "drain_deadline"]
    reason: str
    pending: float | None


class Drains:
    """The nodes with an incomplete drain, so that a tick checks only those."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._draining: set[str] = set()

    def waiting(self) -> list[str]:
        """Ids of the nodes whose drain has not completed yet."""
        return list(self._draining)

    def track(self, node: NodeState) -> None:
        """A node restored with its state: watch its drain if one is still open."""
        if node.drain is not None and not node.drain.complete:
            self._draining.add(node.node_id)

    def start(self, node: NodeState, reason: str, now: float,
              by: Literal["operator", "node"] = "operator") -> DrainState:
        node.drain = DrainState(reason=reason, started=now,
                                deadline=now + self.policy.drain_deadline, by=by)
        self._draining.add(node.node_id)
        return node.drain

    def stop(self, node: NodeState) -> None:
        node.drain = None
        self._draining.discard(node.node_id)

    def forget(self, node_id: str) -> None:
        self._draining.discard(node_id)

    def check(self, node: NodeState, now: float) -> DrainEnd | None:
        """Whether the node's drain ends now; marks it complete if so."""
        drain = node.drain
        if drain is None or drain.complete:
            return None
        pending = node.load.get("pending_tasks")
        if pending is None or pending <= 0:
            drain.complete = True
            self._draining.discard(node.node_id)
            return DrainEnd("drain_complete",
                            "no pending tasks" if pending is not None else
                            "node reports no tasks", pending)
        if now >= drain.deadline:
            drain.complete = True
            self._draining.discard(node.node_id)
            return DrainEnd("drain_deadline",
                            f"drain_deadline reached with {pending:g} tasks still pending",
                            pending)
        return None
