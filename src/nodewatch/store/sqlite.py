"""The embedded default store: one SQLite file in WAL mode, written by one group-committing thread.

Writes issued in one turn of the event loop are handed together to a dedicated writer thread,
which commits everything it finds queued in one transaction (group commit), so many small awaits
cost one fsync-free WAL commit and the event loop never waits on SQLite. Reads use a second
connection on their own thread; WAL lets them run while the writer commits. With
``synchronous=FULL`` every commit syncs the WAL before its writes resolve, so a committed
transaction survives a crash of the process and of the machine (power loss): the coordinator
acknowledges commands and transitions once they resolve, and nothing acknowledged may be lost.
(``NORMAL`` would skip that sync and lose the last commits on power loss.) Group commit keeps
the syncs to one per transaction, not one per write.

A write that fails for a storage reason (``sqlite3.OperationalError``: disk full, I/O error,
locked) fails its whole group and rolls it back: SQLite may already have rolled the whole
transaction back on its own (SQLITE_FULL does), so a group is never half-committed and every
caller sees the real cause.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Final, TypeVar

from nodewatch.model import Event, HistorySample, NodeState, SampleChunk
from nodewatch.store.codec import (
    decode_chunk_body,
    decode_event,
    decode_node,
    decode_sample_body,
    encode_chunk_body,
    encode_event,
    encode_node_packed,
    encode_sample_body_packed,
)

__all__ = ["SqliteStore"]

log = logging.getLogger("nodewatch.store.sqlite")

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]
# Bytes of new pages a probe write needs (probe_write): more than the room a full database
# has left inside its pages, about what a round of history writes takes.
PROBE_ROOM: Final = 64 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, revision INTEGER NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    bucket INTEGER NOT NULL, node_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (bucket, node_id, ts, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sample_buckets (bucket INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS rollups (
    bucket INTEGER NOT NULL, node_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (bucket, node_id, ts, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_buckets (bucket INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS chunks (
    bucket INTEGER NOT NULL, node_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (bucket, node_id, ts, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk_buckets (bucket INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# samples is clustered by (bucket, node_id, ts, seq), bucket = floor(ts / BUCKET_SECONDS): time
# first, so a commit's samples land at the right edge of the tree next to each other (close to
# a plain append; a table keyed (node_id, ts) dirtied one page per node per commit and ran at
# ~25k rows/s, and a heap log moved into it every 20k rows at ~40-80k), and pruning deletes
# from the left edge. One node's hour is one primary-key seek per bucket (720 for an hour),
# driven by sample_buckets, the list of buckets that hold samples. Bodies leave out node_id,
# ts and seq, which the key holds. Rollups (store/tiers.py) live in a table of the same shape
# with one-minute buckets (60 seeks for an hour), so each tier ages out on its own. Raw samples
# written as chunks (store/tiers.py SampleChunks: up to a minute of one node's samples, one row
# instead of twelve) live in a third table of that shape, keyed by their last sample's ts and
# seq: a chunk is read while any of its samples is at or after ``since`` and pruned once all
# are before the cutoff.

_MAX_BATCH: Final = 512  # queued operations per transaction; bounds one commit's duration
BUCKET_SECONDS: Final = 5.0  # stored in every row's key: changing it needs a migration
ROLLUP_BUCKET_SECONDS: Final = 60.0  # the same, for the rollups table
_STOP: Final = object()
CHECKPOINT_EVERY: Final = 0.25  # seconds; at most this often a background WAL checkpoint
_BACKSTOP_PAGES: Final = 10_000  # the writer's own automatic checkpoint (SQLite's default 1,000)
# One seek per listed bucket; rows come out in (bucket, ts, seq) order, which is ts order.
HISTORY_QUERY: Final = (
    "SELECT s.ts, s.seq, s.body FROM sample_buckets AS b JOIN samples AS s "
    "ON s.bucket = b.bucket AND s.node_id = ?1 AND s.ts >= ?2 "
    "WHERE b.bucket >= ?3 ORDER BY b.bucket, s.ts, s.seq"
)


@dataclass(slots=True)
class _Tier:
    """One history tier's table, its bucket list and width; ``known``: the newest buckets known
    to be listed (owned by the writer thread)."""

    table: str
    buckets: str
    seconds: float
    known: set[int] = field(default_factory=set)

    def bucket(self, ts: float) -> int:
        return math.floor(ts / self.seconds)

    @property
    def query(self) -> str:
        return HISTORY_QUERY.replace("sample_buckets", self.buckets).replace(
            "samples", self.table)


class _Write:
    """One queued write: the function the writer thread runs and the future it resolves."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: WriteFn, future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


