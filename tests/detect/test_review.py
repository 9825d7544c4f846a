"""Review decisions: a node that comes back rejoins on its own or waits for an operator."""

from __future__ import annotations

from nodewatch.detect.policy import Policy
from nodewatch.detect.review import Review
from nodewatch.model import Health, NodeState, Registration, Report
from nodewatch.testing import FakeClock

POLICY = Policy(healthy_interval=10.0, unhealthy_interval=2.0, fall=3, max_rejoins=2)


def stored(**fields: object) -> NodeState:
    node = NodeState(node_id="n0", address="10.0.0.1:7301", incarnation=1, seq=5,
                     last_ts=1000.0)
    for name, value in fields.items():
        setattr(node, name, value)
    return node


def reg(incarnation: int, last_seq: int, last_ts: float) -> Registration:
    return Registration(node_id="n0", address="10.0.0.1:7301", incarnation=incarnation,
                        last_seq=last_seq, last_ts=last_ts)


def test_a_restart_within_the_window_rejoins() -> None:
    decision, reason, evidence = Review(POLICY).judge(stored(), reg(2, 5, 1005.0), 1005.0)
    assert (decision, reason) == ("rejoin", "restart within the detection window")
    assert evidence["unobserved_s"] == 5.0


def test_a_lost_incarnation_goes_to_review() -> None:
    decision, reason, _ = Review(POLICY).judge(stored(incarnation=3), reg(2, 9, 1005.0), 1005.0)
    assert decision == "review" and "incarnation went back" in reason


def test_a_node_down_longer_than_the_window_goes_to_review() -> None:
    node = stored(health=Health.UNHEALTHY)
    decision, reason, _ = Review(POLICY).judge(node, reg(2, 5, 1100.0), 1100.0)
    assert decision == "review" and "while thought down" in reason


def test_restarts_beyond_max_rejoins_within_the_hour_go_to_review() -> None:
    clock, review, node = FakeClock(), Review(POLICY), stored()
    for _ in range(2):
        review.count_restart(node, clock())
        clock.advance(60.0)
    decision, reason, _ = review.judge(node, reg(2, 5, 1005.0), clock())
    assert decision == "review" and reason.startswith("flapping: 3 restarts")
    clock.advance(3600.0)
    assert review.judge(node, reg(2, 5, 1005.0), clock())[0] == "rejoin"


def test_a_down_node_that_kept_sampling_longer_than_the_window_ran_unobserved() -> None:
    review, node = Review(POLICY), stored()
    assert review.unobserved_run(node, Report(1, 6, 1001.0, samples=10,
                                              sample_interval=1.0)) is None
    node.health = Health.UNHEALTHY
    found = review.unobserved_run(node, Report(1, 7, 1100.0, samples=60, sample_interval=1.0))
    assert found is not None
    reason, evidence = found
    assert "a partition" in reason and evidence["ran_s"] == 50.0


def test_a_registration_is_judged_against_the_state_before_a_polled_restart() -> None:
    review, node = Review(POLICY), stored()
    review.note_report(node, Report(2, 0, 1010.0))
    node.incarnation, node.seq, node.last_ts = 2, 0, 1010.0  # what the poll applied
    review.restore_before_restart(node, reg(2, 0, 1010.0))
    assert (node.incarnation, node.seq, node.last_ts) == (1, 5, 1000.0)


def test_the_coordinators_own_downtime_is_not_the_nodes_unobserved_run() -> None:
    # Stored at 1000 (the coordinator's last write before it died); it started observing again
    # at 1080; the agent restarted meanwhile and last sampled at 1082: 2 s unobserved, not 82.
    decision, _, evidence = Review(POLICY).judge(stored(health=Health.HEALTHY),
                                                 reg(2, 5, 1082.0), 1083.0,
                                                 observing_since=1080.0)
    assert decision == "rejoin"
    assert evidence["unobserved_s"] == 2.0 and evidence["observing_since"] == 1080.0
    # Running unobserved for longer than a window after the coordinator was back still counts.
    decision, _, _ = Review(POLICY).judge(stored(health=Health.HEALTHY), reg(2, 5, 1120.0),
                                          1121.0, observing_since=1080.0)
    assert decision == "review"


def test_a_node_thought_down_is_judged_on_the_whole_gap_even_across_a_restart() -> None:
    decision, reason, _ = Review(POLICY).judge(stored(health=Health.UNHEALTHY),
                                               reg(2, 5, 1082.0), 1083.0, observing_since=1080.0)
    assert decision == "review" and "while thought down" in reason
