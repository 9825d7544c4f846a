"""The outlier rule (gray failures) through the cluster facade, on a fake clock: ejection with
its figures, hysteresis both ways, the growing back-off, the per-group cap, the group-rise
hold, the volume threshold, the guard, the budget and dry_run."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.outcome import Outcome
from nodewatch.detect.policy import Policy
from nodewatch.model import CallerObservation, CheckResult, Event, Health, NodeState, Report
from nodewatch.testing import FakeClock

FAST = Policy(base_ejection_time=10.0, max_ejection_time=100.0, startup_grace=0.0,
              max_rate=1000.0, max_fraction=1.0)


class Fleet:
    """A healthy cluster whose nodes report business load each second."""

    def __init__(self, n: int, policy: Policy = FAST, labels: dict[str, dict[str, str]] | None
                 = None) -> None:
        self.clock = FakeClock()
        self.ids = [f"n{i}" for i in range(n)]
        self.cluster = Cluster(policy, now=self.clock(), nodes=[
            NodeState(node_id=i, address=f"10.0.0.{k}:7301", health=Health.HEALTHY,
                      incarnation=1, labels=(labels or {}).get(i, {}))
            for k, i in enumerate(self.ids)])
        self.cluster.restart_grace(self.clock() - 1000.0)
        self.seq = 0
        self.events: list[Event] = []
        self.load: dict[str, dict[str, float]] = {i: {"error_rate": 0.002} for i in self.ids}

    def report(self, node_id: str) -> Outcome:
        self.seq += 1
        return self.cluster.observe(CheckResult(node_id, True, self.clock(), 0.001, report=Report(
            1, self.seq, self.clock(), load=dict(self.load[node_id])), source="push"))

    def run(self, seconds: float, step: float = 0.5) -> list[Event]:
        """Every node reports and the cluster ticks, every ``step`` seconds."""
        start = len(self.events)
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            for node_id in self.ids:
                self.events += self.report(node_id).events
            self.events += self.cluster.tick(self.clock()).events
        return self.events[start:]

    def node(self, node_id: str) -> NodeState:
        node = self.cluster.node(node_id)
        assert node is not None
        return node


def kinds(events: list[Event], *wanted: str) -> list[tuple[str, str]]:
    return [(e.kind, e.node_id) for e in events if e.kind in wanted]


def test_the_ten_agent_story_ejects_the_node_at_40_percent_within_seconds() -> None:
    fleet = Fleet(10, Policy())  # the defaults
    fleet.load["n3"] = {"error_rate": 0.4}
    events = fleet.run(4.0)
    [event] = [e for e in events if e.kind == "outlier"]
    node = fleet.node("n3")
    assert event.node_id == "n3" and event.ts - 1_000_000.0 <= 3.0
    assert "errors 40 % vs group median 0.2 % over 5s, 1 observer (agent)" in event.reason
    assert node.health is Health.HEALTHY and not node.schedulable
    assert node.outlier is not None and node.outlier.ejections == 1
    assert node.outlier.until == event.ts + 30.0  # base_ejection_time x 1
    assert node.to_json()["outlier"]["reason"] == event.reason
    assert any(r.startswith("outlier: errors 40 %") for r in node.to_json()["reasons"])
    assert [a.kind for a in fleet.cluster.due_actions()] == ["outlier"]
    assert all(fleet.node(i).schedulable for i in fleet.ids if i != "n3")


def test_a_normal_fleet_with_noise_never_ejects_anyone() -> None:
    import random

    rng = random.Random(7)
    fleet = Fleet(20, Policy())
    events: list[Event] = []
    for _ in range(120):
        for node_id in fleet.ids:
            fleet.load[node_id] = {"qps": rng.uniform(20, 200),
                                   "error_rate": max(0.0, rng.gauss(0.002, 0.002)),
                                   "latency_p99_ms": rng.uniform(20, 60)}
        events += fleet.run(1.0)
    assert kinds(events, "outlier", "outlier_held", "outlier_hold") == []


def test_hysteresis_in_a_short_burst_is_not_an_ejection() -> None:
    fleet = Fleet(10)
    fleet.load["n1"] = {"error_rate": 0.5}
    fleet.run(1.5)  # under eject_after (2 s)
    fleet.load["n1"] = {"error_rate": 0.002}
    assert kinds(fleet.run(10.0), "outlier") == []


def test_hysteresis_out_it_returns_only_after_its_backoff_and_once_back_in_line() -> None:
    fleet = Fleet(10)
    fleet.load["n1"] = {"error_rate": 0.5}
    fleet.run(3.0)
    state = fleet.node("n1").outlier
    assert state is not None
    fleet.run(state.until - fleet.clock() + 5.0)  # the back-off is over, the figures are not
    assert fleet.node("n1").outlier is not None
    fleet.load["n1"] = {"error_rate": 0.002}
    back = fleet.run(2.0)
    assert kinds(back, "outlier_cleared") == []  # in line for less than clear_after (3 s)
    back = fleet.run(2.0)
    [cleared] = [e for e in back if e.kind == "outlier_cleared"]
    assert "errors 0.2 % vs group median 0.2 %" in cleared.reason
    assert fleet.node("n1").schedulable and fleet.node("n1").ejections == 1
    assert [a.kind for a in fleet.cluster.due_actions()] == ["outlier", "outlier_cleared"]


def test_the_backoff_grows_with_repeated_ejections_and_is_capped() -> None:
    fleet = Fleet(10, replace(FAST, max_ejection_time=25.0))
    fleet.load["n1"] = {"error_rate": 0.5}
    lengths = []
    for _ in range(4):
        fleet.run(3.0)
        state = fleet.node("n1").outlier
        assert state is not None
        lengths.append(state.until - state.since)
        fleet.load["n1"] = {"error_rate": 0.002}
        fleet.run(state.until - fleet.clock() + 4.0)
        assert fleet.node("n1").outlier is None
        fleet.load["n1"] = {"error_rate": 0.5}
    assert lengths == [10.0, 20.0, 25.0, 25.0]


def test_without_enough_volume_nobody_is_judged() -> None:
    fleet = Fleet(10)
    for node_id in fleet.ids:
        fleet.load[node_id] = {"qps": 2.0, "error_rate": 0.002}  # 10 requests per 5 s window
    fleet.load["n1"] = {"qps": 2.0, "error_rate": 0.5}
    assert kinds(fleet.run(10.0), "outlier") == []
    fleet.load["n1"] = {"qps": 50.0, "error_rate": 0.5}  # enough volume, but alone: the
    assert kinds(fleet.run(10.0), "outlier") == []  # group has < min_nodes judged nodes
    for node_id in fleet.ids[2:]:
        fleet.load[node_id] = {"qps": 50.0, "error_rate": 0.002}
    assert kinds(fleet.run(4.0), "outlier") == [("outlier", "n1")]


def test_at_most_max_ejection_fraction_of_a_group_and_at_least_one() -> None:
    fleet = Fleet(10)
    fleet.load["n1"] = {"error_rate": 0.5}
    fleet.load["n2"] = {"error_rate": 0.4}
    events = fleet.run(4.0)
    assert kinds(events, "outlier") == [("outlier", "n1")]  # 10 % of 10: one, the worst
    [held] = [e for e in events if e.kind == "outlier_held"]
    assert held.node_id == "n2" and "max_ejection_fraction (1 of 10 nodes" in held.reason
    assert fleet.node("n2").schedulable


def test_groups_by_label_each_compared_with_its_own_median() -> None:
    labels = {f"n{i}": {"zone": "a" if i < 6 else "b"} for i in range(12)}
    fleet = Fleet(12, replace(FAST, outlier_group_by="zone"), labels)
    for i in range(6, 12):
        fleet.load[f"n{i}"] = {"error_rate": 0.1}  # zone b runs at 10 %: normal for it
    fleet.load["n1"] = {"error_rate": 0.1}  # 10 % in zone a (median 0.2 %) is an outlier
    events = fleet.run(4.0)
    [event] = [e for e in events if e.kind == "outlier"]
    assert event.node_id == "n1" and event.evidence["group"] == "zone=a"


def test_when_the_whole_group_rises_together_nobody_is_taken_out_and_an_event_says_why() -> None:
    fleet = Fleet(10)
    for node_id in fleet.ids[:4]:  # 4 of 10 rise at once: past group_rise_fraction (0.3)
        fleet.load[node_id] = {"error_rate": 0.3}
    events = fleet.run(6.0)
    assert kinds(events, "outlier") == []
    [hold] = [e for e in events if e.kind == "outlier_hold"]
    assert hold.node_id == "" and "4 of 10 nodes' errors rose together" in hold.reason
    for node_id in fleet.ids:  # everyone: the median itself rises, nobody is far from it
        fleet.load[node_id] = {"error_rate": 0.3}
    events = fleet.run(6.0)
    assert kinds(events, "outlier") == [] and kinds(events, "outlier_hold_off")


def test_observers_take_out_a_node_whose_agent_reports_nothing_wrong() -> None:
    fleet = Fleet(10)
    for _ in range(8):
        fleet.clock.advance(0.5)
        unknown = fleet.cluster.observe_callers("lb-1", [
            CallerObservation(i, 100.0, 40.0 if i == "n4" else 0.0) for i in fleet.ids]
            + [CallerObservation("ghost", 1.0, 0.0)], fleet.clock())
        assert unknown == ["ghost"]
        fleet.run(0.5)
    [event] = [e for e in fleet.events if e.kind == "outlier"]
    # The callers saw enough: their view is the node's figures (the agent's 0.2 % is not
    # added to the very requests they counted).
    assert event.node_id == "n4" and event.reason.endswith("40 % vs group median 0 % over 5s, "
                                                           "1 observer (lb-1)")
    assert event.evidence["sources"] == ["lb-1"]


def test_latency_outliers_are_ejected_too() -> None:
    fleet = Fleet(10)
    for node_id in fleet.ids:
        fleet.load[node_id] = {"error_rate": 0.002, "latency_p99_ms": 40.0}
    fleet.load["n5"] = {"error_rate": 0.002, "latency_p99_ms": 900.0}
    [event] = [e for e in fleet.run(4.0) if e.kind == "outlier"]
    assert event.node_id == "n5" and "latency p99 900 ms vs group median 40 ms" in event.reason


def test_ejections_draw_from_the_disruption_budget() -> None:
    fleet = Fleet(10, replace(FAST, max_fraction=0.1, indirect_probes=0))
    fleet.load["n1"] = {"error_rate": 0.5}
    fleet.run(4.0)
    assert fleet.node("n1").outlier is not None
    # The budget (10 % of 10) is spent by the outlier: a failed node's cleanup waits.
    for _ in range(4):
        fleet.clock.advance(6.0)
        fleet.events += fleet.cluster.observe(CheckResult("n7", False, fleet.clock(), 1.0)).events
    assert [e.reason for e in fleet.events if e.kind == "held"] == [
        "held: budget (1 of 10 nodes already out)"]


def test_no_ejection_while_the_budget_or_the_guard_holds() -> None:
    fleet = Fleet(10, replace(FAST, max_rate=1.0))
    fleet.cluster.budget.note_ejection(fleet.clock())  # the rate is spent
    fleet.load["n1"] = {"error_rate": 0.5}
    events = fleet.run(4.0)
    assert kinds(events, "outlier") == []
    [held] = [e for e in events if e.kind == "outlier_held"]
    assert held.reason.startswith("held: budget (rate 1/min reached)")


def test_dry_run_records_the_verdict_but_the_node_stays_schedulable() -> None:
    fleet = Fleet(10, replace(FAST, dry_run=True))
    fleet.load["n1"] = {"error_rate": 0.5}
    [event] = [e for e in fleet.run(4.0) if e.kind == "outlier"]
    node = fleet.node("n1")
    assert event.reason.startswith("dry run: would eject: errors 50 %")
    assert event.evidence["dry_run"] is True
    assert node.outlier is not None and node.outlier.dry_run and node.schedulable
    assert fleet.cluster.outliers.ejected_count == 0  # nothing drawn from the budget


def test_disabled_it_judges_nothing() -> None:
    fleet = Fleet(10, replace(FAST, outliers=False))
    fleet.load["n1"] = {"error_rate": 0.9}
    assert kinds(fleet.run(5.0), "outlier") == [] and not fleet.cluster.outliers.active


def test_an_ejection_survives_a_restart_through_the_node_state() -> None:
    fleet = Fleet(10)
    fleet.load["n1"] = {"error_rate": 0.5}
    fleet.run(4.0)
    nodes = [fleet.node(i) for i in fleet.ids]
    restarted = Cluster(FAST, now=fleet.clock(), nodes=nodes)
    assert restarted.outliers.ejected_count == 1 and not restarted.nodes["n1"].schedulable
    out: dict[str, Any] = restarted.nodes["n1"].to_json()["outlier"]
    assert out["ejections"] == 1 and out["until"] > fleet.clock()


class SharedFleet:
    """One outlier group split over two coordinators' cores, each with its own nodes, that
    tell each other their part of the group every step (what coordinator/shares.py carries
    through etcd)."""

    def __init__(self, parts: tuple[int, int], policy: Policy) -> None:
        self.one, self.two = Fleet(parts[0], policy), Fleet(parts[1], policy)
        self.two.ids = [f"m{i}" for i in range(parts[1])]
        self.two.cluster = Cluster(policy, now=self.two.clock(), nodes=[
            NodeState(node_id=i, address=f"10.0.1.{k}:7301", health=Health.HEALTHY,
                      incarnation=1) for k, i in enumerate(self.two.ids)])
        self.two.cluster.restart_grace(self.two.clock() - 1000.0)
        self.two.load = {i: {"error_rate": 0.002} for i in self.two.ids}
        for fleet in (self.one, self.two):
            fleet.cluster.share_groups({})

    def run(self, seconds: float, step: float = 0.5) -> list[Event]:
        events: list[Event] = []
        for _ in range(round(seconds / step)):
            events += self.one.run(step, step) + self.two.run(step, step)
            self.one.cluster.share_groups({"two": dict(self.two.cluster.outliers.summaries)})
            self.two.cluster.share_groups({"one": dict(self.one.cluster.outliers.summaries)})
        return events


def test_a_group_split_over_coordinators_is_judged_against_its_whole_median() -> None:
    policy = replace(FAST, outlier_min_nodes=6)
    fleet = SharedFleet((4, 4), policy)  # neither part alone has the six nodes to judge
    alone = Fleet(4, policy)
    alone.load["n1"] = {"error_rate": 0.5}
    assert kinds(alone.run(6.0), "outlier") == []
    fleet.one.load["n1"] = {"error_rate": 0.5}
    events = fleet.run(6.0)
    assert kinds(events, "outlier") == [("outlier", "n1")]
    [ejected] = [e for e in events if e.kind == "outlier"]
    assert ejected.evidence["judged_nodes"] == 4  # its own part; the centre is the group's
    assert ejected.evidence["group_median"] == pytest.approx(0.002, rel=0.05)


def test_max_ejection_fraction_holds_over_the_whole_group_not_per_coordinator() -> None:
    fleet = SharedFleet((5, 5), FAST)  # 10 % of 10 nodes: one may be out, fleet-wide
    fleet.one.load["n1"] = {"error_rate": 0.4}
    fleet.two.load["m1"] = {"error_rate": 0.5}  # the worse one, on the other coordinator
    events = fleet.run(8.0)
    assert kinds(events, "outlier") == [("outlier", "m1")]
    reasons = [e.reason for e in events if e.kind == "outlier_held" and e.node_id == "n1"]
    assert reasons and any("max_ejection_fraction (1 of 10 nodes" in r for r in reasons)
    assert fleet.one.node("n1").schedulable


def test_a_group_summary_survives_its_json_and_refuses_nonsense() -> None:
    from nodewatch.detect.groups import (
        LATENCY_EDGES,
        RATE_EDGES,
        GroupSummary,
        histogram,
        merged_median,
    )

    part = GroupSummary(3, 2, 3, 1, 1, histogram([0.0, 0.01], RATE_EDGES),
                        histogram([], LATENCY_EDGES), 0.3)
    assert GroupSummary.from_json(part.to_json()) == part
    assert merged_median([part.rates], RATE_EDGES) == pytest.approx(0.005, rel=0.05)
    with pytest.raises(ValueError, match="out of range"):
        GroupSummary.from_json({**part.to_json(), "rates": {"9999": 1}})
    with pytest.raises(ValueError, match="negative"):
        GroupSummary.from_json({**part.to_json(), "out": -1})
