"""Several coordinators on one etcd store: leader election on a lease, the follower's mirror of
the store, and the leader's watch of agent liveness keys. The coordinator edge, never the core.

The leader holds ``P/election/leader`` on a lease kept alive about every TTL/3; it polls,
confirms failures, runs actions and writes node state. Followers serve reads and the API from
a mirror of the store that they keep by watch, and campaign as soon as the leader's key is
deleted (its lease expired or was revoked), so a dead leader is replaced within one TTL; the new
leader reloads everything from the store and starts with ``restart_grace``.
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
AGENTS = "agents"
RETRY = 0.5


class Led(Protocol):
    """What the election drives: the coordinator."""

    async def become_leader(self) -> None: ...

    async def become_follower(self, leader: str) -> None: ...

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
        while True:
            try:
                lease = await self.store.grant(self.ttl)
                if await self.store.create_with_lease(key, self.identity.encode(), lease):
                    await self._lead(led, lease)
                else:
                    assert self.store.client is not None and self.store.client.lease is not None
                    await self.store.client.lease.revoke(lease, timeout=self.store.timeout)
                    await self._follow(led, key)
            except asyncio.CancelledError:
                raise
            except (EtcdError, LookupError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("election: %s; retrying", error)
                await asyncio.sleep(RETRY)

    async def _lead(self, led: Led, lease: int) -> None:
        self._lease = lease
        keepalive = self.store.keepalive(lease, self.ttl)
        self.leading, self.leader = True, self.identity
        log.info("leader: %s (lease %x, ttl %ss)", self.identity, lease, self.ttl)
        agents: asyncio.Task[None] | None = None
        try:
            await led.become_leader()
            agents = asyncio.get_running_loop().create_task(self._watch_agents(led))
            await keepalive.lost.wait()
            log.error("leader lease lost: stepping down")
        finally:
            self.leading = False
            if agents is not None:
                agents.cancel()
            await keepalive.stop(revoke=False)
            self._lease = None
        await led.become_follower("")

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
