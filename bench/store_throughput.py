"""Store throughput: node snapshots/s, one node's hour read, prune loop-blocking, per backend.

Prints figures beside a raw baseline measured in the same run, so the ratio means something on
any machine. Goals: snapshot writes >= 50 % of the raw baseline, compared per row (a snapshot
is two rows: the node and its sample; the ratio per snapshot is printed too), reading one
node's last hour < 20 ms (the slowest of 50 reads), prune never blocking the loop > 50 ms.

    .venv/bin/python bench/store_throughput.py [--backend sqlite|etcd|redis|all] [--nodes 1000]
        [--samples 720] [--gc coordinator|default]

etcd and Redis run as throwaway servers on loopback started by the script (Debian's etcd and
redis-server); their baselines are the client's plain puts with 64 in flight (etcd) and
pipelined SETs (Redis), on the same server in the same run.

A snapshot is what the coordinator writes per node per observation: the NodeState (a
compare-and-swap upsert) plus one HistorySample. The baselines write rows of the full encoded
sample's size; a store may store fewer bytes (SQLite leaves the key fields out of the body).

The process runs with the coordinator's GC settings (``tune_gc``: state frozen, gen0 threshold
50,000) unless ``--gc default``: with the defaults, gen-2 collections of 10-20 ms land inside
reads on a loaded machine and the slowest read measures the collector, not the store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nodewatch.coordinator.run import tune_gc
from nodewatch.model import Health, HistorySample, NodeState
from nodewatch.store.base import Store
from nodewatch.store.codec import encode_sample
from nodewatch.store.etcd import EtcdStore
from nodewatch.store.redis import RedisStore
from nodewatch.store.sqlite import SqliteStore
from nodewatch.testing import EtcdCluster, RedisServer, find_binary

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


async def sqlite_baseline(workdir: Path, url: str, rows: int, body: bytes) -> Baseline:
    return _sqlite_baseline(workdir, rows, body)


async def etcd_baseline(workdir: Path, url: str, rows: int, body: bytes) -> Baseline:
    """etcd3aio plain puts of the same rows: 64 in flight, then one at a time."""
    store = EtcdStore.from_url(url.replace("/bench", "/raw"))
    await store.open()
    try:
        kv = store.kv
        rows = min(rows, 40_000)
        sem = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with sem:
                await kv.put(f"/raw/{i % 1000:04d}/{i:09d}".encode(), body)

        start = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(rows)))
        batched = rows / (time.perf_counter() - start)
        single_rows = 2_000
        start = time.perf_counter()
        for i in range(single_rows):
            await kv.put(f"/raw1/{i:09d}".encode(), body)
        single = single_rows / (time.perf_counter() - start)
    finally:
        await store.close()
    return Baseline(batched=batched, single=single)


async def redis_baseline(workdir: Path, url: str, rows: int, body: bytes) -> Baseline:
    """redis-py SETs of the same rows: 1,000 per pipeline, then one per round trip."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url.split("?")[0], socket_timeout=30.0)
    try:
        start = time.perf_counter()
        for at in range(0, rows, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(at, min(rows, at + 1000)):
                    pipe.set(f"raw:{i}", body)
                await pipe.execute()
        batched = rows / (time.perf_counter() - start)
        single_rows = 5_000
        start = time.perf_counter()
        for i in range(single_rows):
            await client.set(f"raw1:{i}", body)
        single = single_rows / (time.perf_counter() - start)
        await client.flushdb()
    finally:
        await client.aclose()
    return Baseline(batched=batched, single=single)


def _sqlite_baseline(workdir: Path, rows: int, body: bytes) -> Baseline:
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
    await store.history(nodes[0].node_id, since)  # the first read opens what it needs
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


@contextlib.contextmanager
def no_server(workdir: Path) -> Iterator[str]:
    yield ""


@contextlib.contextmanager
def etcd_server(workdir: Path) -> Iterator[str]:
    binary = find_binary("etcd")
    if binary is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    with EtcdCluster(workdir / "etcd", binary=binary) as cluster:
        yield cluster.url("/bench")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    binary = find_binary("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(workdir / "redis", binary=binary) as server:
        yield server.url(prefix="bench")


@dataclass
class Backend:
    server: Callable[[Path], contextlib.AbstractContextManager[str]]
    make_store: Callable[[Path, str], Store]
    baseline: Callable[[Path, str, int, bytes], Awaitable[Baseline]]
    baseline_name: str
    batched_name: str


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(
        server=no_server,
        make_store=lambda workdir, url: SqliteStore(workdir / "state.db"),
        baseline=sqlite_baseline,
        baseline_name="sqlite3 executemany, plain table",
        batched_name="1,000-row transactions",
    ),
    "etcd": Backend(
        server=etcd_server,
        make_store=lambda workdir, url: EtcdStore.from_url(url),
        baseline=etcd_baseline,
        baseline_name="etcd3aio plain puts",
        batched_name="64 puts in flight",
    ),
    "redis": Backend(
        server=redis_server,
        make_store=lambda workdir, url: RedisStore(url),
        baseline=redis_baseline,
        baseline_name="redis-py SETs",
        batched_name="1,000 per pipeline",
    ),
}


async def run(args: argparse.Namespace, workdir: Path) -> None:
    for name in sorted(BACKENDS) if args.backend == "all" else [args.backend]:
        backend = BACKENDS[name]
        here = workdir / name
        here.mkdir(parents=True, exist_ok=True)
        with backend.server(here) as url:
            await run_backend(name, backend, args, here, url)


async def run_backend(name: str, backend: Backend, args: argparse.Namespace, workdir: Path,
                      url: str) -> None:
    nodes = [NodeState(f"node-{i:04d}", f"10.0.{i // 250}.{i % 250}:7301",
                       labels={"zone": "abc"[i % 3]}, health=Health.HEALTHY, incarnation=1)
             for i in range(args.nodes)]
    body = encode_sample(snapshot(NodeState("node-0000", "x"), 0.0))
    raw = await backend.baseline(workdir, url, 200_000, body)
    print(f"backend {name}: {args.nodes} nodes x {args.samples} samples, "
          f"{len(body)} B/sample")
    print(f"  raw baseline ({backend.baseline_name}, {len(body)} B rows):")
    print(f"    {backend.batched_name:<24} {raw.batched:>10,.0f} rows/s")
    print(f"    one row per round trip   {raw.single:>10,.0f} rows/s")

    store = backend.make_store(workdir, url)
    await store.open()
    if args.gc == "coordinator":
        tune_gc()
    try:
        rate = await measure_writes(store, nodes, args.samples)
        per_row = 2 * rate / raw.batched
        print(f"  snapshot writes (save_nodes + add_samples, {args.nodes}-node batches):")
        print(f"    {rate:>10,.0f} snapshots/s = {2 * rate:,.0f} rows/s = {per_row:.0%} of raw "
              f"batched per row ({rate / raw.batched:.0%} per snapshot; "
              f"{rate / raw.single:.1f}x raw one-row)   goal >= 50 % per row: "
              f"{'ok' if per_row >= 0.5 else 'MISSED'}")
        now = args.samples * SAMPLE_INTERVAL
        reads = sorted(await measure_reads(store, nodes, now - 3600.0))
        median, p95, worst = statistics.median(reads), reads[int(len(reads) * 0.95)], reads[-1]
        print(f"  read one node's last hour ({min(args.samples, 720)} samples, {len(reads)} "
              f"reads): median {median:.2f} ms, p95 {p95:.2f} ms, max {worst:.2f} ms   "
              f"goal < 20 ms: {'ok' if worst < 20 else 'MISSED'}")
        # Prune the oldest sixth (10 of 60 minutes), as a coordinator catching up would.
        deleted, took, longest = await measure_prune(store, now + 600.0, 3600.0)
        print(f"  prune: {deleted:,} rows in {took * 1000:.0f} ms "
              f"({deleted / took:,.0f} rows/s), longest loop block {longest * 1000:.1f} ms"
              f"   goal < 50 ms: {'ok' if longest < 0.05 else 'MISSED'}")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=[*sorted(BACKENDS), "all"], default="sqlite")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=720, help="samples per node (720 = 1 h)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--gc", choices=["coordinator", "default"], default="coordinator",
                        help="GC settings: the coordinator process's (tune_gc) or Python's")
    args = parser.parse_args()
    random.seed(1)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run(args, args.dir))
        return
    with tempfile.TemporaryDirectory(prefix="nodewatch-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
