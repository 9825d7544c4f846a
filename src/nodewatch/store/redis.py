"""The Redis store (redis-py's asyncio client): node state with compare-and-set in a Lua script,
history in sorted sets per node and tier (score = ts, trimmed by time), events in a stream.

Keys under a prefix (``redis://host:6379/0?prefix=nodewatch``): ``P:nodes`` and ``P:rev``
(hashes node_id -> body / revision), ``P:revision`` (the counter revisions come from, so they
stay monotonic across deletes), ``P:events`` (a stream whose entry ids are the event numbers,
trimmed to ``events_retained``), ``P:h:<node_id>`` (raw samples) and ``P:r:<node_id>``
(rollups, store/tiers.py) plus the set ``P:hnodes`` of nodes with history, and ``P:meta``.
A whole batch is one script call or one pipeline: one round trip.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import Any, Final, TypeVar, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis.asyncio as aioredis

from nodewatch.model import Event, HistorySample, NodeState, SampleChunk, event_id, event_number
from nodewatch.store.base import WritesInFlight
from nodewatch.store.codec import (
    decode_event,
    decode_node,
    decode_sample,
    encode_event,
    encode_node,
    encode_sample,
)

__all__ = ["RedisStore"]

T = TypeVar("T")
CHUNK: Final = 1_000  # nodes per script call / samples per pipeline
PRUNE_NODES: Final = 200  # ZREMRANGEBYSCOREs per pipeline in prune

# KEYS: nodes, rev, revision counter. ARGV: (node_id, expected revision, body) repeated.
# Returns per node: the new revision, the stored one for a replay of equal content, or 0.
_CAS: Final = """
local out = {}
for i = 1, #ARGV, 3 do
  local id, want, body = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local cur = tonumber(redis.call('HGET', KEYS[2], id) or '0')
  if cur == want then
    local rev = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[1], id, body)
    redis.call('HSET', KEYS[2], id, rev)
    out[#out + 1] = rev
  elseif cur > 0 and redis.call('HGET', KEYS[1], id) == body then
    out[#out + 1] = cur
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: stream. ARGV: maxlen, then (number, body) repeated in order. Ids already stored are
# skipped (a stream only takes ids above its last one, and trimming only drops the oldest).
_APPEND: Final = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local top = 0
if #last > 0 then top = tonumber((string.gsub(last[1][1], '-.*', ''))) end
for i = 2, #ARGV, 2 do
  if tonumber(ARGV[i]) > top then
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], ARGV[i] .. '-1', 'e', ARGV[i + 1])
    top = tonumber(ARGV[i])
  end
