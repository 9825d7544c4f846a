"""Which coordinator watches which node, when several share one store.

A node falls into one of a fixed number of *shares* by a hash of its id (never by who is
running, so a node's share never changes). Each share goes to one live coordinator by
rendezvous (highest random weight) hashing: every coordinator weighs every share and the
heaviest wins. Every coordinator computes the same table from the same member set, without
talking; and when a member comes or goes only the shares it wins or held move (about 1/N of
them), never a reshuffle. Pure: the edge (``coordinator/shares.py``) keeps the member set
from etcd and claims what this table says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Assignment", "SHARES", "moved", "share_of"]

SHARES = 256  # enough for an even spread over a few dozen coordinators; small to claim


@lru_cache(maxsize=1 << 18)
def share_of(node_id: str, shares: int = SHARES) -> int:
    """The node's share: a stable hash of its id, the same on every coordinator."""
    digest = hashlib.blake2b(node_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shares


def _weight(member: str, share: int) -> int:
    digest = hashlib.blake2b(f"{member}\x00{share}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _heaviest(members: frozenset[str], share: int) -> str:
    return max(members, key=lambda member: (_weight(member, share), member))


@dataclass(frozen=True, slots=True)
class Assignment:
    """The owner of every share for one set of members (``owners[k]``; "" with no member)."""

    members: frozenset[str]
    owners: tuple[str, ...]

    @classmethod
    def of(cls, members: Iterable[str], shares: int = SHARES) -> Assignment:
        live = frozenset(members)
        if not live:
            return cls(live, ("",) * shares)
        # Ties (equal 64-bit weights) go to the smaller name, so that the table is total.
        return cls(live, tuple(_heaviest(live, k) for k in range(shares)))

    @property
    def shares(self) -> int:
        return len(self.owners)

    def owner(self, node_id: str) -> str:
        return self.owners[share_of(node_id, self.shares)]

    def held_by(self, member: str) -> frozenset[int]:
        return frozenset(k for k, owner in enumerate(self.owners) if owner == member)

    def counts(self) -> dict[str, int]:
        """Shares per member (every member listed, also one that happens to win none)."""
        counts = dict.fromkeys(sorted(self.members), 0)
        for owner in self.owners:
            if owner:
                counts[owner] += 1
        return counts


def moved(before: Assignment, after: Assignment) -> frozenset[int]:
    """The shares whose owner differs between two assignments of the same size."""
    if before.shares != after.shares:
        raise ValueError(f"assignments of {before.shares} and {after.shares} shares")
    return frozenset(k for k, (a, b) in enumerate(zip(before.owners, after.owners, strict=True))
                     if a != b)
