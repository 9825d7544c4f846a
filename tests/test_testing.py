"""The public test helpers work as documented: an in-process cluster detects a stopped agent;
application backends fail at their rate behind a real haproxy, under a bounded load loop."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nodewatch.model import PeerVote
from nodewatch.testing import (
    ErrorBackends,
    EtcdCluster,
    FakeClock,
    FakeProbe,
    InProcessCluster,
    LoadLoop,
)
from tests.helpers import require_binary, wait_until
from tests.respond.servers import Haproxy, running


def test_fake_clock_only_moves_when_told() -> None:
    clock = FakeClock(100.0)
    assert clock() == 100.0
    assert clock.advance(2.5) == 102.5 and clock() == 102.5


async def test_fake_probe_answers_peer_probes_from_its_script_per_peer_and_target() -> None:
    probe = FakeProbe(FakeClock())
    probe.set_peer_vote("p1", "10.0.0.9:80", True)
    probe.set_peer_vote("p2", "10.0.0.9:80", False)
    assert await probe.peer_check("p1", "10.0.0.1:80", "10.0.0.9:80") == PeerVote("p1", True)
    vote = await probe.peer_check("p2", "10.0.0.2:80", "10.0.0.9:80")
    assert vote is not None and vote.reachable is False
    unscripted = await probe.peer_check("p1", "10.0.0.1:80", "10.0.0.8:80")
    assert unscripted is not None and unscripted.reachable is None  # never dials anything
    assert probe.peer_calls == [("p1", "10.0.0.9:80"), ("p2", "10.0.0.9:80"),
                                ("p1", "10.0.0.8:80")]


async def test_in_process_cluster_sees_nodes_healthy_then_a_stopped_one_unhealthy(
        tmp_path: Path) -> None:
    async with InProcessCluster(tmp_path, nodes=3) as cluster:
        await cluster.wait_for(lambda: all(cluster.health(f"node-{i}") == "healthy"
                                           for i in range(1, 4)))
        await cluster.agents["node-2"].stop()
        await cluster.wait_for(lambda: cluster.health("node-2") == "unhealthy")
        assert cluster.health("node-1") == "healthy"


def test_error_backends_behind_haproxy_answer_at_their_rates_and_the_load_stops_at_its_bound(
        tmp_path: Path) -> None:
    apps = ErrorBackends(["a", "b"]).start()
    apps.rates["b"] = 1.0
    lb = Haproxy(tmp_path / "haproxy", apps.addresses)
    with running(apps, lb.start()):
        load = LoadLoop(lb.url, rate=200.0, workers=2, max_requests=40, max_seconds=10.0)
        with load:
            wait_until(lambda: sum(load.statuses.values()) == 40, timeout=10.0,
                       message="40 answers")
        assert load.sent == 40
        assert dict(load.statuses) == {200: 20, 500: 20}  # round robin, b fails every one
        assert dict(apps.served) == {("a", 200): 20, ("b", 500): 20}


def test_a_three_member_etcd_cluster_takes_writes_and_leaves_nothing_behind() -> None:
    cluster = EtcdCluster(size=3, binary=require_binary("etcd"))
    with cluster:
        assert cluster.workdir is not None and len(cluster.endpoints) == 3
        workdir = cluster.workdir
        assert all(m.alive() for m in cluster.members)
        done = subprocess.run(
            [require_binary("etcdctl"), "--endpoints", ",".join(cluster.endpoints),
             "endpoint", "status", "--write-out", "simple"],
            capture_output=True, env={"ETCDCTL_API": "3"}, check=True, timeout=10)
        assert done.stdout.decode().count("\n") == 3  # one line per member, one cluster
        members = list(cluster.members)
    assert not any(m.alive() for m in members) and not workdir.exists()


def test_an_etcd_cluster_that_fails_to_start_stops_what_it_started(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")  # runs, never listens
    fake.chmod(0o755)
    cluster = EtcdCluster(size=2, binary=str(fake))
    with pytest.raises(RuntimeError, match="did not start"):
        cluster.start(wait=0.5)
    assert cluster.members and not any(m.alive() for m in cluster.members)
    assert cluster.workdir is not None and not cluster.workdir.exists()