end
return 0
"""


def split_redis_url(url: str) -> tuple[str, str]:
    """``redis://h:6379/0?prefix=p`` -> (the URL without ``prefix``, "p"; default nodewatch)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["nodewatch"])[0]
    rest = "&".join(f"{k}={v}" for k, vs in query.items() for v in vs)
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore:
    """The :class:`~nodewatch.store.base.Store` on Redis 6.2+."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        events_retained: int = 100_000,
        socket_timeout: float = 10.0,
    ) -> None:
        if events_retained < 1:
            raise ValueError("events_retained must be at least 1")
        self.url, prefix = split_redis_url(url)
        self.prefix = prefix
        self.events_retained = events_retained
        self.socket_timeout = socket_timeout
        self._redis: aioredis.Redis | None = None
        self._cas: Any = None
        self._append: Any = None
        self._in_flight = WritesInFlight()
        self._closed = False
        self.k_nodes, self.k_rev, self.k_counter = f"{prefix}:nodes", f"{prefix}:rev", \
            f"{prefix}:revision"
        self.k_events, self.k_hnodes, self.k_meta = f"{prefix}:events", f"{prefix}:hnodes", \
            f"{prefix}:meta"

    def _history_key(self, node_id: str, rollup: bool = False) -> str:
        return f"{self.prefix}:{'r' if rollup else 'h'}:{node_id}"

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._redis is not None:
            raise RuntimeError("store already opened")
        # redis-py's default socket timeout (5 s) would cut long calls: always set it. It is
        # the coordinator's store_timeout (store.open), so no retry on timeout: a retried
        # request could only end after the coordinator gave up on it.
        self._redis = aioredis.Redis.from_url(
            self.url, socket_timeout=self.socket_timeout,
            socket_connect_timeout=min(5.0, self.socket_timeout),
            health_check_interval=30, retry_on_timeout=False)
        await self._redis.ping()
        self._cas = self._redis.register_script(_CAS)
        self._append = self._redis.register_script(_APPEND)

    async def close(self) -> None:
        if self._redis is None or self._closed:
            return
        await self._in_flight.idle()  # writes issued before close() finish first
        self._closed = True
        await self._redis.aclose()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None or self._closed:
            raise RuntimeError("store is not open")
        return self._redis

    async def _writing(self, work: Awaitable[T]) -> T:
        self.redis  # noqa: B018 - raises when closed
        return await self._in_flight.run(work)

    async def flush(self) -> None:
        """A write is in Redis when its call returns (durability is Redis's own config)."""
        await self._in_flight.idle()

    # -- nodes ------------------------------------------------------------------------------

    async def load_nodes(self) -> list[NodeState]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.k_nodes)
            pipe.hgetall(self.k_rev)
            bodies, revisions = await pipe.execute()
        return [decode_node(bodies[k], int(revisions.get(k, 0))) for k in sorted(bodies)]

    async def get_node(self, node_id: str) -> NodeState | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self.k_nodes, node_id)
            pipe.hget(self.k_rev, node_id)
            body, revision = await pipe.execute()
        return None if body is None else decode_node(body, int(revision or 0))

    async def save_nodes(self, nodes: Sequence[NodeState]) -> list[str]:
        if not nodes:
            return []
        chunks = []
        for at in range(0, len(nodes), CHUNK):
            args: list[Any] = []
            for node in nodes[at:at + CHUNK]:
                args += (node.node_id, node.revision, encode_node(node))
            chunks.append(args)

        async def save() -> list[Any]:
            keys = [self.k_nodes, self.k_rev, self.k_counter]
            return list(await asyncio.gather(*(self._cas(keys=keys, args=a) for a in chunks)))

        results = await self._writing(save())
        conflicts = []
        for node, revision in zip(nodes, (int(r) for rs in results for r in rs), strict=True):
            if revision == 0:
                conflicts.append(node.node_id)
            else:
                node.revision = revision
        return conflicts

    async def delete_node(self, node_id: str) -> bool:
        async def delete() -> bool:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.k_nodes, node_id)
                pipe.hdel(self.k_rev, node_id)
                deleted, _ = await pipe.execute()
            return int(deleted) > 0

        return await self._writing(delete())

    # -- events -----------------------------------------------------------------------------

    async def append_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        args: list[Any] = [self.events_retained]
        for event in sorted(events, key=lambda e: e.id):
            args += (event_number(event.id), encode_event(event))

        await self._writing(self._append(keys=[self.k_events], args=args))

    async def events_after(self, after: str | None, limit: int = 1000) -> list[Event]:
        start = f"({event_number(after)}-1" if after is not None else "-"
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       await self.redis.xrange(self.k_events, start, "+", count=limit))
        return [decode_event(fields[b"e"]) for _, fields in entries]

    async def last_event_id(self) -> str | None:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       await self.redis.xrevrange(self.k_events, "+", "-", count=1))
        if not entries:
            return None
        return event_id(int(entries[0][0].split(b"-")[0]))

    # -- history ----------------------------------------------------------------------------

    async def add_chunks(self, chunks: Sequence[SampleChunk]) -> None:
        """One entry per sample, as ``add_samples`` writes them."""
        await self.add_samples([s for chunk in chunks for s in chunk.samples()])

    async def add_samples(self, samples: Sequence[HistorySample]) -> None:
        if not samples:
            return
        rows = [(self._history_key(s.node_id, bool(s.span)), s.node_id, s.ts, encode_sample(s))
                for s in samples]

        async def add() -> None:
            for at in range(0, len(rows), CHUNK):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, _, ts, body in rows[at:at + CHUNK]:
                        pipe.zadd(key, {body: ts})
                    pipe.sadd(self.k_hnodes, *{row[1] for row in rows[at:at + CHUNK]})
                    await pipe.execute()

        await self._writing(add())

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self._history_key(node_id), since, "+inf")
            pipe.zrangebyscore(self._history_key(node_id, rollup=True), since, "+inf")
            raw_bodies, rolled_bodies = await pipe.execute()
        raw = [decode_sample(body) for body in cast(list[bytes], raw_bodies)]
        first = raw[0].ts if raw else math.inf
        rolled = (decode_sample(body) for body in cast(list[bytes], rolled_bodies))
        return [*(r for r in rolled if r.ts < first), *raw]

    async def prune(self, now: float, history_ttl: float,
                    full_resolution: float | None = None) -> int:
        """ZREMRANGEBYSCORE per node and tier, PRUNE_NODES nodes per pipeline: each round trip
        is short and the loop runs between them."""
        raw_cutoff = f"({now - (history_ttl if full_resolution is None else full_resolution)!r}"
        cutoff = f"({now - history_ttl!r}"
        total = 0
        cursor = 0
        while True:
            cursor, members = await self.redis.sscan(self.k_hnodes, cursor, count=PRUNE_NODES)
            node_ids = [m.decode() for m in cast(list[bytes], members)]
            for at in range(0, len(node_ids), PRUNE_NODES):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for node_id in node_ids[at:at + PRUNE_NODES]:
                        pipe.zremrangebyscore(self._history_key(node_id), "-inf", raw_cutoff)
                        pipe.zremrangebyscore(self._history_key(node_id, rollup=True), "-inf",
                                              cutoff)
                    total += sum(int(n) for n in await self._writing(pipe.execute()))
            if int(cursor) == 0:
                return total

    # -- meta -------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        value = cast(bytes | None, await self.redis.hget(self.k_meta, key))
        return None if value is None else value.decode()

    async def put_meta(self, key: str, value: str) -> None:
        await self._writing(self.redis.hset(self.k_meta, key, value))

    async def probe_write(self, now: float) -> None:
        await self.put_meta("store_probe", repr(now))
        await self.flush()
