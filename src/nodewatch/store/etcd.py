"""The etcd v3 store (etcd3aio over gRPC) and the etcd primitives HA is built on.

Keys under the URL's prefix ``P``: ``P/nodes/<id>`` (compare-and-swap on mod_revision, which is
the node's ``revision``), ``P/events/<id>``, ``P/history/<id>/<ts>/<seq>`` (raw samples) and
``P/rollups/<id>/<ts>/<seq>`` (store/tiers.py), each attached to a lease per time bucket living
as long as its tier, so history expires by itself even with no coordinator running; ``P/meta/<k>``,
``P/agents/<id>`` (an agent's liveness key on its own lease) and ``P/leader`` (the election).
Writes are batched into transactions of up to 128 operations (etcd's default ``max-txn-ops``)
with a bounded number in flight. Several endpoints are load-balanced by gRPC; a lost member's
calls fail over to the others (transient errors are retried by the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Generic, TypeVar
from urllib.parse import urlsplit

from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdTransientError,
    SortOrder,
    SortTarget,
    prefix_range_end,
)
from etcd3aio._protobuf import Compare  # the MOD target has no helper in etcd3aio 0.3
from etcd3aio.kv import KVService

from nodewatch.model import Event, HistorySample, NodeState, SampleChunk
from nodewatch.store.base import Fenced, WritesInFlight
from nodewatch.store.codec import (
    decode_event,
    decode_node,
    decode_sample,
    encode_event,
    encode_node,
    encode_sample,
)

__all__ = ["Campaign", "EtcdStore", "Fence", "KeepAlive", "RawKey", "WatchEvent",
           "parse_etcd_url"]

log = logging.getLogger("nodewatch.store.etcd")
T = TypeVar("T")

TXN_OPS: Final = 128  # etcd's default --max-txn-ops
PAGE: Final = 2_000  # keys per range read: stays far below gRPC's 4 MiB message limit
HISTORY_BUCKET: Final = 60.0  # seconds of samples sharing one history lease
RUN_TTL: Final = 7200.0  # how long the record of an action's run is kept (P/runs/)


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """``etcd://h1:2379,h2:2379/prefix`` -> (["h1:2379", "h2:2379"], "/prefix")."""
    if not url.startswith("etcd://"):
        raise ValueError(f"expected etcd://host:port[,host:port...]/prefix, got {url!r}")
    rest = url.removeprefix("etcd://")
    hosts, _, path = rest.partition("/")
    endpoints = []
    for host in hosts.split(","):
        host = host.strip()
        if not host:
            continue
        endpoints.append(host if ":" in host.rsplit("]", 1)[-1] else f"{host}:2379")
    if not endpoints:
        raise ValueError(f"no etcd endpoint in {url!r}")
    prefix = "/" + path.strip("/") if path.strip("/") else "/nodewatch"
    return endpoints, prefix


def _resolve(endpoint: str) -> str:
    """gRPC's ``ipv4:`` target (used for several endpoints) takes addresses, not names."""
    parts = urlsplit(f"//{endpoint}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    try:
        socket.inet_aton(host)
        return f"{host}:{port}"
    except OSError:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        return f"{address}:{port}"


def _ts_key(ts: float) -> str:
    return f"{max(ts, 0.0):020.6f}"


Fence = Callable[[str], "tuple[bytes, int] | None"]
"""A node id -> the key whose holder alone may write that node and the lease it must be on
(the leader key, or the claim of the node's share); None: no condition."""


def _lease_is(key: bytes, lease: int) -> Any:
    return Compare(result=Compare.EQUAL, target=Compare.LEASE, key=key, lease=lease)


def _mod_revision_is(key: bytes, revision: int) -> Any:
    if revision == 0:
        return KVService.txn_compare_create_revision(key, 0)
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=revision)


