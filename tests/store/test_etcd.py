"""etcd specifics beyond the contract: a 3-member cluster losing a member, leases, watches."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewatch.model import Event, Health, HistorySample, NodeState
from nodewatch.store.base import Fenced
from nodewatch.store.etcd import EtcdStore, WatchEvent
from nodewatch.testing import EtcdCluster
from tests.helpers import async_wait_until, require_binary


@pytest.fixture(scope="module")
def three_members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3, spread=True,
                     binary=binary) as cluster:
        yield cluster


def node(i: int, **fields: object) -> NodeState:
    return NodeState(f"web-{i:02d}", f"10.0.0.{i}:7301", health=Health.HEALTHY, **fields)  # type: ignore[arg-type]


async def test_store_rides_over_the_loss_of_one_member(three_members: EtcdCluster) -> None:
    url = three_members.url("/member-loss")
    assert url.count(",") == 2
    store = EtcdStore.from_url(url, timeout=3.0)
    await store.open()
    try:
        nodes = [node(i) for i in range(20)]
        assert await store.save_nodes(nodes) == []
        three_members.members[0].kill()  # maybe the raft leader, maybe the client's endpoint
        for round_ in range(1, 4):  # every call keeps working through the re-election
            for n in nodes:
                n.seq = round_
            assert await asyncio.wait_for(store.save_nodes(nodes), 15) == []
            await store.add_samples([HistorySample(n.node_id, float(round_), round_, "healthy",
                                                   {}, {}) for n in nodes])
        stored = await store.load_nodes()
        assert [n.seq for n in stored] == [3] * 20
        assert len(await store.history("web-07", 0.0)) == 3
    finally:
        await store.close()


async def test_a_lease_key_expires_by_itself_and_a_watch_sees_it(tmp_path: Path) -> None:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", binary=binary) as cluster:
        store = EtcdStore.from_url(cluster.url("/lease"))
        await store.open()
        try:
            lease = await store.grant(1)
            key = store.key("agents", "web-1")
            assert await store.create_with_lease(key, b"{}", lease)
            assert not await store.create_with_lease(key, b"{}", lease)
            _, revision = await store.list_raw("agents")
            seen: list[WatchEvent] = []

            async def watch() -> None:
                async for batch in store.watch("agents", revision + 1):
                    seen.extend(batch)

            watcher = asyncio.create_task(watch())
            try:
                await async_wait_until(
                    lambda: asyncio.sleep(0, [e for e in seen if e.kind == "delete"]),
                    within=10, message="the lease to expire")
            finally:
                watcher.cancel()
            assert seen[-1].key == "web-1"
            assert await store.get_raw(key) is None
        finally:
            await store.close()


async def test_keepalive_keeps_a_short_lease_alive(tmp_path: Path) -> None:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", binary=binary) as cluster:
        store = EtcdStore.from_url(cluster.url("/keepalive"))
        await store.open()
        try:
            lease = await store.grant(1)
            key = store.key("agents", "web-1")
            await store.create_with_lease(key, b"{}", lease)
            keepalive = store.keepalive(lease, 1)
            loop = asyncio.get_running_loop()
            until = loop.time() + 3.0  # three TTLs
            while loop.time() < until:
                assert await store.get_raw(key) is not None
                assert not keepalive.lost.is_set()
                await asyncio.sleep(0.2)
            await keepalive.stop(revoke=True)
            assert await store.get_raw(key) is None  # a revoked lease takes its keys along
        finally:
            await store.close()


async def test_keepalive_tells_an_expired_lease_from_an_unreachable_etcd(tmp_path: Path) -> None:
    """``expired``: etcd answered that the lease is gone; not set: etcd did not answer for a
    whole TTL (the leader then cannot know whether someone else took over)."""
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", binary=binary) as cluster:
        member = cluster.members[0]
        assert member.popen is not None
        store = EtcdStore.from_url(cluster.url("/keepalive-loss"), timeout=1.0)
        await store.open()
        try:
            assert store.client is not None and store.client.lease is not None
            revoked = store.keepalive(await store.grant(1), 1)
            await store.client.lease.revoke(revoked.lease_id, timeout=2.0)
            await asyncio.wait_for(revoked.lost.wait(), timeout=10)
            assert revoked.expired and "expired" in revoked.cause

            cut_off = store.keepalive(await store.grant(1), 1)
            member.popen.send_signal(signal.SIGSTOP)
            try:
                await asyncio.wait_for(cut_off.lost.wait(), timeout=10)
            finally:
                member.popen.send_signal(signal.SIGCONT)
            assert not cut_off.expired and "unreachable" in cut_off.cause
        finally:
            await store.close()


async def test_writes_under_a_fence_are_refused_once_its_key_left_the_lease(
        etcd_server: EtcdCluster) -> None:
    """A deposed decider's late write never lands: node and event writes carry the fence (the
    leader key, or a share's claim, on the writer's lease) as a compare."""
    store = EtcdStore.from_url(etcd_server.url("/fence"), timeout=3.0)
    await store.open()
    try:
        lease = await store.grant(30)
        key = store.key("election", "leader")
        assert await store.create_with_lease(key, b"me", lease)
        store.fence = lambda _node_id: (key, lease)
        nodes = [node(i) for i in range(200)]  # two transactions: 127 nodes and a fence each
        assert await store.save_nodes(nodes) == []
        await store.append_events([Event(f"e{i}", 1.0, n.node_id, "registered", "", "unknown",
                                         "x") for i, n in enumerate(nodes[:3])])
        assert all(n.revision > 0 for n in nodes)

        # Another coordinator won meanwhile: the key is on its lease now.
        await store.client.lease.revoke(lease)  # type: ignore[union-attr]
        other = await store.grant(30)
        assert await store.create_with_lease(key, b"other", other)
        before = {n.node_id: n.revision for n in await store.load_nodes()}
        for n in nodes:
            n.seq = 7
        with pytest.raises(Fenced, match="no longer holds .*election/leader"):
            await store.save_nodes(nodes)
        with pytest.raises(Fenced):
            await store.save_nodes(nodes[:1])  # node by node too (the compare fails alone)
        with pytest.raises(Fenced):
            await store.append_events([Event("late", 2.0, "web-01", "unhealthy", "healthy",
                                             "unhealthy", "x")])
        with pytest.raises(Fenced):
            await store.delete_node("web-01")
        stored = await store.load_nodes()
        assert {n.node_id: n.revision for n in stored} == before
        assert all(n.seq == 0 for n in stored)
        assert [e.id for e in await store.events_after(None)] == ["e0", "e1", "e2"]

        store.fence = lambda _node_id: (key, other)  # the new holder writes as usual
        for n in nodes:
            n.revision = before[n.node_id]
        assert await store.save_nodes(nodes) == []
        assert {n.seq for n in await store.load_nodes()} == {7}
        assert await store.delete_node("web-01")
        assert await store.get_node("web-01") is None
    finally:
        await store.close()


def test_fenced_groups_keep_every_transaction_within_etcds_compare_limit() -> None:
    store = EtcdStore(["127.0.0.1:1"], "/groups")  # never opened: grouping only
    ids = [f"n{i}" for i in range(1000)]
    store.fence = lambda node_id: (f"share/{int(node_id[1:]) % 37}".encode(), 7)
    groups = store._fenced_groups(ids, ids)
    assert sorted(i for g in groups for i in g.items) == sorted(ids)
    for g in groups:
        assert len(g.items) + len(g.fences) <= 128
        assert len(set(g.fences)) == len(g.fences)
        assert {f for f in g.own} <= set(g.fences)
        assert all(store.fence(i) == f for i, f in zip(g.items, g.own, strict=True))
    assert len(groups) <= 10  # 1000 nodes and 37 fences: not one transaction per share
    store.fence = lambda _node_id: (b"leader", 7)
    assert [len(g.items) for g in store._fenced_groups(ids, ids)] == [127] * 7 + [111]
    store.fence = None
    assert [len(g.items) for g in store._fenced_groups(ids, ids)] == [128] * 7 + [104]