def _resolve(outcomes: list[Outcome]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _bucket(ts: float) -> int:
    return math.floor(ts / BUCKET_SECONDS)


def _connect(path: Path, *, cache_mb: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per group).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class _Checkpointer:
    """Copies the WAL into the database file on its own thread and connection, at most every
    ``CHECKPOINT_EVERY`` seconds after commits, so that the writer's commits no longer include
    SQLite's automatic checkpoint (10-20 % of the bench's write time). Readers and the writer
    go on while it copies (a PASSIVE checkpoint); the writer keeps an automatic checkpoint at
    ``_BACKSTOP_PAGES`` in case this one falls behind."""

    def __init__(self, path: Path) -> None:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path,), name=f"nodewatch-store-checkpoint:{path.name}",
            daemon=True,
        )
        self._thread.start()

    def committed(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    def _run(self, path: Path) -> None:
        conn = _connect(path, cache_mb=1)
        try:
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # the backstop checkpoints meanwhile
                    log.warning("background checkpoint of %s failed: %s", path, error)
                if self._stopping.wait(CHECKPOINT_EVERY):
                    return
        finally:
            conn.close()


def _migrate_history(conn: sqlite3.Connection) -> None:
    """Move samples from the layout before buckets (history + history_log) into ``samples``;
    their bodies still hold node_id, ts and seq, which the body decoder ignores."""
    old = {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('history', 'history_log')"
    )}
    if not old:
        return
    conn.create_function("nodewatch_bucket", 1, _bucket, deterministic=True)
    conn.execute("BEGIN IMMEDIATE")
    for table in sorted(old):
        conn.execute(
            f"INSERT OR IGNORE INTO samples(bucket, node_id, ts, seq, body) SELECT "
            f"nodewatch_bucket(ts), node_id, ts, seq, body FROM {table}"
        )
        conn.execute(f"DROP TABLE {table}")
    conn.execute(
        "INSERT OR IGNORE INTO sample_buckets(bucket) SELECT DISTINCT bucket FROM samples"
    )
    conn.execute("COMMIT")


