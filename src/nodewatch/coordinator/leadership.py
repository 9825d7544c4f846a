"""Several coordinators on one etcd store: leader election on a lease, the follower's mirror of
the store, and the leader's watch of agent liveness keys. The coordinator edge, never the core.

The leader holds ``P/election/leader`` on a lease kept alive about every TTL/3; it polls,
confirms failures, runs actions and writes node state. Followers serve reads and the API from
a mirror of the store that they keep by watch, and campaign as soon as the leader's key is
deleted (its lease expired or was revoked), so a dead leader is replaced within one TTL; the new
leader reloads everything from the store and starts with ``restart_grace``.

Every win also stamps ``P/election-term`` in the same transaction; its mod revision is the term.

Losing the lease, two cases, kept apart:

- **etcd answered that the lease expired** (a refresh returned TTL <= 0), or a campaign finds
  another coordinator's key: step down, a follower (decisions not stored yet are dropped; the
  next leader decides from the store).
- **etcd did not answer for a whole TTL** (refreshes time out or fail): the coordinator is
  *leader, unconfirmed*. It keeps polling and observing from memory, computes transitions and
  queues them (and their actions) without writing or acting, and refuses commands (503 naming
  the cause). It campaigns again as soon as etcd answers: it is confirmed only if it wins the
  key again **and** the term stamp is still its own (nobody else won meanwhile, checked in the
  same transaction); it then writes what it queued, in order, and runs the held actions. If
  another coordinator holds the key or won a term meanwhile, it becomes a follower and drops
  what it held. An unconfirmed leader never acts: while etcd is unreachable from it, another
  coordinator that reaches etcd may win once our lease's TTL has run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
from etcd3aio import EtcdError

from nodewatch.model import Event, NodeState
from nodewatch.protocol import AgentLease
from nodewatch.store.codec import decode_event, decode_node
from nodewatch.store.etcd import EtcdStore, WatchEvent

__all__ = ["Leadership", "Led"]

log = logging.getLogger("nodewatch.leader")

ELECTION = "election"
ELECTION_TERM = "election-term"  # stamped by every win: its mod revision is the term
AGENTS = "agents"
RETRY = 0.5


class Led(Protocol):
    """What the election drives: the coordinator."""

    async def become_leader(self) -> None: ...

    async def become_follower(self, leader: str) -> None: ...

    async def become_unconfirmed(self, cause: str) -> None: ...

    async def confirm_leader(self) -> None: ...

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None: ...

    def mirror_events(self, events: list[Event]) -> None: ...

    def agent_published(self, lease: AgentLease) -> None: ...

    def agent_lease_expired(self, node_id: str) -> None: ...


class Leadership:
    """Campaigns for the coordinator ``identity`` (its API address) until stopped."""

    def __init__(self, store: EtcdStore, identity: str, ttl: float = 5.0) -> None:
        self.store = store
        self.identity = identity
        self.ttl = max(1, math.ceil(ttl))
        self.leading = False
        self.leader = ""
        self._task: asyncio.Task[None] | None = None
        self._lease: int | None = None

    def start(self, led: Led) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(led),
                                                            name="nodewatch-election")

    async def stop(self) -> None:
        """Step down: revoking the lease deletes the key, so a follower takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lease is not None:
            with contextlib.suppress(Exception):
                assert self.store.client is not None and self.store.client.lease is not None
                await self.store.client.lease.revoke(self._lease, timeout=2.0, max_attempts=1)
            self._lease = None

    async def _run(self, led: Led) -> None:
        key = self.store.key(ELECTION, "leader")
        term_key = self.store.key(ELECTION_TERM)
        while True:
            try:
                lease = await self.store.grant(self.ttl)
                won = await self.store.campaign(key, self.identity.encode(), lease, term_key,
                                                None)
                if won.won:
                    await self._lead(led, key, term_key, lease, won.term)
                else:
                    assert self.store.client is not None and self.store.client.lease is not None
                    await self.store.client.lease.revoke(lease, timeout=self.store.timeout)
                    await self._follow(led, key)
            except asyncio.CancelledError:
                raise
            except (EtcdError, LookupError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("election: %s; retrying", error)
                await asyncio.sleep(RETRY)

    async def _lead(self, led: Led, key: bytes, term_key: bytes, lease: int,
                    term: int) -> None:
        """Lead until the lease is lost. Lost because etcd said so (expired): step down.
        Lost because etcd did not answer for a TTL: leader, unconfirmed (see ``_reconfirm``);
        confirmed again, lead on under the new lease; otherwise step down."""
        agents: asyncio.Task[None] | None = None
        keepalive = self.store.keepalive(lease, self.ttl)
        self._hold(key, lease)
        log.info("leader: %s (lease %x, ttl %ss)", self.identity, lease, self.ttl)
        try:
            await led.become_leader()
            agents = asyncio.get_running_loop().create_task(self._watch_agents(led))
            while True:
                await keepalive.lost.wait()
                await keepalive.stop(revoke=False)
                self.leading, self._lease = False, None
                if keepalive.expired:
                    log.error("leader lease lost (%s): stepping down", keepalive.cause)
                    break
                log.error("leader lease lost (%s): leader, unconfirmed; holding actions and "
                          "writes until etcd answers", keepalive.cause)
                await led.become_unconfirmed(keepalive.cause)
                regained = await self._reconfirm(key, term_key, lease, term)
                if regained is None:
                    break
                lease, term = regained
                keepalive = self.store.keepalive(lease, self.ttl)
                self._hold(key, lease)
                log.info("leader again: %s (lease %x), nobody led meanwhile", self.identity,
                         lease)
                await led.confirm_leader()
        finally:
            await keepalive.stop(revoke=False)
            self.leading, self._lease = False, None
            if agents is not None:
                agents.cancel()
        if self.leader == self.identity:
            self.leader = ""
        await led.become_follower(self.leader)

    def _hold(self, key: bytes, lease: int) -> None:
        self._lease = lease
        # Every node and event write is conditional on the leader key being on this lease:
        # one sent while leading and delivered after the lease was lost is refused.
        fence = (key, lease)
        self.store.fence = lambda _node_id: fence
        self.leading, self.leader = True, self.identity

    async def _reconfirm(self, key: bytes, term_key: bytes, old_lease: int,
                         term: int) -> tuple[int, int] | None:
        """Campaign until etcd answers. Won, with the term stamp unchanged since our own win
        (nobody else led in between): the new (lease, term). Our old key still there on the
        old lease (etcd had not expired it yet): revoke it and campaign again. Anyone else
        holding the key, or a newer term: None (the caller becomes a follower)."""
        assert self.store.client is not None and self.store.client.lease is not None
        leases = self.store.client.lease
        while True:
            try:
                lease = await self.store.grant(self.ttl)
            except (EtcdError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("etcd still unreachable (%s); retrying", error)
                await asyncio.sleep(RETRY)
                continue
            try:
                result = await self.store.campaign(key, self.identity.encode(), lease,
                                                   term_key, term)
            except (EtcdError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("campaign failed (%s); retrying", error)
                await asyncio.sleep(RETRY)
                continue
            if result.won:
                return lease, result.term
            with contextlib.suppress(Exception):
                await leases.revoke(lease, timeout=self.store.timeout)
            if result.holder_lease == old_lease and result.term == term:
                log.info("our old lease %x still holds the key: revoking it, campaigning again",
                         old_lease)
                with contextlib.suppress(Exception):
                    await leases.revoke(old_lease, timeout=self.store.timeout)
                continue
            self.leader = result.holder.decode() if result.holder is not None else ""
            log.warning("while etcd was unreachable another coordinator led (%s, term %d, "
                        "ours %d): dropping what was held", self.leader or "gone", result.term,
                        term)
            return None

    async def _follow(self, led: Led, key: bytes) -> None:
        """Mirror the store until the leader's key is gone."""
        current = await self.store.get_raw(key)
        if current is None:
            return
        self.leader = current[0].decode()
        await led.become_follower(self.leader)
        nodes, revision = await self.store.load_nodes_at()
        led.mirror_nodes(nodes, [], reset=True)
        loop = asyncio.get_running_loop()
        mirror = [loop.create_task(self._mirror_nodes(led, revision)),
                  loop.create_task(self._mirror_events(led, revision))]
        try:
            async for batch in self.store.watch(ELECTION, current[1]):
                if any(e.kind == "delete" for e in batch):
                    log.info("leader %s is gone: campaigning", self.leader)
                    return
                for change in batch:
                    self.leader = change.value.decode()
        finally:
            for task in mirror:
                task.cancel()
            await asyncio.gather(*mirror, return_exceptions=True)

    async def _mirror_nodes(self, led: Led, revision: int) -> None:
        async def apply(batch: list[WatchEvent]) -> None:
            led.mirror_nodes([decode_node(e.value, e.revision) for e in batch if e.kind == "put"],
                             [e.key for e in batch if e.kind == "delete"], reset=False)

        await self._watching("nodes", revision, apply, led)

    async def _mirror_events(self, led: Led, revision: int) -> None:
        async def apply(batch: list[WatchEvent]) -> None:
            led.mirror_events([decode_event(e.value) for e in batch if e.kind == "put"])

        await self._watching("events", revision, apply, led)

    async def _watch_agents(self, led: Led) -> None:
        """The leader's view of agent liveness keys: a delete is an expired (or revoked) lease."""
        decoder = msgspec.json.Decoder(AgentLease)
        published, revision = await self.store.list_raw(AGENTS)
        for _, value in published:
            with contextlib.suppress(msgspec.DecodeError):
                led.agent_published(decoder.decode(value))

        async def apply(batch: list[WatchEvent]) -> None:
            for change in batch:
                if change.kind == "delete":
                    led.agent_lease_expired(change.key)
                else:
                    with contextlib.suppress(msgspec.DecodeError):
                        led.agent_published(decoder.decode(change.value))

        await self._watching(AGENTS, revision, apply, led)

    async def _watching(self, sub: str, revision: int,
                        apply: Callable[[list[WatchEvent]], Awaitable[None]], led: Led) -> None:
        """Watch from ``revision + 1``; after a compaction, reload nodes and watch on."""
        start = revision + 1
        while True:
            try:
                async for batch in self.store.watch(sub, start):
                    await apply(batch)
                    start = batch[-1].revision + 1
                return
            except LookupError:
                nodes, revision = await self.store.load_nodes_at()
                if sub == "nodes":
                    led.mirror_nodes(nodes, [], reset=True)
                start = revision + 1
            except (EtcdError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("watch of %s failed (%s); watching again from %d", sub, error, start)
                await asyncio.sleep(RETRY)
