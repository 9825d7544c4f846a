"""Several active coordinators on one etcd (``[coordinator] coordination = "shares"``): who is
a member, which shares each holds, and the mirror of everybody else's nodes. The edge of
``detect/shares.py`` (the pure assignment), never the core.

Keys, all under ``P/nodes!`` so that one watch of [``P/nodes!``, end of ``P/nodes/``) carries
the members, the share claims and the node states in one stream, in revision order:

- ``P/nodes!members/<name>``: the coordinator's API URL, on its lease (TTL ``leader_ttl``,
  refreshed about every TTL/3).
- ``P/nodes!shares/<k>``: the holder's name, on its lease; created only if absent (a claim).
- ``P/nodes!slots/<n>``: the event slot the coordinator mints event ids in (see
  ``detect/journal.EventSequence``), on its lease.

Every member computes the same assignment from the members it sees (rendezvous hashing), and
reconciles: it releases the shares it holds but no longer wins (writes what is pending for
them first, then deletes the key), and claims the ones it wins that nobody holds. A claim
takes effect when the watch delivers its own put: every node write the previous holder made
came before it in the same stream, so the mirror holds its last word (the new holder then
restarts the nodes' deadlines; see ``Coordinator.acquire_shares``).

A member killed stops refreshing; TTL later etcd deletes its keys and the others claim its
shares. A member that cannot refresh for a whole TTL gives up every share at once, before it
awaits anything (it counts from its own send, so it stops no later than etcd expires the
lease): no node is decided by two coordinators, and decisions it had not stored are dropped
(the next holder decides from the store). It then joins again with a new lease. Node writes
are compare-and-swap on the node's revision as always, so a write racing a takeover fails
rather than overwrites.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec
from etcd3aio import EtcdError, prefix_range_end

from nodewatch.detect.groups import GroupSummary
from nodewatch.detect.journal import EVENT_SLOTS
from nodewatch.detect.shares import SHARES, Assignment, share_of
from nodewatch.model import Event, NodeState
from nodewatch.protocol import AgentLease
from nodewatch.store.codec import decode_event, decode_node
from nodewatch.store.etcd import EtcdStore, Fence, WatchEvent

__all__ = ["ShareKeeper", "Shared"]

log = logging.getLogger("nodewatch.shares")
T = TypeVar("T")

SPACE = "nodes!"
MEMBERS = SPACE + "members"
CLAIMS = SPACE + "shares"
SLOTS = SPACE + "slots"
GROUPS = SPACE + "groups"  # each member's part of the outlier groups, on its lease
MARKS = SPACE + "marks"  # each member's event watermark (see Coordinator.event_watermark)
RETRY = 0.5
RECONCILE_EVERY = 1.0  # also without a change: a claim refused by a race is retried
PUBLISH_EVERY = 0.5  # how often a member's outlier groups and event watermark are published


class Shared(Protocol):
    """What the keeper drives: the coordinator."""

    def start_sharing(self, slot: int) -> None: ...

    def set_members(self, members: Mapping[str, str], assignment: Assignment) -> None: ...

    async def acquire_shares(self, shares: frozenset[int]) -> None: ...

    async def release_shares(self, shares: frozenset[int]) -> None: ...

    def lose_shares(self, cause: str, shares: frozenset[int] | None = None) -> None:
        """Synchronous: giving shares up must never wait on anything (etcd may expire the
        claims any moment)."""

    def node_ids(self) -> list[str]: ...

    def event_watermark(self) -> int: ...

    def set_event_marks(self, marks: Mapping[str, int]) -> None: ...

    def group_summaries(self) -> dict[str, Any]: ...

    def set_peer_groups(self, peers: Mapping[str, Mapping[str, GroupSummary]]) -> None: ...

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None: ...

    def mirror_events(self, events: list[Event]) -> None: ...

    def agent_published(self, lease: AgentLease) -> None: ...

    def agent_lease_expired(self, node_id: str) -> None: ...


class ShareKeeper:
    """Keeps the coordinator reached at ``url`` a member, and its shares claimed, until
    stopped."""

    def __init__(self, store: EtcdStore, url: str, ttl: float = 5.0,
                 shares: int = SHARES) -> None:
        self.store = store
        # The member's name is its URL: unique by nature (two coordinators reached at one URL
        # cannot both be reached), where a listen address such as 0.0.0.0:7300 is not.
        self.identity = url
        self.url = url
        self.ttl = max(1, math.ceil(ttl))
        self.shares = shares
        self.members: dict[str, str] = {}
        self.holders: dict[int, tuple[str, int]] = {}  # share -> (holder, its lease)
        self.groups: dict[str, dict[str, GroupSummary]] = {}  # member -> its outlier groups
        self.held: frozenset[int] = frozenset()
        self.assignment = Assignment.of((), shares)
        self.takeovers = 0  # shares acquired, for /metrics and tests
        self._lease: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._released: set[int] = set()  # given up, while etcd still shows our claim
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self.marks: dict[str, int] = {}  # member -> its event watermark
        self.agent_leases: dict[str, AgentLease] = {}  # the last announcement of each node
        self._paused = False
        self._assigned_members: dict[str, str] = {}  # the members the assignment is of
        self._groups_changed = self._holders_changed = True
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def start(self, shared: Shared) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(shared),
                                                            name="nodewatch-shares")

    async def pause(self) -> None:
        """Stop following and claiming, keeping the lease (and so the shares) until ``stop``:
        a stopping coordinator writes its last word meanwhile, deciding nothing new."""
        self._paused = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self) -> None:
        """Leave: revoking the lease deletes the member and share keys at once, so the others
        take the shares now rather than a TTL later."""
        await self.pause()
        if self._lease is not None:
            await self._revoke(self._lease)
            self._lease = None

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(Exception):
            assert self.store.client is not None and self.store.client.lease is not None
            await self.store.client.lease.revoke(lease, timeout=2.0, max_attempts=1)

    # ------------------------------------------------------------------ membership

    async def _run(self, shared: Shared) -> None:
        while True:
            keepalive = None
            tasks: list[asyncio.Task[None]] = []
            cause = "etcd error"
            dropped = False
            try:
                lease = await self.store.grant(self.ttl)
                self._lease = lease
                self.store.fence = self._fence(lease)
                keepalive = self.store.keepalive(lease, self.ttl)
                if not await self.store.create_with_lease(self.store.key(MEMBERS, self.identity),
                                                          self.url.encode(), lease):
                    # Another live coordinator has this name (the same advertise_url), or this
                    # one's previous lease has not expired yet: wait for it, never share it.
                    log.error("member name %s is taken (another coordinator with the same URL, "
                              "or this one's previous life until its lease expires); waiting",
                              self.identity)
                    cause = "member name taken"
                    await self._revoke(lease)
                    continue
                slot = await self._claim_slot(lease)
                shared.start_sharing(slot)
                log.info("member %s (lease %x, ttl %ss, event slot %d)", self.identity, lease,
                         self.ttl, slot)
                loop = asyncio.get_running_loop()
                tasks = [loop.create_task(self._follow(shared, lease), name="shares-follow"),
                         loop.create_task(self._reconciler(shared, lease), name="shares-claim"),
                         loop.create_task(self._mirror_events(shared), name="shares-events"),
                         loop.create_task(self._publish(shared, lease), name="shares-publish"),
                         loop.create_task(self._watch_agents(shared), name="shares-agents")]
                lost = loop.create_task(keepalive.lost.wait())
                done, _ = await asyncio.wait([*tasks, lost], return_when=asyncio.FIRST_COMPLETED)
                if lost in done:
                    cause = keepalive.cause
                    log.error("membership lease lost (%s): giving up every share", cause)
                    # etcd may expire the lease (and so the claims) any moment now: stop
                    # deciding before anything is awaited. Cancelling the tasks and closing
                    # the keepalive below can take a while on a loaded machine, and another
                    # coordinator may take the shares meanwhile (a fresh-clone CI run saw
                    # both hold them for 22 ms when this waited for that).
                    self._drop(shared, cause)
                    dropped = True
                else:
                    # A task that should run for the lease's life ended: whatever it kept
                    # (the mirror, the claims) is stale from now on. Give everything up at
                    # once (revoking, so the others take over now) and join again.
                    ended = next(t for t in tasks if t.done())
                    error = ended.exception() if not ended.cancelled() else None
                    cause = f"{ended.get_name()} ended ({type(error).__name__}: {error})"
                    log.error("sharing: %s; giving up every share and joining again", cause)
                    await self._revoke(lease)
                lost.cancel()
            except asyncio.CancelledError:
                raise
            except (EtcdError, LookupError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                cause = f"{type(error).__name__}: {error}"
                log.warning("sharing: %s; joining again", cause)
            finally:
                for task in [*tasks, *self._releasing.values()]:
                    task.cancel()
                await asyncio.gather(*tasks, *self._releasing.values(), return_exceptions=True)
                self._releasing.clear()
                if keepalive is not None:
                    await keepalive.stop(revoke=False)
                if not self._paused:
                    self._lease = None
            if self._paused:
                return
            if not dropped:
                self._drop(shared, cause)
            await asyncio.sleep(RETRY)

    def _fence(self, lease: int) -> Fence:
        """A node's writes are conditional on its share's claim being on this lease: a write
        that etcd applies after the claim was lost (expired, deleted, taken) is refused. An
        event of no node (fleet-wide) is this member's own: no condition."""
        shares, claim_key = self.shares, self._claim_key

        def fence(node_id: str) -> tuple[bytes, int] | None:
            return (claim_key(share_of(node_id, shares)), lease) if node_id else None

        return fence

    def _drop(self, shared: Shared, cause: str) -> None:
        """Give every share up, at once. Not under ``_lock``: a task holding it is waiting on
        etcd, and is cancelled before it runs again (nothing is awaited between the two)."""
        self.held = frozenset()
        self.holders.clear()
        self._released.clear()
        self._assigned_members = {}
        self._groups_changed = self._holders_changed = True
        shared.lose_shares(cause)

    async def _claim_slot(self, lease: int) -> int:
        """A free event slot, starting from one picked by the name (usually the same one)."""
        first = zlib.crc32(self.identity.encode()) % EVENT_SLOTS
        for step in range(EVENT_SLOTS):
            slot = (first + step) % EVENT_SLOTS
            if await self.store.create_with_lease(self.store.key(SLOTS, str(slot)),
                                                  self.identity.encode(), lease):
                return slot
        raise RuntimeError(f"all {EVENT_SLOTS} event slots are taken")

    # ------------------------------------------------------------------ the one stream

    async def _follow(self, shared: Shared, lease: int) -> None:
        """Members, claims and node states at one revision, then their changes in order; read
        again from scratch after a compaction or a failure of the stream."""
        start = self.store.key(SPACE)
        end = prefix_range_end(self.store.key("nodes", ""))
        node_prefix = self.store.key("nodes", "").decode()
        while True:
            try:
                revision = await self._read_all(shared, lease, start, end, node_prefix)
                async for batch in self.store.watch_range(start, end, revision + 1):
                    await self._apply(shared, lease, batch, node_prefix)
                log.warning("watch of members, shares and nodes ended: reading them again")
            except LookupError:
                log.warning("watch compacted: reading members, shares and nodes again")
            except (EtcdError, OSError, TimeoutError) as error:
                log.warning("following members, shares and nodes failed (%s); reading again",
                            error)
                await asyncio.sleep(RETRY)

    async def _read_all(self, shared: Shared, lease: int, start: bytes, end: bytes,
                        node_prefix: str) -> int:
        keys, revision = await self.store.range_raw(start, end)
        members: dict[str, str] = {}
        holders: dict[int, tuple[str, int]] = {}
        self.groups.clear()
        self.marks.clear()
        nodes: list[NodeState] = []
        for kv in keys:
            key = kv.key.decode()
            if key.startswith(node_prefix):
                with contextlib.suppress(msgspec.DecodeError, IndexError):
                    nodes.append(decode_node(kv.value, kv.revision))
            else:
                self._note(key, kv.value, kv.lease, True, members, holders)
        stored = {n.node_id for n in nodes}
        # Nodes deleted while nobody watched (a compaction, a broken stream): gone here too.
        ghosts = [i for i in shared.node_ids() if i not in stored]
        shared.mirror_nodes(nodes, ghosts, reset=False)
        self.members, self.holders = members, holders
        self._assigned_members = {}
        self._groups_changed = self._holders_changed = True
        await self._settle(shared, lease)
        return revision

    def _note(self, key: str, value: bytes, lease: int, put: bool,
              members: dict[str, str], holders: dict[int, tuple[str, int]]) -> None:
        prefix = self.store.prefix + "/"
        name = key[len(prefix):]
        if name.startswith(MEMBERS + "/"):
            member = name[len(MEMBERS) + 1:]
            if put:
                members[member] = value.decode(errors="replace")
            else:
                members.pop(member, None)
        elif name.startswith(MARKS + "/"):
            member = name[len(MARKS) + 1:]
            self._groups_changed = True
            self.marks.pop(member, None)
            if put:
                with contextlib.suppress(ValueError):
                    self.marks[member] = int(value)
        elif name.startswith(GROUPS + "/"):
            member = name[len(GROUPS) + 1:]
            self._groups_changed = True
            self.groups.pop(member, None)
            if put:
                try:
                    data = msgspec.json.decode(value)
                    self.groups[member] = {str(group): GroupSummary.from_json(part)
                                           for group, part in dict(data).items()}
                except (msgspec.DecodeError, ValueError, KeyError, TypeError, AttributeError):
                    log.warning("unreadable outlier groups from %s: ignored", member)
        elif name.startswith(CLAIMS + "/"):
            self._holders_changed = True
            with contextlib.suppress(ValueError):
                share = int(name[len(CLAIMS) + 1:])
                if put:
                    holders[share] = (value.decode(errors="replace"), lease)
                else:
                    holders.pop(share, None)

    async def _apply(self, shared: Shared, lease: int, batch: list[WatchEvent],
                     node_prefix: str) -> None:
        puts: list[NodeState] = []
        deleted: list[str] = []
        for change in batch:
            if change.key.startswith(node_prefix):
                node_id = change.key[len(node_prefix):]
                if change.kind == "delete":
                    deleted.append(node_id)
                else:
                    with contextlib.suppress(msgspec.DecodeError, IndexError):
                        puts.append(decode_node(change.value, change.revision))
            else:
                self._note(change.key, change.value, change.lease, change.kind == "put",
                           self.members, self.holders)
        if puts or deleted:
            shared.mirror_nodes(puts, deleted, reset=False)
        await self._settle(shared, lease)

    async def _settle(self, shared: Shared, lease: int) -> None:
        """Take the shares the stream says are ours; tell the coordinator the members and
        the others' outlier groups. Only what changed is recomputed: most batches carry node
        states alone, and they must cost what they carry."""
        if self.members != self._assigned_members:
            self._assigned_members = dict(self.members)
            assignment = Assignment.of(self.members, self.shares)
            if assignment != self.assignment:
                self.assignment = assignment
                self._wake.set()
            shared.set_members(self.members, assignment)
            self._groups_changed = True
        if self._groups_changed:
            self._groups_changed = False
            shared.set_peer_groups({m: g for m, g in self.groups.items()
                                    if m != self.identity and m in self.members})
            shared.set_event_marks({m: mark for m, mark in self.marks.items()
                                    if m != self.identity and m in self.members})
        if not self._holders_changed:
            return
        self._holders_changed = False
        async with self._lock:
            ours = frozenset(k for k, (holder, on) in self.holders.items()
                             if holder == self.identity and on == lease)
            self._released &= ours  # deleted keys are released for good
            gone = self.held - ours
            if gone:
                # Our claim vanished (deleted by hand, or an old lease expired): another may
                # hold it any moment, so stop deciding for it now.
                self.held = self.held - gone
                shared.lose_shares("the claims are gone from etcd", gone)
            new = ours - self.held - self._released
            if new:
                self.held = self.held | new
                self.takeovers += len(new)
                await shared.acquire_shares(new)
                # Announcements of etcd-lease agents seen while another coordinator owned
                # them: this one registers them now.
                for node_id, announced in list(self.agent_leases.items()):
                    if share_of(node_id, self.shares) in new:
                        shared.agent_published(announced)

    # ------------------------------------------------------------------ reconcile

    async def _reconciler(self, shared: Shared, lease: int) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_EVERY):
                    await self._wake.wait()
            self._wake.clear()
            if self.identity not in self.members:
                continue  # our member key has not come back by watch yet
            try:
                await self._reconcile(shared, lease)
            except (EtcdError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("reconciling shares failed (%s); retrying", error)
                await asyncio.sleep(RETRY)

    async def _reconcile(self, shared: Shared, lease: int) -> None:
        wanted = self.assignment.held_by(self.identity)
        me = self.identity.encode()
        release = self.held - wanted
        if release:
            # In a task of its own: the last word may take a while to write (actions to end),
            # and claims (a member lost meanwhile) and the stream must go on.
            self.held = self.held - release
            self._released |= release
            task = asyncio.get_running_loop().create_task(
                self._release(shared, frozenset(release)), name="shares-release")
            for k in release:
                self._releasing[k] = task
        # Released, and the claim still ours (a delete that failed): delete it again.
        again = [k for k in sorted(self._released) if k not in self._releasing
                 and self.holders.get(k) == (self.identity, lease)]
        # Our name on an older lease (a previous life of this process): not ours now.
        stale = [k for k, (holder, on) in self.holders.items()
                 if holder == self.identity and on != lease]
        await asyncio.gather(*(self.store.delete_if(self._claim_key(k), me)
                               for k in again + stale))
        claim = [k for k in sorted(wanted - self.held) if k not in self.holders]
        if claim:
            await asyncio.gather(*(self.store.create_with_lease(self._claim_key(k), me, lease)
                                   for k in claim))

    async def _release(self, shared: Shared, shares: frozenset[int]) -> None:
        try:
            await shared.release_shares(shares)
            me = self.identity.encode()
            await asyncio.gather(*(self.store.delete_if(self._claim_key(k), me)
                                   for k in sorted(shares)))
        except (EtcdError, OSError, TimeoutError) as error:
            log.warning("releasing shares: %s; the claims are deleted on the next round", error)
        finally:
            for k in shares:
                if self._releasing.get(k) is asyncio.current_task():
                    del self._releasing[k]
            self._wake.set()

    async def _publish(self, shared: Shared, lease: int) -> None:
        """This member's part of every outlier group and its event watermark, when they
        changed (on its lease, so a member that goes takes them with it)."""
        groups_key = self.store.key(GROUPS, self.identity)
        mark_key = self.store.key(MARKS, self.identity)
        last_groups, last_mark = b"", b""
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            try:
                groups = msgspec.json.encode(shared.group_summaries())
                mark = str(shared.event_watermark()).encode()
                if groups != last_groups:
                    await self.store.put_raw(groups_key, groups, lease)
                    last_groups = groups
                if mark != last_mark:
                    await self.store.put_raw(mark_key, mark, lease)
                    last_mark = mark
            except (EtcdError, OSError, TimeoutError) as error:
                log.debug("publishing outlier groups or the event mark failed (%s)", error)

    def _claim_key(self, share: int) -> bytes:
        return self.store.key(CLAIMS, str(share))

    # ------------------------------------------------------------------ events and agents

    async def _mirror_events(self, shared: Shared) -> None:
        _, revision = await self._retrying(lambda: self.store.list_raw(MEMBERS))
        async for batch in self._watching("events", revision):
            shared.mirror_events([decode_event(e.value) for e in batch if e.kind == "put"])

    async def _watch_agents(self, shared: Shared) -> None:
        decoder = msgspec.json.Decoder(AgentLease)
        published, revision = await self._retrying(lambda: self.store.list_raw("agents"))
        for _, value in published:
            with contextlib.suppress(msgspec.DecodeError):
                announced = decoder.decode(value)
                self.agent_leases[announced.node_id] = announced
                shared.agent_published(announced)
        async for batch in self._watching("agents", revision):
            for change in batch:
                if change.kind == "delete":
                    self.agent_leases.pop(change.key, None)
                    shared.agent_lease_expired(change.key)
                else:
                    with contextlib.suppress(msgspec.DecodeError):
                        announced = decoder.decode(change.value)
                        self.agent_leases[announced.node_id] = announced
                        shared.agent_published(announced)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await call()
            except (EtcdError, OSError, TimeoutError) as error:
                log.warning("etcd read failed (%s); retrying", error)
                await asyncio.sleep(RETRY)

    async def _watching(self, sub: str, revision: int) -> AsyncIterator[list[WatchEvent]]:
        start = revision + 1
        while True:
            try:
                async for batch in self.store.watch(sub, start):
                    yield batch
                    start = batch[-1].revision + 1
                return
            except LookupError:
                _, latest = await self.store.list_raw(MEMBERS)
                start = latest + 1
            except (EtcdError, OSError, TimeoutError, Exception) as error:  # noqa: BLE001
                log.warning("watch of %s failed (%s); watching again from %d", sub, error, start)
                await asyncio.sleep(RETRY)
