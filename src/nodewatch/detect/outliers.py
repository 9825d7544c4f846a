"""Gray failures: nodes that answer ``/health`` but fail their callers far more than their
group (Envoy's outlier detection, judged against the fleet), with hysteresis, back-off and caps.

Evidence per node comes from two kinds of source, summed over a sliding ``window``: the node's
own agent (``error_rate``, ``qps``, ``latency_p99_ms`` in its business load: a gauge, counted as
``qps x window`` requests) and callers' observations (``{requests, errors, latency_p99_ms}`` per
window, from load balancers, services or peers), summed over the callers so that every request
weighs alike. Once the callers saw ``min_requests`` in the window their view is the node's
figures; the agent's report stands in while they saw too little (or there are none).

The group's centre is the **median** of the judged nodes in service (not Envoy's mean - k x
stdev): healthy nodes of one service have nearly identical error rates, so a dispersion-based
threshold collapses (MAD = 0) or is inflated by the outliers themselves (stdev), while the
median ignores up to half the group. A node is an outlier when its rate is at least the median
plus ``error_margin`` and at least ``factor`` x the median (the margin rules near 0, the factor
when the whole group runs high). Pure: no I/O, the clock passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Literal

from nodewatch.detect.groups import (
    LATENCY_EDGES,
    RATE_EDGES,
    GroupSummary,
    histogram,
    merged_median,
)
from nodewatch.detect.policy import Policy
from nodewatch.model import CallerObservation, Health, NodeState

__all__ = ["AGENT_SOURCE", "Figures", "OutlierDetector", "OutlierVerdict", "percent"]

AGENT_SOURCE = "agent"  # the node's own report; every other source is a caller
# Back in line means under half the margins: a band, so a node on the edge does not flap.
_CLEAR_BAND = 0.5

VerdictKind = Literal["outlier", "outlier_cleared", "outlier_held", "outlier_hold",
                      "outlier_hold_off"]


def percent(rate: float) -> str:
    """0.4 -> '40 %', 0.002 -> '0.2 %': figures as people read them."""
    return f"{rate * 100:.3g} %"


@dataclass(frozen=True, slots=True)
class Figures:
    """One node's evidence over the window, all sources summed."""

    requests: float
    errors: float
    latency_ms: float | None  # request-weighted p99, None when nobody reported one
    sources: tuple[str, ...]

    @property
    def rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": round(self.requests, 1), "errors": round(self.errors, 1),
                "error_rate": round(self.rate, 5),
                "latency_p99_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
                "sources": list(self.sources)}


@dataclass(frozen=True, slots=True)
class OutlierVerdict:
    """What the rule decided for a node (or, with ``node_id`` "", for a group)."""

    kind: VerdictKind
    node_id: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    until: float = 0.0  # outlier: the end of its back-off
    ejections: int = 0  # outlier: its ejection count, this one included


@dataclass(slots=True)
class _Sample:
    at: float
    requests: float
    errors: float
    latency_ms: float | None


@dataclass(slots=True)
class _Evidence:
    agent: _Sample | None = None
    callers: dict[str, deque[_Sample]] = field(default_factory=dict)

    def empty(self) -> bool:
        return self.agent is None and not self.callers


@dataclass(slots=True)
class _Judged:
    node: NodeState
    figures: Figures
    judgeable: bool


