"""Self-check rules (``cpu_percent above 95 for 30s``): pure step functions of
(previous state, now, metrics), built once from config and composed in a list.

A rule fires when its condition has held for ``for`` seconds and clears only when it has been
false for ``for`` seconds too, so a value hovering at the threshold does not flap the status.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nodewatch.config import AgentRuleConfig, format_duration

__all__ = ["Rule", "RuleState", "build_rule", "build_rules", "evaluate_rules"]


@dataclass(frozen=True, slots=True)
class RuleState:
    """Where one rule stands: firing or not, and since when the condition disagrees."""

    firing: bool = False
    changing_since: float | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A built rule: ``step`` is the pure transition, ``reason`` what a firing rule reports."""

    reason: str
    step: Callable[[RuleState, float, Mapping[str, float]], RuleState]


def build_rule(cfg: AgentRuleConfig) -> Rule:
    """Decide once (metric, comparison, threshold) and return the specialised step."""
    if cfg.above is not None:
        compare, threshold, word = operator.gt, cfg.above, "above"
    elif cfg.below is not None:
        compare, threshold, word = operator.lt, cfg.below, "below"
    else:
        raise ValueError("a rule needs 'above' or 'below'")
    metric = cfg.metric
    hold = float(cfg.for_)
    reason = cfg.reason or f"{metric} {word} {threshold:g} for {format_duration(hold)}"

    def step(state: RuleState, now: float, metrics: Mapping[str, float]) -> RuleState:
        value = metrics.get(metric)
        # A metric nobody reported (an unset load.NAME) is not a breach.
        breached = value is not None and compare(value, threshold)
        if breached == state.firing:
            return state if state.changing_since is None else RuleState(state.firing, None)
        since = now if state.changing_since is None else state.changing_since
        if now - since >= hold:
            return RuleState(breached, None)
        return state if state.changing_since == since else RuleState(state.firing, since)

    return Rule(reason=reason, step=step)


def build_rules(configs: Sequence[AgentRuleConfig]) -> list[Rule]:
    return [build_rule(cfg) for cfg in configs]


def evaluate_rules(rules: Sequence[Rule], states: Sequence[RuleState], now: float,
                   metrics: Mapping[str, float]) -> tuple[list[RuleState], list[str]]:
    """Step every rule; return the new states and the reasons of the firing ones, in order."""
    new_states = [rule.step(state, now, metrics) for rule, state in zip(rules, states, strict=True)]
    reasons = [rule.reason for rule, state in zip(rules, new_states, strict=True) if state.firing]
    return new_states, reasons
