"""The pure detection core: per-node state machine plus cluster policies.

No I/O and no clock of its own: every method takes ``now``. Observations (polls, heartbeats,
lease expiries, peer votes, registrations, operator commands, ticks) go in; events, indirect
probe requests and cleanup requests come out. The coordinator, the simulation and the tests
drive the same code.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodewatch.detect.policy import Policy
from nodewatch.model import (
    Admin,
    CheckResult,
    DrainState,
    Event,
    Health,
    NodeState,
    NodeStatus,
    PeerVote,
    RegisterDecision,
    Registration,
    Report,
    event_id,
)

__all__ = ["ActionRequest", "Cluster", "Conflict", "Outcome", "ProbeRequest", "UnknownNode"]

_OUT = frozenset({Health.UNHEALTHY, Health.DEAD})
_REJOIN_MEMORY = 3600.0
_GUARD_HOLD = "held: guard (many nodes failing at once)"
_REACHABLE = "reachable from peers"
_PEERS_UNREACHABLE = "held: peers unreachable too (fault near the coordinator?)"
_CONFIRMING = "confirming through peers"


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


@dataclass(slots=True)
class _Failure:
    at: float
    failure: str
    detail: str
    latency: float
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "class": self.failure,
            "detail": self.detail,
            "latency": round(self.latency, 4),
            "source": self.source,
        }


class Cluster:
    """All nodes' state machines and the cluster-wide policies (guard, gate, budget)."""

    def __init__(
        self,
        policy: Policy,
        *,
        now: float,
        rng: random.Random | None = None,
        nodes: Iterable[NodeState] = (),
        next_event: int = 1,
    ) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.nodes: dict[str, NodeState] = {n.node_id: n for n in nodes}
        self._next_event = next_event
        self.started_at = now
        self.loop_lag = 0.0
        self.guard_on = False
        self._failures: dict[str, deque[_Failure]] = {}
        # When each node's current streak of failed checks began (coordinator clock): ``fall``
        # failures confirm only once the streak spans ``policy.fall_span``. Not persisted: after
        # a restart a streak counts its time afresh from the next failure (the startup grace
        # holds confirmations longer than that anyway).
        self._failing_since: dict[str, float] = {}
        self._suspect_since: dict[str, float] = {}
        self._probing: set[str] = set()
        self._held_cleanup: dict[str, str] = {}  # node_id -> event id of the unhealthy event
        self._cleanup_times: deque[float] = deque()
        # Entries into suspect within the guard window: (time, node), and each node's latest
        # entry, so that the guard counts nodes rather than flaps of one node.
        self._went_suspect: deque[tuple[float, str]] = deque()
        self._suspect_entry: dict[str, float] = {}
        # Health of the nodes in _suspect_entry, counted, so the guard never scans nodes.
        self._recent_health: Counter[Health] = Counter()
        # (since, node_id) of unhealthy nodes, for dead_after without scanning; lazy deletion.
        self._dead_due: list[tuple[float, str]] = []
        # node_id -> (incarnation, seq, last_ts) from before a restart that a poll saw first.
        self._before_restart: dict[str, tuple[int, int, float]] = {}
        # Samples count of the last report seen per node (same incarnation): after an outage,
        # how far it moved says whether the node kept running while it was thought down.
        self._samples_seen: dict[str, tuple[int, int]] = {}
        self._dirty: set[str] = set(self.nodes)
        self._routine: set[str] = set()
        # Indexes kept in step with health so that no per-observation path scans all nodes.
        self._unhealthy: set[str] = set()
        self._draining: set[str] = set()
        self._dead_count = 0
        self._out_count = 0
        self._id_list: list[str] | None = None
        for node in self.nodes.values():
            if node.health is Health.SUSPECT:
                self._suspect_since[node.node_id] = now
            elif node.health is Health.UNHEALTHY:
                self._unhealthy.add(node.node_id)
                self._dead_due.append((node.since, node.node_id))
                if not node.cleaned_up:
                    self._held_cleanup[node.node_id] = ""
            elif node.health is Health.DEAD:
                self._dead_count += 1
            if node.drain is not None and not node.drain.complete:
                self._draining.add(node.node_id)
            self._out_count += node.cleaned_up and node.health is not Health.DEAD
        heapq.heapify(self._dead_due)

    # ------------------------------------------------------------------ bookkeeping

    def take_dirty(self, routine: bool = True) -> set[str]:
        """Node ids changed since the last call: what the coordinator must persist.

        With ``routine=False`` only nodes with a transition or a command are taken; nodes that
        merely saw routine observations stay pending for a later full write.
        """
        dirty, self._dirty = self._dirty, set()
        if routine:
            dirty |= self._routine
            self._routine = set()
        return dirty

    def mark_dirty(self, node_ids: Iterable[str]) -> None:
        """Ask for these nodes to be written again (after a failed or lost write)."""
        self._dirty.update(i for i in node_ids if i in self.nodes)

    @property
    def next_event_number(self) -> int:
        return self._next_event

    def _emit(
        self,
        out: Outcome,
        now: float,
        node_id: str,
        kind: str,
        from_: str = "",
        to: str = "",
        reason: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> Event:
        event = Event(
            id=event_id(self._next_event),
            ts=now,
            node_id=node_id,
            kind=kind,
            from_=from_,
            to=to,
            reason=reason,
            evidence=evidence or {},
        )
        self._next_event += 1
        out.events.append(event)
        return event

    def _set_health(
        self,
        out: Outcome,
        node: NodeState,
        health: Health,
        now: float,
        reason: str,
        evidence: dict[str, Any],
        kind: str | None = None,
    ) -> Event:
        before = node.health
        node.since = now
        self._index_health(node, health)
        node.health_reason = reason if health is not Health.HEALTHY else ""
        if health is Health.SUSPECT:
            self._suspect_since[node.node_id] = now
            self._went_suspect.append((now, node.node_id))
            if node.node_id not in self._suspect_entry:
                self._recent_health[health] += 1
            self._suspect_entry[node.node_id] = now
        else:
            self._suspect_since.pop(node.node_id, None)
            self._probing.discard(node.node_id)
        return self._emit(
            out, now, node.node_id, kind or health.value, before.value, health.value, reason,
            evidence,
        )

    def _index_health(self, node: NodeState, health: Health) -> None:
        before = node.health
        node.health = health
        if node.node_id in self._suspect_entry:
            self._recent_health[before] -= 1
            self._recent_health[health] += 1
        if before is Health.UNHEALTHY:
            self._unhealthy.discard(node.node_id)
        elif before is Health.DEAD:
            self._dead_count -= 1
            self._out_count += node.cleaned_up
        if health is Health.UNHEALTHY:
            self._unhealthy.add(node.node_id)
            heapq.heappush(self._dead_due, (node.since, node.node_id))
        elif health is Health.DEAD:
            self._dead_count += 1
            self._out_count -= node.cleaned_up

    def _set_cleaned_up(self, node: NodeState, value: bool) -> None:
        if node.cleaned_up != value:
            if node.health is not Health.DEAD:
                self._out_count += 1 if value else -1
            node.cleaned_up = value

    def _gate_reason(self, now: float) -> str:
        """Why the coordinator must not confirm failures right now ('' when it may).

        The reason is a fixed string per cause (figures go to the evidence) so that a held
        node gets one event when the cause changes, not one per check as a countdown ticks.
        """
        if now < self.started_at + self.policy.startup_grace:
            return "held: startup grace"
        if self.loop_lag > self.policy.max_loop_lag:
            return "held: coordinator loop lag"
        return ""

    def _gate_evidence(self, now: float) -> dict[str, Any]:
        grace_left = self.started_at + self.policy.startup_grace - now
        return {"loop_lag": round(self.loop_lag, 4), "max_loop_lag": self.policy.max_loop_lag,
                "grace_left": round(max(0.0, grace_left), 3)}

    def poll_deadline(self, node_id: str) -> float:
        """How long an accepted push puts off the node's next poll: its current interval,
        unjittered (the pushes are already spread by their assigned phases)."""
        node = self.nodes.get(node_id)
        p = self.policy
        return p.healthy_interval if node is not None and node.health is Health.HEALTHY \
            else p.unhealthy_interval

    def interval_for(self, node_id: str) -> float:
        """Seconds until the node's next check, jittered: fast while unknown or suspect;
        ``down_interval`` once confirmed unhealthy; slow while healthy, and for dead nodes
        (final until they register again)."""
        node = self.nodes.get(node_id)
        p = self.policy
        if node is None:
            base = p.unhealthy_interval
        elif node.health in (Health.HEALTHY, Health.DEAD):
            base = p.healthy_interval
        elif node.health is Health.UNHEALTHY:
            base = p.confirmed_down_interval
        else:
            base = p.unhealthy_interval
        return p.jittered(base, self.rng)

    # ------------------------------------------------------------------ gate

    def restart_grace(self, now: float) -> None:
        """A (re)start or a leader change: observe, but confirm nothing for ``startup_grace``."""
        self.started_at = now

    def set_loop_lag(self, lag: float) -> None:
        self.loop_lag = lag

    # ------------------------------------------------------------------ observations

    def is_stale(self, node: NodeState, report: Report) -> bool:
        return (report.incarnation, report.seq) <= (node.incarnation, node.seq)

    def observe(self, result: CheckResult) -> Outcome:
        """One poll / heartbeat / lease expiry. A stale pushed report changes nothing."""
        node = self.nodes.get(result.node_id)
        if node is None:
            raise UnknownNode(result.node_id)
        out = Outcome()
        now = result.at
        report = result.report
        if result.ok and report is not None:
            if self.is_stale(node, report):
                if result.source == "push":
                    out.stale = True
                    return out
            else:
                self._apply_report(out, node, report, now)
        if node.health is not Health.DEAD:  # dead is final until the node registers again
            if result.ok:
                self._on_success(out, node, result)
            else:
                self._on_failure(out, node, result)
        # A transition must be written at once; a routine observation (new seq, load, counters)
        # may wait for the next full write, so a heartbeat is not a store write every time.
        (self._dirty if out.events else self._routine).add(node.node_id)
        if out.events:
            self._update_guard(out, now)
        return out

    def _apply_report(self, out: Outcome, node: NodeState, report: Report, now: float) -> None:
        if report.samples >= 0:
            self._judge_unobserved_run(out, node, report, now)
        if report.incarnation > node.incarnation > 0:
            # A restart seen by a poll before its registration arrived: keep what was stored
            # before it, so that the registration is judged against the previous incarnation.
            self._before_restart.setdefault(node.node_id,
                                            (node.incarnation, node.seq, node.last_ts))
        node.incarnation = report.incarnation
        node.seq = report.seq
        node.last_ts = report.ts
        node.system = report.system
        node.load = report.load
        node.reasons = list(report.reasons)
        if report.status is not node.node_status:
            before = node.node_status
            node.node_status = report.status
            reason = "; ".join(report.reasons) or f"node reports {report.status.value}"
            kind = "status_ok" if report.status is NodeStatus.OK else report.status.value
            self._emit(out, now, node.node_id, kind, before.value, report.status.value, reason,
                       {"reasons": list(report.reasons)})
            event = out.events[-1]
            if report.status is NodeStatus.DRAINING and node.drain is None:
                node.drain = DrainState(reason=reason, started=now,
                                        deadline=now + self.policy.drain_deadline, by="node")
                self._draining.add(node.node_id)
                # Handled like an operator drain: load balancers stop sending new work.
                self._action(out, "drained", node, event)
            elif before is NodeStatus.DRAINING and node.drain and node.drain.by == "node":
                node.drain = None
                self._draining.discard(node.node_id)
                self._action(out, "undrained", node, event)
            elif report.status is NodeStatus.DEGRADED:
                self._action(out, "degraded", node, event)  # no new work: drain it softly
            else:
                self._action(out, "status_ok", node, event)
        if node.drain is not None and not node.drain.complete:
            self._check_drain(out, node, now)

    def _judge_unobserved_run(self, out: Outcome, node: NodeState, report: Report,
                              now: float) -> None:
        """A node confirmed down that answers again in the same incarnation: if it took more
        samples meanwhile than fit in one detection window, it kept running while unreachable
        (a partition, not a crash or a freeze) and needs a human before it takes work."""
        seen = self._samples_seen.get(node.node_id)
        self._samples_seen[node.node_id] = (report.incarnation, report.samples)
        if (seen is None or seen[0] != report.incarnation or report.sample_interval <= 0
                or node.health not in _OUT or node.admin is not Admin.ACTIVE):
            return
        ran = (report.samples - seen[1]) * report.sample_interval
        window = self.policy.detection_window
        if ran <= window:
            return
        reason = (f"kept running for about {ran:.0f}s while unreachable and thought down "
                  f"(window {window:g}s): a partition")
        evidence: dict[str, Any] = {
            "samples_before": seen[1], "samples_now": report.samples,
            "sample_interval": report.sample_interval, "ran_s": round(ran, 3)}
        if self.policy.auto_approve:
            self._emit(out, now, node.node_id, "approved", Admin.ACTIVE.value,
                       Admin.ACTIVE.value, f"auto-approved: {reason}", evidence)
            return
        node.admin = Admin.REVIEW
        self._dirty.add(node.node_id)
        event = self._emit(out, now, node.node_id, "review", Admin.ACTIVE.value,
                           Admin.REVIEW.value, reason, evidence)
        self._action(out, "review", node, event)  # out of load balancers until approved

    def _on_success(self, out: Outcome, node: NodeState, result: CheckResult) -> None:
        now = result.at
        node.last_seen = now
        node.consecutive_failures = 0
        node.consecutive_successes += 1
        self._failures.pop(node.node_id, None)
        self._failing_since.pop(node.node_id, None)
        self._probing.discard(node.node_id)
        if node.health is Health.HEALTHY:
            return
        if node.consecutive_successes < self.policy.rise:
            return
        before = node.health
        evidence = {"successes": node.consecutive_successes, "source": result.source,
                    "latency": round(result.latency, 4)}
        if before in _OUT or node.cleaned_up:
            # Back from an outage: from unhealthy, or from dead through a new registration
            # (the cleanup still holds the node out, so it must be put back).
            self._set_health(out, node, Health.HEALTHY, now,
                             f"{node.consecutive_successes} consecutive good checks", evidence,
                             kind="recovered")
            self._held_cleanup.pop(node.node_id, None)
            if node.cleaned_up:
                self._set_cleaned_up(node, False)
                self._action(out, "recovered", node, out.events[-1])
        else:
            self._set_health(out, node, Health.HEALTHY, now,
                             f"{node.consecutive_successes} consecutive good checks", evidence)

    def _on_failure(self, out: Outcome, node: NodeState, result: CheckResult) -> None:
        now = result.at
        node.consecutive_successes = 0
        node.consecutive_failures += 1
        self._failing_since.setdefault(node.node_id, now)
        failures = self._failures.get(node.node_id)
        if failures is None:
            # The first failure, its quick re-check and fall - 1 more: the whole streak that
            # confirms a node, as its evidence.
            failures = self._failures[node.node_id] = deque(maxlen=max(self.policy.fall + 1, 3))
        failures.append(_Failure(now, result.failure.value if result.failure else "error",
                                 result.detail, result.latency, result.source))
        if node.health in (Health.HEALTHY, Health.UNKNOWN):
            self._set_health(out, node, Health.SUSPECT, now,
                             f"check failed: {self._describe(failures[-1])}",
                             {"checks": [f.to_json() for f in failures]})
            out.check_now.append(node.node_id)
            # The node that tips the guard must itself be held: decide the guard first.
            self._update_guard(out, now)
        if node.health is Health.SUSPECT and self._fall_reached(node, now):
            self._try_confirm(out, node, now)

    def _fall_reached(self, node: NodeState, now: float) -> bool:
        """``fall`` consecutive failures spread over ``fall_span``: a failure that lasts
        (fall - 1) unhealthy intervals, however often the node was checked meanwhile."""
        p = self.policy
        if node.consecutive_failures < p.fall:
            return False
        # A hair of slack for float sums of jittered intervals that land on the bound exactly.
        return now - self._failing_since.get(node.node_id, now) >= p.fall_span - 1e-9

    @staticmethod
    def _describe(failure: _Failure) -> str:
        return f"{failure.failure} ({failure.detail})" if failure.detail else failure.failure

    def _hold(self, out: Outcome, node: NodeState, now: float, reason: str,
              evidence: dict[str, Any]) -> None:
        """Keep a node suspect, telling why once per change of reason rather than every check."""
        if node.health_reason != reason:
            node.health_reason = reason
            self._dirty.add(node.node_id)
            self._emit(out, now, node.node_id, "suspect", Health.SUSPECT.value,
                       Health.SUSPECT.value, reason, evidence)

    def _try_confirm(self, out: Outcome, node: NodeState, now: float) -> None:
        evidence: dict[str, Any] = {"checks": self._checks(node.node_id),
                                    **self._gate_evidence(now)}
        gate = self._gate_reason(now)
        if gate:
            self._hold(out, node, now, gate, evidence)
            return
        if self.guard_on:
            self._hold(out, node, now, _GUARD_HOLD, evidence)
            return
        if node.node_id in self._probing:
            return
        peers = self._pick_peers(node)
        if peers:
            self._probing.add(node.node_id)
            out.probes.append(ProbeRequest(node.node_id, node.address, peers))
            if node.health_reason != _REACHABLE:
                # Asking again about a node the peers still reach is no news.
                self._hold(out, node, now, _CONFIRMING, evidence)
            return
        self._confirm(out, node, now, evidence)

    def _checks(self, node_id: str) -> list[dict[str, Any]]:
        """The recent failed checks with their class: the evidence of every failure event."""
        return [f.to_json() for f in self._failures.get(node_id, ())]

    def _pick_peers(self, node: NodeState) -> tuple[tuple[str, str], ...]:
        want = self.policy.indirect_probes
        if want <= 0:
            return ()
        if self._id_list is None or len(self._id_list) != len(self.nodes):
            self._id_list = list(self.nodes)
        ids = self._id_list
        chosen: dict[str, str] = {}
        # A bounded random sample instead of a scan: a confirmation must not cost O(cluster
        # size). Without replacement, so that a small cluster is searched completely.
        for index in self.rng.sample(range(len(ids)), min(len(ids), want * 8)):
            peer = self.nodes.get(ids[index])
            if (peer is not None and peer.health is Health.HEALTHY
                    and peer.node_id != node.node_id and peer.address):
                chosen[peer.node_id] = peer.address
                if len(chosen) >= want:
                    break
        return tuple(chosen.items())

    def peer_votes(self, node_id: str, votes: list[PeerVote], now: float) -> Outcome:
        """Answers of the indirect probe.

        A peer that still reaches the node holds it. If the coordinator could not reach any
        asked peer either, the fault is as likely on its own side (a partition cutting off
        the node and the peers alike): the node is held and the next failed check asks other
        peers. Peers that answered without a usable vote (no ``/probe``) are ignored; with no
        votes at all the peers could not help and the node is confirmed.
        """
        out = Outcome()
        node = self.nodes.get(node_id)
        if node is None or node_id not in self._probing:
            return out
        self._probing.discard(node_id)
        if node.health is not Health.SUSPECT:
            return out
        evidence: dict[str, Any] = {
            "checks": self._checks(node_id),
            "peers": [{"peer": v.peer_id, "reachable": v.reachable, "detail": v.detail}
                      for v in votes],
            "reachable_from": sorted(v.peer_id for v in votes if v.reachable),
            **self._gate_evidence(now),
        }
        if evidence["reachable_from"]:
            self._hold(out, node, now, _REACHABLE, evidence)
            return out
        if votes and all(v.reachable is None for v in votes):
            self._hold(out, node, now, _PEERS_UNREACHABLE, evidence)
            self._dirty.add(node_id)
            return out
        gate = self._gate_reason(now)
        if gate or self.guard_on:
            self._hold(out, node, now, gate or _GUARD_HOLD, evidence)
            return out
        self._confirm(out, node, now, evidence)
        self._dirty.add(node_id)
        self._update_guard(out, now)
        return out

    def _confirm(self, out: Outcome, node: NodeState, now: float,
                 evidence: dict[str, Any]) -> None:
        failures = self._failures.get(node.node_id)
        last = self._describe(failures[-1]) if failures else "checks failed"
        span = now - self._failing_since.get(node.node_id, now)
        reason = (f"{node.consecutive_failures} consecutive failed checks over {span:.1f}s, "
                  f"last: {last}")
        event = self._set_health(out, node, Health.UNHEALTHY, now, reason, evidence)
        self._request_cleanup(out, node, event, now)

    # ------------------------------------------------------------------ budget

    def _budget_block(self, now: float) -> str:
        while self._cleanup_times and self._cleanup_times[0] <= now - 60.0:
            self._cleanup_times.popleft()
        if len(self._cleanup_times) >= self.policy.max_rate:
            return f"held: budget (rate {self.policy.max_rate:g}/min reached)"
        # Dead nodes are gone for good: they neither use the budget nor size it, so a cluster
        # that lost nodes long ago can still clean up a new failure.
        watched = len(self.nodes) - self._dead_count
        limit = self.policy.budget_limit(watched)
        if self._out_count >= limit:
            return f"held: budget ({limit} of {watched} nodes already out)"
        return ""

    def _request_cleanup(self, out: Outcome, node: NodeState, event: Event, now: float) -> None:
        if node.cleaned_up:
            # Still out from an earlier outage (dead, registered again, failed again): the
            # cleanup is repeated but draws nothing more from the budget.
            self._action(out, "unhealthy", node, event)
            return
        block = self._budget_block(now)
        if block:
            self._held_cleanup[node.node_id] = event.id
            self._emit(out, now, node.node_id, "held", node.health.value, node.health.value,
                       block, {"for_event": event.id, "checks": self._checks(node.node_id)})
            return
        self._held_cleanup.pop(node.node_id, None)
        self._cleanup_times.append(now)
        self._set_cleaned_up(node, True)
        self._action(out, "unhealthy", node, event)

    def _action(self, out: Outcome, kind: str, node: NodeState, event: Event) -> None:
        out.actions.append(ActionRequest(kind, node.node_id, node.address, event.id,
                                         event.reason))

    # ------------------------------------------------------------------ guard

    def _update_guard(self, out: Outcome, now: float) -> None:
        p = self.policy
        window_start = now - p.guard_window
        while self._went_suspect and self._went_suspect[0][0] < window_start:
            at, node_id = self._went_suspect.popleft()
            if self._suspect_entry.get(node_id) == at:
                self._forget_suspect_entry(node_id)
        total = len(self.nodes) - self._dead_count
        if total < p.guard_min_nodes:
            if self.guard_on:
                self.guard_on = False
                self._emit(out, now, "", "guard_off", "on", "off",
                           f"only {total} nodes watched (min_nodes {p.guard_min_nodes})")
            return
        # Nodes that went suspect within the window and are still failing (suspect, or
        # confirmed before the guard could see them): distinct nodes, not flaps of one.
        recent_unhealthy = self._recent_health[Health.UNHEALTHY]
        if not self.guard_on:
            recent = self._recent_health[Health.SUSPECT] + recent_unhealthy
            if recent and recent >= p.guard_fraction * total:
                self.guard_on = True
                self._emit(out, now, "", "guard_on", "off", "on",
                           f"{recent} of {total} nodes went suspect within "
                           f"{p.guard_window:g}s: assuming a fault on the coordinator's side",
                           {"suspect": recent, "total": total, "fraction": p.guard_fraction})
        else:
            # Every suspect node (held ones stay suspect past the window), plus the recent
            # ones already confirmed: never fewer than turned the guard on.
            failing = len(self._suspect_since) + recent_unhealthy
            if failing < p.guard_fraction * total:
                self.guard_on = False
                self._emit(out, now, "", "guard_off", "on", "off",
                           f"{failing} of {total} nodes failing, below {p.guard_fraction:g}",
                           {"suspect": failing, "total": total})

    def _forget_suspect_entry(self, node_id: str) -> None:
        del self._suspect_entry[node_id]
        node = self.nodes.get(node_id)
        if node is not None:
            self._recent_health[node.health] -= 1

    # ------------------------------------------------------------------ registration

    def register(self, reg: Registration, now: float) -> tuple[RegisterDecision, Outcome]:
        """Decide new / rejoin / review for an agent that (re)started, per SPEC's rules."""
        out = Outcome()
        node = self.nodes.get(reg.node_id)
        if node is None:
            node = NodeState(node_id=reg.node_id, address=reg.address, labels=dict(reg.labels),
                             incarnation=reg.incarnation, seq=-1, last_ts=reg.last_ts,
                             version=reg.version, registered_at=now, since=now)
            self.nodes[reg.node_id] = node
            self._id_list = None
            self._dirty.add(reg.node_id)
            self._emit(out, now, reg.node_id, "registered", "", Health.UNKNOWN.value,
                       "new node", {"decision": "new", "incarnation": reg.incarnation})
            out.check_now.append(reg.node_id)
            return "new", out
        prior = self._before_restart.pop(reg.node_id, None)
        if prior is not None and reg.incarnation == node.incarnation > prior[0]:
            node.incarnation, node.seq, node.last_ts = prior
        decision, reason, evidence = self._judge_return(node, reg, now)
        if decision == "review" and self.policy.auto_approve:
            evidence["auto_approved"] = reason
            decision, reason = "rejoin", f"auto-approved: {reason}"
        node.address = reg.address
        node.labels = dict(reg.labels) or node.labels
        node.version = reg.version or node.version
        node.registered_at = now
        if reg.incarnation != node.incarnation:
            node.incarnation = reg.incarnation
            node.seq = -1
            node.rejoins = [t for t in node.rejoins if t > now - _REJOIN_MEMORY]
            node.rejoins.append(now)
        node.last_ts = max(node.last_ts, reg.last_ts)
        # A registration proves the agent alive: fall and rise both count afresh from here.
        node.consecutive_successes = 0
        node.consecutive_failures = 0
        self._failures.pop(node.node_id, None)
        self._failing_since.pop(node.node_id, None)
        self._probing.discard(node.node_id)
        before = node.health
        if before is Health.DEAD:
            # Watched again from scratch. cleaned_up stays: the node is still out of the load
            # balancers, and returning to healthy emits ``recovered`` to put it back.
            self._index_health(node, Health.UNKNOWN)
            node.since = now
        self._dirty.add(node.node_id)
        if decision == "review":
            prev_admin = node.admin
            node.admin = Admin.REVIEW
            event = self._emit(out, now, node.node_id, "review", prev_admin.value,
                               Admin.REVIEW.value, reason, evidence)
            self._action(out, "review", node, event)  # out of load balancers until approved
        else:
            self._emit(out, now, node.node_id, "registered", before.value, node.health.value,
                       reason, evidence)
        out.check_now.append(node.node_id)
        return decision, out

    def _judge_return(
        self, node: NodeState, reg: Registration, now: float
    ) -> tuple[RegisterDecision, str, dict[str, Any]]:
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
        unobserved = reg.last_ts - node.last_ts if node.last_ts else 0.0
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
        recent = [t for t in node.rejoins if t > now - _REJOIN_MEMORY]
        node.rejoins = recent
        if len(recent) >= p.max_rejoins:
            return "review", (f"flapping: {len(recent) + 1} restarts within an hour "
                              f"(max_rejoins {p.max_rejoins})"), evidence
        evidence["decision"] = "rejoin"
        return "rejoin", "restart within the detection window", evidence

    # ------------------------------------------------------------------ operator commands

    def _get(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        return node

    def add_static(self, node_id: str, address: str, labels: dict[str, str], now: float) -> Outcome:
        """A node from the config file: watched without registering."""
        out = Outcome()
        node = self.nodes.get(node_id)
        if node is not None:
            if node.address != address or node.labels != labels:
                node.address, node.labels = address, dict(labels)
                self._dirty.add(node_id)
            return out
        self.nodes[node_id] = NodeState(node_id=node_id, address=address, labels=dict(labels),
                                        registered_at=now, since=now, seq=-1)
        self._id_list = None
        self._dirty.add(node_id)
        self._emit(out, now, node_id, "registered", "", Health.UNKNOWN.value,
                   "static node from the configuration", {"decision": "new"})
        out.check_now.append(node_id)
        return out

    def drain(self, node_id: str, reason: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        if node.admin is Admin.DRAINED:
            return out  # idempotent
        if node.admin is Admin.REVIEW:
            # Draining would replace review, and undrain would then skip the approval.
            raise Conflict(f"node {node_id} is in review; approve it first")
        before = node.admin
        node.admin = Admin.DRAINED
        node.drain = DrainState(reason=reason or "operator drain", started=now,
                                deadline=now + self.policy.drain_deadline)
        self._draining.add(node_id)
        self._dirty.add(node_id)
        event = self._emit(out, now, node_id, "drained", before.value, Admin.DRAINED.value,
                           node.drain.reason,
                           {"waiting_for": {"pending_tasks": node.load.get("pending_tasks")},
                            "deadline": node.drain.deadline})
        self._action(out, "drained", node, event)
        self._check_drain(out, node, now)
        return out

    def _check_drain(self, out: Outcome, node: NodeState, now: float) -> None:
        drain = node.drain
        if drain is None or drain.complete:
            return
        pending = node.load.get("pending_tasks")
        if pending is None or pending <= 0:
            drain.complete = True
            self._draining.discard(node.node_id)
            self._emit(out, now, node.node_id, "drain_complete", "draining", "drained",
                       "no pending tasks" if pending is not None else "node reports no tasks",
                       {"pending_tasks": pending})
            self._dirty.add(node.node_id)
        elif now >= drain.deadline:
            drain.complete = True
            self._draining.discard(node.node_id)
            event = self._emit(out, now, node.node_id, "drain_deadline", "draining", "drained",
                               f"drain_deadline reached with {pending:g} tasks still pending",
                               {"pending_tasks": pending})
            self._action(out, "drain_deadline", node, event)
            self._dirty.add(node.node_id)

    def undrain(self, node_id: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        if node.admin is not Admin.DRAINED:
            if node.admin is Admin.REVIEW:
                raise Conflict(f"node {node_id} is in review; approve it instead")
            return out
        node.admin = Admin.ACTIVE
        node.drain = None
        self._draining.discard(node_id)
        self._dirty.add(node_id)
        event = self._emit(out, now, node_id, "undrained", Admin.DRAINED.value,
                           Admin.ACTIVE.value, "operator undrain")
        self._action(out, "undrained", node, event)
        return out

    def approve(self, node_id: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        if node.admin is not Admin.REVIEW:
            raise Conflict(f"node {node_id} is not in review (admin is {node.admin.value})")
        node.admin = Admin.ACTIVE
        node.rejoins.clear()
        self._dirty.add(node_id)
        event = self._emit(out, now, node_id, "approved", Admin.REVIEW.value,
                           Admin.ACTIVE.value, "operator approved")
        self._action(out, "approved", node, event)
        return out

    def remove(self, node_id: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        before = node.health
        self._index_health(node, Health.UNKNOWN)
        self._set_cleaned_up(node, False)
        del self.nodes[node_id]
        self._id_list = None
        if node_id in self._suspect_entry:
            del self._suspect_entry[node_id]
            self._recent_health[Health.UNKNOWN] -= 1  # _index_health counted it as unknown
        for table in (self._failures, self._failing_since, self._suspect_since, self._held_cleanup,
                      self._before_restart, self._samples_seen):
            table.pop(node_id, None)
        self._probing.discard(node_id)
        self._draining.discard(node_id)
        self._dirty.discard(node_id)
        self._routine.discard(node_id)
        event = self._emit(out, now, node_id, "removed", before.value, "",
                           "operator removed the node")
        self._action(out, "removed", node, event)
        out.removed.append(node_id)
        self._update_guard(out, now)
        return out

    def record(self, kind: str, node_id: str, reason: str, evidence: dict[str, Any],
               now: float) -> Outcome:
        """An event reported by an edge (e.g. ``action_failed`` from the respond stage): the
        core only mints it, so that ids stay in one sequence; it changes no state."""
        out = Outcome()
        self._emit(out, now, node_id, kind, "", "", reason, evidence)
        return out

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> Outcome:
        """Timers: dead_after, drain deadlines, held cleanups, the guard's window."""
        out = Outcome()
        # While the gate or the guard holds, the coordinator evicts nobody: no dead_after and
        # no release of held cleanups (a restored outage may have ended while it was down).
        evicting = not self.guard_on and not self._gate_reason(now)
        if evicting:
            self._declare_dead(out, now)
        for node_id in list(self._draining):
            self._check_drain(out, self.nodes[node_id], now)
        if evicting and self._held_cleanup:
            self._release_held(out, now)
        self._update_guard(out, now)
        return out

    def _declare_dead(self, out: Outcome, now: float) -> None:
        p = self.policy
        due = self._dead_due
        while due and now - due[0][0] >= p.dead_after:
            since, node_id = heapq.heappop(due)
            node = self.nodes.get(node_id)
            if node is None or node.health is not Health.UNHEALTHY or node.since != since:
                continue  # stale entry: the node recovered, was removed or went down again
            event = self._set_health(out, node, Health.DEAD, now,
                                     f"unhealthy for {now - since:.0f}s "
                                     f"(dead_after {p.dead_after:g}s)",
                                     {"checks": self._checks(node_id), "since": since})
            self._dirty.add(node_id)
            if node.cleaned_up:
                self._action(out, "dead", node, event)

    def _release_held(self, out: Outcome, now: float) -> None:
        if self._budget_block(now):
            return  # the common case during an outage: no copy of a long waiting list
        for node_id in list(self._held_cleanup):
            held = self.nodes.get(node_id)
            if held is None or held.health not in _OUT:
                self._held_cleanup.pop(node_id, None)
                continue
            if self._budget_block(now):
                break
            event = self._emit(out, now, node_id, "cleanup", held.health.value,
                               held.health.value, "budget allows cleanup now",
                               {"for_event": self._held_cleanup[node_id],
                                "checks": self._checks(node_id)})
            self._held_cleanup.pop(node_id, None)
            self._cleanup_times.append(now)
            self._set_cleaned_up(held, True)
            self._dirty.add(node_id)
            self._action(out, "unhealthy", held, event)
            if held.health is Health.DEAD:
                # Went dead while its cleanup waited: deregister it for good now.
                self._action(out, "dead", held, event)

    # ------------------------------------------------------------------ views

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {h.value: 0 for h in Health}
        schedulable = 0
        for node in self.nodes.values():
            counts[node.health.value] += 1
            schedulable += node.schedulable
        counts["schedulable"] = schedulable
        counts["total"] = len(self.nodes)
        return counts
