"""Invariants of the detection core over random input sequences (hypothesis stateful tests).

A few nodes get random checks, pushed reports, registrations, drains, votes, ticks, loop-lag
changes and clock jumps; after every step the rules of SPEC.md must hold.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.outcome import Conflict, Outcome, ProbeRequest, UnknownNode
from nodewatch.detect.policy import Policy
from nodewatch.model import (
    CheckResult,
    FailureClass,
    Health,
    NodeStatus,
    PeerVote,
    Registration,
    Report,
    event_number,
)
from nodewatch.testing import FakeClock

NODE_IDS = [f"n{i}" for i in range(5)]
node_ids = st.sampled_from(NODE_IDS)
failures = st.sampled_from(list(FailureClass))
statuses = st.sampled_from(list(NodeStatus))
small = st.integers(min_value=0, max_value=4)
seqs = st.integers(min_value=-1, max_value=12)
pending = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 5.0]))

policies = st.builds(
    Policy,
    jitter=st.sampled_from([0.0, 0.1]),
    fall=st.integers(min_value=1, max_value=4),
    rise=st.integers(min_value=1, max_value=3),
    dead_after=st.sampled_from([30.0, 120.0]),
    startup_grace=st.sampled_from([0.0, 10.0, 45.0]),
    max_loop_lag=st.just(1.0),
    guard_fraction=st.sampled_from([0.5, 0.75]),
    guard_min_nodes=st.sampled_from([2, 3, 4]),
    indirect_probes=st.sampled_from([0, 1, 2]),
    max_rejoins=st.sampled_from([1, 3]),
    auto_approve=st.booleans(),
    max_fraction=st.sampled_from([0.2, 0.5]),
    max_rate=st.sampled_from([1.0, 2.0, 10.0]),
    drain_deadline=st.sampled_from([20.0, 600.0]),
)


class ClusterMachine(RuleBasedStateMachine):
    """Drives one Cluster and keeps an independent model of what SPEC.md promises."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cluster: Cluster
        self.policy: Policy
        # The model: consecutive failed / good checks since the last opposite check or
        # registration, counted here without looking at the machine's own counters.
        self.fails: dict[str, int] = {}
        self.goods: dict[str, int] = {}
        self.started_at = self.clock()
        self.lag = 0.0
        self.guard = False
        self.last_event = 0
        self.probes: list[ProbeRequest] = []
        self.cleanup_times: list[float] = []

    @initialize(policy=policies, seed=st.integers(0, 2**16),
                initial=st.lists(node_ids, min_size=1, max_size=5, unique=True))
    def start(self, policy: Policy, seed: int, initial: list[str]) -> None:
        self.policy = policy
        self.cluster = Cluster(policy, now=self.clock(), rng=random.Random(seed))
        for node_id in initial:
            self._register(Registration(node_id, f"{node_id}:7301", 1, 0, self.clock()))

    # ------------------------------------------------------------ driving and checking

    def _gate(self) -> bool:
        now = self.clock()
        return now < self.started_at + self.policy.startup_grace or self.lag > 1.0

    def _apply(self, out: Outcome, before_cleaned: set[str]) -> None:
        """Check one outcome against the model, event by event, then the cluster after it."""
        p = self.policy
        gate = self._gate()
        guard_at: dict[str, bool] = {}  # the guard as each event saw it
        for event in out.events:
            number = event_number(event.id)
            assert number > self.last_event, "event ids must strictly increase"
            self.last_event = number
            if event.kind in ("guard_on", "guard_off"):
                self.guard = event.kind == "guard_on"
            guard_at[event.id] = self.guard
            if event.kind == "unhealthy":
                assert self.fails[event.node_id] >= p.fall, (
                    f"{event.node_id} confirmed after {self.fails[event.node_id]} failures")
                assert not gate, f"confirmed while the gate holds: {event}"
                assert not self.guard, f"confirmed while the guard holds: {event}"
            elif event.kind in ("healthy", "recovered"):
                assert self.goods[event.node_id] >= p.rise, (
                    f"{event.node_id} healthy after {self.goods[event.node_id]} good checks")
            elif event.kind in ("dead", "cleanup"):
                assert not gate and not self.guard, f"eviction while held: {event}"
            if event.kind in ("suspect", "unhealthy", "held", "cleanup", "dead"):
                checks = event.evidence.get("checks")
                assert checks is not None, f"{event.kind} without its failing checks"
                assert all(c["class"] in set(FailureClass) for c in checks)
        for action in out.actions:
            if action.kind in ("unhealthy", "dead"):
                assert not gate and not guard_at[action.event_id], (
                    f"cleanup action while held: {action}")
        self.probes += out.probes
        for node_id in out.removed:
            self.fails.pop(node_id, None)
            self.goods.pop(node_id, None)
        # A new cleanup is a node newly taken out; a dead node that registers again was out
        # already. The budget counts the nodes out that are not dead (gone for good).
        newly = self._cleaned() - before_cleaned
        cleaned = {n.node_id for n in self.cluster.nodes.values()
                   if n.cleaned_up and n.health is not Health.DEAD}
        if newly:
            watched = sum(n.health is not Health.DEAD for n in self.cluster.nodes.values())
            limit = p.budget_limit(watched)
            assert len(cleaned) <= limit, f"{len(cleaned)} nodes out, budget {limit}"
            self.cleanup_times += [self.clock()] * len(newly)
        recent = [t for t in self.cleanup_times if t > self.clock() - 60.0]
        assert len(recent) <= p.max_rate, f"{len(recent)} cleanups within a minute"

    def _cleaned(self) -> set[str]:
        return {n.node_id for n in self.cluster.nodes.values() if n.cleaned_up}

    def _register(self, reg: Registration) -> None:
        before = self._cleaned()
        _, out = self.cluster.register(reg, self.clock())
        self.fails[reg.node_id] = 0
        self.goods[reg.node_id] = 0
        self._apply(out, before)

    def _observe(self, result: CheckResult) -> Outcome:
        node = self.cluster.nodes[result.node_id]
        before = self._cleaned()
        stale = (result.report is not None and result.source == "push"
                 and (result.report.incarnation, result.report.seq)
                 <= (node.incarnation, node.seq))
        snapshot = copy.deepcopy(node)
        next_event = self.cluster.next_event_number
        self.cluster.take_dirty()
        out = self.cluster.observe(result)
        local = not result.ok and result.failure is FailureClass.LOCAL
        if stale or local:  # a check that failed on the checker's side is no evidence either
            assert not out, "a stale report or a local failure must change nothing"
            assert out.stale == stale
            assert node == snapshot, "a stale report or a local failure changed the node"
            assert self.cluster.next_event_number == next_event
            assert not self.cluster.take_dirty()
            return out
        if result.ok:
            self.fails[result.node_id] = 0
            self.goods[result.node_id] += 1
        else:
            self.fails[result.node_id] += 1
            self.goods[result.node_id] = 0
        self._apply(out, before)
        return out

    # ------------------------------------------------------------ rules

    @precondition(lambda self: bool(self.cluster.nodes))
    @rule(data=st.data(), ok=st.booleans(), failure=failures, with_report=st.booleans(),
          inc=small, seq=seqs, status=statuses, tasks=pending)
    def poll(self, data: st.DataObject, ok: bool, failure: FailureClass, with_report: bool,
             inc: int, seq: int, status: NodeStatus, tasks: float | None) -> None:
        node_id = data.draw(st.sampled_from(sorted(self.cluster.nodes)))
        report = None
        if ok and with_report:
            load = {} if tasks is None else {"pending_tasks": tasks}
            report = Report(inc, seq, self.clock(), status=status, load=load)
        self._observe(CheckResult(node_id, ok, self.clock(), failure=None if ok else failure,
                                  detail="random", report=report))

    @precondition(lambda self: bool(self.cluster.nodes))
    @rule(data=st.data(), ok=st.booleans(), count=st.integers(1, 5), failure=failures,
          spacing=st.sampled_from([0.0, 1.0, 5.0]))
    def streak(self, data: st.DataObject, ok: bool, count: int, failure: FailureClass,
               spacing: float) -> None:
        """Several checks of one node in a row: how outages and recoveries really look."""
        node_id = data.draw(st.sampled_from(sorted(self.cluster.nodes)))
        for _ in range(count):
            self._observe(CheckResult(node_id, ok, self.clock(),
                                      failure=None if ok else failure, detail="streak"))
            self.clock.advance(spacing)

    @precondition(lambda self: bool(self.cluster.nodes))
    @rule(data=st.data(), inc=small, seq=seqs, status=statuses, tasks=pending)
    def push(self, data: st.DataObject, inc: int, seq: int, status: NodeStatus,
             tasks: float | None) -> None:
        node_id = data.draw(st.sampled_from(sorted(self.cluster.nodes)))
        node = self.cluster.nodes[node_id]
        if data.draw(st.booleans()):  # often newer than the stored one, for real progress
            inc, seq = node.incarnation, node.seq + 1
        load = {} if tasks is None else {"pending_tasks": tasks}
        report = Report(inc, seq, self.clock(), status=status, load=load)
        self._observe(CheckResult(node_id, True, self.clock(), report=report, source="push"))

    @precondition(lambda self: bool(self.cluster.nodes))
    @rule(data=st.data())
    def replay_stored_report(self, data: st.DataObject) -> None:
        node_id = data.draw(st.sampled_from(sorted(self.cluster.nodes)))
        node = self.cluster.nodes[node_id]
        report = Report(node.incarnation, node.seq - data.draw(st.integers(0, 2)), self.clock(),
                        status=data.draw(statuses))
        self._observe(CheckResult(node_id, True, self.clock(), report=report, source="push"))

    @rule(node_id=node_ids, inc=small, last_seq=seqs, behind=st.sampled_from([0.0, 10.0, 500.0]))
    def register(self, node_id: str, inc: int, last_seq: int, behind: float) -> None:
        node = self.cluster.nodes.get(node_id)
        last_ts = (node.last_ts if node else self.clock()) + behind
        self._register(Registration(node_id, f"{node_id}:7301", inc, last_seq, last_ts))

    @rule(node_id=node_ids, command=st.sampled_from(["drain", "undrain", "approve", "remove"]))
    def operator(self, node_id: str, command: str) -> None:
        before = self._cleaned()
        now = self.clock()
        try:
            if command == "drain":
                out = self.cluster.drain(node_id, "test", now)
            else:
                out = getattr(self.cluster, command)(node_id, now)
        except UnknownNode:
            assert node_id not in self.cluster.nodes
            return
        except Conflict:
            return
        self._apply(out, before)

    @precondition(lambda self: bool(self.probes))
    @rule(data=st.data())
    def answer_probe(self, data: st.DataObject) -> None:
        probe = self.probes.pop(data.draw(st.integers(0, len(self.probes) - 1)))
        verdicts = st.sampled_from([True, False, None])  # None: we could not reach the peer
        votes = [PeerVote(peer, data.draw(verdicts)) for peer, _ in probe.peers
                 if data.draw(st.booleans())]
        before = self._cleaned()
        self._apply(self.cluster.peer_votes(probe.node_id, votes, self.clock()), before)

    @rule()
    def tick(self) -> None:
        before = self._cleaned()
        self._apply(self.cluster.tick(self.clock()), before)

    @rule(lag=st.sampled_from([0.0, 0.5, 2.0]))
    def loop_lag(self, lag: float) -> None:
        self.lag = lag
        self.cluster.set_loop_lag(lag)

    @rule()
    def restart_grace(self) -> None:
        self.started_at = self.clock()
        self.cluster.restart_grace(self.clock())

    @rule(seconds=st.sampled_from([0.5, 3.0, 5.0, 15.0, 61.0, 200.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # ------------------------------------------------------------ invariants

    @invariant()
    def counts_sum_to_total(self) -> None:
        counts = self.cluster.counts()
        assert sum(counts[h.value] for h in Health) == counts["total"] == len(self.cluster.nodes)
        assert counts["schedulable"] == sum(
            n.health is Health.HEALTHY and n.node_status is NodeStatus.OK
            and n.admin.value == "active" for n in self.cluster.nodes.values())

    @invariant()
    def schedulable_is_its_formula(self) -> None:
        for node in self.cluster.nodes.values():
            assert node.to_json()["schedulable"] == (
                node.health is Health.HEALTHY and node.node_status is NodeStatus.OK
                and node.admin.value == "active")

    @invariant()
    def indexes_agree_with_the_nodes(self) -> None:
        c: Any = self.cluster
        nodes = c.nodes.values()
        assert c.table.out_count == sum(n.cleaned_up and n.health is not Health.DEAD for n in nodes)
        assert c.table.dead_count == sum(n.health is Health.DEAD for n in nodes)
        assert c.table.unhealthy == {n.node_id for n in nodes if n.health is Health.UNHEALTHY}
        assert set(c.table.suspect_since) == {n.node_id for n in nodes
                                              if n.health is Health.SUSPECT}
        recent = {h: 0 for h in Health}
        for node_id in c.guard.recent:
            recent[c.nodes[node_id].health] += 1
        assert all(c.guard.recent_health[h] == recent[h] for h in Health)

    @invariant()
    def only_suspect_nodes_are_probed(self) -> None:
        c: Any = self.cluster
        for node_id in c.peers.probing:
            assert c.nodes[node_id].health is Health.SUSPECT

    @invariant()
    def guard_mirror_matches(self) -> None:
        assert self.cluster.guard_on == self.guard


ClusterMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClusterInvariants = ClusterMachine.TestCase
