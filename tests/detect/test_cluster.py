"""The cluster facade's surface: a read-only view of the nodes and mirroring that keeps every
index right (the decisions themselves are pinned in test_machine.py)."""

from __future__ import annotations

import copy

import pytest

from nodewatch.detect.cluster import MANY_UNKNOWN, OVERLOAD_STRETCH, Cluster
from nodewatch.detect.policy import Policy
from nodewatch.model import (
    CheckResult,
    DrainState,
    FailureClass,
    Health,
    NodeState,
    NodeStatus,
    Report,
)
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


# ---------------------------------------------------------------------- the routine push


def push(node_id: str, at: float, seq: int, *, incarnation: int = 1,
         status: NodeStatus = NodeStatus.OK, reasons: tuple[str, ...] = (),
         load: dict[str, float] | None = None, samples: int = -1) -> CheckResult:
    return CheckResult(node_id=node_id, ok=True, at=at, source="push", report=Report(
        incarnation=incarnation, seq=seq, ts=at, status=status, reasons=reasons,
        system={"cpu_percent": float(seq)}, load=load or {}, sample_interval=5.0,
        samples=samples))


def pair(suspicion: str = "fixed") -> tuple[Cluster, Cluster]:
    """Two clusters fed alike: the second never takes the routine path."""
    policy = Policy(suspicion=suspicion, rise=1)
    fast = Cluster(policy, now=0.0, nodes=[state("a", Health.UNKNOWN)])
    full = Cluster(policy, now=0.0, nodes=[state("a", Health.UNKNOWN)])
    full.routine_push = lambda node, report, now: False  # type: ignore[method-assign]
    return fast, full


def feed(clusters: tuple[Cluster, Cluster], result: CheckResult) -> list[list[str]]:
    return [[e.kind for e in c.observe(result).events] for c in clusters]


@pytest.mark.parametrize("suspicion", ["fixed", "phi"])
def test_a_routine_push_changes_exactly_what_the_full_path_changes(suspicion: str) -> None:
    clusters = pair(suspicion)
    script = [
        push("a", 1.0, 1, samples=1),  # unknown -> healthy: the full path
        push("a", 4.5, 2, samples=1),  # routine
        push("a", 8.0, 3, samples=2, load={"qps": 50.0, "error_rate": 0.01}),  # routine
        push("a", 8.1, 3, samples=2),  # stale
        push("a", 11.5, 4, status=NodeStatus.DEGRADED, reasons=("disk",)),  # an event
        push("a", 15.0, 5, status=NodeStatus.DEGRADED, reasons=("disk",)),  # routine again
        push("a", 18.5, 6, status=NodeStatus.DEGRADED, reasons=("disk", "cpu")),  # reasons
        push("a", 22.0, 1, incarnation=2),  # a restart: the full path
        push("a", 25.5, 2, incarnation=2),
    ]
    taken: list[bool] = []
    routine = clusters[0].routine_push

    def counted(node: NodeState, report: Report, now: float) -> bool:
        taken.append(routine(node, report, now))
        return taken[-1]

    clusters[0].routine_push = counted  # type: ignore[method-assign]
    for result in script:
        kinds = feed(clusters, result)
        assert kinds[0] == kinds[1], result
        fast, full = (c.nodes["a"] for c in clusters)
        assert fast == full, result
        assert clusters[0].take_dirty() == clusters[1].take_dirty()
        assert clusters[0].poll_deadline("a") == clusters[1].poll_deadline("a")
    assert clusters[0].outliers.figures("a", 26.0) == clusters[1].outliers.figures("a", 26.0)
    assert taken.count(True) == 4  # the routine pushes of the script, and only those


def test_aroutine_push_is_stale_when_its_seq_is_not_newer() -> None:
    cluster = Cluster(Policy(rise=1), now=0.0, nodes=[state("a", Health.UNKNOWN)])
    cluster.observe(push("a", 1.0, 5))
    assert cluster.observe(push("a", 2.0, 5)).stale
    assert cluster.observe(push("a", 3.0, 4)).stale
    assert cluster.nodes["a"].seq == 5
    assert not cluster.observe(push("a", 4.0, 6)).stale and cluster.nodes["a"].seq == 6


def test_a_push_from_a_suspect_node_takes_the_full_path_and_recovers_it() -> None:
    cluster = Cluster(Policy(rise=1), now=0.0, nodes=[state("a", Health.UNKNOWN)])
    cluster.observe(push("a", 1.0, 1))
    failed = CheckResult(node_id="a", ok=False, at=2.0, failure=FailureClass.REFUSED,
                         detail="refused")
    assert [e.kind for e in cluster.observe(failed).events] == ["suspect"]
    assert [e.kind for e in cluster.observe(push("a", 3.0, 2)).events] == ["healthy"]
    assert cluster.nodes["a"].consecutive_failures == 0


def test_a_node_not_yet_healthy_waits_for_its_next_push_unless_in_doubt() -> None:
    policy = Policy(rise=2, healthy_interval=4.0, unhealthy_interval=0.5)
    few = Cluster(policy, now=0.0, nodes=[state("a", Health.UNKNOWN)])
    few.observe(push("a", 1.0, 1))
    assert few.poll_deadline("a") == policy.unhealthy_interval  # a new node: healthy soon
    fleet = [state(f"x{i}", Health.UNKNOWN) for i in range(MANY_UNKNOWN)]
    cluster = Cluster(policy, now=0.0, nodes=[state("a", Health.UNKNOWN),
                                              state("b", Health.UNKNOWN), *fleet])
    assert cluster.table.unknown_count == MANY_UNKNOWN + 2
    cluster.observe(push("a", 1.0, 1))
    assert cluster.nodes["a"].health is Health.UNKNOWN  # one success of two
    assert cluster.poll_deadline("a") == policy.healthy_interval
    cluster.observe(push("a", 4.5, 2))  # the next push, not a poll, makes it healthy
    assert cluster.nodes["a"].health is Health.HEALTHY
    cluster.observe(CheckResult(node_id="b", ok=False, at=1.0, failure=FailureClass.REFUSED))
    cluster.observe(push("b", 1.2, 1))
    assert cluster.nodes["b"].health is Health.SUSPECT  # in doubt: checked fast
    assert cluster.poll_deadline("b") == policy.unhealthy_interval
    assert cluster.poll_deadline("nobody") == policy.unhealthy_interval


@pytest.mark.parametrize("suspicion", ["fixed", "phi"])
def test_push_deadlines_stretch_while_the_coordinator_drops_heartbeats(suspicion: str) -> None:
    policy = Policy(suspicion=suspicion, rise=1, unhealthy_interval=0.5)
    cluster = Cluster(policy, now=0.0, nodes=[state("a", Health.UNKNOWN),
                                              state("b", Health.UNKNOWN)])
    for at, seq in ((1.0, 1), (4.5, 2), (8.0, 3)):
        cluster.observe(push("a", at, seq))
    cluster.observe(CheckResult(node_id="b", ok=False, at=8.0, failure=FailureClass.REFUSED))
    assert cluster.nodes["a"].health is Health.HEALTHY
    plain = cluster.poll_deadline("a")
    cluster.note_receive_drops(True)
    assert cluster.poll_deadline("a") == plain * OVERLOAD_STRETCH
    assert cluster.push_deadline(cluster.nodes["a"]) == plain * OVERLOAD_STRETCH
    # A node already in doubt is checked as fast as ever: only the wait for pushes grows.
    assert cluster.poll_deadline("b") == policy.unhealthy_interval
    cluster.note_receive_drops(False)
    assert cluster.poll_deadline("a") == plain
