"""The coordinator's judgement of itself (coordinator/health.py), on plain inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nodewatch.coordinator.health import (
    FLAP_MEMORY,
    LAG_FAILING_AFTER,
    LAG_FAILING_FACTOR,
    OutageClock,
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


# ---------------------------------------------------------------------- the outage clock


def test_an_outage_begins_at_its_first_failure_and_its_retries_back_off_to_the_cap() -> None:
    clock = OutageClock(first_backoff=0.5, max_backoff=4.0)
    assert clock.since is None and not clock.waiting(NOW)
    assert clock.failed(NOW) is True
    assert clock.since == NOW and clock.retry_at == NOW + 0.5
    assert clock.waiting(NOW + 0.4) and not clock.waiting(NOW + 0.5)
    pauses = []
    for step in range(1, 6):
        at = NOW + step
        assert clock.failed(at) is False  # the same outage goes on
        pauses.append(clock.retry_at - at)
    assert pauses == [1.0, 2.0, 4.0, 4.0, 4.0] and clock.since == NOW
    assert clock.recovered(NOW + 9) == NOW
    assert clock.since is None and not clock.waiting(NOW + 9)
    assert clock.recovered(NOW + 10) is None  # already available: nothing ended


def test_a_store_failing_again_soon_after_it_recovered_continues_the_same_outage() -> None:
    """A full disk takes a node's state rewritten in place and refuses new history: each
    brief success must not restart the outage, or it would never be judged failing."""
    clock = OutageClock(first_backoff=0.5, max_backoff=10.0)
    clock.failed(NOW)
    clock.failed(NOW + 0.5)  # backoff now 2 s
    assert clock.recovered(NOW + 1.0) == NOW
    assert clock.failed(NOW + 1.0 + FLAP_MEMORY - 1) is True  # resumed: logged again
    assert clock.since == NOW
    assert clock.retry_at == NOW + FLAP_MEMORY + 2.0  # the backoff went on growing
    health = judge(replace(CALM, now=NOW + FLAP_MEMORY, store_timeout=3.0,
                           store=StoreHealth(available=False, since=clock.since)))
    assert health.status == "failing"


def test_a_store_up_for_the_flap_memory_starts_a_new_outage_with_a_fresh_backoff() -> None:
    clock = OutageClock(first_backoff=0.5, max_backoff=10.0)
    for step in range(4):
        clock.failed(NOW + step)
    clock.recovered(NOW + 4)
    later = NOW + 4 + FLAP_MEMORY
    assert clock.failed(later) is True
    assert clock.since == later and clock.retry_at == later + 0.5
