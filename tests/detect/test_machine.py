"""The pure detection core: hysteresis, gate, guard, indirect confirmation, budget, register
rules, drains and operator commands, each pinned by one example on a fake clock."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.machine import NodeTable
from nodewatch.detect.outcome import Conflict, Outcome, UnknownNode
from nodewatch.detect.policy import Policy
from nodewatch.model import (
    Admin,
    CheckResult,
    FailureClass,
    Health,
    NodeState,
    NodeStatus,
    PeerVote,
    Registration,
    Report,
)
from nodewatch.testing import FakeClock

# No startup grace, no jitter and no peers unless a test asks: each test turns on what it pins.
BASE = Policy(startup_grace=0.0, jitter=0.0, indirect_probes=0, guard_min_nodes=100)


def make(clock: FakeClock, nodes: int = 1, **overrides: Any) -> Cluster:
    cluster = Cluster(replace(BASE, **overrides), now=clock(), rng=random.Random(3))
    for i in range(nodes):
        cluster.register(reg(f"n{i}"), clock())
    return cluster


def reg(node_id: str, incarnation: int = 1, last_seq: int = 0, last_ts: float = 0.0,
        ) -> Registration:
    return Registration(node_id=node_id, address=f"10.0.0.{len(node_id)}:7301",
                        incarnation=incarnation, last_seq=last_seq, last_ts=last_ts)


def ok(cluster: Cluster, clock: FakeClock, node_id: str = "n0", report: Report | None = None,
       source: str = "poll") -> Outcome:
    return cluster.observe(CheckResult(node_id=node_id, ok=True, at=clock(), report=report,
                                       source=source))  # type: ignore[arg-type]


def fail(cluster: Cluster, clock: FakeClock, node_id: str = "n0",
         failure: FailureClass = FailureClass.TIMEOUT) -> Outcome:
    return cluster.observe(CheckResult(node_id=node_id, ok=False, at=clock(), failure=failure,
                                       detail="scripted"))


def fail_later(cluster: Cluster, clock: FakeClock, node_id: str = "n0",
               failure: FailureClass = FailureClass.TIMEOUT) -> Outcome:
    """A failed check one ``unhealthy_interval`` after the last, as the poller spaces them."""
    clock.advance(cluster.policy.unhealthy_interval)
    return fail(cluster, clock, node_id, failure)


def healthy(cluster: Cluster, clock: FakeClock, *node_ids: str) -> None:
    for node_id in node_ids or ("n0",):
        for _ in range(cluster.policy.rise):
            ok(cluster, clock, node_id)
        assert cluster.nodes[node_id].health is Health.HEALTHY


def kinds(out: Outcome) -> list[str]:
    return [e.kind for e in out.events]


def health(cluster: Cluster, node_id: str = "n0") -> Health:
    return cluster.nodes[node_id].health


def report(incarnation: int = 1, seq: int = 1, **kw: Any) -> Report:
    return Report(incarnation=incarnation, seq=seq, ts=1000.0 + seq, **kw)


# ---------------------------------------------------------------- rise / fall hysteresis


def test_new_node_becomes_healthy_after_rise_successes(clock: FakeClock) -> None:
    cluster = make(clock)
    assert not ok(cluster, clock)
    assert health(cluster) is Health.UNKNOWN
    out = ok(cluster, clock)
    assert kinds(out) == ["healthy"] and health(cluster) is Health.HEALTHY


def test_first_failure_makes_a_healthy_node_suspect(clock: FakeClock) -> None:
    cluster = make(clock)
    healthy(cluster, clock)
    out = fail(cluster, clock)
    assert kinds(out) == ["suspect"]
    assert health(cluster) is Health.SUSPECT
    assert out.check_now == ["n0"]


def test_unhealthy_only_after_fall_consecutive_failures(clock: FakeClock) -> None:
    cluster = make(clock, fall=3)
    healthy(cluster, clock)
    fail(cluster, clock)
    fail_later(cluster, clock)
    assert health(cluster) is Health.SUSPECT
    out = fail_later(cluster, clock)
    assert kinds(out) == ["unhealthy"]
    assert [a.kind for a in out.actions] == ["unhealthy"]
    assert health(cluster) is Health.UNHEALTHY


def test_a_success_restarts_the_fall_count(clock: FakeClock) -> None:
    cluster = make(clock, fall=3)
    healthy(cluster, clock)
    fail(cluster, clock)
    fail_later(cluster, clock)
    ok(cluster, clock)
    fail_later(cluster, clock)
    fail_later(cluster, clock)
    assert health(cluster) is Health.SUSPECT


def test_a_success_restarts_the_span_too(clock: FakeClock) -> None:
    cluster = make(clock, fall=3)  # fall_span 10 s
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(1)
    ok(cluster, clock)
    clock.advance(8)
    for _ in range(3):  # 3 failures, 9 s after the first failure but only 2 s after the success
        fail(cluster, clock)
        clock.advance(1)
    assert health(cluster) is Health.SUSPECT


# ---------------------------------------------------------------- fall spans time


def test_fall_failures_quicker_than_the_span_do_not_confirm(clock: FakeClock) -> None:
    # Checked every second for other reasons (re-checks, probes): the count is reached at
    # once, but the failure must last (fall - 1) x unhealthy_interval x (1 - jitter) = 9 s.
    cluster = make(clock, fall=3, jitter=0.1)
    assert cluster.policy.fall_span == pytest.approx(9.0)
    healthy(cluster, clock)
    for _ in range(9):  # at 0, 1, ..., 8 s
        assert "unhealthy" not in kinds(fail(cluster, clock))
        clock.advance(1)
    assert health(cluster) is Health.SUSPECT
    out = fail(cluster, clock)  # 9 s after the first failure
    assert kinds(out) == ["unhealthy"]
    assert out.events[0].reason.startswith("10 consecutive failed checks over 9.0s")


def test_the_quick_recheck_does_not_count(clock: FakeClock) -> None:
    # The kill -9 of issue 11: fall 3 at 200 ms was confirmed 207 ms after the first failure,
    # because the re-check right after it was one of the three.
    cluster = make(clock, fall=3, unhealthy_interval=0.2)
    healthy(cluster, clock)
    out = fail(cluster, clock, failure=FailureClass.REFUSED)
    assert kinds(out) == ["suspect"] and out.check_now == ["n0"]
    clock.advance(0.007)
    assert not fail(cluster, clock, failure=FailureClass.REFUSED).events  # the re-check
    assert not fail_later(cluster, clock, failure=FailureClass.REFUSED).events
    assert health(cluster) is Health.SUSPECT  # 3 failures, but over one interval only
    out = fail_later(cluster, clock, failure=FailureClass.REFUSED)
    assert kinds(out) == ["unhealthy"]
    assert out.events[0].reason.startswith("4 consecutive failed checks over 0.4s")
    assert len(out.events[0].evidence["checks"]) == 4  # the whole streak, re-check included


def test_checks_early_by_the_jitter_still_confirm_at_fall(clock: FakeClock) -> None:
    cluster = make(clock, fall=3, jitter=0.1)
    healthy(cluster, clock)
    fail(cluster, clock)
    fail(cluster, clock)  # the re-check
    for _ in range(2):  # two intervals, each as short as the jitter allows
        clock.advance(4.5)
        out = fail(cluster, clock)
    assert kinds(out) == ["unhealthy"]


def test_fall_two_needs_one_interval_after_the_first_failure(clock: FakeClock) -> None:
    cluster = make(clock, fall=2)
    healthy(cluster, clock)
    fail(cluster, clock)
    assert not fail(cluster, clock).events  # the re-check alone confirmed before issue 11
    assert kinds(fail_later(cluster, clock)) == ["unhealthy"]


def test_fall_one_confirms_on_the_first_failure(clock: FakeClock) -> None:
    cluster = make(clock, fall=1)
    assert cluster.policy.fall_span == 0.0
    healthy(cluster, clock)
    out = fail(cluster, clock)
    assert kinds(out) == ["suspect", "unhealthy"]
    assert out.events[1].reason.startswith("1 consecutive failed checks over 0.0s")


def test_a_missed_heartbeat_starts_the_span(clock: FakeClock) -> None:
    # A lease expiry is a failure, and the poll it asks for (plus its re-check) come at once:
    # none of them stands in for the intervals that must pass.
    cluster = make(clock, fall=3, unhealthy_interval=1.0, jitter=0.1)
    healthy(cluster, clock)
    out = cluster.observe(CheckResult(node_id="n0", ok=False, at=clock(),
                                      failure=FailureClass.LEASE_EXPIRED,
                                      detail="no heartbeat for 2.5s", source="lease"))
    assert kinds(out) == ["suspect"]
    for _ in range(2):  # the poll it asked for, and the re-check after it
        clock.advance(0.001)
        assert not fail(cluster, clock, failure=FailureClass.REFUSED).events
    clock.advance(0.9)
    assert not fail(cluster, clock, failure=FailureClass.REFUSED).events
    clock.advance(0.9)  # 1.802 s >= 2 x 1 s x 0.9
    out = fail(cluster, clock, failure=FailureClass.REFUSED)
    assert kinds(out) == ["unhealthy"]
    assert out.events[0].reason.startswith("5 consecutive failed checks over 1.8s")


def test_a_restored_streak_counts_its_span_afresh(clock: FakeClock) -> None:
    # After a coordinator restart the stored count survives but the streak's start does not:
    # the span is counted from the first failure this coordinator sees.
    stored = NodeState(node_id="n0", address="10.0.0.2:7301", health=Health.SUSPECT,
                       consecutive_failures=2, incarnation=1)
    cluster = Cluster(replace(BASE, fall=3), now=clock(), nodes=[stored])
    assert not fail(cluster, clock).events
    assert not fail_later(cluster, clock).events  # 4 failures, but one interval seen here
    assert kinds(fail_later(cluster, clock)) == ["unhealthy"]


def test_suspect_returns_to_healthy_only_after_rise_successes(clock: FakeClock) -> None:
    cluster = make(clock, rise=3)
    healthy(cluster, clock)
    fail(cluster, clock)
    assert not kinds(ok(cluster, clock)) and not kinds(ok(cluster, clock))
    assert health(cluster) is Health.SUSPECT
    out = ok(cluster, clock)
    assert kinds(out) == ["healthy"] and not out.actions


def test_unhealthy_recovers_after_rise_successes_with_recovered(clock: FakeClock) -> None:
    cluster = make(clock, fall=2, rise=2)
    healthy(cluster, clock)
    fail(cluster, clock)
    fail_later(cluster, clock)
    assert health(cluster) is Health.UNHEALTHY
    assert not ok(cluster, clock).events
    assert health(cluster) is Health.UNHEALTHY
    out = ok(cluster, clock)
    assert kinds(out) == ["recovered"]
    assert out.events[0].from_ == "unhealthy" and out.events[0].to == "healthy"
    assert [a.kind for a in out.actions] == ["recovered"]
    assert not cluster.nodes["n0"].cleaned_up


def test_a_failure_restarts_the_rise_count(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, rise=2)
    healthy(cluster, clock)
    fail(cluster, clock)
    ok(cluster, clock)
    fail(cluster, clock)
    ok(cluster, clock)
    assert health(cluster) is Health.UNHEALTHY


def test_every_failure_event_carries_the_failure_class(clock: FakeClock) -> None:
    cluster = make(clock, fall=3)
    healthy(cluster, clock)
    events = (fail(cluster, clock, failure=FailureClass.REFUSED).events
              + fail_later(cluster, clock, failure=FailureClass.HTTP_STATUS).events
              + fail_later(cluster, clock, failure=FailureClass.BAD_BODY).events)
    assert [e.kind for e in events] == ["suspect", "unhealthy"]
    assert [c["class"] for c in events[0].evidence["checks"]] == ["refused"]
    assert [c["class"] for c in events[1].evidence["checks"]] == [
        "refused", "http_status", "bad_body"]
    assert "bad_body" in events[1].reason


# ---------------------------------------------------------------- intervals


def test_interval_for_is_slow_while_healthy_and_fast_otherwise(clock: FakeClock) -> None:
    cluster = make(clock)
    assert cluster.interval_for("n0") == 5.0  # unknown
    healthy(cluster, clock)
    assert cluster.interval_for("n0") == 30.0
    fail(cluster, clock)
    assert cluster.interval_for("n0") == 5.0


def test_a_confirmed_down_node_is_checked_at_down_interval(clock: FakeClock) -> None:
    cluster = make(clock, down_interval=60.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    assert cluster.nodes["n0"].health is Health.SUSPECT
    assert cluster.interval_for("n0") == 5.0  # still being confirmed: fast
    for _ in range(cluster.policy.fall - 1):
        fail_later(cluster, clock)
    assert cluster.nodes["n0"].health is Health.UNHEALTHY
    assert cluster.interval_for("n0") == 60.0
    for _ in range(cluster.policy.rise):  # its recovery is seen as quickly as ever
        ok(cluster, clock)
    assert cluster.nodes["n0"].health is Health.HEALTHY
    assert make(clock).policy.confirmed_down_interval == 5.0  # 0: as unhealthy_interval


def test_interval_for_stays_within_jitter_bounds(clock: FakeClock) -> None:
    cluster = make(clock, jitter=0.1)
    healthy(cluster, clock)
    intervals = [cluster.interval_for("n0") for _ in range(2000)]
    assert all(27.0 <= i <= 33.0 for i in intervals)
    assert max(intervals) - min(intervals) > 5.0  # it really spreads
    fail(cluster, clock)
    assert all(4.5 <= cluster.interval_for("n0") <= 5.5 for _ in range(500))


# ---------------------------------------------------------------- dead_after


def test_unhealthy_node_goes_dead_after_dead_after_with_dead_action(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, dead_after=600.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(599)
    assert not cluster.tick(clock()).events
    clock.advance(1)
    out = cluster.tick(clock())
    assert kinds(out) == ["dead"] and health(cluster) is Health.DEAD
    assert [a.kind for a in out.actions] == ["dead"]
    assert out.events[0].evidence["checks"][0]["class"] == "timeout"


def test_dead_node_frees_its_budget_slot_for_a_held_cleanup(clock: FakeClock) -> None:
    # 10 nodes, max_fraction 0.1: one may be out; the second one's cleanup is held.
    cluster = make(clock, nodes=10, fall=1, dead_after=600.0, max_fraction=0.1)
    healthy(cluster, clock, "n0", "n1")
    fail(cluster, clock, "n0")
    out = fail(cluster, clock, "n1")
    assert "held" in kinds(out)
    clock.advance(600)
    out = cluster.tick(clock())
    assert sorted(e.node_id for e in out.events if e.kind == "dead") == ["n0", "n1"]
    # n0 is gone for good and no longer uses the budget: n1's held cleanup runs now, and as
    # n1 is dead too it is deregistered at once. No dead action ran for n1 before its cleanup.
    assert [(a.kind, a.node_id) for a in out.actions] == [
        ("dead", "n0"), ("unhealthy", "n1"), ("dead", "n1")]


def test_dead_without_cleanup_runs_no_dead_action(clock: FakeClock) -> None:
    # The rate limit (one cleanup a minute) holds n1's cleanup past its death.
    cluster = make(clock, nodes=10, fall=1, dead_after=30.0, max_rate=1.0)
    healthy(cluster, clock, "n0", "n1")
    fail(cluster, clock, "n0")
    out = fail(cluster, clock, "n1")
    assert "held" in kinds(out)
    clock.advance(30)
    out = cluster.tick(clock())
    assert sorted(e.node_id for e in out.events if e.kind == "dead") == ["n0", "n1"]
    assert [(a.kind, a.node_id) for a in out.actions] == [("dead", "n0")]


def test_dead_node_ignores_checks_until_it_registers(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, rise=1, dead_after=10.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(10)
    cluster.tick(clock())
    assert not ok(cluster, clock).events
    assert health(cluster) is Health.DEAD
    assert cluster.interval_for("n0") == 30.0  # not polled at the fast rate for nothing


def test_dead_node_that_registers_again_is_recovered_into_the_load_balancer(
        clock: FakeClock) -> None:
    cluster = make(clock, fall=1, rise=2, dead_after=10.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(10)
    cluster.tick(clock())
    decision, out = cluster.register(reg("n0", incarnation=2), clock())
    assert decision == "rejoin" and health(cluster) is Health.UNKNOWN
    ok(cluster, clock)
    out = ok(cluster, clock)
    assert kinds(out) == ["recovered"] and [a.kind for a in out.actions] == ["recovered"]
    assert cluster.counts()["healthy"] == 1


# ---------------------------------------------------------------- self-health gate


def test_startup_grace_holds_confirmation_with_one_event(clock: FakeClock) -> None:
    cluster = make(clock, fall=2, startup_grace=45.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    out = fail_later(cluster, clock)
    assert kinds(out) == ["suspect"] and out.events[0].reason == "held: startup grace"
    assert out.events[0].evidence["checks"][0]["class"] == "timeout"
    clock.advance(5)
    assert not fail(cluster, clock).events  # same reason: no new event
    assert not fail(cluster, clock).actions
    assert health(cluster) is Health.SUSPECT
    clock.advance(41)
    out = fail(cluster, clock)  # the next failed check after the grace confirms
    assert kinds(out) == ["unhealthy"] and [a.kind for a in out.actions] == ["unhealthy"]


def test_restart_grace_starts_a_new_grace_period(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, startup_grace=30.0)
    clock.advance(100)
    cluster.restart_grace(clock())
    healthy(cluster, clock)
    out = fail(cluster, clock)
    assert health(cluster) is Health.SUSPECT
    assert out.events[-1].reason == "held: startup grace"


def test_loop_lag_holds_confirmation_until_it_drops(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, max_loop_lag=1.0)
    healthy(cluster, clock)
    cluster.set_loop_lag(2.5)
    out = fail(cluster, clock)
    assert kinds(out) == ["suspect", "suspect"]
    assert out.events[-1].reason == "held: coordinator loop lag"
    assert out.events[-1].evidence["loop_lag"] == 2.5
    cluster.set_loop_lag(3.0)
    assert not fail(cluster, clock).events  # the lag changed, the reason did not
    cluster.set_loop_lag(0.1)
    assert health(cluster) is Health.SUSPECT
    assert kinds(fail(cluster, clock)) == ["unhealthy"]


def test_dropping_heartbeats_holds_a_timeout_but_not_a_refusal(clock: FakeClock) -> None:
    # A coordinator that drops its own heartbeats reads its polls' answers late too: a
    # timeout is no evidence then, a refused connection still is.
    cluster = make(clock, nodes=10, fall=2)
    healthy(cluster, clock, *(f"n{i}" for i in range(10)))
    cluster.note_receive_drops(True)
    fail(cluster, clock, "n0")
    out = fail_later(cluster, clock, "n0")
    assert kinds(out) == ["suspect"]
    assert out.events[0].reason == "held: coordinator overloaded (dropping heartbeats)"
    assert out.events[0].evidence["receive_overload"] is True and not out.actions
    assert not fail_later(cluster, clock, "n0").events  # same reason: no new event
    fail(cluster, clock, "n1", FailureClass.REFUSED)
    assert kinds(fail_later(cluster, clock, "n1", FailureClass.REFUSED)) == ["unhealthy"]
    # One timeout in a streak of refusals is enough to doubt it.
    fail(cluster, clock, "n2", FailureClass.REFUSED)
    out = fail_later(cluster, clock, "n2", FailureClass.TIMEOUT)
    assert health(cluster, "n2") is Health.SUSPECT and not out.actions
    cluster.note_receive_drops(False)
    assert health(cluster) is Health.SUSPECT
    out = fail_later(cluster, clock, "n0")  # the next failed check after the overload
    assert kinds(out) == ["unhealthy"] and [a.kind for a in out.actions] == ["unhealthy"]


def test_a_check_that_failed_on_the_checkers_side_is_no_evidence(clock: FakeClock) -> None:
    cluster = make(clock, fall=2)
    healthy(cluster, clock)
    fail(cluster, clock)
    assert health(cluster) is Health.SUSPECT and cluster.nodes["n0"].consecutive_failures == 1
    for _ in range(5):  # out of descriptors, or read late: nothing moves, nothing confirms
        out = fail_later(cluster, clock, failure=FailureClass.LOCAL)
        assert not out.events and not out.actions
    assert health(cluster) is Health.SUSPECT and cluster.nodes["n0"].consecutive_failures == 1
    fresh = make(clock, nodes=2, fall=1)
    healthy(fresh, clock, "n1")
    assert not fail(fresh, clock, "n1", FailureClass.LOCAL).events
    assert health(fresh, "n1") is Health.HEALTHY
    assert kinds(fail_later(cluster, clock)) == ["unhealthy"]  # real evidence still confirms


def test_gate_reason_change_emits_one_event_per_reason(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, startup_grace=10.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(11)
    cluster.set_loop_lag(5.0)
    out = fail(cluster, clock)
    assert [e.reason for e in out.events] == ["held: coordinator loop lag"]


def test_gate_holds_dead_after_and_held_cleanups(clock: FakeClock) -> None:
    cluster = make(clock, fall=1, dead_after=60.0)
    healthy(cluster, clock)
    fail(cluster, clock)
    clock.advance(100)
    cluster.set_loop_lag(9.0)
    assert health(cluster) is Health.UNHEALTHY
    assert not cluster.tick(clock()).events
    cluster.set_loop_lag(0.0)
    assert kinds(cluster.tick(clock())) == ["dead"]


# ---------------------------------------------------------------- guard


def guarded(clock: FakeClock, nodes: int = 4, **kw: Any) -> Cluster:
    cluster = make(clock, nodes=nodes, guard_min_nodes=4, guard_fraction=0.5, **kw)
    healthy(cluster, clock, *[f"n{i}" for i in range(nodes)])
    return cluster


def test_guard_turns_on_when_half_the_nodes_go_suspect_in_the_window(clock: FakeClock) -> None:
    cluster = guarded(clock, fall=3)
    assert not cluster.guard_on
    fail(cluster, clock, "n0")
    clock.advance(5)
    out = fail(cluster, clock, "n1")
    assert kinds(out) == ["suspect", "guard_on"] and cluster.guard_on
    assert out.events[1].evidence["suspect"] == 2


def test_guard_ignores_suspects_outside_the_window(clock: FakeClock) -> None:
    cluster = guarded(clock, fall=3)
    fail(cluster, clock, "n0")
    clock.advance(46)  # one detection window: healthy_interval 30 + unhealthy_interval 5 x 3
    fail(cluster, clock, "n1")
    assert not cluster.guard_on


def test_guard_window_spans_a_healthy_interval(clock: FakeClock) -> None:
    # Healthy nodes are polled every 30 s, so a partition is discovered over that long:
    # suspects 20 s apart are still one event for the guard.
    cluster = guarded(clock, fall=3)
    fail(cluster, clock, "n0")
    clock.advance(20)
    fail(cluster, clock, "n1")
    assert cluster.guard_on


def test_guard_counts_nodes_not_flaps_of_one_node(clock: FakeClock) -> None:
    cluster = guarded(clock, fall=3, rise=1)
    fail(cluster, clock, "n0")
    ok(cluster, clock, "n0")
    fail(cluster, clock, "n0")
    assert not cluster.guard_on


def test_guard_needs_min_nodes(clock: FakeClock) -> None:
    cluster = make(clock, nodes=3, guard_min_nodes=4)
    healthy(cluster, clock, "n0", "n1", "n2")
    for i in range(3):
        fail(cluster, clock, f"n{i}")
    assert not cluster.guard_on


def test_node_that_tips_the_guard_is_not_confirmed(clock: FakeClock) -> None:
    cluster = guarded(clock, fall=1)
    assert kinds(fail(cluster, clock, "n0")) == ["suspect", "unhealthy"]
    out = fail(cluster, clock, "n1")
    assert "unhealthy" not in kinds(out) and "guard_on" in kinds(out)
    assert not out.actions
    assert health(cluster, "n1") is Health.SUSPECT
    assert out.events[-1].reason == "held: guard (many nodes failing at once)"


def test_guard_holds_confirmations_and_lifts_when_failures_drop(clock: FakeClock) -> None:
    cluster = guarded(clock, fall=2, rise=1)
    for i in range(3):
        fail(cluster, clock, f"n{i}")
    assert cluster.guard_on
    for _ in range(3):
        clock.advance(cluster.policy.unhealthy_interval)  # past fall: only the guard holds
        for i in range(3):
            out = fail(cluster, clock, f"n{i}")
            assert "unhealthy" not in kinds(out)
    assert {health(cluster, f"n{i}") for i in range(3)} == {Health.SUSPECT}
    ok(cluster, clock, "n1")
    assert cluster.guard_on  # 2 of 4 still failing
    out = ok(cluster, clock, "n2")
    assert "guard_off" in kinds(out) and not cluster.guard_on
    assert kinds(fail(cluster, clock, "n0")) == ["unhealthy"]


# ---------------------------------------------------------------- indirect confirmation


def probing(clock: FakeClock, **kw: Any) -> Cluster:
    cluster = make(clock, nodes=4, fall=2, indirect_probes=2, **kw)
    healthy(cluster, clock, "n0", "n1", "n2", "n3")
    return cluster


def test_confirmation_first_asks_healthy_peers(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    out = fail_later(cluster, clock)
    assert len(out.probes) == 1 and not out.actions
    probe = out.probes[0]
    assert probe.node_id == "n0" and probe.address == cluster.nodes["n0"].address
    assert len(probe.peers) == 2 and len(set(probe.peers)) == 2
    assert all(peer != "n0" and health(cluster, peer) is Health.HEALTHY
               for peer, _ in probe.peers)
    assert health(cluster) is Health.SUSPECT
    assert out.events[-1].reason == "confirming through peers"
    assert not fail(cluster, clock).probes  # one probe in flight at a time


def test_probe_asks_at_most_the_healthy_peers_there_are(clock: FakeClock) -> None:
    cluster = make(clock, nodes=3, fall=1, indirect_probes=5)
    healthy(cluster, clock, "n0", "n1")  # n2 stays unknown
    out = fail(cluster, clock)
    assert [p for p, _ in out.probes[0].peers] == ["n1"]


def test_reachable_vote_keeps_node_suspect_without_cleanup(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    (probe,) = fail_later(cluster, clock).probes
    votes = [PeerVote(probe.peers[0][0], reachable=True),
             PeerVote(probe.peers[1][0], reachable=False, detail="timeout")]
    out = cluster.peer_votes("n0", votes, clock())
    assert kinds(out) == ["suspect"] and not out.actions
    assert out.events[0].reason == "reachable from peers"
    assert out.events[0].evidence["reachable_from"] == [probe.peers[0][0]]
    assert health(cluster) is Health.SUSPECT


def test_repeated_reachable_votes_emit_no_new_events(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    (probe,) = fail_later(cluster, clock).probes
    cluster.peer_votes("n0", [PeerVote(probe.peers[0][0], True)], clock())
    out = fail(cluster, clock)
    assert len(out.probes) == 1 and not out.events  # asks again, quietly
    out = cluster.peer_votes("n0", [PeerVote(out.probes[0].peers[0][0], True)], clock())
    assert not out.events


def test_all_unreachable_votes_confirm_with_votes_in_evidence(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    (probe,) = fail_later(cluster, clock).probes
    votes = [PeerVote(p, reachable=False, detail="refused") for p, _ in probe.peers]
    out = cluster.peer_votes("n0", votes, clock())
    assert kinds(out) == ["unhealthy"] and [a.kind for a in out.actions] == ["unhealthy"]
    assert [v["reachable"] for v in out.events[0].evidence["peers"]] == [False, False]
    assert out.events[0].evidence["checks"][-1]["class"] == "timeout"


def test_peers_we_cannot_reach_either_hold_and_the_next_failure_asks_again(
        clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    (probe,) = fail_later(cluster, clock).probes
    votes = [PeerVote(p, reachable=None, detail="peer unreachable") for p, _ in probe.peers]
    out = cluster.peer_votes("n0", votes, clock())
    assert kinds(out) == ["suspect"] and not out.actions
    assert out.events[0].reason.startswith("held: peers unreachable too")
    assert health(cluster) is Health.SUSPECT
    (again,) = fail(cluster, clock).probes  # asks (other) peers on the next failed check
    out = cluster.peer_votes("n0", [PeerVote(p, False, "refused") for p, _ in again.peers],
                             clock())
    assert kinds(out) == ["unhealthy"]


def test_one_real_unreachable_vote_outweighs_peers_we_cannot_reach(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    (probe,) = fail_later(cluster, clock).probes
    (first, _), (second, _) = probe.peers
    votes = [PeerVote(first, None, "peer unreachable"), PeerVote(second, False, "refused")]
    assert kinds(cluster.peer_votes("n0", votes, clock())) == ["unhealthy"]


def test_no_votes_at_all_confirm(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    fail_later(cluster, clock)
    out = cluster.peer_votes("n0", [], clock())
    assert kinds(out) == ["unhealthy"] and out.events[0].evidence["peers"] == []


def test_votes_after_the_node_recovered_are_ignored(clock: FakeClock) -> None:
    cluster = probing(clock, rise=1)
    fail(cluster, clock)
    fail_later(cluster, clock)
    ok(cluster, clock)
    assert not cluster.peer_votes("n0", [], clock())
    assert health(cluster) is Health.HEALTHY


def test_votes_arriving_while_gated_hold(clock: FakeClock) -> None:
    cluster = probing(clock)
    fail(cluster, clock)
    fail_later(cluster, clock)
    cluster.set_loop_lag(4.0)
    out = cluster.peer_votes("n0", [], clock())
    assert kinds(out) == ["suspect"] and out.events[0].reason == "held: coordinator loop lag"


# ---------------------------------------------------------------- disruption budget


def test_budget_allows_at_least_one_node_out(clock: FakeClock) -> None:
    cluster = make(clock, nodes=3, fall=1, max_fraction=0.2)  # 3 x 0.2 -> 0, but never < 1
    healthy(cluster, clock, "n0", "n1")
    assert [a.kind for a in fail(cluster, clock, "n0").actions] == ["unhealthy"]
    out = fail(cluster, clock, "n1")
    assert kinds(out) == ["suspect", "unhealthy", "held"] and not out.actions
    assert out.events[-1].reason.startswith("held: budget")
    assert out.events[-1].evidence["for_event"] == out.events[1].id
    assert out.events[-1].evidence["checks"][0]["class"] == "timeout"
    assert health(cluster, "n1") is Health.UNHEALTHY  # observed health stays truthful


def test_budget_max_fraction_limits_nodes_out(clock: FakeClock) -> None:
    cluster = make(clock, nodes=10, fall=1, max_fraction=0.2)
    healthy(cluster, clock, *[f"n{i}" for i in range(10)])
    actions = [a for i in range(4) for a in fail(cluster, clock, f"n{i}").actions]
    assert [a.node_id for a in actions] == ["n0", "n1"]


def test_held_cleanup_is_released_on_tick_when_a_node_recovers(clock: FakeClock) -> None:
    cluster = make(clock, nodes=5, fall=1, rise=1, max_fraction=0.2)
    healthy(cluster, clock, "n0", "n1")
    fail(cluster, clock, "n0")
    fail(cluster, clock, "n1")
    assert not cluster.tick(clock()).actions
    ok(cluster, clock, "n0")
    out = cluster.tick(clock())
    assert kinds(out) == ["cleanup"]
    assert [(a.kind, a.node_id) for a in out.actions] == [("unhealthy", "n1")]
    assert cluster.nodes["n1"].cleaned_up


def test_budget_max_rate_per_minute(clock: FakeClock) -> None:
    cluster = make(clock, nodes=10, fall=1, rise=1, max_fraction=1.0, max_rate=2)
    healthy(cluster, clock, *[f"n{i}" for i in range(10)])
    for i in range(3):
        fail(cluster, clock, f"n{i}")
    out_now = [n for n in cluster.nodes.values() if n.cleaned_up]
    assert len(out_now) == 2
    clock.advance(30)
    assert not cluster.tick(clock()).actions
    clock.advance(30)
    out = cluster.tick(clock())
    assert [(a.kind, a.node_id) for a in out.actions] == [("unhealthy", "n2")]


def test_held_cleanup_of_a_node_that_went_dead_also_deregisters_it(clock: FakeClock) -> None:
    cluster = make(clock, nodes=4, fall=1, rise=1, dead_after=60.0)
    healthy(cluster, clock, "n0", "n1")
    fail(cluster, clock, "n0")
    fail(cluster, clock, "n1")  # held
    clock.advance(60)
    out = cluster.tick(clock())  # both dead; dead n0 frees the only slot for n1's cleanup
    assert [(a.kind, a.node_id) for a in out.actions] == [
        ("dead", "n0"), ("unhealthy", "n1"), ("dead", "n1")]


# ---------------------------------------------------------------- register


def test_unknown_node_registers_as_new(clock: FakeClock) -> None:
    cluster = make(clock, nodes=0)
    decision, out = cluster.register(reg("a"), clock())
    assert decision == "new" and kinds(out) == ["registered"] and out.check_now == ["a"]
    assert health(cluster, "a") is Health.UNKNOWN


def with_history(clock: FakeClock, **kw: Any) -> Cluster:
    """n0 registered with incarnation 1 and reported seq 10 at its ts 1010."""
    cluster = make(clock, **kw)
    ok(cluster, clock, report=report(1, 10))
    ok(cluster, clock, report=report(1, 11))
    return cluster


def test_clean_restart_rejoins(clock: FakeClock) -> None:
    cluster = with_history(clock)
    decision, out = cluster.register(reg("n0", 2, last_seq=11, last_ts=1011.0), clock())
    assert decision == "rejoin" and cluster.nodes["n0"].admin is Admin.ACTIVE
    assert health(cluster) is Health.HEALTHY  # back to ok checks as usual


def test_crash_restart_within_the_window_rejoins(clock: FakeClock) -> None:
    cluster = with_history(clock)
    # Sent seq 14 that the coordinator never saw, 20 s after its last seen sample.
    decision, _ = cluster.register(reg("n0", 2, last_seq=14, last_ts=1031.0), clock())
    assert decision == "rejoin"


def test_same_incarnation_registering_again_rejoins(clock: FakeClock) -> None:
    cluster = with_history(clock)
    decision, out = cluster.register(reg("n0", 1, last_seq=11, last_ts=1011.0), clock())
    assert decision == "rejoin" and out.events[0].kind == "registered"


def test_rejoin_returns_to_healthy_after_rise_checks(clock: FakeClock) -> None:
    cluster = with_history(clock, fall=1)
    fail(cluster, clock)
    cluster.register(reg("n0", 2, last_seq=11, last_ts=1012.0), clock())
    ok(cluster, clock)
    assert kinds(ok(cluster, clock)) == ["recovered"]


def test_incarnation_going_back_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock)
    cluster.register(reg("n0", 5, last_seq=0, last_ts=1012.0), clock())
    decision, out = cluster.register(reg("n0", 2, last_seq=0, last_ts=1013.0), clock())
    assert decision == "review" and kinds(out) == ["review"]
    node = cluster.nodes["n0"]
    assert node.admin is Admin.REVIEW and not node.schedulable


def test_seq_going_back_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock)
    decision, out = cluster.register(reg("n0", 2, last_seq=3, last_ts=1012.0), clock())
    assert decision == "review" and "seq went back" in out.events[0].reason


def test_seq_going_back_in_the_same_incarnation_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock)
    decision, _ = cluster.register(reg("n0", 1, last_seq=3, last_ts=1012.0), clock())
    assert decision == "review"


def test_running_unobserved_while_thought_down_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock, fall=1)
    fail(cluster, clock)
    assert health(cluster) is Health.UNHEALTHY
    window = cluster.policy.detection_window
    decision, out = cluster.register(reg("n0", 2, last_seq=99, last_ts=1011 + window + 1),
                                     clock())
    assert decision == "review" and "while thought down" in out.events[0].reason


def test_partitioned_process_registering_again_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock, fall=1)
    fail(cluster, clock)
    decision, _ = cluster.register(reg("n0", 1, last_seq=500, last_ts=5000.0), clock())
    assert decision == "review"


def test_flapping_past_max_rejoins_needs_review(clock: FakeClock) -> None:
    cluster = with_history(clock, max_rejoins=3)
    decisions = []
    for inc in range(2, 6):
        clock.advance(60)
        decisions.append(cluster.register(reg("n0", inc, last_seq=11, last_ts=1011.0),
                                          clock())[0])
    assert decisions == ["rejoin", "rejoin", "rejoin", "review"]


def test_rejoins_older_than_an_hour_are_forgotten(clock: FakeClock) -> None:
    cluster = with_history(clock, max_rejoins=2)
    for inc in range(2, 6):
        clock.advance(1800)
        decision, _ = cluster.register(reg("n0", inc, last_seq=11, last_ts=1011.0), clock())
        assert decision == "rejoin"


def test_auto_approve_turns_review_into_rejoin(clock: FakeClock) -> None:
    cluster = with_history(clock, auto_approve=True)
    decision, out = cluster.register(reg("n0", 2, last_seq=3, last_ts=1012.0), clock())
    assert decision == "rejoin" and cluster.nodes["n0"].admin is Admin.ACTIVE
    assert out.events[0].reason.startswith("auto-approved")
    assert "auto_approved" in out.events[0].evidence


def test_register_restarts_the_fall_count(clock: FakeClock) -> None:
    cluster = make(clock, fall=3)
    healthy(cluster, clock)
    fail(cluster, clock)
    fail(cluster, clock)
    cluster.register(reg("n0", 2), clock())
    fail(cluster, clock)
    assert health(cluster) is Health.SUSPECT


# ---------------------------------------------------------------- reports


def test_stale_report_changes_nothing(clock: FakeClock) -> None:
    cluster = with_history(clock)
    before = cluster.nodes["n0"].to_json()
    cluster.take_dirty()
    out = ok(cluster, clock, report=report(1, 11, status=NodeStatus.DEGRADED), source="push")
    assert out.stale and not out
    assert cluster.nodes["n0"].to_json() == before
    assert not cluster.take_dirty()


def test_stale_polled_report_still_counts_as_a_good_check(clock: FakeClock) -> None:
    cluster = with_history(clock, rise=1)
    fail(cluster, clock)
    out = ok(cluster, clock, report=report(1, 5))
    assert not out.stale and kinds(out) == ["healthy"]
    assert cluster.nodes["n0"].seq == 11


def test_self_reported_degraded_makes_the_node_unschedulable(clock: FakeClock) -> None:
    cluster = with_history(clock)
    assert cluster.nodes["n0"].schedulable
    out = ok(cluster, clock, report=report(1, 12, status=NodeStatus.DEGRADED,
                                           reasons=("cpu_percent > 95 for 30s",)))
    assert kinds(out) == ["degraded"] and out.events[0].reason == "cpu_percent > 95 for 30s"
    node = cluster.nodes["n0"]
    assert node.health is Health.HEALTHY and not node.schedulable
    assert [a.kind for a in out.actions] == ["degraded"]  # load balancers drain it softly
    out = ok(cluster, clock, report=report(1, 13))
    assert node.schedulable
    assert kinds(out) == ["status_ok"] and [a.kind for a in out.actions] == ["status_ok"]


# ---------------------------------------------------------------- drains


def test_drain_completes_when_pending_tasks_reach_zero(clock: FakeClock) -> None:
    cluster = with_history(clock)
    ok(cluster, clock, report=report(1, 12, load={"pending_tasks": 3.0}))
    out = cluster.drain("n0", "maintenance", clock())
    assert kinds(out) == ["drained"] and [a.kind for a in out.actions] == ["drained"]
    assert out.events[0].evidence["waiting_for"] == {"pending_tasks": 3.0}
    node = cluster.nodes["n0"]
    assert node.admin is Admin.DRAINED and not node.schedulable
    assert node.drain is not None and not node.drain.complete
    out = ok(cluster, clock, report=report(1, 13, load={"pending_tasks": 0.0}))
    assert kinds(out) == ["drain_complete"] and node.drain.complete


def test_drain_of_a_node_without_pending_tasks_completes_at_once(clock: FakeClock) -> None:
    cluster = with_history(clock)
    assert kinds(cluster.drain("n0", "", clock())) == ["drained", "drain_complete"]


def test_drain_escalates_at_drain_deadline(clock: FakeClock) -> None:
    cluster = with_history(clock, drain_deadline=60.0)
    ok(cluster, clock, report=report(1, 12, load={"pending_tasks": 3.0}))
    cluster.drain("n0", "maintenance", clock())
    clock.advance(59)
    assert not cluster.tick(clock())
    clock.advance(1)
    out = cluster.tick(clock())
    assert kinds(out) == ["drain_deadline"]
    assert [a.kind for a in out.actions] == ["drain_deadline"]
    assert "3 tasks still pending" in out.events[0].reason


def test_drain_twice_is_idempotent(clock: FakeClock) -> None:
    cluster = with_history(clock)
    cluster.drain("n0", "x", clock())
    assert not cluster.drain("n0", "x", clock())


def test_node_reported_draining_is_handled_like_a_drain(clock: FakeClock) -> None:
    cluster = with_history(clock, drain_deadline=60.0)
    out = ok(cluster, clock, report=report(1, 12, status=NodeStatus.DRAINING,
                                           load={"pending_tasks": 2.0}))
    assert kinds(out) == ["draining"]
    node = cluster.nodes["n0"]
    assert not node.schedulable and node.drain is not None and node.drain.by == "node"
    clock.advance(60)
    out = cluster.tick(clock())
    assert kinds(out) == ["drain_deadline"] and node.drain.complete


def test_node_reported_draining_completes_at_zero_and_clears_on_ok(clock: FakeClock) -> None:
    cluster = with_history(clock)
    ok(cluster, clock, report=report(1, 12, status=NodeStatus.DRAINING,
                                     load={"pending_tasks": 2.0}))
    out = ok(cluster, clock, report=report(1, 13, status=NodeStatus.DRAINING,
                                           load={"pending_tasks": 0.0}))
    assert kinds(out) == ["drain_complete"]
    ok(cluster, clock, report=report(1, 14))
    node = cluster.nodes["n0"]
    assert node.drain is None and node.schedulable


def test_undrain_makes_the_node_schedulable_again(clock: FakeClock) -> None:
    cluster = with_history(clock)
    cluster.drain("n0", "x", clock())
    out = cluster.undrain("n0", clock())
    assert kinds(out) == ["undrained"] and [a.kind for a in out.actions] == ["undrained"]
    assert cluster.nodes["n0"].schedulable and cluster.nodes["n0"].drain is None
    assert not cluster.undrain("n0", clock())  # idempotent


# ---------------------------------------------------------------- operator commands


def in_review(clock: FakeClock) -> Cluster:
    cluster = with_history(clock)
    cluster.register(reg("n0", 2, last_seq=3, last_ts=1012.0), clock())
    assert cluster.nodes["n0"].admin is Admin.REVIEW
    return cluster


def test_approve_returns_a_node_in_review_to_active(clock: FakeClock) -> None:
    cluster = in_review(clock)
    out = cluster.approve("n0", clock())
    assert kinds(out) == ["approved"] and cluster.nodes["n0"].admin is Admin.ACTIVE


def test_approve_of_a_node_not_in_review_conflicts(clock: FakeClock) -> None:
    cluster = with_history(clock)
    with pytest.raises(Conflict):
        cluster.approve("n0", clock())


def test_undrain_of_a_node_in_review_conflicts(clock: FakeClock) -> None:
    with pytest.raises(Conflict):
        in_review(clock).undrain("n0", clock())


def test_drain_of_a_node_in_review_conflicts(clock: FakeClock) -> None:
    cluster = in_review(clock)
    with pytest.raises(Conflict):
        cluster.drain("n0", "x", clock())
    assert cluster.nodes["n0"].admin is Admin.REVIEW


@pytest.mark.parametrize("command", ["drain", "undrain", "approve", "remove"])
def test_commands_on_an_unknown_node_raise_unknown_node(clock: FakeClock, command: str) -> None:
    cluster = make(clock)
    args: tuple[Any, ...] = ("nope", "r", clock()) if command == "drain" else ("nope", clock())
    with pytest.raises(UnknownNode):
        getattr(cluster, command)(*args)


def test_observing_an_unknown_node_raises_unknown_node(clock: FakeClock) -> None:
    with pytest.raises(UnknownNode):
        ok(make(clock), clock, "nope")


def test_remove_forgets_the_node_and_reports_its_last_health(clock: FakeClock) -> None:
    cluster = make(clock, nodes=2, fall=1)
    healthy(cluster, clock)
    fail(cluster, clock)
    out = cluster.remove("n0", clock())
    assert kinds(out) == ["removed"] and out.events[0].from_ == "unhealthy"
    assert out.removed == ["n0"] and [a.kind for a in out.actions] == ["removed"]
    assert "n0" not in cluster.nodes and cluster.counts()["total"] == 1


def test_add_static_watches_a_node_once(clock: FakeClock) -> None:
    cluster = make(clock, nodes=0)
    out = cluster.add_static("s1", "10.1.1.1:7301", {"zone": "a"}, clock())
    assert kinds(out) == ["registered"] and out.check_now == ["s1"]
    assert not cluster.add_static("s1", "10.1.1.2:7301", {}, clock())
    assert cluster.nodes["s1"].address == "10.1.1.2:7301"


# ---------------------------------------------------------------- bookkeeping


def test_event_ids_strictly_increase(clock: FakeClock) -> None:
    cluster = make(clock, nodes=3, fall=1)
    events = []
    for i in range(3):
        for _ in range(2):
            events += ok(cluster, clock, f"n{i}").events
        events += fail(cluster, clock, f"n{i}").events
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_take_dirty_returns_changed_nodes_once(clock: FakeClock) -> None:
    cluster = make(clock, nodes=2)
    assert cluster.take_dirty() == {"n0", "n1"}
    ok(cluster, clock, "n1")
    assert cluster.take_dirty() == {"n1"}
    assert cluster.take_dirty() == set()


def test_counts_sum_to_total(clock: FakeClock) -> None:
    cluster = make(clock, nodes=4, fall=1)
    healthy(cluster, clock, "n0", "n1")
    fail(cluster, clock, "n1")
    counts = cluster.counts()
    assert sum(counts[h.value] for h in Health) == counts["total"] == 4
    assert counts["schedulable"] == 1


def _partition_cluster(auto_approve: bool = False) -> tuple[Cluster, FakeClock]:
    clock = FakeClock()
    policy = Policy(healthy_interval=1.0, unhealthy_interval=0.25, fall=3, rise=2, jitter=0.0,
                    startup_grace=0.0, indirect_probes=0, guard_min_nodes=100,
                    auto_approve=auto_approve)
    cluster = Cluster(policy, now=clock())
    cluster.register(Registration("p1", "127.0.0.1:1", 1, 0, clock()), clock())
    return cluster, clock


def _report_ok(cluster: Cluster, clock: FakeClock, seq: int, samples: int) -> Outcome:
    report = Report(incarnation=1, seq=seq, ts=clock(), sample_interval=1.0, samples=samples)
    return cluster.observe(CheckResult("p1", True, clock(), report=report))


def _confirm_down(cluster: Cluster, clock: FakeClock) -> None:
    for _ in range(3):
        clock.advance(0.25)
        cluster.observe(CheckResult("p1", False, clock(), failure=FailureClass.TIMEOUT))
    assert cluster.nodes["p1"].health is Health.UNHEALTHY


def test_node_that_kept_sampling_while_confirmed_down_goes_to_review() -> None:
    cluster, clock = _partition_cluster()
    for i in range(1, 3):
        clock.advance(1)
        _report_ok(cluster, clock, seq=i, samples=i)
    _confirm_down(cluster, clock)
    clock.advance(60)
    # 60 more samples at 1 s: it ran through a minute nobody could see (window is 1.75 s).
    out = _report_ok(cluster, clock, seq=70, samples=62)
    assert cluster.nodes["p1"].admin is Admin.REVIEW
    [review] = [e for e in out.events if e.kind == "review"]
    assert "partition" in review.reason and review.evidence["ran_s"] == 60.0
    clock.advance(1)
    _report_ok(cluster, clock, seq=71, samples=63)
    assert cluster.nodes["p1"].health is Health.HEALTHY
    assert not cluster.nodes["p1"].schedulable


def test_frozen_node_that_resumes_recovers_without_review() -> None:
    cluster, clock = _partition_cluster()
    for i in range(1, 3):
        clock.advance(1)
        _report_ok(cluster, clock, seq=i, samples=i)
    _confirm_down(cluster, clock)
    clock.advance(60)
    _report_ok(cluster, clock, seq=3, samples=3)  # SIGSTOP then SIGCONT: one new sample
    clock.advance(1)
    _report_ok(cluster, clock, seq=4, samples=4)
    node = cluster.nodes["p1"]
    assert node.admin is Admin.ACTIVE and node.health is Health.HEALTHY and node.schedulable


def test_partition_review_respects_auto_approve() -> None:
    cluster, clock = _partition_cluster(auto_approve=True)
    clock.advance(1)
    _report_ok(cluster, clock, seq=1, samples=1)
    _confirm_down(cluster, clock)
    clock.advance(60)
    out = _report_ok(cluster, clock, seq=70, samples=61)
    assert cluster.nodes["p1"].admin is Admin.ACTIVE
    assert any(e.kind == "approved" and "auto-approved" in e.reason for e in out.events)


# ---------------------------------------------------------------------- the node table


def test_the_node_table_keeps_its_indexes_in_step_with_health() -> None:
    table = NodeTable([NodeState(node_id="a", address="a:1"),
                       NodeState(node_id="b", address="b:1")])
    a = table.nodes["a"]
    a.since = 10.0
    table.set_health(a, Health.UNHEALTHY)
    table.set_cleaned_up(a, True)
    assert table.unhealthy == {"a"} and table.out_count == 1
    table.set_health(a, Health.DEAD)
    assert table.dead_count == 1 and table.out_count == 0 and table.watched == 1
    table.drop("a")
    assert table.dead_count == 0 and table.ids() == ["b"]


def test_only_nodes_unhealthy_for_dead_after_are_due() -> None:
    table = NodeTable([NodeState(node_id="a", address="a:1"),
                       NodeState(node_id="b", address="b:1")])
    for node_id, since in (("a", 0.0), ("b", 50.0)):
        node = table.nodes[node_id]
        node.since = since
        table.set_health(node, Health.UNHEALTHY)
    table.nodes["b"].since = 51.0  # went down again: its first entry is stale
    assert [n.node_id for _, n in table.due_dead(100.0, dead_after=60.0)] == ["a"]
    assert list(table.due_dead(200.0, dead_after=60.0)) == []
