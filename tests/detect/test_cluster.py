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
