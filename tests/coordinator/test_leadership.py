"""Losing the leader lease because etcd is unreachable, against a real etcd.

The rule (``coordinator/leadership.py``): a leader whose lease could not be refreshed for a
whole TTL is *leader, unconfirmed*: it keeps polling and observing, queues transitions and
their actions, writes nothing, runs nothing and refuses commands. When etcd answers it is
confirmed only if it wins the election key again with the term stamp unchanged (nobody else
led meanwhile): it then writes what it queued and runs the held actions, once. If another
coordinator won meanwhile it becomes a follower and drops what it held.

etcd is made unreachable by SIGSTOP (one coordinator) or by cutting a relay in front of one
coordinator only (two coordinators). Waits are conditions bounded at ten times what is
expected, never fixed sleeps.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from nodewatch.config import Config, load_config
from nodewatch.coordinator.leadership import Leadership
from nodewatch.coordinator.service import Coordinator, NotLeader
from nodewatch.model import Event, FailureClass, Health
from nodewatch.store.etcd import EtcdStore
from nodewatch.testing import EtcdCluster, FakeProbe, free_port
from tests.coordinator.support import RecordingActions, eventually
from tests.relay import Relay

TTL = 1.0
BOUND = 10 * TTL + 10  # ten times the expected lease loss and recovery, plus store timeouts
NODES = ("n1", "n2", "n3")
UNCONFIRMED = "leader (unconfirmed)"

pytestmark = pytest.mark.slow


def config(tmp_path: Path, listen: str) -> Config:
    path = tmp_path / f"{listen.replace(':', '_')}.toml"
    path.write_text(f"""
[coordinator]
listen = "{listen}"
leader_ttl = "1s"

[detection]
healthy_interval = "200ms"
unhealthy_interval = "100ms"
timeout = "100ms"
connect_timeout = "100ms"
fall = 3
rise = 1
startup_grace = "0s"

[guard]
min_nodes = 10
indirect_probes = 0