class OutlierDetector:
    """Owns the evidence windows and the per-node timers of the rule; the cluster facade
    turns its verdicts into node state, events and actions (and asks the guard and budget)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._evidence: dict[str, _Evidence] = {}
        self._candidate_since: dict[str, float] = {}  # outlier figures since (not yet out)
        self._in_line_since: dict[str, float] = {}  # ejected, back in line since
        self._held: dict[str, str] = {}  # why a candidate is not ejected (told once)
        self._holding: dict[str, str] = {}  # groups whose errors rose together -> reason
        self._settled_since: dict[str, float] = {}  # held groups, settled again since
        self._ejected: dict[str, bool] = {}  # ejected node -> counts (not a dry run)
        # Shared coordinators: the other coordinators' parts of each group (member -> group
        # -> summary), and this one's part as of the last judgement, for them.
        self.peers: Mapping[str, Mapping[str, GroupSummary]] = {}
        self.summaries: dict[str, GroupSummary] = {}
        self.publishing = False  # set by a shared coordinator: keep ``summaries``

    # ------------------------------------------------------------------ evidence

    @property
    def active(self) -> bool:
        """Anything to judge: evidence or an ejection (else a tick costs nothing)."""
        return self.policy.outliers and bool(self._evidence or self._ejected)

    @property
    def peer_ejected(self) -> int:
        """Nodes the other coordinators have out as outliers (from their group summaries)."""
        return sum(g.out for part in self.peers.values() for g in part.values())

    @property
    def ejected_count(self) -> int:
        """Nodes out as outliers for real (dry runs excluded): what the budget counts."""
        return sum(self._ejected.values())

    def note_report(self, node_id: str, load: Mapping[str, float], now: float) -> None:
        """The node's own business load: a gauge that stands until the next report. An
        application that reports nothing (all zeros) gives no evidence."""
        if not self.policy.outliers:
            return
        rate = load.get("error_rate", 0.0)
        qps = load.get("qps", 0.0)
        latency = load.get("latency_p99_ms")
        evidence = self._evidence.get(node_id)
        if rate <= 0 and qps <= 0 and latency is None:
            if evidence is not None:
                evidence.agent = None
                if evidence.empty():
                    del self._evidence[node_id]
            return
        # rate x qps x window: the requests the agent stands for over one window; without
        # qps the application's rate is taken at its word, as just enough volume.
        requests = qps * self.policy.outlier_window if qps > 0 else self.policy.outlier_min_requests
        sample = _Sample(now, requests, min(max(rate, 0.0), 1.0) * requests,
                         latency if latency is None or latency >= 0 else None)
        self._evidence.setdefault(node_id, _Evidence()).agent = sample

    def note_callers(self, source: str, observations: Iterable[CallerObservation],
                     now: float) -> None:
        """Counts from a caller, one window each; kept for ``window`` seconds."""
        if not self.policy.outliers:
            return
        for obs in observations:
            evidence = self._evidence.setdefault(obs.node_id, _Evidence())
            evidence.callers.setdefault(source, deque()).append(
                _Sample(now, obs.requests, min(obs.errors, obs.requests), obs.latency_p99_ms))

    def track(self, node: NodeState) -> None:
        """A node restored or mirrored with its state: its ejection counts again."""
        self._ejected.pop(node.node_id, None)
        if node.outlier is not None:
            self._ejected[node.node_id] = not node.outlier.dry_run

    def forget(self, node_id: str) -> None:
        self._evidence.pop(node_id, None)
        self._candidate_since.pop(node_id, None)
        self._in_line_since.pop(node_id, None)
        self._held.pop(node_id, None)
        self._ejected.pop(node_id, None)

    def figures(self, node_id: str, now: float) -> Figures | None:
        """The node's evidence over the window (expired caller samples dropped)."""
        evidence = self._evidence.get(node_id)
        if evidence is None:
            return None
        start = now - self.policy.outlier_window
        samples: list[tuple[str, _Sample]] = []
        if evidence.agent is not None:
            samples.append((AGENT_SOURCE, evidence.agent))
        for source, window in list(evidence.callers.items()):
            while window and window[0].at <= start:
                window.popleft()
            if not window:
                del evidence.callers[source]
                continue
            samples += [(source, sample) for sample in window]
        if not samples:
            del self._evidence[node_id]
            return None
        callers = [(source, s) for source, s in samples if source != AGENT_SOURCE]
        if sum(s.requests for _, s in callers) >= self.policy.outlier_min_requests:
            # The callers' view wins once it has the volume: they count the very requests
            # the application counts (adding both counts them twice), and they also see what
            # the application cannot (resets, timeouts before it), without its report's lag.
            samples = callers
        requests = sum(s.requests for _, s in samples)
        errors = sum(s.errors for _, s in samples)
        timed = [(s.latency_ms, max(s.requests, 1.0)) for _, s in samples
                 if s.latency_ms is not None]
        latency = (sum(v * w for v, w in timed) / sum(w for _, w in timed)) if timed else None
        sources = tuple(sorted({source for source, _ in samples}))
        return Figures(requests, errors, latency, sources)

    # ------------------------------------------------------------------ judgement

    def _group(self, node: NodeState) -> str:
        key = self.policy.outlier_group_by
        return f"{key}={node.labels.get(key, '')}" if key else "fleet"

    def judge(self, now: float, nodes: Mapping[str, NodeState],
              block: Callable[[], str]) -> list[OutlierVerdict]:
        """Compare every judged node with its group; ``block`` says why no ejection may
        happen now ('' when one may: the guard, the disruption budget)."""
        verdicts: list[OutlierVerdict] = []
        groups: dict[str, list[_Judged]] = {}
        self.summaries = {}
        for node_id in list(self._evidence) + [i for i in self._ejected if i not in
                                                self._evidence]:
            node = nodes.get(node_id)
            if node is None:
                self.forget(node_id)
                continue
            found = self.figures(node_id, now)
            if found is None:
                found = Figures(0.0, 0.0, None, ())
            judgeable = (found.requests >= self.policy.outlier_min_requests
                         and len(found.sources) >= self.policy.outlier_min_sources
                         and node.health is Health.HEALTHY)
            groups.setdefault(self._group(node), []).append(_Judged(node, found, judgeable))
        for group, members in sorted(groups.items()):
            self._judge_group(now, group, members, block, verdicts)
        return verdicts

    def _judge_group(self, now: float, group: str, members: list[_Judged],
                     block: Callable[[], str], verdicts: list[OutlierVerdict]) -> None:
        p = self.policy
        in_service = [m for m in members if m.judgeable and m.node.outlier is None]
        judged = [m for m in members if m.judgeable]
        rates = [m.figures.rate for m in in_service]
        timed = [m.figures.latency_ms for m in in_service if m.figures.latency_ms is not None]
        peers = [part[group] for part in self.peers.values() if group in part]
        if peers:
            # The group spans coordinators: its centre is the median of everybody's
            # in-service nodes, read from the summed histograms (detect/groups.py).
            rate_counts, latency_counts = histogram(rates, RATE_EDGES), histogram(
                timed, LATENCY_EDGES)
            enough = len(in_service) + sum(g.in_service for g in peers) >= p.outlier_min_nodes
            centre = (merged_median([rate_counts, *(g.rates for g in peers)], RATE_EDGES)
                      or 0.0) if enough else 0.0
            timed_total = len(timed) + sum(sum(g.latencies) for g in peers)
            latency_centre = merged_median([latency_counts, *(g.latencies for g in peers)],
                                           LATENCY_EDGES) \
                if timed_total >= p.outlier_min_nodes else None
        else:
            enough = len(in_service) >= p.outlier_min_nodes
            centre = median(rates) if enough else 0.0
            latency_centre = median(timed) if len(timed) >= p.outlier_min_nodes else None
        outliers: list[tuple[float, _Judged, str]] = []
        if enough:
            for m in judged:
                why = self._why(m.figures, centre, latency_centre, 1.0)
                if why:
                    outliers.append((m.figures.rate, m, why))
        # The whole group rose together (a shared dependency): nobody is taken out.
        candidates = len(outliers) + sum(g.candidates for g in peers)
        judged_total = len(judged) + sum(g.judged for g in peers)
        rising = enough and candidates >= 2 and (
            candidates >= p.group_rise_fraction * judged_total)
        rising = self._note_hold(now, group, rising, candidates, judged_total, centre,
                                 verdicts)
        base = {"group": group, "group_median": round(centre, 5), "window": p.outlier_window,
                "judged_nodes": len(judged)}
        if latency_centre is not None:
            base["group_latency_p99_ms"] = round(latency_centre, 1)
        self._clear_ejected(now, members, centre, latency_centre, enough, base, verdicts)
        outlier_ids = {m.node.node_id for _, m, _ in outliers}
        for m in members:
            if m.node.node_id not in outlier_ids:
                self._candidate_since.pop(m.node.node_id, None)
                self._held.pop(m.node.node_id, None)
        size_here = len({m.node.node_id for m in judged} | {m.node.node_id for m in members
                                                            if m.node.outlier is not None})
        out_here = sum(1 for m in members if m.node.outlier is not None
                       and self._ejected.get(m.node.node_id, False))
        waiting = [rate for rate, m, _ in outliers if m.node.outlier is None]
        if self.publishing:
            self.summaries[group] = GroupSummary(
                len(judged), len(in_service), size_here, out_here, len(outliers),
                histogram(rates, RATE_EDGES), histogram(timed, LATENCY_EDGES),
                max(waiting, default=0.0))
        worse_elsewhere = max((g.worst for g in peers), default=0.0)
        # max_ejection_fraction is of the whole group, across coordinators.
        size = size_here + sum(g.size for g in peers)
        out_now = out_here + sum(g.out for g in peers)
        limit = p.ejection_limit(size)
        for _, m, why in sorted(outliers, key=lambda item: -item[0]):
            node_id = m.node.node_id
            if m.node.outlier is not None:
                continue
            if rising:
                # Nobody's hysteresis runs while the whole group is up (the group's event says
                # why): a node counts as an outlier only from when its group has settled.
                self._candidate_since.pop(node_id, None)
                continue
            since = self._candidate_since.setdefault(node_id, now)
            if now - since < p.outlier_eject_after:
                continue
            evidence = {**base, **m.figures.to_json(), "outlier_for": round(now - since, 3)}
            reason = (f"{why} over {p.outlier_window:g}s, {len(m.figures.sources)} "
                      f"observer{'s' if len(m.figures.sources) != 1 else ''} "
                      f"({', '.join(m.figures.sources)})")
            if out_now >= limit:
                hold = (f"held: max_ejection_fraction ({out_now} of {size} nodes in {group} "
                        "already out)")
            elif worse_elsewhere > m.figures.rate:
                hold = (f"held: a worse node of {group} ({percent(worse_elsewhere)} errors) "
                        "is another coordinator's to eject first")
            else:
                hold = block()
            if hold:
                if self._held.get(node_id) != hold:
                    self._held[node_id] = hold
                    verdicts.append(OutlierVerdict("outlier_held", node_id,
                                                   f"{hold}: {reason}", evidence))
                continue
            self._held.pop(node_id, None)
            self._candidate_since.pop(node_id, None)
            ejections = self._decayed(m.node, now) + 1
            until = now + p.ejection_time(ejections)
            self._ejected[node_id] = not p.dry_run
            out_now += not p.dry_run
            evidence["ejections"] = ejections
            evidence["until"] = until
            verdicts.append(OutlierVerdict("outlier", node_id, reason, evidence, until,
                                           ejections))

    def _why(self, f: Figures, centre: float, latency_centre: float | None,
             band: float) -> str:
        """Why these figures are far from the group's ('' when they are in line); ``band``
        scales the margins (under 1: the stricter test of being back in line)."""
        p = self.policy
        rate = f.rate
        if rate >= centre + p.outlier_error_margin * band and rate >= centre * (
                1 + (p.outlier_factor - 1) * band) and rate > 0:
            return f"errors {percent(rate)} vs group median {percent(centre)}"
        if f.latency_ms is not None and latency_centre is not None:
            margin = p.outlier_latency_margin * 1000.0 * band
            if f.latency_ms >= latency_centre + margin and f.latency_ms >= latency_centre * (
                    1 + (p.outlier_latency_factor - 1) * band):
                return (f"latency p99 {f.latency_ms:.0f} ms vs group median "
                        f"{latency_centre:.0f} ms")
        return ""

    def _decayed(self, node: NodeState, now: float) -> int:
        """The node's ejection count, less one for each max_ejection_time it behaved."""
        if node.ejections <= 0 or not node.outlier_cleared_at:
            return max(node.ejections, 0)
        quiet = int((now - node.outlier_cleared_at) // self.policy.max_ejection_time)
        return max(0, node.ejections - quiet)

    def _clear_ejected(self, now: float, members: list[_Judged], centre: float,
                       latency_centre: float | None, enough: bool, base: dict[str, Any],
                       verdicts: list[OutlierVerdict]) -> None:
        """An ejected node returns once its back-off is over and it has been back in line for
        ``clear_after``; with too little evidence to judge (drained, it gets few requests)
        it returns after its back-off, as Envoy's do, and is ejected again if it must be."""
        p = self.policy
        for m in members:
            state = m.node.outlier
            node_id = m.node.node_id
            if state is None:
                self._in_line_since.pop(node_id, None)
                continue
            if now < state.until:
                continue
            still = enough and m.judgeable and bool(
                self._why(m.figures, centre, latency_centre, _CLEAR_BAND))
            if still:
                self._in_line_since.pop(node_id, None)
                continue
            since = self._in_line_since.setdefault(node_id, now)
            if now - since < p.outlier_clear_after and m.judgeable:
                continue
            self._in_line_since.pop(node_id, None)
            self._ejected.pop(node_id, None)
            figures = m.figures
            if m.judgeable:
                reason = (f"errors {percent(figures.rate)} vs group median {percent(centre)} "
                          f"for {now - since:.0f}s, after a {state.until - state.since:.0f}s "
                          "back-off")
            else:
                reason = (f"back-off of {state.until - state.since:.0f}s over; too little "
                          "traffic to judge, returned on trial")
            verdicts.append(OutlierVerdict("outlier_cleared", node_id, reason,
                                           {**base, **figures.to_json(),
                                            "ejections": state.ejections}))

    def _note_hold(self, now: float, group: str, rising: bool, outliers: int, judged: int,
                   centre: float, verdicts: list[OutlierVerdict]) -> bool:
        """Whether the group is held: from when its errors rose together until they have
        been settled for a whole ``window`` (so a fleet in the middle of a rise, whose
        median moves, never has its first or last nodes taken out)."""
        evidence = {"group": group, "outliers": outliers, "judged_nodes": judged,
                    "group_median": round(centre, 5),
                    "group_rise_fraction": self.policy.group_rise_fraction}
        if rising:
            self._settled_since.pop(group, None)
            if group not in self._holding:
                reason = (f"{group}: {outliers} of {judged} nodes' errors rose together "
                          f"(median {percent(centre)}): a shared dependency? nobody is taken "
                          "out")
                self._holding[group] = reason
                verdicts.append(OutlierVerdict("outlier_hold", "", reason, evidence))
            return True
        if group not in self._holding:
            return False
        settled = self._settled_since.setdefault(group, now)
        if now - settled < self.policy.outlier_window:
            return True
        del self._holding[group], self._settled_since[group]
        verdicts.append(OutlierVerdict(
            "outlier_hold_off", "", f"{group}: {outliers} of {judged} nodes far from the median "
            f"for {now - settled:.0f}s, below group_rise_fraction", evidence))
        return False