@dataclass(slots=True)
class _Fenced(Generic[T]):
    """One transaction's items, the fences they need (distinct), and each item's own."""

    items: list[T] = field(default_factory=list)
    fences: list[tuple[bytes, int]] = field(default_factory=list)
    own: list[tuple[bytes, int] | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix: ``put`` or ``delete`` of ``key`` (prefix stripped)."""

    kind: str
    key: str
    value: bytes
    revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RawKey:
    """One stored key as read: full key, value, the lease it is on (0: none), mod revision."""

    key: bytes
    value: bytes
    lease: int
    revision: int


@dataclass(frozen=True, slots=True)
class Campaign:
    """What :meth:`EtcdStore.campaign` found: ``won``; ``term`` (the new term if won, the
    current one if not); who holds the key (value, lease) when it was refused."""

    won: bool
    term: int
    holder: bytes | None
    holder_lease: int


async def refresh_lease(client: Etcd3Client, lease_id: int, within: float) -> int:
    """One keep-alive of the lease: its TTL as etcd answered (0 or less: expired)."""
    lease = client.lease
    assert lease is not None
    call = lease.keep_alive(lease_id)
    try:
        async with asyncio.timeout(within):
            async for reply in call:
                return int(reply.TTL)
    finally:
        call.cancel()
    return 0


class KeepAlive:
    """Keeps one lease alive, refreshing about every TTL/3; ``lost`` is set when it expired
    (a refresh answered TTL <= 0: ``expired`` is then True, etcd itself said the lease is
    gone) or could not be refreshed for a whole TTL (``expired`` False: etcd did not answer,
    so whether the lease still lives is unknown here). ``cause`` says which, for logs."""

    def __init__(self, client: Etcd3Client, lease_id: int, ttl: int) -> None:
        self.client = client
        self.lease_id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.expired = False
        self.cause = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> KeepAlive:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"nodewatch-lease-{self.lease_id:x}")
        return self

    async def _refresh(self, within: float) -> int:
        return await refresh_lease(self.client, self.lease_id, within)

    async def _run(self) -> None:
        last_ok = time.monotonic()
        interval = max(0.2, self.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            # The lease's TTL restarts when etcd handles the refresh, which is after we sent
            # it: counting from the send, we give the lease up no later than etcd expires it.
            sent = time.monotonic()
            # Never wait past the moment the lease may have expired: a refresh answered
            # later must not let this side believe it held the lease meanwhile.
            left = last_ok + self.ttl - sent
            try:
                if left <= 0:
                    raise TimeoutError("no refresh answered within the lease's TTL")
                ttl = await self._refresh(min(max(1.0, self.ttl / 3), left))
            except (EtcdError, TimeoutError, Exception) as error:  # noqa: BLE001 - retried
                if time.monotonic() - last_ok >= self.ttl - 0.05:
                    log.warning("lease %x not refreshed for %ss: lost (%s)", self.lease_id,
                                self.ttl, error)
                    self.cause = (f"etcd unreachable: lease not refreshed for {self.ttl}s "
                                  f"({type(error).__name__}: {error})")
                    self.lost.set()
                    return
                interval = 0.2
                continue
            if ttl <= 0:
                self.expired, self.cause = True, "etcd answered: the lease has expired"
                self.lost.set()
                return
            last_ok = sent
            interval = max(0.2, self.ttl / 3)

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.client.lease is not None:
            with contextlib.suppress(Exception):
                await self.client.lease.revoke(self.lease_id, timeout=2.0, max_attempts=1)


class EtcdStore:
    """The :class:`~nodewatch.store.base.Store` on etcd v3 (3.4+)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = "/nodewatch",
        *,
        events_retained: int = 100_000,
        history_ttl: float = 3600.0,
        full_resolution: float | None = None,
        timeout: float = 5.0,
        in_flight: int = 64,
    ) -> None:
        if events_retained < 1:
            raise ValueError("events_retained must be at least 1")
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.events_retained = events_retained
        self.history_ttl = history_ttl
        # How long a raw sample lives (its lease); None: history_ttl, as rollups.
        self.full_resolution = history_ttl if full_resolution is None else full_resolution
        self.timeout = timeout
        self.in_flight = in_flight
        self.client: Etcd3Client | None = None
        self._kv: KVService | None = None
        self._sem = asyncio.Semaphore(in_flight)
        self._event_estimate = 0
        self._history_leases: dict[float, tuple[int, int]] = {}  # ttl -> (bucket, lease id)
        self._history_nodes: set[str] = set()  # listed under P/hnodes/ by this process
        self._lease_lock = asyncio.Lock()
        self._in_flight = WritesInFlight()
        self._closed = False
        # Set by the election or the share keeper: node and event writes carry it as a
        # condition, so that a write delivered after this coordinator lost its lease is
        # refused (Fenced), never stored.
        self.fence: Fence | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdStore:
        endpoints, prefix = parse_etcd_url(url)
        return cls(endpoints, prefix, **options)

    def key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.client is not None:
            raise RuntimeError("store already opened")
        loop = asyncio.get_running_loop()
        targets = [await loop.run_in_executor(None, _resolve, e) for e in self.endpoints]
        self.client = Etcd3Client(targets, rpc_max_attempts=max(3, 2 * len(targets)))
        await self.client.connect()
        self._kv = self.client.kv
        self._event_estimate = await self._count(self.key("events", ""))

    async def close(self) -> None:
        if self.client is None or self._closed:
            return
        await self._in_flight.idle()  # writes issued before close() finish first
        self._closed = True  # writes issued before close() finish first
        await self.client.close()

    async def __aenter__(self) -> EtcdStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def kv(self) -> KVService:
        if self._kv is None or self._closed:
            raise RuntimeError("store is not open")
        return self._kv

    async def _writing(self, work: Awaitable[T]) -> T:
        """Count a write in flight so that close() waits for it."""
        return await self._in_flight.run(work)

    async def _bounded(self, work: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
        """At most ``in_flight`` at once; a timed-out or unavailable call is tried again (a
        member died mid-call or the cluster was electing): every batched write is replay-safe
        (puts of the same bytes, compare-and-swap that accepts equal content)."""
        for attempt in range(1, attempts + 1):
            try:
                async with self._sem:
                    return await work()
            except (TimeoutError, EtcdTransientError, EtcdConnectionError):
                if attempt == attempts:
                    raise
                log.warning("etcd call failed (attempt %d of %d); trying again", attempt,
                            attempts)
        raise AssertionError("unreachable")

    async def flush(self) -> None:
        """Every etcd write is durable (on a quorum) when its call returns."""
        await self._in_flight.idle()

    async def _count(self, prefix: bytes) -> int:
        response = await self.kv.get(prefix, prefix_range_end(prefix), count_only=True,
                                     timeout=self.timeout)
        return int(response.count)

    async def _range(self, start: bytes, end: bytes, *, limit: int = 0,
                     keys_only: bool = False, descend: bool = False,
                     serializable: bool = False) -> list[Any]:
        response = await self.kv.get(
            start, end, serializable=serializable, limit=limit, keys_only=keys_only,
            # NONE is key order already; asking for ASCEND makes etcd 3.4 read and sort the
            # whole range before applying the limit (a prune walk took a minute).
            sort_order=SortOrder.DESCEND if descend else SortOrder.NONE,
            sort_target=SortTarget.KEY, timeout=self.timeout)
        return list(response.kvs)

    async def _range_all(self, prefix: bytes, end: bytes | None = None
                         ) -> tuple[list[Any], int]:
        """Every key under a prefix (or in [prefix, end)), paged; and the store revision of
        the first page."""
        end = prefix_range_end(prefix) if end is None else end
        out: list[Any] = []
        start = prefix
        revision = 0
        while True:
            response = await self.kv.get(start, end, limit=PAGE, revision=revision,
                                         timeout=self.timeout)
            revision = revision or int(response.header.revision)
            out.extend(response.kvs)
            if not response.more or not response.kvs:
                return out, revision
            start = bytes(response.kvs[-1].key) + b"\0"

    # -- nodes ------------------------------------------------------------------------------

    async def load_nodes(self) -> list[NodeState]:
        return (await self.load_nodes_at())[0]

    async def load_nodes_at(self) -> tuple[list[NodeState], int]:
        """Every node and the store revision they were read at (to watch from revision + 1)."""
        kvs, revision = await self._range_all(self.key("nodes", ""))
        return [decode_node(bytes(kv.value), int(kv.mod_revision)) for kv in kvs], revision

    async def get_node(self, node_id: str) -> NodeState | None:
        response = await self.kv.get(self.key("nodes", node_id), timeout=self.timeout)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return decode_node(bytes(kv.value), int(kv.mod_revision))

    async def save_nodes(self, nodes: Sequence[NodeState]) -> list[str]:
        if not nodes:
            return []
        items = [(self.key("nodes", n.node_id), n.revision, encode_node(n)) for n in nodes]
        groups = self._fenced_groups([n.node_id for n in nodes], items)
        results = await self._writing(asyncio.gather(
            *(self._bounded(partial(self._cas_group, group)) for group in groups)))
        revisions: dict[bytes, int | None] = {}
        for group, result in zip(groups, results, strict=True):
            revisions.update((key, r) for (key, _, _), r in zip(group.items, result,
                                                                 strict=True))
        conflicts = []
        for node, (key, _, _) in zip(nodes, items, strict=True):
            revision = revisions[key]
            if revision is None:
                conflicts.append(node.node_id)
            else:
                node.revision = revision
        return conflicts

    def _fenced_groups(self, node_ids: Sequence[str], items: Sequence[T]) -> list[_Fenced[T]]:
        """The items in transactions of at most ``TXN_OPS`` compares (etcd counts them as it
        counts operations): each item's own, plus one per distinct fence in the transaction
        (the leader key: one; share claims: one per share the items fall in)."""
        fence = self.fence
        pairs = sorted(((fence(i) if fence else None, n) for n, i in enumerate(node_ids)),
                       key=lambda p: p[0] or (b"", 0))
        groups: list[_Fenced[T]] = []
        current: _Fenced[T] | None = None
        for item_fence, at in pairs:  # sorted: an item's fence is the group's last, or new
            new = item_fence is not None and (
                current is None or not current.fences or current.fences[-1] != item_fence)
            if current is None or len(current.items) + len(current.fences) + 1 + new > TXN_OPS:
                current = _Fenced()
                groups.append(current)
                new = item_fence is not None
            if new and item_fence is not None:
                current.fences.append(item_fence)
            current.items.append(items[at])
            current.own.append(item_fence)
        return groups

    def _refused(self, fences: Sequence[tuple[bytes, int]], response: Any, at: int) -> None:
        """Raise Fenced when a fence's key, read back from the ``at``-th answer on of a failed
        transaction (one answer per fence, in order), is not on the fence's lease."""
        lost = []
        for n, (key, lease) in enumerate(fences):
            kvs = response.responses[at + n].response_range.kvs
            if not kvs or int(kvs[0].lease) != lease:
                lost.append(key)
        if lost:
            raise Fenced(", ".join(self.endpoints), lost)

    async def _cas_group(self, group: _Fenced[tuple[bytes, int, bytes]]) -> list[int | None]:
        """One transaction for the group; if any compare fails, node by node."""
        items = group.items
        compares = [_mod_revision_is(key, old) for key, old, _ in items]
        compares += [_lease_is(*f) for f in group.fences]
        response = await self.kv.txn(
            compares, [KVService.txn_op_put(key, body) for key, _, body in items],
            [KVService.txn_op_get(f[0]) for f in group.fences], timeout=self.timeout)
        if response.succeeded:
            return [int(response.header.revision)] * len(items)
        self._refused(group.fences, response, 0)
        return list(await asyncio.gather(*(self._cas_one(fence, *item)
                                           for fence, item in zip(group.own, items,
                                                                  strict=True))))

    async def _cas_one(self, fence: tuple[bytes, int] | None, key: bytes, old: int,
                       body: bytes) -> int | None:
        compares = [_mod_revision_is(key, old)]
        reads = [KVService.txn_op_get(key)]
        if fence is not None:
            compares.append(_lease_is(*fence))
            reads.append(KVService.txn_op_get(fence[0]))
        response = await self.kv.txn(compares, [KVService.txn_op_put(key, body)], reads,
                                     timeout=self.timeout)
        if response.succeeded:
            return int(response.header.revision)
        self._refused([fence] if fence is not None else [], response, 1)
        kvs = response.responses[0].response_range.kvs
        if kvs and bytes(kvs[0].value) == body:
            return int(kvs[0].mod_revision)  # the same content again: replay-safe
        return None

    async def delete_node(self, node_id: str) -> bool:
        key = self.key("nodes", node_id)
        fence = self.fence(node_id) if self.fence else None
        if fence is None:
            response = await self._writing(self.kv.delete(key, timeout=self.timeout))
            return int(response.deleted) > 0
        answer = await self._writing(self.kv.txn(
            [_lease_is(*fence)], [KVService.txn_op_delete(key)],
            [KVService.txn_op_get(fence[0])], timeout=self.timeout))
        if not answer.succeeded:
            self._refused([fence], answer, 0)
        return int(answer.responses[0].response_delete_range.deleted) > 0

    # -- events -----------------------------------------------------------------------------

    async def append_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        ops = [KVService.txn_op_put(self.key("events", e.id), encode_event(e)) for e in events]
        # An event of a node is fenced as the node's writes are; a fleet-wide one (no node)
        # by the fence of "" (the leader key; nothing when sharing: every member records
        # its own).
        groups = self._fenced_groups([e.node_id for e in events], ops)

        async def append() -> None:
            await asyncio.gather(*(self._bounded(partial(self._put_fenced, group))
                                   for group in groups))
            self._event_estimate += len(events)  # an upper bound: replays count twice
            if self._event_estimate > self.events_retained:
                await self._trim_events()

        await self._writing(append())

    async def _put_fenced(self, group: _Fenced[Any]) -> None:
        if not group.fences:
            await self.kv.txn([], group.items, timeout=self.timeout)
            return
        response = await self.kv.txn([_lease_is(*f) for f in group.fences], group.items,
                                     [KVService.txn_op_get(f[0]) for f in group.fences],
                                     timeout=self.timeout)
        if not response.succeeded:
            self._refused(group.fences, response, 0)

    async def _put_ops(self, ops: list[Any]) -> None:
        groups = [ops[at:at + TXN_OPS] for at in range(0, len(ops), TXN_OPS)]
        await asyncio.gather(*(self._bounded(partial(self.kv.txn, [], group,
                                                     timeout=self.timeout))
                               for group in groups))

    async def _trim_events(self) -> None:
        prefix = self.key("events", "")
        count = await self._count(prefix)
        excess = count - self.events_retained
        if excess > 0:
            oldest = await self._range(prefix, prefix_range_end(prefix), limit=excess,
                                       keys_only=True)
            await self.kv.delete(prefix, bytes(oldest[-1].key) + b"\0", timeout=self.timeout)
        self._event_estimate = min(count, self.events_retained)

    async def events_after(self, after: str | None, limit: int = 1000) -> list[Event]:
        prefix = self.key("events", "")
        start = self.key("events", after) + b"\0" if after is not None else prefix
        kvs = await self._range(start, prefix_range_end(prefix), limit=limit)
        return [decode_event(bytes(kv.value)) for kv in kvs]

    async def last_event_id(self) -> str | None:
        prefix = self.key("events", "")
        kvs = await self._range(prefix, prefix_range_end(prefix), limit=1, keys_only=True,
                                descend=True)
        return bytes(kvs[0].key)[len(prefix):].decode() if kvs else None

    # -- action runs ------------------------------------------------------------------------

    def _run_key(self, run: str) -> bytes:
        return self.key("runs", run)

    async def claim_run(self, run: str, node_id: str, record: bytes, ttl: float,
                        revision: int = 0) -> tuple[str, bytes, int, int]:
        """Claim the run ``run`` (an action for an event) for the decider of ``node_id``:
        ``record`` is stored under ``P/runs/<run>`` on a lease of its own of ``ttl`` seconds
        (etcd's clock times it: no host's clock is trusted), only if the fence holds and the
        key is absent (or, with ``revision``, still the claim read at that revision: one that
        cannot expire by itself). Returns ``(verdict, record, revision, lease)``: ``claimed``
        (ours), ``fenced`` (this coordinator is not the decider any more) or ``taken`` (the
        record found, its revision and lease)."""
        key = self._run_key(run)
        fence = self.fence(node_id) if self.fence else None
        compares = [_mod_revision_is(key, revision)]
        reads = [KVService.txn_op_get(key)]
        if fence is not None:
            compares.append(_lease_is(*fence))
            reads.append(KVService.txn_op_get(fence[0]))
        lease = await self.grant(max(1, math.ceil(ttl)))
        response = await self._writing(self.kv.txn(
            compares, [KVService.txn_op_put(key, record, lease=lease)], reads,
            timeout=self.timeout))
        if response.succeeded:
            return "claimed", record, int(response.header.revision), lease
        assert self.client is not None and self.client.lease is not None
        with contextlib.suppress(Exception):  # unused; it would expire by itself anyway
            await self.client.lease.revoke(lease, timeout=self.timeout)
        try:
            self._refused([fence] if fence is not None else [], response, 1)
        except Fenced:
            return "fenced", b"", 0, 0
        kvs = response.responses[0].response_range.kvs
        if not kvs:  # the claim read at ``revision`` expired meanwhile: claim afresh
            return await self.claim_run(run, node_id, record, ttl)
        return "taken", bytes(kvs[0].value), int(kvs[0].mod_revision), int(kvs[0].lease)

    async def refresh_run(self, lease: int) -> bool:
        """Keep a claim of ours alive (before a retry of its action): False once expired."""
        assert self.client is not None
        return await refresh_lease(self.client, lease, self.timeout) > 0

    async def get_run(self, run: str) -> tuple[bytes, int] | None:
        return await self.get_raw(self._run_key(run))

    async def end_run(self, run: str, record: bytes) -> None:
        """The run ended (ran, or gave up): not fenced, so that a decider deposed while the
        action ran still tells the next one not to run it again."""
        lease = await self._lease_for_history(RUN_TTL)
        await self._writing(self.kv.put(self._run_key(run), record, lease=lease,
                                        timeout=self.timeout))

    # -- history ----------------------------------------------------------------------------

    async def _lease_for_history(self, ttl: float) -> int:
        """One lease per HISTORY_BUCKET seconds of wall time and tier, living ttl + one bucket."""
        bucket = int(time.time() // HISTORY_BUCKET)
        current = self._history_leases.get(ttl)
        if current is not None and current[0] == bucket:
            return current[1]
        async with self._lease_lock:
            current = self._history_leases.get(ttl)
            if current is not None and current[0] == bucket:
                return current[1]
            lease = self.client.lease if self.client is not None else None
            assert lease is not None
            granted = await lease.grant(math.ceil(ttl + HISTORY_BUCKET), timeout=self.timeout)
            self._history_leases[ttl] = (bucket, int(granted.ID))
            return int(granted.ID)

    def _history_key(self, sample: HistorySample) -> bytes:
        return self.key("rollups" if sample.span else "history", sample.node_id,
                        _ts_key(sample.ts), f"{sample.seq:020d}")

    async def add_chunks(self, chunks: Sequence[SampleChunk]) -> None:
        """One entry per sample, as ``add_samples`` writes them."""
        await self.add_samples([s for chunk in chunks for s in chunk.samples()])

    async def add_samples(self, samples: Sequence[HistorySample]) -> None:
        if not samples:
            return
        # One put per key: etcd refuses a transaction that names a key twice.
        samples = list({self._history_key(s): s for s in samples}.values())

        async def add() -> None:
            ops = []
            if any(not s.span for s in samples):
                lease = await self._lease_for_history(self.full_resolution)
                ops += [KVService.txn_op_put(self._history_key(s), encode_sample(s), lease=lease)
                        for s in samples if not s.span]
            if any(s.span for s in samples):
                lease = await self._lease_for_history(self.history_ttl)
                ops += [KVService.txn_op_put(self._history_key(s), encode_sample(s), lease=lease)
                        for s in samples if s.span]
            new = {s.node_id for s in samples} - self._history_nodes
            # P/hnodes/<id> lists the nodes with history, so that prune never scans history.
            ops += [KVService.txn_op_put(self.key("hnodes", node_id), b"") for node_id in new]
            await self._put_ops(ops)
            self._history_nodes |= new

        await self._writing(add())

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        start = _ts_key(since).encode()

        async def tier(sub: str) -> list[HistorySample]:
            prefix = self.key(sub, node_id, "")
            # Serializable: the member answers from its own copy, without the quorum round
            # trip of a linearizable read (~0.5 ms of ~3); history a moment stale is fine.
            kvs = await self._range(prefix + start, prefix_range_end(prefix), serializable=True)
            return [decode_sample(bytes(kv.value)) for kv in kvs]

        raw, rolled = await asyncio.gather(tier("history"), tier("rollups"))
        first = raw[0].ts if raw else math.inf
        return [*(r for r in rolled if r.ts < first), *raw]

    async def prune(self, now: float, history_ttl: float,
                    full_resolution: float | None = None) -> int:
        """Per node with history and tier, one range delete of what is older than the cutoff
        (one raft entry each, 16 in flight; the loop runs between them); leases remove the
        rest by themselves. Never a scan of the history keys: etcd 3.4 counts every key of a
        range even with a limit, so walking the history prefix costs O(all samples) per step.
        The raw tier is skipped when ``full_resolution`` is 0 (nothing raw is written)."""
        raw_ttl = history_ttl if full_resolution is None else full_resolution
        tiers = [("rollups", _ts_key(now - history_ttl).encode())]
        if raw_ttl > 0:
            tiers.append(("history", _ts_key(now - raw_ttl).encode()))
        listed, _ = await self.list_raw("hnodes")
        sem = asyncio.Semaphore(16)

        async def prune_node(node_id: str, sub: str, cutoff: bytes) -> int:
            prefix = self.key(sub, node_id, "")
            async with sem:
                response = await self.kv.delete(prefix, prefix + cutoff, timeout=self.timeout)
            return int(response.deleted)

        counts = await self._writing(asyncio.gather(
            *(prune_node(n, sub, cutoff) for n, _ in listed for sub, cutoff in tiers)))
        return sum(counts)

    # -- meta -------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        response = await self.kv.get(self.key("meta", key), timeout=self.timeout)
        return bytes(response.kvs[0].value).decode() if response.kvs else None

    async def put_meta(self, key: str, value: str) -> None:
        await self._writing(self.kv.put(self.key("meta", key), value.encode(),
                                        timeout=self.timeout))

    async def probe_write(self, now: float) -> None:
        await self.put_meta("store_probe", repr(now))
        await self.flush()

    # -- leases and watches (agent lease mode, leader election, followers) ------------------

    async def grant(self, ttl: int) -> int:
        assert self.client is not None and self.client.lease is not None
        return int((await self.client.lease.grant(ttl, timeout=self.timeout)).ID)

    def keepalive(self, lease_id: int, ttl: int) -> KeepAlive:
        assert self.client is not None
        return KeepAlive(self.client, lease_id, ttl).start()

    async def create_with_lease(self, key: bytes, value: bytes, lease_id: int) -> bool:
        """Put ``key`` only if it does not exist (an election, a first publication)."""
        response = await self.kv.txn([KVService.txn_compare_create_revision(key, 0)],
                                     [KVService.txn_op_put(key, value, lease=lease_id)],
                                     timeout=self.timeout)
        return bool(response.succeeded)

    async def campaign(self, key: bytes, value: bytes, lease_id: int, term_key: bytes,
                       term: int | None) -> Campaign:
        """One election round, atomically: create ``key`` on the lease if it does not exist and
        stamp ``term_key`` (its mod revision is the new term). With ``term`` given, also require
        that ``term_key`` was not stamped since (nobody else won in between; 0: never stamped).
        When refused, the answer carries who holds ``key`` and the current term."""
        compares = [KVService.txn_compare_create_revision(key, 0)]
        if term is not None:
            compares.append(_mod_revision_is(term_key, term))
        response = await self.kv.txn(
            compares,
            [KVService.txn_op_put(key, value, lease=lease_id),
             KVService.txn_op_put(term_key, value)],
            [KVService.txn_op_get(key), KVService.txn_op_get(term_key)],
            timeout=self.timeout)
        if response.succeeded:
            return Campaign(True, int(response.header.revision), None, 0)
        held = response.responses[0].response_range.kvs
        stamp = response.responses[1].response_range.kvs
        return Campaign(False, int(stamp[0].mod_revision) if stamp else 0,
                        bytes(held[0].value) if held else None,
                        int(held[0].lease) if held else 0)

    async def get_raw(self, key: bytes) -> tuple[bytes, int] | None:
        response = await self.kv.get(key, timeout=self.timeout)
        if not response.kvs:
            return None
        return bytes(response.kvs[0].value), int(response.kvs[0].mod_revision)

    async def list_raw(self, sub: str) -> tuple[list[tuple[str, bytes]], int]:
        prefix = self.key(sub, "")
        kvs, revision = await self._range_all(prefix)
        return [(bytes(kv.key)[len(prefix):].decode(), bytes(kv.value)) for kv in kvs], revision

    async def range_raw(self, start: bytes, end: bytes) -> tuple[list[RawKey], int]:
        """Every key in [start, end) (full keys) at one revision, and that revision."""
        kvs, revision = await self._range_all(start, end)
        return [RawKey(bytes(kv.key), bytes(kv.value), int(kv.lease), int(kv.mod_revision))
                for kv in kvs], revision

    async def watch_range(self, start: bytes, end: bytes,
                          start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes in [start, end) from ``start_revision`` (full keys), as ``watch``: one
        stream, so changes of different prefixes in it come in revision order."""
        assert self.client is not None and self.client.watch is not None
        stream = self.client.watch.watch(start, end, start_revision=start_revision)
        async for response in stream:
            if response.compact_revision > 0:
                raise LookupError(f"watch compacted at {response.compact_revision}")
            if response.events:
                yield [WatchEvent("delete" if ev.type == 1 else "put",
                                  bytes(ev.kv.key).decode(), bytes(ev.kv.value),
                                  int(ev.kv.mod_revision), int(ev.kv.lease))
                       for ev in response.events]

    async def put_raw(self, key: bytes, value: bytes, lease_id: int = 0) -> int:
        """An unconditional put; the store revision it made."""
        response = await self.kv.txn([], [KVService.txn_op_put(key, value, lease=lease_id)],
                                     timeout=self.timeout)
        return int(response.header.revision)

    async def delete_if(self, key: bytes, value: bytes) -> bool:
        """Delete ``key`` only while it holds ``value`` (a share released by its holder)."""
        response = await self.kv.txn([KVService.txn_compare_value(key, value)],
                                     [KVService.txn_op_delete(key)], timeout=self.timeout)
        return bool(response.succeeded)

    async def watch(self, sub: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes under ``P/<sub>/`` from ``start_revision``, one list per etcd response.

        etcd3aio resumes a broken stream from the last revision + 1; a compacted start
        revision raises LookupError so that the caller reloads and watches again."""
        assert self.client is not None and self.client.watch is not None
        prefix = self.key(sub, "")
        stream = self.client.watch.watch(prefix, prefix_range_end(prefix),
                                         start_revision=start_revision)
        async for response in stream:
            if response.compact_revision > 0:
                raise LookupError(f"watch of {sub} compacted at {response.compact_revision}")
            if response.events:
                yield [WatchEvent("delete" if ev.type == 1 else "put",
                                  bytes(ev.kv.key)[len(prefix):].decode(), bytes(ev.kv.value),
                                  int(ev.kv.mod_revision)) for ev in response.events]
