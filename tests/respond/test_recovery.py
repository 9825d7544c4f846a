"""Registration decisions when the poller sees a restarted node before its registration."""

from __future__ import annotations

import random

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.policy import Policy
from nodewatch.model import CheckResult, Registration, Report
from nodewatch.testing import FakeClock

POLICY = Policy(startup_grace=0.0, jitter=0.0, indirect_probes=0, guard_min_nodes=100,
                max_rejoins=1)


def poll(cluster: Cluster, clock: FakeClock, incarnation: int, seq: int) -> None:
    cluster.observe(CheckResult(node_id="n", ok=True, at=clock(),
                                report=Report(incarnation=incarnation, seq=seq, ts=clock())))


def register(cluster: Cluster, clock: FakeClock, incarnation: int, last_seq: int,
             last_ts: float) -> str:
    decision, _ = cluster.register(Registration("n", "127.0.0.1:1", incarnation, last_seq,
                                                last_ts), clock())
    return decision


def test_restart_polled_before_it_registers_still_rejoins(clock: FakeClock) -> None:
    cluster = Cluster(POLICY, now=clock(), rng=random.Random(1))
    assert register(cluster, clock, 1, 0, 0.0) == "new"
    for seq in range(1, 4):
        clock.advance(0.5)
        poll(cluster, clock, 1, seq)
    last_ts = clock()
    # Crash and restart: the new process answers a poll (incarnation 2, seq past the
    # reservation) before its registration, which carries the seq it had before the crash.
    clock.advance(0.5)
    poll(cluster, clock, 2, 103)
    assert register(cluster, clock, 2, 100, last_ts) == "rejoin"
    assert cluster.nodes["n"].rejoins, "the restart counts towards max_rejoins"
    clock.advance(0.5)
    poll(cluster, clock, 2, 104)
    # The next restart within the hour, again seen by a poll first, is flapping.
    clock.advance(0.5)
    poll(cluster, clock, 3, 205)
    assert register(cluster, clock, 3, 200, clock() - 0.5) == "review"


def test_same_process_registering_again_is_not_taken_for_a_restart(clock: FakeClock) -> None:
    cluster = Cluster(POLICY, now=clock(), rng=random.Random(1))
    register(cluster, clock, 1, 0, 0.0)
    clock.advance(0.5)
    poll(cluster, clock, 1, 5)
    assert register(cluster, clock, 1, 5, clock()) == "rejoin"
    assert not cluster.nodes["n"].rejoins