class SqliteStore:
    """The :class:`~nodewatch.store.base.Store` on one SQLite file (default backend)."""

    def __init__(
        self,
        path: str | Path,
        *,
        events_retained: int = 100_000,
        prune_chunk: int = 5_000,
        cache_mb: int = 64,
    ) -> None:
        if events_retained < 1 or prune_chunk < 1:
            raise ValueError("events_retained and prune_chunk must be at least 1")
        self.path = Path(path)
        self.events_retained = events_retained
        self.prune_chunk = prune_chunk
        self.cache_mb = cache_mb
        self._queue: queue.SimpleQueue[list[_Write] | object] = queue.SimpleQueue()
        self._pending: list[_Write] = []  # issued in this turn of the loop, not yet handed over
        self._writer: threading.Thread | None = None
        self._writer_ready: asyncio.Future[None] | None = None
        self._writer_done: asyncio.Future[None] | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the writer thread only:
        self._revision = 0  # last store revision handed out; monotonic across deletes
        self._event_count = 0
        self._raw = _Tier("samples", "sample_buckets", BUCKET_SECONDS)
        self._rolled = _Tier("rollups", "rollup_buckets", ROLLUP_BUCKET_SECONDS)
        self._chunked = _Tier("chunks", "chunk_buckets", BUCKET_SECONDS)
        self._closed = False

    @property
    def _tiers(self) -> tuple[_Tier, _Tier, _Tier]:
        return self._raw, self._rolled, self._chunked

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._loop is not None:
            raise RuntimeError("store already opened")
        self._loop = loop = asyncio.get_running_loop()
        self._writer_ready = loop.create_future()
        self._writer_done = loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, name=f"nodewatch-store-writer:{self.path.name}", daemon=True
        )
        self._writer.start()
        await self._writer_ready  # schema exists before the reader opens
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="nodewatch-store-reader")
        self._read_conn = await loop.run_in_executor(self._reader, self._open_reader)

    def _open_reader(self) -> sqlite3.Connection:
        conn = _connect(self.path, cache_mb=self.cache_mb)
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def close(self) -> None:
        if self._loop is None or self._closed:
            return
        self._closed = True
        self._hand_over()
        self._queue.put(_STOP)  # FIFO: everything queued before is committed first
        assert self._writer_done is not None
        await self._writer_done
        if self._reader is not None:
            conn = self._read_conn
            if conn is not None:
                await self._loop.run_in_executor(self._reader, conn.close)
            self._reader.shutdown(wait=False)

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the writer thread ------------------------------------------------------------------

    def _writer_main(self) -> None:
        loop = self._loop
        assert loop is not None and self._writer_ready is not None and self._writer_done is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, cache_mb=self.cache_mb)
            conn.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_PAGES}")
            conn.execute("PRAGMA journal_size_limit=67108864")  # a restarted WAL shrinks to 64 MB
            conn.executescript(_SCHEMA)
            _migrate_history(conn)
            self._revision = max(
                conn.execute("SELECT coalesce(max(revision), 0) FROM nodes").fetchone()[0],
                conn.execute(
                    "SELECT coalesce(max(value), 0) FROM store_info WHERE key = 'revision'"
                ).fetchone()[0],
            )
            self._event_count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        except BaseException as error:  # noqa: BLE001 - reported to open()'s caller
            failed: list[Outcome] = [
                (self._writer_ready, None, error),
                (self._writer_done, None, None),
            ]
            loop.call_soon_threadsafe(_resolve, failed)
            return
        ready: list[Outcome] = [(self._writer_ready, None, None)]
        loop.call_soon_threadsafe(_resolve, ready)
        checkpointer = _Checkpointer(self.path)
        try:
            stopping = False
            while not stopping:
                batch: list[_Write] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    assert isinstance(item, list)
                    batch.extend(item)
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    loop.call_soon_threadsafe(_resolve, self._commit(conn, batch))
                    checkpointer.committed()
        finally:
            checkpointer.stop()
            conn.close()
            done: list[Outcome] = [(self._writer_done, None, None)]
            loop.call_soon_threadsafe(_resolve, done)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write]) -> list[Outcome]:
        """Run a group of writes in one transaction; one failing write fails alone."""
        outcomes: list[Outcome] = []
        events_before = self._event_count
        known_before = [set(t.known) for t in self._tiers]
        revision_before = self._revision
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                conn.execute("SAVEPOINT write")
                try:
                    result = write.fn(conn)
                except sqlite3.OperationalError:
                    raise  # storage trouble: the whole group fails (below), with this cause
                except Exception as error:  # noqa: BLE001 - handed to the awaiting caller
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                    outcomes.append((write.future, None, error))
                else:
                    conn.execute("RELEASE write")
                    outcomes.append((write.future, result, None))
            if self._revision != revision_before:
                conn.execute(
                    "INSERT OR REPLACE INTO store_info(key, value) VALUES ('revision', ?)",
                    (self._revision,),
                )
            if self._event_count > self.events_retained:
                self._trim_events(conn)
            conn.execute("COMMIT")
        except Exception as error:  # noqa: BLE001 - the whole group failed to commit
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:  # the writer thread must live on
                    log.warning("rollback of %s failed: %s", self.path, rollback_error)
            # Revisions already handed out stay burnt (only monotonicity matters).
            self._event_count = events_before
            for tier, known in zip(self._tiers, known_before, strict=True):
                tier.known = known
            return [(write.future, None, error) for write in batch]
        return outcomes

    def _trim_events(self, conn: sqlite3.Connection) -> None:
        excess = self._event_count - self.events_retained
        conn.execute(
            "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id LIMIT 1 OFFSET ?)",
            (excess - 1,),
        )
        self._event_count = self.events_retained

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._loop
        if loop is None or self._closed:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_Write(fn, future))
        if len(self._pending) == 1:
            loop.call_soon(self._hand_over)
        return await future

    def _hand_over(self) -> None:
        """Queue this turn's writes as one item, so that the writer (woken by the first put)
        does not start a transaction with only part of them (the bench's save_nodes and
        add_samples, awaited together, went into two commits)."""
        if self._pending:
            writes, self._pending = self._pending, []
            self._queue.put(writes)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._read_conn
        if self._loop is None or conn is None or self._closed:
            raise RuntimeError("store is not open")
        return await self._loop.run_in_executor(self._reader, fn, conn)

    async def flush(self) -> None:
        await self._write(lambda conn: None)

    # -- nodes ------------------------------------------------------------------------------

    async def load_nodes(self) -> list[NodeState]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT revision, body FROM nodes ORDER BY node_id"
            ).fetchall()
        )
        return [decode_node(body, revision) for revision, body in rows]

    async def get_node(self, node_id: str) -> NodeState | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT revision, body FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
        )
        return None if row is None else decode_node(row[1], row[0])

    async def save_nodes(self, nodes: Sequence[NodeState]) -> list[str]:
        if not nodes:
            return []
        # Encode on the loop: the snapshot is taken now, whatever the caller changes next.
        items = [(node.node_id, node.revision, encode_node_packed(node)) for node in nodes]
        revisions = await self._write(lambda conn: self._save_nodes(conn, items))
        conflicts = []
        for node, revision in zip(nodes, revisions, strict=True):
            if revision is None:
                conflicts.append(node.node_id)
            else:
                node.revision = revision
        return conflicts

    def _save_nodes(
        self, conn: sqlite3.Connection, items: list[tuple[str, int, bytes]]
    ) -> list[int | None]:
        """Writer thread: new revision per node, or None for a lost compare-and-swap."""
        base = self._revision
        self._revision += len(items)
        new = [base + i + 1 for i in range(len(items))]
        # Fast path: every compare succeeds, checked by the total row count of two executemany.
        conn.execute("SAVEPOINT cas")
        updates = [
            (body, rev, node_id, old)
            for (node_id, old, body), rev in zip(items, new, strict=True)
            if old > 0
        ]
        inserts = [
            (node_id, rev, body)
            for (node_id, old, body), rev in zip(items, new, strict=True)
            if old == 0
        ]
        changed = 0
        if updates:
            changed += conn.executemany(
                "UPDATE nodes SET body = ?, revision = ? WHERE node_id = ? AND revision = ?",
                updates,
            ).rowcount
        if inserts:
            changed += conn.executemany(
                "INSERT OR IGNORE INTO nodes(node_id, revision, body) VALUES (?, ?, ?)", inserts
            ).rowcount
        if changed == len(items):
            conn.execute("RELEASE cas")
            return list(new)
        conn.execute("ROLLBACK TO cas")
        conn.execute("RELEASE cas")
        # Slow path, one node at a time: find the losers and the replays of stored content.
        result: list[int | None] = []
        for (node_id, old, body), rev in zip(items, new, strict=True):
            row = conn.execute(
                "SELECT revision, body FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
            stored = 0 if row is None else row[0]
            if stored == old:
                conn.execute(
                    "INSERT OR REPLACE INTO nodes(node_id, revision, body) VALUES (?, ?, ?)",
                    (node_id, rev, body),
                )
                result.append(rev)
            elif row is not None and row[1] == body:
                result.append(stored)  # the same content again: nothing to change
            else:
                result.append(None)
        return result

    async def delete_node(self, node_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)).rowcount > 0

        return await self._write(delete)

    # -- events -----------------------------------------------------------------------------

    async def append_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        rows = [(event.id, encode_event(event)) for event in events]

        def append(conn: sqlite3.Connection) -> None:
            added = conn.executemany(
                "INSERT OR IGNORE INTO events(id, body) VALUES (?, ?)", rows
            ).rowcount
            self._event_count += added

        await self._write(append)

    async def events_after(self, after: str | None, limit: int = 1000) -> list[Event]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit)
            ).fetchall()
        )
        return [decode_event(body) for (body,) in rows]

    async def last_event_id(self) -> str | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT id FROM events ORDER BY id DESC LIMIT 1").fetchone()
        )
        return None if row is None else str(row[0])

    # -- history ----------------------------------------------------------------------------

    async def add_samples(self, samples: Sequence[HistorySample]) -> None:
        if not samples:
            return
        raw: list[tuple[int, str, float, int, bytes]] = []
        rolled: list[tuple[int, str, float, int, bytes]] = []
        for s in samples:
            tier, rows = (self._rolled, rolled) if s.span else (self._raw, raw)
            rows.append((tier.bucket(s.ts), s.node_id, s.ts, s.seq, encode_sample_body_packed(s)))

        def add(conn: sqlite3.Connection) -> None:
            if raw:
                self._add_rows(conn, self._raw, raw)
            if rolled:
                self._add_rows(conn, self._rolled, rolled)

        await self._write(add)

    async def add_chunks(self, chunks: Sequence[SampleChunk]) -> None:
        rows = [(self._chunked.bucket(c.last_ts), c.node_id, c.last_ts, c.last_seq,
                 encode_chunk_body(c)) for c in chunks if len(c)]
        if rows:
            await self._write(lambda conn: self._add_rows(conn, self._chunked, rows))

    @staticmethod
    def _add_rows(conn: sqlite3.Connection, tier: _Tier,
                  rows: list[tuple[int, str, float, int, bytes]]) -> None:
        """Writer thread: rows sorted by key, so the tree sees an in-order run of inserts."""
        rows.sort(key=itemgetter(0, 1, 2, 3))
        conn.executemany(
            f"INSERT OR IGNORE INTO {tier.table}(bucket, node_id, ts, seq, body) "
            "VALUES (?, ?, ?, ?, ?)", rows,
        )
        new = {row[0] for row in rows} - tier.known
        if new:
            conn.executemany(
                f"INSERT OR IGNORE INTO {tier.buckets}(bucket) VALUES (?)", [(b,) for b in new]
            )
            tier.known |= new
            if len(tier.known) > 64:  # only the newest matter: samples come in time order
                tier.known = set(sorted(tier.known)[-16:])

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        raw_query, rolled_query = self._raw.query, self._rolled.query

        chunk_query = self._chunked.query

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            raw = conn.execute(raw_query, (node_id, since, self._raw.bucket(since))).fetchall()
            rolled = conn.execute(
                rolled_query, (node_id, since, self._rolled.bucket(since))).fetchall()
            chunked = conn.execute(
                chunk_query, (node_id, since, self._chunked.bucket(since))).fetchall()
            return raw, rolled, chunked

        raw, rolled, chunked = await self._read(read)
        samples = [decode_sample_body(node_id, ts, seq, body) for ts, seq, body in raw]
        if chunked:  # both tables only across the upgrade to chunks; each dedupes on its own
            seen = {(s.ts, s.seq) for s in samples}
            for _, _, body in chunked:
                for sample in decode_chunk_body(node_id, body).samples():
                    if sample.ts >= since and (sample.ts, sample.seq) not in seen:
                        seen.add((sample.ts, sample.seq))
                        samples.append(sample)
            samples.sort(key=attrgetter("ts", "seq"))
        first = samples[0].ts if samples else math.inf
        return [*(decode_sample_body(node_id, ts, seq, body)
                  for ts, seq, body in rolled if ts < first), *samples]

    async def prune(self, now: float, history_ttl: float,
                    full_resolution: float | None = None) -> int:
        """Each step is its own short transaction of at most ``prune_chunk`` rows, so queued
        writes get in between steps and no commit grows with the backlog."""
        raw_cutoff = now - (history_ttl if full_resolution is None else full_resolution)
        total = 0
        for tier, cutoff in ((self._raw, raw_cutoff), (self._chunked, raw_cutoff),
                             (self._rolled, now - history_ttl)):
            done = False
            while not done:
                deleted, done = await self._write(
                    partial(self._prune_step, tier=tier, cutoff=cutoff))
                total += deleted
        return total

    def _prune_step(self, conn: sqlite3.Connection, *, tier: _Tier,
                    cutoff: float) -> tuple[int, bool]:
        """Writer thread: delete up to ``prune_chunk`` expired rows from the oldest buckets
        (the left edge of the tree); return the count and whether nothing expired is left."""
        budget = self.prune_chunk
        deleted = 0
        last = tier.bucket(cutoff)  # the bucket holding the cutoff keeps its newer rows
        buckets = conn.execute(
            f"SELECT bucket FROM {tier.buckets} WHERE bucket <= ? ORDER BY bucket", (last,)
        ).fetchall()
        for (bucket,) in buckets:
            count = conn.execute(
                f"DELETE FROM {tier.table} WHERE bucket = ?1 AND (node_id, ts, seq) IN ("
                f"SELECT node_id, ts, seq FROM {tier.table} WHERE bucket = ?1 AND ts < ?2 "
                "LIMIT ?3)",
                (bucket, cutoff, budget - deleted),
            ).rowcount
            deleted += count
            if deleted >= budget:
                return deleted, False  # this bucket may hold more: the next step looks again
            if bucket < last:
                conn.execute(f"DELETE FROM {tier.buckets} WHERE bucket = ?", (bucket,))
                tier.known.discard(bucket)
        return deleted, True

    # -- meta -------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        )
        return None if row is None else str(row[0])

    async def put_meta(self, key: str, value: str) -> None:
        def put(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

        await self._write(put)

    async def probe_write(self, now: float) -> None:
        def probe(conn: sqlite3.Connection) -> None:
            # PROBE_ROOM of new pages, freed again before the commit: refused while the disk
            # (or max_page_count) leaves no room, whatever room is left inside pages.
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('store_probe', ?)",
                         (repr(now),))
            conn.execute("INSERT OR REPLACE INTO meta(key, value) "
                         "VALUES ('store_probe_room', zeroblob(?))", (PROBE_ROOM,))
            conn.execute("DELETE FROM meta WHERE key = 'store_probe_room'")

        await self._write(probe)
        await self.flush()