[budget]
max_fraction = 1.0
""" + "".join(f'\n[[nodes]]\nid = "{n}"\naddress = "127.0.0.1:{i + 1}"\n'
              for i, n in enumerate(NODES)))
    return load_config(path)


def coordinator(tmp_path: Path, endpoint: str, prefix: str,
                listen: str) -> tuple[Coordinator, FakeProbe, RecordingActions]:
    store = EtcdStore([endpoint], prefix, timeout=1.0)
    probe, sink = FakeProbe(time.time), RecordingActions()
    coord = Coordinator(config(tmp_path, listen), store, probe=probe, actions=sink,
                        leadership=Leadership(store, listen, ttl=TTL))
    return coord, probe, sink


def health(coord: Coordinator, node_id: str) -> Health | None:
    node = coord.cluster.nodes.get(node_id)
    return None if node is None else node.health


async def stored(endpoint: str, prefix: str) -> tuple[dict[str, Health], list[Event]]:
    async with EtcdStore([endpoint], prefix) as store:
        nodes = {n.node_id: n.health for n in await store.load_nodes()}
        return nodes, await store.events_after(None, 1000)


async def test_single_leader_keeps_watching_while_etcd_hangs_and_acts_once_after(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    member = etcd.members[0]
    assert member.popen is not None
    coord, probe, sink = coordinator(tmp_path, member.endpoint, "/hang", "127.0.0.1:7001")
    await coord.start()
    stopped = False
    try:
        await eventually(lambda: coord.role == "leader"
                               and all(health(coord, n) is Health.HEALTHY for n in NODES),
                         within=BOUND, message="leader, three healthy nodes")
        await coord.persist()

        member.popen.send_signal(signal.SIGSTOP)
        stopped = True
        await eventually(lambda: coord.role == UNCONFIRMED, within=BOUND,
                         message="the lease is lost: leader, unconfirmed")
        assert coord.status()["leader"] == ""
        assert "etcd unreachable" in coord.unconfirmed_cause
        # /healthz says so: no confirmed leader, with the cause (failing after leader_ttl).
        judged = coord.health()
        assert judged.status in ("degraded", "failing")
        assert any("leadership is unconfirmed" in reason for reason in judged.reasons)
        assert coord.poller.stats()["nodes"] == len(NODES)  # still watching every node
        with pytest.raises(NotLeader, match="unconfirmed.*etcd unreachable"):
            await coord.command("drain", "n1", "maintenance")

        # A node dies meanwhile: detected from memory, its cleanup held.
        probe.set("n2", FailureClass.REFUSED)
        await eventually(lambda: health(coord, "n2") is Health.UNHEALTHY, within=BOUND,
                         message="n2 confirmed unhealthy in memory")
        checks = coord.checks
        await eventually(lambda: coord.checks >= checks + 10, within=BOUND,
                         message="the poller keeps checking")
        assert coord.role == UNCONFIRMED
        assert sink.submitted == [], "an unconfirmed leader ran an action"

        member.popen.send_signal(signal.SIGCONT)
        stopped = False
        await eventually(lambda: coord.role == "leader", within=BOUND,
                         message="etcd answers: leader again")
        await eventually(lambda: "unhealthy:n2" in sink.submitted, within=BOUND,
                         message="the held cleanup runs")
        nodes, events = await stored(member.endpoint, "/hang")
        assert nodes["n2"] is Health.UNHEALTHY
        kinds = [e.kind for e in events if e.node_id == "n2"]
        assert kinds[-2:] == ["suspect", "unhealthy"] and kinds.count("unhealthy") == 1
        checks = coord.checks
        await eventually(lambda: coord.checks >= checks + 10, within=BOUND,
                         message="the poller keeps checking")
        assert sink.submitted == ["unhealthy:n2"], "the held action ran more than once"
        assert (await coord.command("drain", "n1", "maintenance")).events  # commands again
    finally:
        if stopped:
            member.popen.send_signal(signal.SIGCONT)
        await coord.stop()


async def test_cut_off_leader_becomes_a_follower_and_runs_nothing_it_held(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    member = etcd.members[0]
    relay = Relay(("127.0.0.1", free_port()), (member.host, member.client_port)).start()
    one, probe_one, sink_one = coordinator(tmp_path, relay.address, "/cut", "127.0.0.1:7001")
    two, _, sink_two = coordinator(tmp_path, member.endpoint, "/cut", "127.0.0.1:7002")
    await one.start()
    try:
        await eventually(lambda: one.role == "leader"
                               and all(health(one, n) is Health.HEALTHY for n in NODES),
                         within=BOUND, message="first coordinator leads")
        await one.persist()
        await two.start()
        await eventually(lambda: two.role == "follower" and two.leader == "127.0.0.1:7001",
                         within=BOUND, message="second coordinator follows")

        relay.cut()  # only the first coordinator loses etcd
        probe_one.set("n2", FailureClass.REFUSED)  # and only it sees n2 fail
        await eventually(lambda: one.role == UNCONFIRMED, within=BOUND,
                         message="the cut-off leader is unconfirmed")
        await eventually(lambda: two.role == "leader", within=BOUND,
                         message="the other coordinator wins the lease")
        await eventually(lambda: health(one, "n2") is Health.UNHEALTHY, within=BOUND,
                         message="the cut-off leader confirms n2 in memory")
        assert sink_one.submitted == []

        relay.restore()
        await eventually(lambda: one.role == "follower" and one.leader == "127.0.0.1:7002",
                         within=BOUND, message="etcd answers: another leads, so a follower")
        assert two.role == "leader"
        await eventually(lambda: health(one, "n2") is Health.HEALTHY, within=BOUND,
                         message="the follower mirrors the new leader's view")
        nodes, events = await stored(member.endpoint, "/cut")
        assert nodes["n2"] is Health.HEALTHY
        assert not [e for e in events if e.node_id == "n2" and e.kind == "unhealthy"]
        assert sink_one.submitted == [], "the cut-off leader ran what it had held"
        assert sink_two.submitted == []
    finally:
        await one.stop()
        await two.stop()
        relay.stop()
