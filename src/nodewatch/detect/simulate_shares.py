"""Who watches which share when several coordinators share one etcd, for the simulator.

Plays the membership protocol of issue 17 around :mod:`nodewatch.detect.shares` on the virtual
clock: each coordinator's lease (``leader_ttl``, kept alive every third of it) carrying its
``members/<name>`` key and its ``shares/<k>`` claims (created only if absent), and the watches
that bring a change to the others ``watch_delay`` later. A kill or a join becomes a timeline of
watch starts and stops per share, decided before the run: nothing a node does changes who owns
what, so :func:`nodewatch.detect.simulate.simulate` applies the timeline as events.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from nodewatch.detect.shares import SHARES, Assignment, moved

__all__ = ["Handover", "WRITE_RTT", "coordinator_join", "coordinator_loss", "steady"]

WRITE_RTT = 0.002  # one etcd write (a transaction on a 3-member cluster on a LAN): one raft round


@dataclass(slots=True)
class Handover:
    """One membership change and what it did to the shares.

    ``changes`` are ``(at, share, coordinator)`` in time order, ``-1`` meaning that nobody
    watches the share from then on; ``intervals`` are every share's ``(coordinator, start,
    end)`` watches, from which the gaps and overlaps are measured rather than assumed.
    """

    names: tuple[str, ...]  # coordinator number -> name; a joining one is the last
    initial: tuple[int, ...]  # the watcher of each share at time 0
    event: str = ""  # "", "kill" or "join"
    event_at: float = math.inf
    victim: int = -1  # the killed coordinator
    lease_expired_at: float = math.nan  # kill: when etcd deleted the victim's keys
    changes: list[tuple[float, int, int]] = field(default_factory=list)
    moved: frozenset[int] = frozenset()
    intervals: dict[int, list[tuple[int, float, float]]] = field(default_factory=dict)

    @property
    def claimed_at(self) -> float:
        """When the last moved share was claimed by its new owner."""
        claims = [at for at, _, c in self.changes if c >= 0]
        return max(claims) if claims else math.nan

    def held(self, coordinator: int) -> int:
        return sum(1 for owner in self.initial if owner == coordinator)

    def unwatched_max(self, end: float) -> float:
        """The longest time a share (so each of its nodes) was watched by nobody, to ``end``."""
        longest = 0.0
        for k in range(len(self.initial)):
            covered = sorted(self.intervals.get(k, [(self.initial[k], 0.0, end)]),
                             key=lambda w: w[1])
            reach = 0.0
            for _, start, stop in covered:
                longest = max(longest, start - reach)
                reach = max(reach, stop)
            longest = max(longest, end - reach)
        return longest

    def doubly_watched_max(self) -> float:
        """The longest time two coordinators watched the same share at once."""
        longest = 0.0
        for watches in self.intervals.values():
            for a, (ca, sa, ea) in enumerate(watches):
                for cb, sb, eb in watches[a + 1:]:
                    if ca != cb:
                        longest = max(longest, min(ea, eb) - max(sa, sb))
        return longest


def _names(coordinators: int) -> tuple[str, ...]:
    if coordinators < 1:
        raise ValueError("coordinators must be at least 1")
    return tuple(f"c{j}" for j in range(coordinators))


def _numbers(names: tuple[str, ...], assignment: Assignment) -> tuple[int, ...]:
    number = {name: j for j, name in enumerate(names)}
    return tuple(number[owner] for owner in assignment.owners)


def _record(h: Handover, end: float) -> Handover:
    """Fill ``intervals`` from ``initial`` and ``changes``."""
    h.changes.sort()
    open_at = {k: (c, 0.0) for k, c in enumerate(h.initial)}
    for at, k, c in h.changes:
        if k in open_at:
            was, since = open_at.pop(k)
            h.intervals.setdefault(k, []).append((was, since, at))
        if c >= 0:
            open_at[k] = (c, at)
    for k in h.moved:
        if k in open_at:
            was, since = open_at.pop(k)
            h.intervals.setdefault(k, []).append((was, since, end))
    return h


def steady(coordinators: int, shares: int = SHARES) -> Handover:
    """Several coordinators and no change: every share watched by its owner all along."""
    names = _names(coordinators)
    return Handover(names, _numbers(names, Assignment.of(names, shares)))


def coordinator_loss(coordinators: int, at: float, ttl: float, watch_delay: float,
                     rng: random.Random, end: float, shares: int = SHARES) -> Handover:
    """One coordinator killed at ``at``: it stops watching at once; its lease expires ``ttl``
    after its last keepalive (every ``ttl / 3``, so ``2 ttl / 3`` to ``ttl`` after the kill);
    each survivor sees the deletes after its watch delay, recomputes the assignment and claims
    the shares it now wins (one write)."""
    if coordinators < 2:
        raise ValueError("coordinator-loss needs at least 2 coordinators (one to take over)")
    names = _names(coordinators)
    before = Assignment.of(names, shares)
    victim = rng.randrange(coordinators)
    period = ttl / 3.0
    phase = rng.uniform(0.0, period)  # when its keepalive loop began, modulo the period
    last_keepalive = phase + math.floor((at - phase) / period) * period
    expired = last_keepalive + ttl
    after = Assignment.of([n for j, n in enumerate(names) if j != victim], shares)
    gone = moved(before, after)
    seen = {j: expired + watch_delay * rng.uniform(0.5, 1.5) for j in range(coordinators)}
    h = Handover(names, _numbers(names, before), "kill", at, victim, expired, moved=gone)
    owner = _numbers(names, after) if after.members else ()
    for k in sorted(gone):
        h.changes.append((at, k, -1))
        h.changes.append((seen[owner[k]] + WRITE_RTT, k, owner[k]))
    return _record(h, end)


def coordinator_join(coordinators: int, at: float, watch_delay: float, rng: random.Random,
                     end: float, shares: int = SHARES) -> Handover:
    """One coordinator added at ``at`` to ``coordinators``: it registers its member key; each
    old owner of a share it now wins sees that, stops watching the share and releases it
    (its pending state and the delete in one write); the newcomer sees the delete and claims."""
    names = _names(coordinators + 1)
    newcomer = coordinators
    before = Assignment.of(names[:-1], shares)
    after = Assignment.of(names, shares)
    registered = at + 2 * WRITE_RTT  # a lease grant, then the member key on it
    seen = {j: registered + watch_delay * rng.uniform(0.5, 1.5) for j in range(coordinators)}
    old = _numbers(names, before)
    h = Handover(names, old, "join", at, moved=moved(before, after))
    for k in sorted(h.moved):
        stop = seen[old[k]]
        released = stop + WRITE_RTT
        h.changes.append((stop, k, -1))
        h.changes.append((released + watch_delay * rng.uniform(0.5, 1.5) + WRITE_RTT, k,
                          newcomer))
    return _record(h, end)
