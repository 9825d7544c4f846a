"""Review decisions: whether a node that comes back (registers again, or answers after an
outage) rejoins on its own or waits for an operator's approval, per SPEC's rules."""

from __future__ import annotations

from typing import Any

from nodewatch.detect.policy import Policy
from nodewatch.model import (
    Admin,
    Health,
    NodeState,
    RegisterDecision,
    Registration,
    Report,
    ReportFields,
)

__all__ = ["REJOIN_MEMORY", "Review"]

REJOIN_MEMORY = 3600.0  # how far back restarts count towards max_rejoins
_OUT = frozenset({Health.UNHEALTHY, Health.DEAD})


class Review:
    """What was seen of each node before it came back, and the rules that judge its return."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # node_id -> (incarnation, seq, last_ts) from before a restart that a poll saw first.
        self._before_restart: dict[str, tuple[int, int, float]] = {}
        # Samples count of the last report seen per node (same incarnation): after an outage,
        # how far it moved says whether the node kept running while it was thought down.
        self._samples_seen: dict[str, tuple[int, int]] = {}

    def forget(self, node_id: str) -> None:
        self._before_restart.pop(node_id, None)
        self._samples_seen.pop(node_id, None)

    def note_report(self, node: NodeState, report: Report) -> None:
        """A new report, before it is applied to ``node``."""
        if report.incarnation > node.incarnation > 0:
            # A restart seen by a poll before its registration arrived: keep what was stored
            # before it, so that the registration is judged against the previous incarnation.
            self._before_restart.setdefault(node.node_id,
                                            (node.incarnation, node.seq, node.last_ts))

    def restore_before_restart(self, node: NodeState, reg: Registration) -> None:
        """Judge a registration against the incarnation before a restart a poll saw first."""
        prior = self._before_restart.pop(reg.node_id, None)
        if prior is not None and reg.incarnation == node.incarnation > prior[0]:
            node.incarnation, node.seq, node.last_ts = prior

    def note_samples(self, node_id: str, incarnation: int, samples: int) -> None:
        """A healthy node's sample count (what ``unobserved_run`` records and judges nothing
        by while the node is up): the routine push path's share of it."""
        self._samples_seen[node_id] = (incarnation, samples)

    def unobserved_run(self, node: NodeState,
                       report: ReportFields) -> tuple[str, dict[str, Any]] | None:
        """A node confirmed down that answers again in the same incarnation: if it took more
        samples meanwhile than fit in one detection window, it kept running while unreachable
        (a partition, not a crash or a freeze) and needs a human before it takes work.
        Returns the reason and evidence for review, or None."""
        seen = self._samples_seen.get(node.node_id)
        self._samples_seen[node.node_id] = (report.incarnation, report.samples)
        if (seen is None or seen[0] != report.incarnation or report.sample_interval <= 0
                or node.health not in _OUT or node.admin is not Admin.ACTIVE):
            return None
        ran = (report.samples - seen[1]) * report.sample_interval
        window = self.policy.detection_window
        if ran <= window:
            return None
        reason = (f"kept running for about {ran:.0f}s while unreachable and thought down "
                  f"(window {window:g}s): a partition")
        evidence: dict[str, Any] = {
            "samples_before": seen[1], "samples_now": report.samples,
            "sample_interval": report.sample_interval, "ran_s": round(ran, 3)}
        return reason, evidence

    @staticmethod
    def count_restart(node: NodeState, now: float) -> None:
        """A registration with a new incarnation: one more restart within the memory."""
        node.rejoins = [t for t in node.rejoins if t > now - REJOIN_MEMORY]
        node.rejoins.append(now)

    def judge(self, node: NodeState, reg: Registration, now: float,
              observing_since: float = 0.0) -> tuple[RegisterDecision, str, dict[str, Any]]:
        """Rejoin or review for a known node registering again.

        ``observing_since`` is when this coordinator (re)started observing. A node that was not
        thought down ran unobserved only while somebody was looking: the time the coordinator
        itself was down (and the routine-write lag of the ``last_ts`` it stored before) is the
        coordinator's gap, not the node's, so a restart with every agent re-registering does not
        send healthy nodes to review. A node already thought down is judged on the whole gap:
        running while thought dead is what review is for.
        """
        p = self.policy
        evidence: dict[str, Any] = {
            "stored_incarnation": node.incarnation,
            "stored_seq": node.seq,
            "stored_last_ts": node.last_ts,
            "incarnation": reg.incarnation,
            "last_seq": reg.last_seq,
            "last_ts": reg.last_ts,
        }
        if reg.incarnation < node.incarnation:
            return "review", "incarnation went back: the node lost its state", evidence
        if reg.address != node.address and p.address_change == "review":
            evidence["stored_address"] = node.address
            evidence["address"] = reg.address
            return "review", (f"address changed from {node.address} to {reg.address} "
                              "([review] address_change = \"review\")"), evidence
        unobserved = reg.last_ts - node.last_ts if node.last_ts else 0.0
        if node.health not in _OUT and node.last_ts and observing_since > node.last_ts:
            unobserved = max(0.0, reg.last_ts - observing_since)
            evidence["observing_since"] = observing_since
        evidence["unobserved_s"] = round(unobserved, 3)
        if reg.incarnation == node.incarnation:
            # Same process registering again (e.g. after a coordinator restart or a partition).
            if reg.last_seq < node.seq:
                return "review", "seq went back within one incarnation", evidence
            if unobserved > p.detection_window and node.health in _OUT:
                return "review", (f"ran unobserved for {unobserved:.0f}s while thought down "
                                  f"(window {p.detection_window:g}s): a partition"), evidence
            evidence["decision"] = "rejoin"
            return "rejoin", "registered again without a restart", evidence
        if reg.incarnation == node.incarnation + 1 and reg.last_seq < node.seq:
            return "review", (f"seq went back ({reg.last_seq} < {node.seq}): "
                              "the node lost its state"), evidence
        if unobserved > p.detection_window and node.health in (Health.UNHEALTHY, Health.DEAD,
                                                               Health.SUSPECT):
            return "review", (f"ran unobserved for {unobserved:.0f}s while thought down "
                              f"(window {p.detection_window:g}s)"), evidence
        if unobserved > p.detection_window:
            return "review", (f"ran unobserved for {unobserved:.0f}s "
                              f"(window {p.detection_window:g}s)"), evidence
        recent = [t for t in node.rejoins if t > now - REJOIN_MEMORY]
        node.rejoins = recent
        if len(recent) >= p.max_rejoins:
            return "review", (f"flapping: {len(recent) + 1} restarts within an hour "
                              f"(max_rejoins {p.max_rejoins})"), evidence
        evidence["decision"] = "rejoin"
        return "rejoin", "restart within the detection window", evidence
