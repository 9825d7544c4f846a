"""φ accrual suspicion (detect/phi.py) on a fake clock: what a node's own arrivals allow."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.phi import ArrivalHistory, PhiAccrual, phi, phi_quantile
from nodewatch.detect.policy import Policy
from nodewatch.model import CheckResult, FailureClass, Health, Registration, Report
from nodewatch.testing import FakeClock

POLICY = Policy(suspicion="phi", phi_threshold=8.0, phi_window=100, phi_min_samples=10,
                phi_min_std=0.1, phi_pause=0.0)


def beat(detector: PhiAccrual, clock: FakeClock, intervals: list[float],
         node_id: str = "n1") -> None:
    detector.note(node_id, clock())
    for interval in intervals:
        clock.advance(interval)
        detector.note(node_id, clock())


def test_phi_is_the_logistic_tail_and_the_quantile_inverts_it() -> None:
    assert phi(0.0, 0.0, 1.0) == pytest.approx(0.30103, abs=1e-5)  # half the mass: log10(2)
    assert phi(-10.0, 0.0, 1.0) < 1e-6
    for threshold in (1.0, 3.0, 8.0, 12.0):
        assert phi(phi_quantile(threshold), 0.0, 1.0) == pytest.approx(threshold)
    assert phi_quantile(8.0) == pytest.approx(5.226, abs=1e-3)
    assert phi(1e6, 0.0, 1.0) > 1e16  # a long silence neither overflows nor turns to nan


def test_steady_arrivals_keep_phi_low() -> None:
    clock = FakeClock()
    detector = PhiAccrual(POLICY)
    beat(detector, clock, [1.0] * 50)
    for _ in range(5):
        clock.advance(0.5)
        value = detector.phi("n1", clock())
        assert value is not None and value < 0.01
        clock.advance(0.5)
        detector.note("n1", clock())


def test_silence_crosses_the_threshold_at_the_expected_time() -> None:
    clock = FakeClock()
    detector = PhiAccrual(POLICY)
    beat(detector, clock, [1.0] * 50)
    last = clock()
    # Steady 1 s arrivals: deviation floored at phi_min_std, so mean + 5.226 × 0.1 s.
    allowed = detector.allowed_silence("n1")
    assert allowed == pytest.approx(1.0 + phi_quantile(8.0) * 0.1)
    clock.advance(allowed - 0.05)
    below = detector.phi("n1", clock())
    clock.advance(0.1)
    above = detector.phi("n1", clock())
    assert below is not None and above is not None and below < 8.0 <= above
    clock.advance(10.0)
    grown = detector.phi("n1", clock())
    assert grown is not None and grown > above
    assert clock() - last > allowed


def test_a_jittery_history_tolerates_a_longer_silence() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    steady, jittery = PhiAccrual(POLICY), PhiAccrual(POLICY)
    beat(steady, clock, [1.0] * 100)
    beat(jittery, clock, [max(0.05, rng.lognormvariate(0.0, 0.5)) for _ in range(100)])
    calm, rough = steady.allowed_silence("n1"), jittery.allowed_silence("n1")
    assert calm is not None and rough is not None
    assert rough > calm + 1.0


def test_the_pause_margin_adds_to_the_mean() -> None:
    clock = FakeClock()
    plain, patient = PhiAccrual(POLICY), PhiAccrual(replace(POLICY, phi_pause=3.0))
    for detector in (plain, patient):
        beat(detector, clock, [1.0] * 20)
    a, b = plain.allowed_silence("n1"), patient.allowed_silence("n1")
    assert a is not None and b is not None and b - a == pytest.approx(3.0)


def test_the_window_is_bounded_and_forgets_the_oldest_samples() -> None:
    clock = FakeClock()
    detector = PhiAccrual(replace(POLICY, phi_window=20))
    beat(detector, clock, [5.0] * 20 + [1.0] * 25)
    history = detector.history("n1")
    assert history is not None and len(history) == 20
    assert history.samples() == [1.0] * 20
    assert history.mean == pytest.approx(1.0) and history.std == pytest.approx(0.0, abs=1e-6)


def test_running_sums_match_a_fresh_computation_after_wrapping() -> None:
    rng = random.Random(3)
    history = ArrivalHistory(16)
    t = 0.0
    history.note(t)
    for _ in range(1000):
        t += rng.uniform(0.1, 3.0)
        history.note(t)
    kept = history.samples()
    mean = sum(kept) / len(kept)
    std = (sum((x - mean) ** 2 for x in kept) / len(kept)) ** 0.5
    assert history.mean == pytest.approx(mean) and history.std == pytest.approx(std)


def test_before_enough_samples_there_is_no_judgement_and_the_caller_falls_back() -> None:
    clock = FakeClock()
    detector = PhiAccrual(POLICY)
    assert detector.allowed_silence("n1") is None and detector.phi("n1", clock()) is None
    beat(detector, clock, [1.0] * (POLICY.phi_min_samples - 1))
    assert detector.allowed_silence("n1") is None
    clock.advance(1.0)
    detector.note("n1", clock())
    assert detector.allowed_silence("n1") is not None


def test_a_restart_is_not_an_interval_and_forget_drops_the_node() -> None:
    clock = FakeClock()
    detector = PhiAccrual(POLICY)
    beat(detector, clock, [1.0] * 20)
    detector.restart("n1")
    clock.advance(300.0)  # down for five minutes, then registers again
    detector.note("n1", clock())
    history = detector.history("n1")
    assert history is not None and max(history.samples()) == 1.0
    assert detector.allowed_silence("n1") is not None  # what it showed before is kept
    detector.forget("n1")
    assert "n1" not in detector and detector.allowed_silence("n1") is None



# ---------------------------------------------------------------- through the cluster facade

FACADE = Policy(startup_grace=0.0, jitter=0.0, indirect_probes=0, guard_min_nodes=100,
                healthy_interval=30.0, unhealthy_interval=1.0, fall=3, suspicion="phi",
                phi_pause=0.5, phi_min_samples=10)


class Pusher:
    """One node's agent pushing heartbeats into the cluster, as the coordinator feeds them."""

    def __init__(self, cluster: Cluster, clock: FakeClock, node_id: str) -> None:
        self.cluster, self.clock, self.node_id, self.seq = cluster, clock, node_id, 0
        self.deadline = 0.0  # when the poll that the pushes keep deferring comes due

    def push(self) -> None:
        self.seq += 1
        now = self.clock()
        out = self.cluster.observe(CheckResult(
            node_id=self.node_id, ok=True, at=now, source="push",
            report=Report(incarnation=1, seq=self.seq, ts=now)))
        assert not out.stale
        self.deadline = now + self.cluster.poll_deadline(self.node_id)

    def poll(self, ok: bool) -> list[str]:
        result = CheckResult(node_id=self.node_id, ok=ok, at=self.clock(),
                             failure=None if ok else FailureClass.REFUSED)
        return [e.kind for e in self.cluster.observe(result).events]


