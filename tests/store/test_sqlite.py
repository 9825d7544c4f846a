"""SQLite specifics: WAL settings, the default path, kill -9 durability, prune in bounded steps,
the key that keeps one node's hour a few seeks, and samples kept across the bucket migration."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from array import array
from pathlib import Path
from typing import Any

import pytest

from nodewatch.model import HistorySample, NodeState, SampleChunk, event_id
from nodewatch.store.codec import encode_sample
from nodewatch.store.open import DEFAULT_SQLITE_PATH, open_store
from nodewatch.store.sqlite import HISTORY_QUERY, SqliteStore


async def test_database_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "state.db") as store:
        await store.flush()
        conn = sqlite3.connect(tmp_path / "state.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        synchronous = await store._read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert synchronous == 2  # FULL: an acknowledged commit survives power loss


async def test_default_url_creates_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite://")
    await store.open()
    await store.put_meta("k", "v")
    await store.close()
    assert (tmp_path / DEFAULT_SQLITE_PATH).is_file()


async def test_a_failing_write_fails_alone_in_its_group(tmp_path: Path) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('half', 'done')")
        raise RuntimeError("boom")

    async with SqliteStore(tmp_path / "state.db") as store:
        results = await asyncio.gather(
            store.put_meta("before", "1"), store._write(broken), store.put_meta("after", "2"),
            return_exceptions=True,
        )
        assert isinstance(results[1], RuntimeError)
        assert await store.get_meta("before") == "1" and await store.get_meta("after") == "2"
        assert await store.get_meta("half") is None  # its partial work was rolled back


async def test_concurrent_saves_are_all_committed(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "state.db") as store:
        batches = [[NodeState(f"n{b}-{i}", "h:1") for i in range(20)] for b in range(50)]
        results = await asyncio.gather(*(store.save_nodes(batch) for batch in batches))
        assert results == [[]] * 50
        revisions = [n.revision for batch in batches for n in batch]
        assert len(set(revisions)) == 1000
        assert len(await store.load_nodes()) == 1000


async def test_history_read_is_one_primary_key_seek_per_bucket(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "state.db") as store:
        plan = await store._read(lambda c: c.execute(
            "EXPLAIN QUERY PLAN " + HISTORY_QUERY, ("a", 0.0, 0)).fetchall())
    detail = " ".join(str(row[-1]) for row in plan)
    assert "SEARCH b USING INTEGER PRIMARY KEY (rowid>?)" in detail
    assert "SEARCH s USING PRIMARY KEY (bucket=? AND node_id=? AND ts>?)" in detail
    assert "TEMP B-TREE" not in detail  # no sort: rows come out in ts order


async def test_samples_of_the_layout_before_buckets_are_kept(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE history (node_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER NOT NULL,
            body BLOB NOT NULL, PRIMARY KEY (node_id, ts, seq)) WITHOUT ROWID;
        CREATE TABLE history_log (node_id TEXT NOT NULL, ts REAL NOT NULL,
            seq INTEGER NOT NULL, body BLOB NOT NULL);
    """)
    old = [HistorySample("web-1", float(t), t, "healthy", {"cpu_percent": t}, {})
           for t in range(20)]
    for table, part in (("history", old[:12]), ("history_log", old[12:])):
        conn.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)",
                         [(s.node_id, s.ts, s.seq, encode_sample(s)) for s in part])
    conn.commit()
    conn.close()
    async with SqliteStore(db) as store:
        assert await store.history("web-1", 0.0) == old
        assert await store.history("web-1", 13.0) == old[13:]
        tables = await store._read(lambda c: c.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE 'history%'").fetchall())
        assert tables == []


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from array import array
    from nodewatch.model import Event, HistorySample, NodeState, SampleChunk, event_id
    from nodewatch.store.sqlite import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1])
        await store.open()
        nodes = [NodeState(f"web-{i}", "10.0.0.1:7301", seq=i) for i in range(200)]
        await store.save_nodes(nodes)
        nodes[0].seq = 1000
        await store.save_nodes(nodes[:1])
        await store.append_events(
            [Event(event_id(i), float(i), "web-1", "healthy") for i in range(1, 101)])
        await store.add_samples([HistorySample(f"web-{i}", float(t), t, "healthy", {}, {})
                                 for i in range(200) for t in range(10)])
        await store.add_chunks([SampleChunk(f"web-{i}", ("cpu",), (), array("d", [20.0, 25.0]),
                                            array("q", [20, 25]), bytes(2), array("d", [1.0, 2.0]))
                                for i in range(200)])
        await store.put_meta("leader", "c-1")
        await store.flush()
        print("acked", flush=True)
        await asyncio.Event().wait()  # stay alive, mid-life, until killed

    asyncio.run(main())
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "acked"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    async def check() -> None:
        async with SqliteStore(db) as store:
            nodes = await store.load_nodes()
            assert len(nodes) == 200
            assert next(n for n in nodes if n.node_id == "web-0").seq == 1000
            assert len(await store.events_after(None, limit=1000)) == 100
            assert await store.last_event_id() == event_id(100)
            assert len(await store.history("web-199", 0.0)) == 12
            assert await store.get_meta("leader") == "c-1"

    asyncio.run(check())


