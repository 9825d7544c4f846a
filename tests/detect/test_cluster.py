"""The cluster facade's surface: a read-only view of the nodes and mirroring that keeps every
index right (the decisions themselves are pinned in test_machine.py)."""

from __future__ import annotations

import copy

import pytest

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.policy import Policy
from nodewatch.model import DrainState, Health, NodeState
from nodewatch.testing import FakeClock


def state(node_id: str, health: Health = Health.HEALTHY, cleaned_up: bool = False,
          since: float = 0.0) -> NodeState:
    return NodeState(node_id=node_id, address=f"{node_id}:7301", health=health,
                     cleaned_up=cleaned_up, since=since)


def test_the_view_reads_the_nodes_and_node_finds_one() -> None:
    clock = FakeClock()
    cluster = Cluster(Policy(), now=clock(), nodes=[state("a"), state("b")])
    assert sorted(cluster.nodes) == ["a", "b"]
    assert cluster.node("a") is cluster.nodes["a"]
    assert cluster.node("zz") is None
    assert cluster.nodes.get("zz") is None and "a" in cluster.nodes


def test_the_view_cannot_be_written_to() -> None:
    cluster = Cluster(Policy(), now=FakeClock()(), nodes=[state("a")])
    with pytest.raises(TypeError):
        cluster.nodes["b"] = state("b")  # type: ignore[index]
    assert not hasattr(cluster.nodes, "pop") and not hasattr(cluster.nodes, "clear")


def test_mirroring_replaces_and_deletes_nodes_keeping_the_indexes() -> None:
    clock = FakeClock()
    cluster = Cluster(Policy(), now=clock(), nodes=[state("a"), state("b"), state("c")])
    cluster.mirror([state("a", Health.UNHEALTHY, cleaned_up=True),
                    state("b", Health.DEAD, cleaned_up=True)], deleted=["c"])
    assert sorted(cluster.nodes) == ["a", "b"]
    assert cluster.table.unhealthy == {"a"}
    assert cluster.table.dead_count == 1
    assert cluster.table.out_count == 1  # a is out; dead b no longer counts
    assert cluster.table.watched == 1
    cluster.mirror([state("a")])
    assert cluster.table.unhealthy == set() and cluster.table.out_count == 0
    assert cluster.take_dirty() == set()  # a mirror is never written back


def test_a_reset_mirror_starts_over() -> None:
    clock = FakeClock()
    cluster = Cluster(Policy(), now=clock(), nodes=[state("a", Health.SUSPECT), state("b")])
    drained = state("c")
    drained.drain = DrainState(reason="maintenance", started=0.0, deadline=60.0)
    cluster.mirror([drained], reset=True)
    assert list(cluster.nodes) == ["c"]
    assert cluster.table.suspect_since == {}
    assert cluster.drains.waiting() == ["c"]
    assert cluster.counts()["total"] == 1


def test_a_mirrored_copy_becomes_leader_state_with_the_same_indexes_as_a_restore() -> None:
    clock = FakeClock()
    nodes = [state("a", Health.UNHEALTHY, since=5.0), state("b", Health.DEAD, cleaned_up=True),
             state("c", Health.SUSPECT)]
    restored = Cluster(Policy(), now=clock(), nodes=copy.deepcopy(nodes))
    mirrored = Cluster(Policy(), now=clock())
    mirrored.mirror(copy.deepcopy(nodes))
    for cluster in (restored, mirrored):
        assert cluster.table.unhealthy == {"a"}
        assert cluster.table.dead_count == 1 and cluster.table.out_count == 0
        assert set(cluster.table.suspect_since) == {"c"}
        assert dict(cluster.budget.held) == {"a": ""}


def test_with_a_scope_only_its_nodes_are_timed_out_and_others_writes_survive_a_mirror() -> None:
    clock = FakeClock()
    policy = Policy(dead_after=10.0)
    cluster = Cluster(policy, now=clock(), nodes=[state("mine", Health.UNHEALTHY, since=0.0),
                                                  state("theirs", Health.UNHEALTHY, since=0.0)])
    cluster.take_dirty()
    cluster.scope = lambda node_id: node_id == "mine"
    out = cluster.tick(clock.advance(60.0))
    assert ("mine", "dead") in [(e.node_id, e.kind) for e in out.events]
    assert [e for e in out.events if e.node_id == "theirs"] == []
    assert cluster.nodes["theirs"].health is Health.UNHEALTHY  # its owner decides
    # Another coordinator's node mirrored in keeps this core's pending writes of its own.
    cluster.mirror([state("theirs", Health.HEALTHY)], now=clock())
    assert cluster.take_dirty() == {"mine"}


def test_mirrored_suspects_count_for_the_guard_so_it_sees_the_whole_fleet() -> None:
    clock = FakeClock()
    policy = Policy(guard_min_nodes=4, guard_fraction=0.5)
    ids = [f"n{i}" for i in range(8)]
    cluster = Cluster(policy, now=clock(), nodes=[state(i) for i in ids])
    cluster.scope = lambda node_id: node_id in ("n0", "n1")
    # Four nodes of other coordinators went suspect, as their stored state says.
    cluster.mirror([state(i, Health.SUSPECT) for i in ids[4:]], now=clock())
    # The same state mirrored again (a routine rewrite) is no new entry, nor a lost one.
    cluster.mirror([state(i, Health.SUSPECT) for i in ids[4:]], now=clock.advance(1.0))
    assert len(cluster.guard.recent) == 4
    out = cluster.tick(clock())
    assert [e.kind for e in out.events] == ["guard_on"]
    assert out.events[0].evidence["suspect"] == 4
