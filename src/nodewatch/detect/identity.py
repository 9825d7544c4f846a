"""Node identity: whether a request for a node proves the node's credential, and the rate limit
on ``identity_rejected`` events (a flood of forged requests cannot fill the event log).

Pure: the edge hashes what a request presents (``protocol.credential_hash``) and mints new
credentials; the core only compares hashes (in constant time) and keeps what is stored.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from nodewatch.model import NodeState

__all__ = ["Credential", "Identity", "IdentityRejected", "REJECTED_EVENT_INTERVAL", "Verdict",
           "verify"]

# At most one identity_rejected event per node in this many seconds; the rest are counted in
# the next event's evidence ("suppressed").
REJECTED_EVENT_INTERVAL = 60.0

# new: no such node; valid / previous: proves the current (or, during a rotation, the previous)
# credential; open: the node has no credential on record (stored before credentials, a static
# node) and is accepted, then issued one; reenrol: the address an operator approved for a
# re-enrolment registers; revoked: the credential was revoked, the node re-enrols into review;
# rejected: anything else.
Verdict = Literal["new", "valid", "previous", "open", "reenrol", "revoked", "rejected"]


class IdentityRejected(Exception):
    """A request for an enrolled node without its credential: refused, nothing changed."""


@dataclass(frozen=True, slots=True)
class Credential:
    """What the coordinator keeps of a credential it issues: hashes, never the secret."""

    hash: str  # protocol.credential_hash(secret)
    udp_key: str  # protocol.node_heartbeat_key(secret), hex


def _same(presented: str, stored: str) -> bool:
    return bool(presented and stored) and hmac.compare_digest(presented, stored)


def verify(node: NodeState | None, presented: str, address: str = "", *,
           registering: bool = False, source: str = "") -> Verdict:
    """Judge the credential hash ``presented`` for ``node`` (``address``: the one a
    registration claims; ``source``: the address it came from)."""
    if node is None:
        return "new"
    if _same(presented, node.credential_hash):
        return "valid"
    if _same(presented, node.previous_hash):
        return "previous"
    if node.credential_hash:
        return "rejected"
    if node.reenrol_address:
        same_source = not node.reenrol_from or source == node.reenrol_from
        return ("reenrol" if registering and address == node.reenrol_address and same_source
                else "rejected")
    if node.revoked:
        return "revoked" if registering else "rejected"
    return "open"


class Identity:
    """The per-node rate limit on identity_rejected events."""

    def __init__(self, interval: float = REJECTED_EVENT_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def note_rejection(self, node_id: str, now: float) -> int | None:
        """One more rejection: None when its event is suppressed, else how many were
        suppressed since the last event (to report in this one)."""
        last = self._last.get(node_id)
        if last is not None and now - last < self.interval:
            self._suppressed[node_id] = self._suppressed.get(node_id, 0) + 1
            return None
        self._last[node_id] = now
        return self._suppressed.pop(node_id, 0)

    def suppressed(self, node_id: str) -> int:
        return self._suppressed.get(node_id, 0)

    def forget(self, node_id: str) -> None:
        self._last.pop(node_id, None)
        self._suppressed.pop(node_id, None)
