"""The coordinator's judgement of itself (coordinator/health.py), on plain inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nodewatch.coordinator.health import (
    LAG_FAILING_AFTER,
    LAG_FAILING_FACTOR,
    Signals,
    judge,
)

NOW = 1_700_000_000.0
CALM = Signals(now=NOW, grace_until=NOW - 1, watchable_nodes=3, polled_nodes=3)


@dataclass
class StoreHealth:
    """A stand-in for ``Coordinator.store_health`` (the store's failure handling)."""

    available: bool = True
    since: float | None = None
    cause: str = ""
    queued_events: int = 0
    dropped_events: int = 0
    writes_failed: int = 0


def test_all_well_is_ok_without_reasons() -> None:
    assert judge(CALM).status == "ok" and judge(CALM).reasons == []
    assert judge(replace(CALM, store=StoreHealth())).status == "ok"


def test_startup_grace_and_the_guard_are_degraded_with_until_and_since() -> None:
    health = judge(replace(CALM, grace_until=NOW + 30, guard_on=True, guard_since=NOW - 12))
    assert health.status == "degraded"
    assert health.reasons == ["in startup grace until 2023-11-14T22:13:50Z (30s left)",
                              "guard on since 2023-11-14T22:13:08Z (12s): failures are not "
                              "confirmed"]


def test_a_store_down_briefly_is_degraded_then_failing_after_store_timeout() -> None:
    down = StoreHealth(available=False, since=NOW - 1, cause="[Errno 28] No space left on device",
                       queued_events=4)
    brief = judge(replace(CALM, store=down, store_timeout=3.0))
    assert brief.status == "degraded"
    assert brief.reasons == ["store unavailable since 2023-11-14T22:13:19Z (1s): "
                             "[Errno 28] No space left on device (4 events queued)"]
    long = judge(replace(CALM, store=replace(down, since=NOW - 3, dropped_events=2)))
    assert long.status == "failing" and long.failing
    assert long.reasons[0].startswith("store unavailable since")
    assert long.reasons[0].endswith("(4 events queued, 2 events dropped)")
    # Down since an unknown time: nothing says it is brief.
    assert judge(replace(CALM, store=replace(down, since=None))).status == "failing"


def test_events_queued_for_an_available_store_are_degraded() -> None:
    health = judge(replace(CALM, store=StoreHealth(queued_events=7)))
    assert (health.status, health.reasons) == ("degraded", ["7 events queued for the store"])


def test_no_leader_is_an_election_at_first_then_failing() -> None:
    follower = replace(CALM, leads=False, elected=True, leader="", leader_ttl=5.0)
    electing = judge(replace(follower, leaderless_since=NOW - 2))
    assert electing.status == "degraded"
    assert electing.reasons == ["no leader since 2023-11-14T22:13:18Z (2s): election in progress"]
    nobody = judge(replace(follower, leaderless_since=NOW - 60))
    assert nobody.status == "failing"
    assert nobody.reasons == ["no leader since 2023-11-14T22:12:20Z (60s): nobody holds the "
                              "election lease"]
    # A follower of a known leader is fine, and without an election nobody campaigns.
    assert judge(replace(follower, leader="10.0.0.5:7300")).status == "ok"
    assert judge(replace(CALM, leads=False, elected=False)).status == "ok"


def test_an_unconfirmed_leader_is_no_leader_with_its_cause() -> None:
    cut_off = replace(CALM, leads=False, elected=True, leader="", leader_ttl=5.0,
                      unconfirmed_cause="etcd unreachable")
    early = judge(replace(cut_off, leaderless_since=NOW - 2))
    assert early.status == "degraded"
    assert early.reasons == ["no leader since 2023-11-14T22:13:18Z (2s): this coordinator's "
                             "leadership is unconfirmed (etcd unreachable)"]
    assert judge(replace(cut_off, leaderless_since=NOW - 60)).status == "failing"


def test_a_follower_is_not_judged_on_grace_guard_or_poller() -> None:
    follower = replace(CALM, leads=False, elected=True, leader="10.0.0.5:7300",
                       grace_until=NOW + 30, guard_on=True, polled_nodes=0)
    assert judge(follower).status == "ok"


def test_a_leader_watching_none_of_its_nodes_is_failing() -> None:
    health = judge(replace(CALM, polled_nodes=0, watchable_nodes=3))
    assert (health.status, health.reasons) == (
        "failing", ["poller watches 0 of 3 nodes while leading"])
    assert judge(replace(CALM, polled_nodes=0, watchable_nodes=0)).status == "ok"


def test_loop_lag_is_degraded_briefly_and_failing_when_bad_or_long() -> None:
    lagging = replace(CALM, loop_lag=1.5, max_loop_lag=1.0, lagging_since=NOW - 4)
    health = judge(lagging)
    assert health.status == "degraded"
    assert health.reasons == ["loop lag 1.50s over max_loop_lag 1s since 2023-11-14T22:13:16Z "
                              "(4s)"]
    assert judge(replace(lagging, loop_lag=LAG_FAILING_FACTOR * 1.0)).status == "failing"
    assert judge(replace(lagging, lagging_since=NOW - LAG_FAILING_AFTER)).status == "failing"
    assert judge(replace(CALM, loop_lag=1.0, max_loop_lag=1.0)).status == "ok"


def test_failing_lists_its_reasons_first_then_the_degraded_ones() -> None:
    health = judge(replace(CALM, grace_until=NOW + 10, polled_nodes=0,
                           store=StoreHealth(queued_events=1)))
    assert health.status == "failing"
    assert health.reasons == ["poller watches 0 of 3 nodes while leading",
                              "1 events queued for the store",
                              "in startup grace until 2023-11-14T22:13:30Z (10s left)"]


def test_a_sharing_coordinator_short_of_its_shares_is_degraded_then_failing() -> None:
    sharing = replace(CALM, sharing=True, shares_wanted=128, shares_held=128, leader_ttl=2.0,
                      polled_nodes=0)
    assert judge(sharing).status == "ok"  # polling none of the fleet is normal: its share
    taking = replace(sharing, shares_held=100, shares_short_since=NOW - 1)
    assert judge(taking).status == "degraded"
    assert "holds 100 of the 128 shares it wins" in judge(taking).reasons[0]
    stuck = replace(taking, shares_short_since=NOW - 10)
    assert judge(stuck).status == "failing"
    alone = replace(sharing, shares_wanted=0, shares_held=0, shares_short_since=NOW - 10)
    assert judge(alone).status == "failing"
    assert "not (yet) a member" in judge(alone).reasons[0]
