"""Peer confirmation (indirect probes): before a suspect node is confirmed, a few healthy peers
are asked whether they still reach it, and their votes are tallied."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from nodewatch.detect.policy import Policy
from nodewatch.model import Health, NodeState, PeerVote

__all__ = ["PeerConfirmation", "Verdict"]

Verdict = Literal["reachable", "peers_unreachable", "confirm"]


class PeerConfirmation:
    """Which nodes are being probed through peers, picking the peers, tallying the votes."""

    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self._probing: set[str] = set()

    @property
    def probing(self) -> frozenset[str]:
        return frozenset(self._probing)

    def is_probing(self, node_id: str) -> bool:
        return node_id in self._probing

    def start(self, node_id: str) -> None:
        self._probing.add(node_id)

    def finish(self, node_id: str) -> bool:
        """Votes arrived: the probe is over. False when none was asked for (or forgotten)."""
        if node_id not in self._probing:
            return False
        self._probing.discard(node_id)
        return True

    def forget(self, node_id: str) -> None:
        """The node answered, registered, changed health or is gone: its probe is moot."""
        self._probing.discard(node_id)

    def pick(self, node: NodeState, nodes: Mapping[str, NodeState],
             ids: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """Up to ``indirect_probes`` healthy peers with an address, ``ids`` being all node ids."""
        want = self.policy.indirect_probes
        if want <= 0:
            return ()
        chosen: dict[str, str] = {}
        # A bounded random sample instead of a scan: a confirmation must not cost O(cluster
        # size). Without replacement, so that a small cluster is searched completely.
        for index in self.rng.sample(range(len(ids)), min(len(ids), want * 8)):
            peer = nodes.get(ids[index])
            if (peer is not None and peer.health is Health.HEALTHY
                    and peer.node_id != node.node_id and peer.address):
                chosen[peer.node_id] = peer.address
                if len(chosen) >= want:
                    break
        return tuple(chosen.items())

    @staticmethod
    def tally(votes: Sequence[PeerVote]) -> Verdict:
        """A peer that still reaches the node holds it. If no asked peer could be reached
        either, the fault is as likely on the coordinator's side; peers that answered without
        a usable vote are ignored, and with no votes at all the node is confirmed."""
        if any(v.reachable for v in votes):
            return "reachable"
        if votes and all(v.reachable is None for v in votes):
            return "peers_unreachable"
        return "confirm"

    @staticmethod
    def evidence(votes: Sequence[PeerVote]) -> dict[str, Any]:
        return {
            "peers": [{"peer": v.peer_id, "reachable": v.reachable, "detail": v.detail}
                      for v in votes],
            "reachable_from": sorted(v.peer_id for v in votes if v.reachable),
        }
