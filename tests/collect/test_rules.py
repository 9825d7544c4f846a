"""Self-check rules: pure steps on a fake clock, firing and clearing with hysteresis, and the
agent's status following them when driven by a fake sampler."""

from __future__ import annotations

from nodewatch.collect.rules import RuleState, build_rule, build_rules, evaluate_rules
from nodewatch.config import AgentRuleConfig, Duration
from nodewatch.model import NodeStatus
from nodewatch.testing import FakeClock
from tests.collect.conftest import AgentFactory, FakeSampler


def cpu_rule(hold: float = 30.0) -> AgentRuleConfig:
    return AgentRuleConfig(metric="cpu_percent", above=95.0, for_=Duration(hold))


def drive(clock: FakeClock, values: list[float], step: float = 5.0,
          hold: float = 30.0) -> list[bool]:
    rule = build_rule(cpu_rule(hold))
    state = RuleState()
    firing = []
    for value in values:
        state = rule.step(state, clock(), {"cpu_percent": value})
        firing.append(state.firing)
        clock.advance(step)
    return firing


def test_rule_fires_only_after_holding_for_the_whole_window(clock: FakeClock) -> None:
    # t = 0, 5, ..., 30: breached from t=0, so it fires at t=30 and not before.
    assert drive(clock, [99.0] * 8) == [False] * 6 + [True, True]


def test_a_dip_restarts_the_window(clock: FakeClock) -> None:
    firing = drive(clock, [99.0] * 5 + [50.0] + [99.0] * 7)
    assert firing[:12] == [False] * 12
    assert firing[12] is True


def test_rule_clears_only_after_staying_clear_for_the_window(clock: FakeClock) -> None:
    firing = drive(clock, [99.0] * 7 + [10.0] * 8)
    assert firing[6] is True
    assert firing[7:13] == [True] * 6  # clear for 0..25 s: still firing
    assert firing[13] is False  # clear for 30 s


def test_a_spike_while_clearing_keeps_it_firing(clock: FakeClock) -> None:
    firing = drive(clock, [99.0] * 7 + [10.0] * 3 + [99.0] + [10.0] * 7)
    assert all(firing[6:17])  # the clear window restarts after the spike at index 10
    assert firing[17] is False


def test_below_rules_and_unreported_load_metrics(clock: FakeClock) -> None:
    rule = build_rule(AgentRuleConfig(metric="load.qps", below=1.0, for_=Duration(0.0)))
    assert not rule.step(RuleState(), clock(), {}).firing  # nobody reported qps: no breach
    assert rule.step(RuleState(), clock(), {"load.qps": 0.5}).firing
    assert rule.reason == "load.qps below 1 for 0s"


def test_evaluate_rules_reports_reasons_in_config_order(clock: FakeClock) -> None:
    rules = build_rules([
        AgentRuleConfig(metric="cpu_percent", above=95.0, for_=Duration(0.0)),
        AgentRuleConfig(metric="mem_percent", above=95.0, for_=Duration(0.0), reason="memory"),
    ])
    states, reasons = evaluate_rules(rules, [RuleState(), RuleState()], clock(),
                                     {"cpu_percent": 99.0, "mem_percent": 99.0})
    assert reasons == ["cpu_percent above 95 for 30s".replace("30s", "0s"), "memory"]
    assert all(state.firing for state in states)


async def test_agent_degrades_and_recovers_with_rule_hysteresis(
        make_agent: AgentFactory, sampler: FakeSampler, clock: FakeClock) -> None:
    agent = await make_agent()
    assert agent.status is NodeStatus.OK
    sampler.set(cpu_percent=99.0)
    for _ in range(6):  # t = 5 .. 30 after the first sample at t = 0 (which was at 10 %)
        clock.advance(5)
        await agent.sample_now()
    assert agent.status is NodeStatus.OK  # breached since t=5 only: 25 s so far
    clock.advance(5)
    seq_before = agent.seq
    await agent.sample_now()
    assert agent.status is NodeStatus.DEGRADED
    assert agent.reasons == ["cpu_percent above 95 for 30s"]
    assert agent.health()["status"] == "degraded" and agent.seq == seq_before + 1
    sampler.set(cpu_percent=20.0)
    for _ in range(6):
        clock.advance(5)
        await agent.sample_now()
    assert agent.status is NodeStatus.DEGRADED  # clear for 25 s only
    clock.advance(5)
    await agent.sample_now()
    assert agent.status is NodeStatus.OK and agent.reasons == []


async def test_manual_draining_wins_over_a_firing_rule(
        make_agent: AgentFactory, sampler: FakeSampler, clock: FakeClock) -> None:
    agent = await make_agent(config=None)
    sampler.set(mem_percent=99.0)
    for _ in range(8):
        clock.advance(5)
        await agent.sample_now()
    assert agent.status is NodeStatus.DEGRADED
    await agent.set_status("draining", "maintenance")
    assert agent.status is NodeStatus.DRAINING
    assert agent.reasons == ["maintenance", "mem_percent above 95 for 30s"]
    await agent.set_status("ok")
    assert agent.status is NodeStatus.DEGRADED
