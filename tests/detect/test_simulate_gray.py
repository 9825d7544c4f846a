"""The gray-failure simulation drives the real facade: a gray node is taken out within the
goal, a fleet whose errors rise together loses nobody, and bad settings are refused."""

from __future__ import annotations

import pytest

from nodewatch.detect.simulate_gray import GraySettings, simulate_gray


def test_gray_one_node_in_100_at_20_percent_is_unschedulable_within_7s() -> None:
    result = simulate_gray(GraySettings(scenario="gray", runs=3, seed=3))
    assert result.detected == 3 and result.missed == 0 and result.false_positives == 0
    assert max(result.detection) <= 7.0
    assert result.to_json()["profile"]["panorama_s"] == 7.0


def test_fleet_errors_the_whole_fleet_rising_together_ejects_nobody() -> None:
    result = simulate_gray(GraySettings(scenario="fleet-errors", runs=3, seed=3))
    assert result.false_positives == 0 and result.events.get("outlier", 0) == 0


def test_unknown_scenarios_and_tiny_fleets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        GraySettings(scenario="crash")
    with pytest.raises(ValueError, match="at least 2 nodes"):
        GraySettings(nodes=1)
