"""The self-health gate: while the coordinator is starting up or its event loop lags, it
observes but confirms no failure."""

from __future__ import annotations

from typing import Any

from nodewatch.detect.policy import Policy

__all__ = ["Gate"]


class Gate:
    """Startup grace and loop lag; ``hold_reason(now)`` says why confirming must wait."""

    def __init__(self, policy: Policy, *, now: float) -> None:
        self.policy = policy
        self.started_at = now
        self.loop_lag = 0.0
        # The UDP endpoint's receive buffer overflowing (Cluster.note_receive_drops): not a
        # hold of every confirmation, only of those a late reading can explain.
        self.overloaded = False

    def restart(self, now: float) -> None:
        """A (re)start or a leader change: observe, but confirm nothing for ``startup_grace``."""
        self.started_at = now

    def set_loop_lag(self, lag: float) -> None:
        self.loop_lag = lag

    def set_overloaded(self, overloaded: bool) -> None:
        self.overloaded = overloaded

    def in_grace(self, now: float) -> bool:
        return now < self.started_at + self.policy.startup_grace

    def hold_reason(self, now: float) -> str:
        """Why the coordinator must not confirm failures right now ('' when it may).

        The reason is a fixed string per cause (figures go to the evidence) so that a held
        node gets one event when the cause changes, not one per check as a countdown ticks.
        """
        if self.in_grace(now):
            return "held: startup grace"
        if self.loop_lag > self.policy.max_loop_lag:
            return "held: coordinator loop lag"
        return ""

    def evidence(self, now: float) -> dict[str, Any]:
        grace_left = self.started_at + self.policy.startup_grace - now
        return {"loop_lag": round(self.loop_lag, 4), "max_loop_lag": self.policy.max_loop_lag,
                "grace_left": round(max(0.0, grace_left), 3)}
