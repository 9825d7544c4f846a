"""Store throughput: node snapshots/s, one node's hour read, prune loop-blocking, per backend.

Prints figures beside a raw baseline measured in the same run, so the ratio means something on
any machine. Goals: snapshot writes >= 50 % of raw sqlite3 executemany with 1,000-row
transactions, reading one node's last hour < 20 ms, prune never blocking the loop > 50 ms.

    .venv/bin/python bench/store_throughput.py [--backend sqlite] [--nodes 1000] [--samples 720]

A snapshot is what the coordinator writes per node per observation: the NodeState (a
compare-and-swap upsert) plus one HistorySample. etcd and Redis join as new ``--backend``
choices with their own ``make_store`` and raw baseline; the measurements are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodewatch.detect.types import Health, HistorySample, NodeState
from nodewatch.store.base import Store
from nodewatch.store.codec import encode_sample
from nodewatch.store.sqlite import SqliteStore

SAMPLE_INTERVAL = 5.0  # seconds between one node's samples: 720 of them make an hour


@dataclass
class Baseline:
    """Raw rows/s of the backend's client without nodewatch in the way."""

    batched: float  # rows/s, 1,000 rows per transaction / pipeline
    single: float  # rows/s, one row per transaction / round trip


def snapshot(node: NodeState, ts: float) -> HistorySample:
    node.seq += 1
    node.last_seen = node.last_ts = ts
    node.system = {"cpu_percent": random.uniform(0, 100), "mem_percent": 41.0, "load1": 0.42,
                   "connections": 17.0}
    node.load = {"qps": 42.0, "pending_tasks": 3.0, "error_rate": 0.002}
    return HistorySample(node.node_id, ts, node.seq, node.health.value, node.system, node.load)


def sqlite_baseline(workdir: Path, rows: int, body: bytes) -> Baseline:
    """sqlite3 executemany into a plain table, same PRAGMAs and row size as the store."""
    conn = sqlite3.connect(workdir / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE raw (node_id TEXT, ts REAL, seq INTEGER, body BLOB)")
    data = [(f"node-{i % 1000:04d}", float(i), i, body) for i in range(rows)]
    start = time.perf_counter()
    for at in range(0, rows, 1000):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO raw VALUES (?, ?, ?, ?)", data[at:at + 1000])
        conn.execute("COMMIT")
    batched = rows / (time.perf_counter() - start)
    single_rows = min(rows, 20_000)
    start = time.perf_counter()
    for row in data[:single_rows]:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO raw VALUES (?, ?, ?, ?)", [row])
        conn.execute("COMMIT")
    single = single_rows / (time.perf_counter() - start)
    conn.close()
    return Baseline(batched=batched, single=single)


async def measure_writes(store: Store, nodes: list[NodeState], batches: int) -> float:
    """Snapshots/s: each round saves every node and adds its sample, awaited together.

    Only the store calls are timed (encoding included); making up the samples is not."""
    ts = 0.0
    took = 0.0
    for _ in range(batches):
        ts += SAMPLE_INTERVAL
        samples = [snapshot(node, ts) for node in nodes]
        start = time.perf_counter()
        lost, _ = await asyncio.gather(store.save_nodes(nodes), store.add_samples(samples))
        took += time.perf_counter() - start
        if lost:
            raise AssertionError(f"unexpected conflicts: {lost[:5]}")
    return len(nodes) * batches / took


async def measure_reads(store: Store, nodes: list[NodeState], since: float) -> list[float]:
    """Milliseconds to read one node's last hour, for 50 random nodes, one at a time."""
    took = []
    for node in random.sample(nodes, min(50, len(nodes))):
        start = time.perf_counter()
        got = await store.history(node.node_id, since)
        took.append((time.perf_counter() - start) * 1000)
        if not got:
            raise AssertionError(f"no history for {node.node_id}")
    return took


async def measure_prune(store: Store, now: float, ttl: float) -> tuple[int, float, float]:
    """Rows deleted, seconds taken, and the longest the event loop went without a tick."""
    longest = 0.0
    running = True

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0)
            at = time.perf_counter()
            longest = max(longest, at - last)
            last = at

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    start = time.perf_counter()
    deleted = await store.prune(now, ttl)
    took = time.perf_counter() - start
    running = False
    await ticker
    return deleted, took, longest


@dataclass
class Backend:
    make_store: Callable[[Path], Store]
    baseline: Callable[[Path, int, bytes], Baseline]
    baseline_name: str


BACKENDS = {
    "sqlite": Backend(
        make_store=lambda workdir: SqliteStore(workdir / "state.db"),
        baseline=sqlite_baseline,
        baseline_name="sqlite3 executemany, plain table",
    ),
}


async def run(args: argparse.Namespace, workdir: Path) -> None:
    backend = BACKENDS[args.backend]
    nodes = [NodeState(f"node-{i:04d}", f"10.0.{i // 250}.{i % 250}:7301",
                       labels={"zone": "abc"[i % 3]}, health=Health.HEALTHY, incarnation=1)
             for i in range(args.nodes)]
    body = encode_sample(snapshot(NodeState("node-0000", "x"), 0.0))
    raw = backend.baseline(workdir, 200_000, body)
    print(f"backend {args.backend}: {args.nodes} nodes x {args.samples} samples, "
          f"{len(body)} B/sample")
    print(f"  raw baseline ({backend.baseline_name}, {len(body)} B rows):")
    print(f"    1,000-row transactions   {raw.batched:>10,.0f} rows/s")
    print(f"    one-row transactions     {raw.single:>10,.0f} rows/s")

    store = backend.make_store(workdir)
    await store.open()
    try:
        rate = await measure_writes(store, nodes, args.samples)
        ratio = rate / raw.batched
        print(f"  snapshot writes (save_nodes + add_samples, {args.nodes}-node batches):")
        print(f"    {rate:>10,.0f} snapshots/s = {ratio:.0%} of raw batched "
              f"({rate / raw.single:.1f}x raw one-row; {2 * rate:,.0f} rows/s)   goal >= 50 %: "
              f"{'ok' if ratio >= 0.5 else 'MISSED'}")
        now = args.samples * SAMPLE_INTERVAL
        reads = await measure_reads(store, nodes, now - 3600.0)
        median, worst = statistics.median(reads), max(reads)
        print(f"  read one node's last hour ({min(args.samples, 720)} samples): median "
              f"{median:.2f} ms, max {worst:.2f} ms   goal < 20 ms: "
              f"{'ok' if worst < 20 else 'MISSED'}")
        # Prune the oldest sixth (10 of 60 minutes), as a coordinator catching up would.
        deleted, took, longest = await measure_prune(store, now + 600.0, 3600.0)
        print(f"  prune: {deleted:,} rows in {took * 1000:.0f} ms "
              f"({deleted / took:,.0f} rows/s), longest loop block {longest * 1000:.1f} ms"
              f"   goal < 50 ms: {'ok' if longest < 0.05 else 'MISSED'}")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="sqlite")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=720, help="samples per node (720 = 1 h)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    random.seed(1)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run(args, args.dir))
        return
    with tempfile.TemporaryDirectory(prefix="nodewatch-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
