"""Peer confirmation: healthy peers with an address are picked, probes are tracked per node,
and votes are tallied into reachable, peers unreachable, or confirm."""

from __future__ import annotations

import random

from nodewatch.detect.peers import PeerConfirmation
from nodewatch.detect.policy import Policy
from nodewatch.model import Health, NodeState, PeerVote


def table() -> dict[str, NodeState]:
    nodes = {f"n{i}": NodeState(node_id=f"n{i}", address=f"10.0.0.{i}:7301",
                                health=Health.HEALTHY) for i in range(6)}
    nodes["n0"].health = Health.SUSPECT
    nodes["n1"].health = Health.UNHEALTHY
    nodes["n2"].address = ""
    return nodes


def test_only_healthy_peers_with_an_address_are_picked_never_the_node_itself() -> None:
    peers = PeerConfirmation(Policy(indirect_probes=5), random.Random(1))
    nodes = table()
    picked = peers.pick(nodes["n0"], nodes, list(nodes))
    assert sorted(picked) == [(f"n{i}", f"10.0.0.{i}:7301") for i in (3, 4, 5)]


def test_no_peers_are_picked_when_indirect_probes_is_off() -> None:
    peers = PeerConfirmation(Policy(indirect_probes=0), random.Random(1))
    nodes = table()
    assert peers.pick(nodes["n0"], nodes, list(nodes)) == ()


def test_a_probe_is_finished_once_and_forgotten_probes_take_no_votes() -> None:
    peers = PeerConfirmation(Policy(), random.Random(1))
    peers.start("n0")
    assert peers.is_probing("n0") and peers.probing == {"n0"}
    assert peers.finish("n0")
    assert not peers.finish("n0")
    peers.start("n1")
    peers.forget("n1")
    assert not peers.finish("n1")


def test_votes_are_tallied() -> None:
    tally = PeerConfirmation.tally
    assert tally([PeerVote("a", False), PeerVote("b", True)]) == "reachable"
    assert tally([PeerVote("a", None), PeerVote("b", None)]) == "peers_unreachable"
    assert tally([PeerVote("a", False), PeerVote("b", None)]) == "confirm"
    assert tally([]) == "confirm"
    evidence = PeerConfirmation.evidence([PeerVote("b", True), PeerVote("a", True, "ok")])
    assert evidence["reachable_from"] == ["a", "b"]