def facade(clock: FakeClock, *node_ids: str, policy: Policy = FACADE) -> Cluster:
    cluster = Cluster(policy, now=clock(), rng=random.Random(3))
    for node_id in node_ids:
        cluster.register(Registration(node_id=node_id, address=f"{node_id}:7301",
                                      incarnation=1, last_seq=0, last_ts=0.0), clock())
        for _ in range(policy.rise):
            cluster.observe(CheckResult(node_id=node_id, ok=True, at=clock()))
        assert cluster.nodes[node_id].health is Health.HEALTHY
    return cluster


def test_the_fixed_deadline_holds_until_enough_pushes_then_phi_judges() -> None:
    clock = FakeClock()
    node = Pusher(facade(clock, "n0"), clock, "n0")
    node.push()
    for _ in range(FACADE.phi_min_samples - 1):
        clock.advance(1.0)
        node.push()
        assert node.deadline - clock() == FACADE.healthy_interval  # too few intervals yet
    clock.advance(1.0)
    node.push()
    assert node.deadline - clock() == pytest.approx(1.0 + 0.5 + phi_quantile(8.0) * 0.1)


def test_a_crashed_pusher_is_polled_at_its_phi_deadline_and_confirmed_by_fall() -> None:
    clock = FakeClock()
    cluster = facade(clock, "n0")
    node = Pusher(cluster, clock, "n0")
    node.push()
    for _ in range(30):
        clock.advance(1.0)
        node.push()
    crashed_at = clock()  # no push from here on: the poll comes due at the deadline
    clock.advance(node.deadline - clock())
    assert node.poll(ok=False) == ["suspect"]  # the poll the missed heartbeats led to
    assert node.poll(ok=False) == []  # the quick re-check: a failure, but no time spanned
    clock.advance(FACADE.unhealthy_interval)
    assert node.poll(ok=False) == []
    clock.advance(FACADE.unhealthy_interval)
    assert node.poll(ok=False) == ["unhealthy"]  # fall, spanning (fall - 1) intervals
    assert clock() - crashed_at < 5.0  # the fixed deadline alone: 30 s before the first poll
    assert cluster.poll_deadline("n0") == FACADE.unhealthy_interval  # checked fast meanwhile


def test_jitter_within_a_nodes_history_is_not_suspected_but_a_steady_node_is_polled() -> None:
    rng = random.Random(11)
    clock = FakeClock()
    cluster = facade(clock, "steady", "jittery")
    steady, jittery = Pusher(cluster, clock, "steady"), Pusher(cluster, clock, "jittery")
    steady.push()
    jittery.push()
    t = clock()
    steady_at = [t + k for k in range(1, 100)]
    jittery_at: list[float] = []
    for _ in range(99):  # one second apart on average, often late, now and then very late
        t += max(0.05, rng.lognormvariate(-0.2, 0.6))
        jittery_at.append(t)
    for at, who in sorted([(a, steady) for a in steady_at] + [(a, jittery) for a in jittery_at],
                          key=lambda item: item[0]):
        clock.advance(at - clock())
        who.push()
    gap = 4.0  # both go silent this long after their last push
    assert steady.deadline < steady_at[-1] + gap  # abnormal for it: polled
    assert jittery.deadline > jittery_at[-1] + gap  # normal for it: left alone
    assert jittery.deadline <= jittery_at[-1] + FACADE.healthy_interval  # never past fixed


def test_a_registration_starts_the_intervals_afresh_and_remove_forgets_them() -> None:
    clock = FakeClock()
    cluster = facade(clock, "n0")
    node = Pusher(cluster, clock, "n0")
    node.push()
    for _ in range(20):
        clock.advance(1.0)
        node.push()
    clock.advance(120.0)  # the agent restarts and registers again
    cluster.register(Registration(node_id="n0", address="n0:7301", incarnation=2,
                                  last_seq=node.seq, last_ts=clock()), clock())
    assert cluster.arrivals is not None
    history = cluster.arrivals.history("n0")
    assert history is not None and history.last is None
    cluster.remove("n0", clock())
    assert "n0" not in cluster.arrivals


def test_the_fixed_judgement_keeps_no_arrival_history() -> None:
    clock = FakeClock()
    cluster = facade(clock, "n0", policy=replace(FACADE, suspicion="fixed"))
    node = Pusher(cluster, clock, "n0")
    for _ in range(20):
        clock.advance(1.0)
        node.push()
        assert node.deadline - clock() == FACADE.healthy_interval
    assert cluster.arrivals is None
