"""The cluster facade of the pure detection core: it feeds each input to the per-node machine
and the policies (gate, guard, budget, peers, review, drains, outliers) and collects what they
decide.

No I/O and no clock of its own: every method takes ``now``. Observations (polls, heartbeats,
lease expiries, peer votes, registrations, operator commands, ticks) go in; events, indirect
probe requests and cleanup requests come out. The coordinator, the simulation and the tests
drive the same code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from nodewatch.detect.budget import Budget
from nodewatch.detect.drain import Drains
from nodewatch.detect.gate import Gate
from nodewatch.detect.groups import GroupSummary
from nodewatch.detect.guard import Guard
from nodewatch.detect.identity import Credential, Identity, Verdict
from nodewatch.detect.journal import DirtyNodes, EventSequence, Revisions
from nodewatch.detect.machine import FailureLog, NodeTable
from nodewatch.detect.outcome import ActionRequest, Conflict, Outcome, ProbeRequest, UnknownNode
from nodewatch.detect.outliers import OutlierDetector, OutlierVerdict
from nodewatch.detect.peers import PeerConfirmation
from nodewatch.detect.phi import PhiAccrual
from nodewatch.detect.policy import Policy
from nodewatch.detect.review import Review
from nodewatch.model import (
    ActionDue,
    Admin,
    CallerObservation,
    CheckResult,
    Event,
    FailureClass,
    Health,
    NodeState,
    NodeStatus,
    OutlierState,
    PeerVote,
    RegisterDecision,
    Registration,
    Report,
    ReportFields,
)

__all__ = ["Cluster"]

_OUT = frozenset({Health.UNHEALTHY, Health.DEAD})
# How much longer a healthy node's pushes may be missing before it is polled while the
# coordinator drops heartbeats itself: two missed pushes in a row, not one, cost a poll.
OVERLOAD_STRETCH = 2.0
# Unknown nodes beyond which their first checks are spread out and pushes stand in for them
# (poll_deadline): a start beside a big pushing fleet, not a few new nodes.
MANY_UNKNOWN = 1_000
_GUARD_HOLD = "held: guard (many nodes failing at once)"
_REACHABLE = "reachable from peers"
_PEERS_UNREACHABLE = "held: peers unreachable too (fault near the coordinator?)"
_CONFIRMING = "confirming through peers"
_OVERLOAD_HOLD = "held: coordinator overloaded (dropping heartbeats)"
# Failures a coordinator short of CPU can cause itself: its own check timed out (the answer
# came, but the loop read it too late) or a push it dropped let a lease run out. A refusal or
# a bad answer came from the node's side and is evidence however late it was read.
_LATENESS_FAILURES = frozenset({FailureClass.TIMEOUT.value, FailureClass.LEASE_EXPIRED.value})


class Cluster:
    """All nodes' state machines and the cluster-wide policies, composed."""

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
        self.table = NodeTable(nodes)
        self.failures = FailureLog(policy)
        self.gate = Gate(policy, now=now)
        self.guard = Guard(policy)
        self.budget = Budget(policy)
        self.peers = PeerConfirmation(policy, self.rng)
        self.review = Review(policy)
        self.identity = Identity()
        self.drains = Drains(policy)
        self.outliers = OutlierDetector(policy)
        # Arrival histories only where pushes are judged by them (decided once).
        self.arrivals = PhiAccrual(policy) if policy.suspicion == "phi" else None
        # OVERLOAD_STRETCH while the coordinator drops heartbeats itself (note_receive_drops).
        self.push_stretch = 1.0
        self.event_sequence = EventSequence(next_event)
        # With several coordinators on one store, the nodes this core decides for (its
        # shares); the others are mirrors: counted by the fleet-wide policies (guard, budget),
        # never judged, timed out or acted on here. None: every node is this core's.
        self.scope: Callable[[str], bool] | None = None
        self.dirty = DirtyNodes(self.table.nodes,
                                Revisions(f"{int(now * 1000) & 0xFFFFFFFFFFFF:x}",
                                          members=self.table.nodes))
        for node in self.table.nodes.values():
            self._track(node)

    def _track(self, node: NodeState) -> None:
        """The policies' share of a node restored or mirrored with its state (what is decided
        per node only for the nodes in scope: another coordinator's are its to decide)."""
        if node.health is Health.UNHEALTHY and not node.cleaned_up:
            self.budget.hold(node.node_id, "")
        self.drains.track(node)
        if self.in_scope(node.node_id):
            self.outliers.track(node)

    def adopt(self, node_ids: Iterable[str]) -> None:
        """Nodes that came into scope (a share taken over): their per-node policy state from
        what was mirrored (an ejected outlier stays ejected)."""
        for node_id in node_ids:
            node = self.table.nodes.get(node_id)
            if node is not None:
                self.outliers.track(node)

    # ------------------------------------------------------------------ views

    @property
    def nodes(self) -> Mapping[str, NodeState]:
        """Every node, read-only: change them only through the verbs (``mirror`` included)."""
        return self.table.view

    def node(self, node_id: str) -> NodeState | None:
        return self.table.nodes.get(node_id)

    @property
    def revisions(self) -> Revisions:
        """The revision of every node's last change, for readers that follow changes."""
        return self.dirty.revisions

    @property
    def guard_on(self) -> bool:
        return self.guard.on

    @property
    def loop_lag(self) -> float:
        return self.gate.loop_lag

    @property
    def started_at(self) -> float:
        return self.gate.started_at

    @property
    def next_event_number(self) -> int:
        return self.event_sequence.next_number

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {h.value: 0 for h in Health}
        schedulable = 0
        for node in self.table.nodes.values():
            counts[node.health.value] += 1
            schedulable += node.schedulable
        counts["schedulable"] = schedulable
        counts["total"] = len(self.table.nodes)
        return counts

    # ------------------------------------------------------------------ bookkeeping

    def take_dirty(self, routine: bool = True) -> set[str]:
        """Node ids changed since the last call: what the coordinator must persist.

        With ``routine=False`` only nodes with a transition or a command are taken; nodes that
        merely saw routine observations stay pending for a later full write.
        """
        return self.dirty.take(routine)

    def take_routine(self) -> tuple[set[str], set[str]]:
        """The routine part of ``take_dirty``, split as ``DirtyNodes.take_routine``."""
        return self.dirty.take_routine()

    def mark_dirty(self, node_ids: Iterable[str]) -> None:
        """Ask for these nodes to be written again (after a failed or lost write)."""
        self.dirty.mark(node_ids, self.table.nodes)

    def mirror(self, nodes: Iterable[NodeState], deleted: Iterable[str] = (),
               reset: bool = False, now: float | None = None) -> None:
        """Another coordinator's node state (a follower's leader, or the owner of another
        share): replace, delete or (``reset``) start over, keeping every index right; a
        mirror is never written back. With ``now``, a mirrored node that entered suspect
        counts for this core's guard too, so the guard sees the whole fleet's suspects."""
        if reset:
            for node_id in list(self.table.nodes):
                self._forget(node_id)
        for node in nodes:
            entry = self.guard.recent.get(node.node_id)
            before = self._forget(node.node_id)
            self.table.add(node)
            self._track(node)
            self.revisions.note(node.node_id)
            self.dirty.forget_pending(node.node_id)
            if entry is not None:
                self.guard.keep(node.node_id, entry, node.health)
            if now is not None and node.health is Health.SUSPECT and (
                    before is None or before.health is not Health.SUSPECT):
                self.guard.note_suspect(node.node_id, now)
        for node_id in deleted:
            self._forget(node_id)
        if self.scope is None:
            self.take_dirty()

    def share_groups(self, peers: Mapping[str, Mapping[str, GroupSummary]]) -> None:
        """Shared coordinators: the others' parts of each outlier group, so that a group's
        centre and max_ejection_fraction are the whole group's (see detect/groups.py); from
        now on this core keeps its own part in ``outliers.summaries`` for them."""
        self.outliers.publishing = True
        self.outliers.peers = peers

    def in_scope(self, node_id: str) -> bool:
        return self.scope is None or self.scope(node_id)

    def restore(self, node_id: str, before: NodeState | None,
                discard: Sequence[Event] = ()) -> None:
        """Undo a command or registration whose write failed, as if it never ran: the node
        goes back to ``before`` (``None``: it did not exist) and the outcome's events are
        taken back. ``before`` is the caller's deep copy, taken before the verb ran, and
        becomes the node (the core copies nothing). Its failure streak and the policies'
        other state about it are kept (an undone ``remove`` restarts the streak)."""
        current = self.table.nodes.get(node_id)
        if before is None:
            if current is not None:
                self._forget(node_id)
        else:
            if current is not None:
                self.guard.note_health(node_id, current.health, before.health)
            self.table.add(before)
            self.revisions.note(node_id)
            self.drains.forget(node_id)
            if current is None:
                self._track(before)  # an undone remove: its budget hold and drain
            else:
                self.drains.track(before)
                self.outliers.track(before)
        self.event_sequence.take_back(discard)

    def _forget(self, node_id: str) -> NodeState | None:
        """Drop a node from the table and from every policy's state."""
        node = self.table.drop(node_id)
        if node is not None:
            self.guard.forget(node_id, node.health)
        self.failures.clear(node_id)
        self.budget.release(node_id)
        self.review.forget(node_id)
        self.identity.forget(node_id)
        self.peers.forget(node_id)
        self.drains.forget(node_id)
        self.outliers.forget(node_id)
        self.dirty.forget(node_id)
        if self.arrivals is not None:
            self.arrivals.forget(node_id)
        return node

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
        event = self.event_sequence.mint(now, node_id, kind, from_, to, reason, evidence)
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
            self.guard.note_suspect(node.node_id, now)
        else:
            self.peers.forget(node.node_id)
        return self._emit(
            out, now, node.node_id, kind or health.value, before.value, health.value, reason,
            evidence,
        )

    def _index_health(self, node: NodeState, health: Health) -> None:
        before = self.table.set_health(node, health)
        self.guard.note_health(node.node_id, before, health)

    def note_receive_drops(self, dropping: bool) -> None:
        """Whether the coordinator's own receive buffer overflowed lately (the kernel dropped
        heartbeats before it read them). A missed push then says more about the coordinator
        than about the node, and polling every such node would spend the CPU it is short of
        on polls, drop more heartbeats and poll more: so a healthy node's push deadline is
        stretched by ``OVERLOAD_STRETCH`` meanwhile. A silent node is still polled and judged
        as before, only later; nothing is confirmed sooner or on less evidence. And a streak
        with a timeout in it confirms nothing meanwhile (``_OVERLOAD_HOLD``): a coordinator that
        cannot keep up also reads its polls' answers late, so a live node's poll times out
        (one saturated process at 100,000 nodes, bench/fleet_udp.py, confirmed live nodes on
        such timeouts; the ones read grossly late are no evidence at all, FailureClass.LOCAL).
        A refused connection or a bad answer still confirms."""
        self.push_stretch = OVERLOAD_STRETCH if dropping else 1.0
        self.gate.set_overloaded(dropping)

    def push_deadline(self, node: NodeState) -> float:
        """``poll_deadline`` of a healthy node already in hand (the routine push path)."""
        deadline = self.policy.healthy_interval
        if self.arrivals is not None:
            allowed = self.arrivals.allowed_silence(node.node_id)
            if allowed is not None:
                deadline = min(allowed, deadline)
        return deadline * self.push_stretch

    def poll_deadline(self, node_id: str) -> float:
        """How long an accepted push puts off the node's next poll: its current interval,
        unjittered (the pushes are already spread by their assigned phases). With
        ``suspicion = "phi"`` a healthy node is polled once its silence reaches
        ``phi_threshold`` by its own history, never later than the fixed deadline.

        While more than ``MANY_UNKNOWN`` nodes are unknown (a start beside a pushing fleet),
        an unknown node that pushed waits for its next push too: the push says it is up, its
        next one counts towards ``rise`` as a poll would, and a poll per node half a second
        after its first push would be a storm (with the start's spread in
        ``Coordinator._lead``: 19,300 polls instead of 28,352 before the first minute at
        100,000 nodes, bench/fleet_udp.py, one run each). A few unknown nodes are polled at
        ``unhealthy_interval`` after a push, healthy soon; a node in doubt (suspect,
        unhealthy) always is."""
        node = self.table.nodes.get(node_id)
        if node is None:
            return self.policy.unhealthy_interval
        if node.health is Health.HEALTHY or (
                node.health is Health.UNKNOWN and not node.consecutive_failures
                and self.table.unknown_count > MANY_UNKNOWN):
            return self.push_deadline(node)
        return self.policy.unhealthy_interval

    def interval_for(self, node_id: str) -> float:
        """Seconds until the node's next check, jittered: fast while unknown or suspect;
        ``down_interval`` once confirmed unhealthy; slow while healthy, and for dead nodes
        (final until they register again)."""
        node = self.table.nodes.get(node_id)
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
        self.gate.restart(now)

    def set_loop_lag(self, lag: float) -> None:
        self.gate.set_loop_lag(lag)

    # ------------------------------------------------------------------ observations

    def is_stale(self, node: NodeState, report: Report) -> bool:
        return (report.incarnation, report.seq) <= (node.incarnation, node.seq)

    def observe(self, result: CheckResult) -> Outcome:
        """One poll / heartbeat / lease expiry. A stale pushed report changes nothing, and
        neither does a check that failed on the checker's side (``FailureClass.LOCAL``: out
        of descriptors, read too late): the node is checked again on its interval as if
        this one had not run (the edge counts it by class)."""
        node = self.table.nodes.get(result.node_id)
        if node is None:
            raise UnknownNode(result.node_id)
        out = Outcome()
        if result.failure is FailureClass.LOCAL and not result.ok:
            return out
        now = result.at
        report = result.report
        if (report is not None and result.ok and result.source == "push"
                and self.routine_push(node, report, now)):
            return out
        if result.ok and report is not None:
            if self.is_stale(node, report):
                if result.source == "push":
                    out.stale = True
                    return out
            else:
                if result.source == "push" and self.arrivals is not None:
                    self.arrivals.note(node.node_id, now)
                self._apply_report(out, node, report, now)
        if node.health is not Health.DEAD:  # dead is final until the node registers again
            if result.ok:
                self._on_success(out, node, result)
            else:
                self._on_failure(out, node, result)
        # A transition must be written at once; a routine observation (new seq, load, counters)
        # may wait for the next full write, so a heartbeat is not a store write every time.
        if out.events:
            self.dirty.changed(node.node_id)
        else:
            self.dirty.touched(node.node_id)
        if out.events:
            self._update_guard(out, now)
        return out

    def routine_push(self, node: NodeState, report: ReportFields, now: float) -> bool:
        """The steady state of a pushing fleet: a healthy node's next heartbeat in the same
        incarnation, with the status and reasons it had, nothing open (drain, outlier).
        Updates exactly what the full path would (the report's fields, the arrival, the
        evidence, the success streak; the node touched, not changed) without the branches
        that cannot fire, and says whether it did; anything else takes the full path. Its
        equivalence with the full path is pinned in tests/detect/test_cluster.py. ``report``
        may be the heartbeat's decoded body itself (the UDP edge builds no Report for it)."""
        if (node.health is not Health.HEALTHY or report.incarnation != node.incarnation
                or report.seq <= node.seq or report.status is not node.node_status
                or node.drain is not None or node.outlier is not None
                or node.admin is not Admin.ACTIVE or node.cleaned_up):
            return False
        reasons = report.reasons
        if len(reasons) != len(node.reasons) or (reasons and list(reasons) != node.reasons):
            return False
        node_id = node.node_id
        if self.arrivals is not None:
            self.arrivals.note(node_id, now)
        if report.samples >= 0:
            self.review.note_samples(node_id, report.incarnation, report.samples)
        node.seq = report.seq
        node.last_ts = report.ts
        node.system = report.system
        node.load = report.load
        self.outliers.note_report(node_id, report.load, now)
        node.last_seen = now
        node.consecutive_failures = 0
        node.consecutive_successes += 1
        self.failures.clear(node_id)
        self.peers.forget(node_id)
        self.dirty.pushed(node_id)
        return True

    def _apply_report(self, out: Outcome, node: NodeState, report: Report, now: float) -> None:
        if report.samples >= 0:
            self._judge_unobserved_run(out, node, report, now)
        self.review.note_report(node, report)
        node.incarnation = report.incarnation
        node.seq = report.seq
        node.last_ts = report.ts
        node.system = report.system
        node.load = report.load
        self.outliers.note_report(node.node_id, report.load, now)
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
                self.drains.start(node, reason, now, by="node")
                # Handled like an operator drain: load balancers stop sending new work.
                self._action(out, "drained", node, event)
            elif before is NodeStatus.DRAINING and node.drain and node.drain.by == "node":
                self.drains.stop(node)
                self._action(out, "undrained", node, event)
            elif report.status is NodeStatus.DEGRADED:
                self._action(out, "degraded", node, event)  # no new work: drain it softly
            else:
                self._action(out, "status_ok", node, event)
        if node.drain is not None and not node.drain.complete:
            self._check_drain(out, node, now)

    def _judge_unobserved_run(self, out: Outcome, node: NodeState, report: Report,
                              now: float) -> None:
        found = self.review.unobserved_run(node, report)
        if found is None:
            return
        reason, evidence = found
        if self.policy.auto_approve:
            self._emit(out, now, node.node_id, "approved", Admin.ACTIVE.value,
                       Admin.ACTIVE.value, f"auto-approved: {reason}", evidence)
            return
        node.admin = Admin.REVIEW
        self.dirty.changed(node.node_id)
        event = self._emit(out, now, node.node_id, "review", Admin.ACTIVE.value,
                           Admin.REVIEW.value, reason, evidence)
        self._action(out, "review", node, event)  # out of load balancers until approved

    def _on_success(self, out: Outcome, node: NodeState, result: CheckResult) -> None:
        now = result.at
        node.last_seen = now
        node.consecutive_failures = 0
        node.consecutive_successes += 1
        self.failures.clear(node.node_id)
        self.peers.forget(node.node_id)
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
            self.budget.release(node.node_id)
            if node.cleaned_up:
                self.table.set_cleaned_up(node, False)
                self._action(out, "recovered", node, out.events[-1])
        else:
            self._set_health(out, node, Health.HEALTHY, now,
                             f"{node.consecutive_successes} consecutive good checks", evidence)

    def _on_failure(self, out: Outcome, node: NodeState, result: CheckResult) -> None:
        now = result.at
        node.consecutive_successes = 0
        node.consecutive_failures += 1
        failures = self.failures.record(node.node_id, result)
        if node.health in (Health.HEALTHY, Health.UNKNOWN):
            self._set_health(out, node, Health.SUSPECT, now,
                             f"check failed: {failures[-1].describe()}",
                             {"checks": [f.to_json() for f in failures]})
            out.check_now.append(node.node_id)
            # The node that tips the guard must itself be held: decide the guard first.
            self._update_guard(out, now)
        if node.health is Health.SUSPECT and self.failures.fall_reached(node, now):
            self._try_confirm(out, node, now)

    def _hold(self, out: Outcome, node: NodeState, now: float, reason: str,
              evidence: dict[str, Any]) -> None:
        """Keep a node suspect, telling why once per change of reason rather than every check."""
        if node.health_reason != reason:
            node.health_reason = reason
            self.dirty.changed(node.node_id)
            self._emit(out, now, node.node_id, "suspect", Health.SUSPECT.value,
                       Health.SUSPECT.value, reason, evidence)

    def _try_confirm(self, out: Outcome, node: NodeState, now: float) -> None:
        evidence: dict[str, Any] = {"checks": self.failures.checks(node.node_id),
                                    **self.gate.evidence(now)}
        gate = self.gate.hold_reason(now)
        if gate:
            self._hold(out, node, now, gate, evidence)
            return
        if self.guard.on:
            self._hold(out, node, now, _GUARD_HOLD, evidence)
            return
        if self.peers.is_probing(node.node_id):
            return
        peers = self.peers.pick(node, self.table.nodes, self.table.ids())
        if peers:
            self.peers.start(node.node_id)
            out.probes.append(ProbeRequest(node.node_id, node.address, peers))
            if node.health_reason != _REACHABLE:
                # Asking again about a node the peers still reach is no news.
                self._hold(out, node, now, _CONFIRMING, evidence)
            return
        if self.gate.overloaded and self.failures.classes(node.node_id) & _LATENESS_FAILURES:
            self._hold(out, node, now, _OVERLOAD_HOLD, {**evidence, "receive_overload": True})
            return
        self._confirm(out, node, now, evidence)

    def peer_votes(self, node_id: str, votes: list[PeerVote], now: float) -> Outcome:
        """Answers of the indirect probe, tallied by :meth:`PeerConfirmation.tally`: reachable
        from a peer holds the node; no asked peer reachable either holds it too (the next
        failed check asks other peers); otherwise it is confirmed."""
        out = Outcome()
        node = self.table.nodes.get(node_id)
        if node is None or not self.peers.finish(node_id):
            return out
        if node.health is not Health.SUSPECT:
            return out
        evidence: dict[str, Any] = {
            "checks": self.failures.checks(node_id),
            **self.peers.evidence(votes),
            **self.gate.evidence(now),
        }
        verdict = self.peers.tally(votes)
        if verdict == "reachable":
            self._hold(out, node, now, _REACHABLE, evidence)
            return out
        if verdict == "peers_unreachable":
            self._hold(out, node, now, _PEERS_UNREACHABLE, evidence)
            self.dirty.changed(node_id)
            return out
        gate = self.gate.hold_reason(now)
        if gate or self.guard.on:
            self._hold(out, node, now, gate or _GUARD_HOLD, evidence)
            return out
        self._confirm(out, node, now, evidence)
        self.dirty.changed(node_id)
        self._update_guard(out, now)
        return out

    def _confirm(self, out: Outcome, node: NodeState, now: float,
                 evidence: dict[str, Any]) -> None:
        last_failure = self.failures.last(node.node_id)
        last = last_failure.describe() if last_failure else "checks failed"
        span = self.failures.span(node.node_id, now)
        reason = (f"{node.consecutive_failures} consecutive failed checks over {span:.1f}s, "
                  f"last: {last}")
        event = self._set_health(out, node, Health.UNHEALTHY, now, reason, evidence)
        self._request_cleanup(out, node, event, now)

    # ------------------------------------------------------------------ budget

    def _budget_block(self, now: float) -> str:
        # Outliers ejected draw from the same budget as nodes cleaned up (with shared
        # coordinators, the others' ejections as their group summaries say).
        ejected = self.outliers.ejected_count + self.outliers.peer_ejected
        block = self.budget.block(now, self.table.watched, self.table.out_count + ejected)
        if block or self.scope is None:
            return block
        nodes = self.table.nodes
        own = sum(1 for i in self.table.unhealthy if self.in_scope(i) and nodes[i].cleaned_up)
        return self.budget.block_part(own + self.outliers.ejected_count, self.table.watched)

    def _request_cleanup(self, out: Outcome, node: NodeState, event: Event, now: float) -> None:
        if node.cleaned_up:
            # Still out from an earlier outage (dead, registered again, failed again): the
            # cleanup is repeated but draws nothing more from the budget.
            self._action(out, "unhealthy", node, event)
            return
        block = self._budget_block(now)
        if block:
            self.budget.hold(node.node_id, event.id)
            self._emit(out, now, node.node_id, "held", node.health.value, node.health.value,
                       block, {"for_event": event.id,
                               "checks": self.failures.checks(node.node_id)})
            return
        self.budget.spend(node.node_id, now)
        self.table.set_cleaned_up(node, True)
        self._action(out, "unhealthy", node, event)

    def _action(self, out: Outcome, kind: str, node: NodeState, event: Event) -> None:
        # Stored with the transition, settled once it ran: a crash in between runs it again.
        node.actions_due.append(ActionDue(kind, event.id, event.reason))
        self.dirty.changed(node.node_id)
        out.actions.append(ActionRequest(kind, node.node_id, node.address, event.id,
                                         event.reason))

    def settle_action(self, node_id: str, event_id: str, kind: str) -> None:
        """The respond stage ran the action for ``event_id`` (or gave up on it)."""
        node = self.table.nodes.get(node_id)
        if node is None:
            return
        due = [d for d in node.actions_due if not (d.event_id == event_id and d.kind == kind)]
        if len(due) != len(node.actions_due):
            node.actions_due = due
            self.dirty.changed(node_id)

    def due_actions(self, node_ids: Iterable[str] | None = None) -> list[ActionRequest]:
        """Actions stored but never settled (a coordinator died before they ran): after a
        restart, a leader change or a takeover of a share (``node_ids``: its nodes) they run
        now, at least once."""
        nodes = self.table.nodes.values() if node_ids is None else [
            self.table.nodes[i] for i in node_ids if i in self.table.nodes]
        return [ActionRequest(d.kind, node.node_id, node.address, d.event_id, d.reason)
                for node in nodes for d in node.actions_due]

    # ------------------------------------------------------------------ guard

    def _update_guard(self, out: Outcome, now: float) -> None:
        change = self.guard.update(now, self.table.nodes, self.table.watched,
                                   self.table.suspect_count)
        if change is not None:
            on, off = ("off", "on") if change.on else ("on", "off")
            self._emit(out, now, "", "guard_on" if change.on else "guard_off", on, off,
                       change.reason, change.evidence)

    # ------------------------------------------------------------------ registration

    def register(self, reg: Registration, now: float, *, verdict: Verdict = "open",
                 issue: Credential | None = None,
                 presented: str = "") -> tuple[RegisterDecision, Outcome]:
        """Decide new / rejoin / review for an agent that (re)started, per SPEC's rules.

        ``verdict`` is what ``identity.verify`` said of the credential the registration
        presented (the edge refuses a ``rejected`` one before it gets here: see
        ``reject_identity``); ``issue`` is a new credential to keep for the node (its secret
        goes back in the answer); ``presented`` the hash of what the registration presented,
        kept as the previous credential with ``issue`` (see ``_keep_credential``)."""
        out = Outcome()
        node = self.table.nodes.get(reg.node_id)
        if node is None:
            node = NodeState(node_id=reg.node_id, address=reg.address, labels=dict(reg.labels),
                             incarnation=reg.incarnation, seq=-1, last_ts=reg.last_ts,
                             version=reg.version, registered_at=now, since=now)
            self._keep_credential(node, issue, now, presented)
            self.table.add(node)
            self.dirty.changed(reg.node_id)
            self._emit(out, now, reg.node_id, "registered", "", Health.UNKNOWN.value,
                       "new node", {"decision": "new", "incarnation": reg.incarnation})
            out.check_now.append(reg.node_id)
            return "new", out
        if verdict == "rejected":
            raise ValueError("a rejected identity does not register")
        self.review.restore_before_restart(node, reg)
        decision: RegisterDecision
        if verdict == "reenrol":
            evidence: dict[str, Any] = {"stored_address": node.address, "address": reg.address,
                                        "stored_incarnation": node.incarnation,
                                        "incarnation": reg.incarnation, "decision": "rejoin"}
            decision, reason = "rejoin", "re-enrolled with a new credential (operator approved)"
            node.incarnation = 0  # a new start: counted as a restart below, seq from scratch
            node.reenrol_address = node.claim_address = node.claim_from = node.reenrol_from = ""
        elif verdict == "revoked":
            evidence = {"stored_address": node.address, "address": reg.address,
                        "incarnation": reg.incarnation}
            decision = "review"
            reason = "credential revoked: the node re-enrols with a new one, pending approval"
            node.revoked = False
        else:
            decision, reason, evidence = self.review.judge(
                node, reg, now, observing_since=self.gate.started_at)
            if decision == "review" and self.policy.auto_approve:
                evidence["auto_approved"] = reason
                decision, reason = "rejoin", f"auto-approved: {reason}"
            if verdict == "valid":
                node.previous_hash = node.previous_udp_key = ""  # the new one is proven
            if verdict in ("valid", "previous"):
                node.claim_address = ""  # the node proved itself: a pending claim was not it
        if issue is not None:
            self._keep_credential(node, issue, now, presented)
        node.address = reg.address
        node.labels = dict(reg.labels) or node.labels
        node.version = reg.version or node.version
        node.registered_at = now
        if reg.incarnation != node.incarnation:
            node.incarnation = reg.incarnation
            node.seq = -1
            self.review.count_restart(node, now)
        node.last_ts = max(node.last_ts, reg.last_ts)
        # A registration proves the agent alive: fall and rise both count afresh from here.
        if self.arrivals is not None:
            self.arrivals.restart(node.node_id)  # the gap before it was downtime, not jitter
        node.consecutive_successes = 0
        node.consecutive_failures = 0
        self.failures.clear(node.node_id)
        self.peers.forget(node.node_id)
        before = node.health
        if before is Health.DEAD:
            # Watched again from scratch. cleaned_up stays: the node is still out of the load
            # balancers, and returning to healthy emits ``recovered`` to put it back.
            self._index_health(node, Health.UNKNOWN)
            node.since = now
        self.dirty.changed(node.node_id)
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

    @staticmethod
    def _keep_credential(node: NodeState, issue: Credential | None, now: float,
                         presented: str) -> None:
        """Store a newly issued credential. What the registration presented (``presented``:
        the agent's own enrolment secret, or its current credential in a rotation) stays
        accepted as the previous one until the node proves the new one, so an answer lost on
        the way costs no lock-out: the retry presents it again and is issued another."""
        if issue is None:
            return
        if presented and presented == node.credential_hash:
            node.previous_hash, node.previous_udp_key = node.credential_hash, node.udp_key
        elif presented and presented == node.previous_hash:
            pass  # a retry: the previous pair stays as it is
        else:
            node.previous_hash, node.previous_udp_key = presented, ""  # no key known for it
        node.credential_hash, node.udp_key, node.credential_at = issue.hash, issue.udp_key, now

    def credential_proven(self, node_id: str) -> None:
        """The node proved its current credential: the previous one (a rotation's, or its
        enrolment secret) is no longer accepted."""
        node = self._get(node_id)
        if node.previous_hash or node.previous_udp_key:
            node.previous_hash = node.previous_udp_key = ""
            self.dirty.changed(node_id)

    def reject_identity(self, node_id: str, now: float, *, via: str, claimant: str,
                        reason: str, claimed_address: str = "") -> Outcome:
        """A request for ``node_id`` that did not prove its credential: the node's address,
        seq, health and admin state are left alone. A registration's claimed address is kept
        as the node's pending claim (``approve`` re-enrols it from there). At most one
        ``identity_rejected`` event per node per ``REJECTED_EVENT_INTERVAL``; the ones left
        out are counted in the next one's evidence."""
        out = Outcome()
        node = self.table.nodes.get(node_id)
        if node is None:
            return out
        if claimed_address and (claimed_address, claimant) != (node.claim_address,
                                                               node.claim_from):
            node.claim_address, node.claim_from = claimed_address, claimant
            self.dirty.changed(node_id)  # stored even when its event is rate-limited
        suppressed = self.identity.note_rejection(node_id, now)
        if suppressed is None:
            return out
        evidence: dict[str, Any] = {"via": via, "claimant": claimant,
                                    "stored_address": node.address, "suppressed": suppressed}
        if claimed_address:
            evidence["claimed_address"] = claimed_address
        self._emit(out, now, node_id, "identity_rejected", "", "", reason, evidence)
        self.dirty.changed(node_id)  # the claim is stored with its event
        return out

    # ------------------------------------------------------------------ operator commands

    def _get(self, node_id: str) -> NodeState:
        node = self.table.nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        return node

    def add_static(self, node_id: str, address: str, labels: dict[str, str], now: float) -> Outcome:
        """A node from the config file: watched without registering."""
        out = Outcome()
        node = self.table.nodes.get(node_id)
        if node is not None:
            if node.address != address or node.labels != labels:
                node.address, node.labels = address, dict(labels)
                self.dirty.changed(node_id)
            return out
        self.table.add(NodeState(node_id=node_id, address=address, labels=dict(labels),
                                 registered_at=now, since=now, seq=-1))
        self.dirty.changed(node_id)
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
        drain = self.drains.start(node, reason or "operator drain", now)
        self.dirty.changed(node_id)
        event = self._emit(out, now, node_id, "drained", before.value, Admin.DRAINED.value,
                           drain.reason,
                           {"waiting_for": {"pending_tasks": node.load.get("pending_tasks")},
                            "deadline": drain.deadline})
        self._action(out, "drained", node, event)
        self._check_drain(out, node, now)
        return out

    def _check_drain(self, out: Outcome, node: NodeState, now: float) -> None:
        end = self.drains.check(node, now)
        if end is None:
            return
        event = self._emit(out, now, node.node_id, end.kind, "draining", "drained", end.reason,
                           {"pending_tasks": end.pending})
        if end.kind == "drain_deadline":
            self._action(out, "drain_deadline", node, event)
        self.dirty.changed(node.node_id)

    def undrain(self, node_id: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        if node.admin is not Admin.DRAINED:
            if node.admin is Admin.REVIEW:
                raise Conflict(f"node {node_id} is in review; approve it instead")
            return out
        node.admin = Admin.ACTIVE
        self.drains.stop(node)
        self.dirty.changed(node_id)
        event = self._emit(out, now, node_id, "undrained", Admin.DRAINED.value,
                           Admin.ACTIVE.value, "operator undrain")
        self._action(out, "undrained", node, event)
        return out

    def approve(self, node_id: str, now: float, *, address: str = "",
                note: str = "") -> Outcome:
        """Return a node held for review; with a pending claim (a registration refused for
        want of the credential, e.g. a node that lost its state directory), approve that
        claim too: the old credential is revoked and the next registration from the claimed
        address is issued a new one.

        ``note``: the operator's reason, kept in the event. ``address``, when given, is the
        claim the operator means: anyone with the agent token
        can replace a pending claim, so approving "whatever is pending now" could approve an
        impostor's that came in after the operator looked. A mismatch changes nothing."""
        node = self._get(node_id)
        out = Outcome()
        pending = node.claim_address
        if address and address != (pending or node.address):
            raise Conflict(f"node {node_id}'s " + (f"pending claim is from {pending}"
                                                    if pending else f"address is {node.address}")
                           + f", not {address}: nothing approved")
        # A claim is re-enrolled only when the operator names its address: a plain approve of
        # a node in review must not also hand the node to a claim someone planted meanwhile.
        claim = pending if address else ""
        if node.admin is not Admin.REVIEW and not claim:
            raise Conflict(f"node {node_id} is not in review (admin is {node.admin.value})" + (
                f"; to re-enrol it from its pending claim, approve --address {pending}"
                if pending else " and has no pending claim"))
        evidence: dict[str, Any] = {}
        reason = "operator approved"
        if claim:
            node.credential_hash = node.udp_key = ""
            node.previous_hash = node.previous_udp_key = ""
            node.reenrol_address, node.reenrol_from = claim, node.claim_from
            node.claim_address, node.claim_from, node.revoked = "", "", False
            evidence = {"reenrol_from": claim, "claimant": node.reenrol_from,
                        "stored_address": node.address}
            reason = f"operator approved re-enrolment from {claim}; old credential revoked"
        if note:
            reason = f"{reason}: {note}"
        before = node.admin
        if before is Admin.REVIEW:
            node.admin = Admin.ACTIVE
            node.rejoins.clear()
        self.dirty.changed(node_id)
        event = self._emit(out, now, node_id, "approved", before.value, node.admin.value,
                           reason, evidence)
        if before is Admin.REVIEW:
            self._action(out, "approved", node, event)
        return out

    def revoke(self, node_id: str, now: float) -> Outcome:
        """Revoke the node's credential: refused from now on, and the node's next
        registration goes to review with a new one (a forced re-enrolment)."""
        node = self._get(node_id)
        out = Outcome()
        node.credential_hash = node.udp_key = ""
        node.previous_hash = node.previous_udp_key = ""
        node.claim_address = node.reenrol_address = node.claim_from = node.reenrol_from = ""
        node.revoked = True
        self.dirty.changed(node_id)
        self._emit(out, now, node_id, "revoked", "", "",
                   "operator revoked the node credential: it must re-enrol")
        return out

    def remove(self, node_id: str, now: float) -> Outcome:
        node = self._get(node_id)
        out = Outcome()
        before = node.health
        self._index_health(node, Health.UNKNOWN)
        self.table.set_cleaned_up(node, False)
        self._forget(node_id)
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
        evicting = not self.guard.on and not self.gate.hold_reason(now)
        if evicting:
            self._declare_dead(out, now)
        for node_id in self.drains.waiting():
            if self.in_scope(node_id):
                self._check_drain(out, self.table.nodes[node_id], now)
        if evicting and self.budget.held:
            self._release_held(out, now)
        self._update_guard(out, now)
        if self.outliers.active:
            self._judge_outliers(out, now)
        return out

    # ------------------------------------------------------------------ gray failures

    def observe_callers(self, source: str, observations: Sequence[CallerObservation],
                        now: float) -> list[str]:
        """What callers saw of nodes: evidence only, judged on the next tick. Returns the
        node ids not known here (reported back to the caller, not an error)."""
        known = [o for o in observations if o.node_id in self.table.nodes]
        self.outliers.note_callers(source, [o for o in known if self.in_scope(o.node_id)], now)
        return sorted({o.node_id for o in observations if o.node_id not in self.table.nodes})

    def _ejection_block(self, now: float) -> str:
        if self.guard.on:
            return _GUARD_HOLD
        return self._budget_block(now)

    def _judge_outliers(self, out: Outcome, now: float) -> None:
        nodes: Mapping[str, NodeState] = self.table.nodes if self.scope is None else \
            _Scoped(self.table.nodes, self.scope)
        verdicts = self.outliers.judge(now, nodes, lambda: self._ejection_block(now))
        for verdict in verdicts:
            if not verdict.node_id or self.in_scope(verdict.node_id):
                self._apply_outlier(out, verdict, now)

    def _apply_outlier(self, out: Outcome, v: OutlierVerdict, now: float) -> None:
        node = self.table.nodes.get(v.node_id)
        if node is None:  # a group's hold: no node changes
            self._emit(out, now, "", v.kind, "", "", v.reason, v.evidence)
            return
        if v.kind == "outlier":
            dry = self.policy.dry_run
            node.outlier = OutlierState(since=now, until=v.until, reason=v.reason,
                                        ejections=v.ejections, dry_run=dry,
                                        evidence=dict(v.evidence))
            node.ejections = v.ejections
            if not dry:
                self.budget.note_ejection(now)
            event = self._emit(out, now, node.node_id, "outlier", "in_service", "outlier",
                               ("dry run: would eject: " if dry else "") + v.reason,
                               {**v.evidence, "dry_run": dry})
            self._action(out, "outlier", node, event)
        elif v.kind == "outlier_cleared":
            node.outlier = None
            node.outlier_cleared_at = now
            event = self._emit(out, now, node.node_id, "outlier_cleared", "outlier",
                               "in_service", v.reason, v.evidence)
            self._action(out, "outlier_cleared", node, event)
        else:
            self._emit(out, now, node.node_id, v.kind, "", "", v.reason, v.evidence)
        self.dirty.changed(node.node_id)

    def _declare_dead(self, out: Outcome, now: float) -> None:
        p = self.policy
        for since, node in self.table.due_dead(now, p.dead_after):
            node_id = node.node_id
            if not self.in_scope(node_id):
                continue
            event = self._set_health(out, node, Health.DEAD, now,
                                     f"unhealthy for {now - since:.0f}s "
                                     f"(dead_after {p.dead_after:g}s)",
                                     {"checks": self.failures.checks(node_id), "since": since})
            self.dirty.changed(node_id)
            if node.cleaned_up:
                self._action(out, "dead", node, event)

    def _release_held(self, out: Outcome, now: float) -> None:
        if self._budget_block(now):
            return  # the common case during an outage: no copy of a long waiting list
        for node_id, for_event in list(self.budget.held.items()):
            held = self.table.nodes.get(node_id)
            if held is None or held.health not in _OUT:
                self.budget.release(node_id)
                continue
            if not self.in_scope(node_id):
                continue  # its owner releases it
            if self._budget_block(now):
                break
            event = self._emit(out, now, node_id, "cleanup", held.health.value,
                               held.health.value, "budget allows cleanup now",
                               {"for_event": for_event,
                                "checks": self.failures.checks(node_id)})
            self.budget.spend(node_id, now)
            self.table.set_cleaned_up(held, True)
            self.dirty.changed(node_id)
            self._action(out, "unhealthy", held, event)
            if held.health is Health.DEAD:
                # Went dead while its cleanup waited: deregister it for good now.
                self._action(out, "dead", held, event)


class _Scoped(Mapping[str, NodeState]):
    """The nodes in scope, as a read-only mapping (what the outlier rule may judge)."""

    def __init__(self, nodes: Mapping[str, NodeState], scope: Callable[[str], bool]) -> None:
        self._nodes = nodes
        self._scope = scope

    def __getitem__(self, node_id: str) -> NodeState:
        if not self._scope(node_id):
            raise KeyError(node_id)
        return self._nodes[node_id]

    def __iter__(self) -> Iterator[str]:
        return (i for i in self._nodes if self._scope(i))

    def __len__(self) -> int:
        return sum(1 for _ in self)