async def test_pruning_200k_rows_goes_in_bounded_steps_with_the_loop_running_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How long the loop may wait is a goal measured by bench/store_throughput.py; this pins
    what makes it short: many small steps, each its own write, the loop ticking in between."""
    async with SqliteStore(tmp_path / "state.db", prune_chunk=5_000) as store:
        for part in range(20):  # 200 nodes x 1,000 old samples + 100 fresh ones each
            await store.add_samples([
                HistorySample(f"n{i:03d}", float(t), t, "healthy", {"cpu_percent": 1.0}, {})
                for i in range(part * 10, part * 10 + 10) for t in range(1100)
            ])
        steps: list[int] = []
        ticks_before_step: list[int] = []
        ticks = 0
        prune_step = store._prune_step

        def counted_step(conn: sqlite3.Connection, *, tier: Any,
                         cutoff: float) -> tuple[int, bool]:
            ticks_before_step.append(ticks)
            deleted, done = prune_step(conn, tier=tier, cutoff=cutoff)
            steps.append(deleted)
            return deleted, done

        monkeypatch.setattr(store, "_prune_step", counted_step)
        pruning = True

        async def tick() -> None:
            nonlocal ticks
            while pruning:
                await asyncio.sleep(0)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        start = time.perf_counter()
        deleted = await store.prune(now=4600.0, history_ttl=3600.0)
        took = time.perf_counter() - start
        pruning = False
        await ticker

        assert deleted == 200_000 == sum(steps)
        assert len(steps) >= 40 and max(steps) <= 5_000  # bounded steps, not one big delete
        # The loop ran between every two steps (each step is a separate write it awaited).
        assert all(b > a for a, b in itertools.pairwise(ticks_before_step))
        for node in ("n000", "n123", "n199"):
            kept = await store.history(node, 0.0)
            assert [s.ts for s in kept] == [float(t) for t in range(1000, 1100)]
        assert await store.prune(now=4600.0, history_ttl=3600.0) == 0
        # Only a hang bound (about 1 s is expected); the speed is bench/store_throughput.py's.
        assert took < 30.0, f"prune of 200k rows took {took:.2f} s"


async def test_a_chunk_is_one_row_kept_until_its_last_sample_ages_out(tmp_path: Path) -> None:
    """SQLite writes a chunk as one row keyed by its last sample; samples stored one a row
    before the upgrade to chunks are read beside them, each once."""
    async with SqliteStore(tmp_path / "state.db") as store:
        times = [float(t) for t in range(290, 350, 5)]  # straddles the cutoff at 300
        await store.add_chunks([SampleChunk("a", ("cpu",), ("qps",), array("d", times),
                                            array("q", [int(t) for t in times]),
                                            bytes([0] * 11 + [2]),
                                            array("d", [v for t in times for v in (t, 1.0)]))])
        await store.add_samples([HistorySample("a", 290.0, 290, "healthy", {"cpu": 290.0},
                                               {"qps": 1.0}),
                                 HistorySample("a", 280.0, 280, "healthy", {"cpu": 280.0},
                                               {"qps": 1.0})])
        rows = await store._read(lambda c: c.execute("SELECT count(*) FROM chunks").fetchone())
        assert rows == (1,)
        points = await store.history("a", 0.0)
        assert [p.ts for p in points] == [280.0, *times]
        assert points[-1].health == "suspect" and points[-1].system == {"cpu": 345.0}
        await store.prune(now=3900.0, history_ttl=3600.0)  # cutoff 300
        assert [p.ts for p in await store.history("a", 0.0)] == times  # the chunk stays whole
        await store.prune(now=3950.0, history_ttl=3600.0)  # past its last sample
        assert await store.history("a", 0.0) == []


async def test_a_probe_write_needs_new_room_not_the_room_left_inside_pages(
        tmp_path: Path) -> None:
    """A full database still takes a row rewritten in place; the probe that says the store is
    back must not pass on that room, and leaves nothing behind when it passes."""
    async with SqliteStore(tmp_path / "state.db") as store:
        await store.put_meta("spare", "x" * 100)
        await store.flush()

        def page_counts(conn: sqlite3.Connection) -> tuple[int, int]:
            return (conn.execute("PRAGMA page_count").fetchone()[0],
                    conn.execute("PRAGMA freelist_count").fetchone()[0])
        pages, _ = await store._write(page_counts)
        await store._write(lambda c: c.execute(f"PRAGMA max_page_count={pages}").fetchone())
        await store.put_meta("spare", "y" * 100)  # in place: still taken
        with pytest.raises(sqlite3.OperationalError, match="full"):
            await store.probe_write(1.0)
        await store._write(lambda c: c.execute("PRAGMA max_page_count=1073741823").fetchone())
        await store.probe_write(2.0)
        assert await store.get_meta("store_probe") == "2.0"
        assert await store.get_meta("store_probe_room") is None
        assert await store.get_meta("spare") == "y" * 100
