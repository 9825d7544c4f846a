"""Several simulated coordinators: the etcd membership model and the takeover it drives."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from nodewatch.cli.commands import main
from nodewatch.detect.policy import Policy
from nodewatch.detect.shares import Assignment
from nodewatch.detect.simulate import SimResult, SimSettings, simulate, simulate_coordinators
from nodewatch.detect.simulate_shares import WRITE_RTT, coordinator_join, coordinator_loss

TTL = 5.0
FAST_PUSH = Policy(healthy_interval=4.0, unhealthy_interval=0.5, fall=2, down_interval=4.0)
FAST_PUSH_EDGE = {"heartbeat_interval": 3.5, "heartbeat_grace": 0.0, "timeout": 1.0,
                  "probe_timeout": 1.0}


DEFAULT = Policy()


def shared(scenario: str, policy: Policy = DEFAULT, nodes: int = 600, runs: int = 3,
           **kw: object) -> SimResult:
    return simulate_coordinators(SimSettings(policy=policy, nodes=nodes, duration=180.0,
                                             scenario=scenario, coordinators=3,
                                             **kw), runs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_a_killed_coordinators_lease_expires_within_its_ttl_and_only_its_shares_move(
        seed: int) -> None:
    h = coordinator_loss(4, at=100.0, ttl=TTL, watch_delay=0.005, rng=random.Random(seed),
                         end=200.0)
    names = [f"c{j}" for j in range(4)]
    before = Assignment.of(names)
    after = Assignment.of(n for j, n in enumerate(names) if j != h.victim)
    assert 2 * TTL / 3 <= h.lease_expired_at - h.event_at <= TTL
    assert h.moved == before.held_by(names[h.victim])
    for at, k, c in h.changes:
        if c >= 0:  # claimed by the share's new rendezvous owner, after the keys were deleted
            assert names[c] == after.owners[k] and at > h.lease_expired_at
        else:  # the dead one watches nothing from the kill on
            assert at == h.event_at
    assert h.doubly_watched_max() == 0.0
    assert h.unwatched_max(200.0) <= TTL + 0.0075 + WRITE_RTT


def test_a_join_moves_only_what_the_newcomer_wins_and_releases_before_claiming() -> None:
    h = coordinator_join(3, at=50.0, watch_delay=0.005, rng=random.Random(1), end=100.0)
    assert h.moved == Assignment.of(["c0", "c1", "c2", "c3"]).held_by("c3")
    assert 0 < len(h.moved) < 256 / 2
    for k in h.moved:
        (old, _, stop), (new, claim, _) = h.intervals[k]
        assert new == 3 and old != 3 and stop < claim  # never two at once
    assert h.doubly_watched_max() == 0.0
    assert h.unwatched_max(100.0) < 0.05  # a release, a watch delay, a claim


def test_a_lost_share_is_watched_again_within_leader_ttl_and_one_detection_window() -> None:
    result = shared("coordinator-loss", runs=4, crash_fraction=0.05)
    c = result.coordination
    bound = TTL + SimSettings(policy=Policy()).detection_window
    assert c["watched_again_after"]["n"] == 4 and c["watched_again_after"]["max"] <= bound
    assert c["unwatched_max"] <= TTL + 0.05 and c["doubly_watched_max"] == 0.0
    assert result.false_positives == 0
    # Every crashed node confirmed, once: no answer of the dead coordinator, no second owner.
    assert result.faults > 0 and result.detected == result.faults and result.missed == 0
    assert c["confirmations_max"] == 1
    assert c["detection_near"]["n"] > 0
    assert c["detection_near"]["max"] <= bound + Policy().fall_span


def test_pushing_agents_fail_over_and_their_deaths_are_confirmed_after_the_takeover() -> None:
    result = shared("coordinator-loss", policy=FAST_PUSH, crash_fraction=0.05, **FAST_PUSH_EDGE)
    c = result.coordination
    window = SimSettings(policy=FAST_PUSH).detection_window
    assert result.heartbeats > 0 and result.false_positives == 0
    assert result.detected == result.faults and c["confirmations_max"] == 1
    assert c["watched_again_after"]["max"] <= TTL + window
    assert c["detection_near"]["n"] > 0 and c["detection_near"]["max"] <= TTL + 2 * window


def test_agent_leases_restart_from_the_takeover_and_confirm_nobody_alive() -> None:
    # Silence of 2.5 heartbeats is a failure: the silence while nobody watched must not count.
    result = shared("coordinator-loss", policy=Policy(unhealthy_interval=1.0),
                    heartbeat_interval=1.0, timeout=1.0, probe_timeout=1.0)
    assert result.heartbeats > 0 and result.false_positives == 0
    assert result.detected == result.faults and result.coordination["confirmations_max"] == 1


@pytest.mark.parametrize("edge", [{}, FAST_PUSH_EDGE])
def test_a_coordinator_joining_confirms_nobody(edge: dict[str, float]) -> None:
    policy = FAST_PUSH if edge else Policy()
    result = shared("coordinator-join", policy=policy, **edge)
    c = result.coordination
    assert result.faults == 0 and result.false_positives == 0 and result.false_suspicions == 0
    assert "unhealthy" not in result.events and "suspect" not in result.events
    assert c["shares_moved"]["min"] > 0 and c["unwatched_max"] < 0.05
    assert c["doubly_watched_max"] == 0.0
    assert c["watched_again_after"]["max"] <= policy.unhealthy_interval + 0.1


def test_steady_coordinators_split_the_shares_and_detect_as_one() -> None:
    result = simulate(SimSettings(policy=Policy(), nodes=400, duration=400.0, scenario="crash",
                                  fraction=0.05, coordinators=4))
    c = result.coordination
    assert sum(c["shares_held"].values()) == 256 and len(c["shares_held"]) == 4
    assert c["unwatched_max"] == 0.0 and c["shares_moved"] == 0
    assert result.detected == result.faults == 20 and result.false_positives == 0


def test_one_coordinator_reports_no_coordination() -> None:
    result = simulate(SimSettings(policy=Policy(), nodes=100, duration=200.0))
    assert result.coordination == {} and "coordination" not in result.to_json()


def test_same_seed_same_takeover() -> None:
    a, b = shared("coordinator-loss", runs=2), shared("coordinator-loss", runs=2)
    assert a.coordination == b.coordination and a.detection == b.detection


def test_coordinator_loss_needs_someone_to_take_over() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        SimSettings(policy=Policy(), scenario="coordinator-loss", coordinators=1)


@pytest.mark.parametrize(("args", "message"), [
    (["--coordinators", "0"], "'--coordinators': 0 is not in the range"),
    (["--scenario", "coordinator-loss", "--coordinators", "1"], "at least 2"),
    (["--scenario", "gray", "--coordinators", "3"], "gray runs one coordinator"),
    (["--scenario", "coordinator-join", "--watch-delay", "soon"], "--watch-delay"),
])
def test_cli_refuses_bad_coordinator_values_as_usage_errors(args: list[str],
                                                            message: str) -> None:
    out = CliRunner().invoke(main, ["simulate", "--nodes", "50", *args])
    assert out.exit_code == 2 and message in out.output


def test_cli_prints_the_takeover_figures() -> None:
    out = CliRunner().invoke(main, ["simulate", "--nodes", "300", "--scenario",
                                    "coordinator-loss", "--runs", "2"])
    assert out.exit_code == 0, out.output
    for line in ("shares moved", "lease expired after the kill", "watched again after",
                 "watched by nobody", "deaths near the takeover", "deaths far from it",
                 "false confirmations"):
        assert line in out.output
    data = json.loads(CliRunner().invoke(main, [
        "simulate", "--nodes", "300", "--scenario", "coordinator-join", "--runs", "2",
        "--coordinators", "4", "--json"]).output)
    c = data["coordination"]
    assert c["coordinators"] == 4 and c["runs"] == 2 and len(c["per_run"]) == 2
    assert data["false_positives"] == 0 and data["simulated_s"] == 180.0
