"""The store at fleet size (issue 17, point 2): what the coordinator writes for 100,000 nodes on
the fast push profile, before and after write-on-change with a slow refresh and history tiers,
and whether a real 3-member etcd takes it with room to spare.

    .venv/bin/python bench/store_fleet.py [--nodes 100000] [--driven 10000] [--duration 240]
        [--etcd-seconds 10] [--no-etcd]

1. **The write pattern, from the code.** A real ``Coordinator`` (detection core, write path:
   ``_take_nodes``, ``RoutineRefresh``, ``Rollups``, the ticker's cadence) on a fake clock and a
   counting store, fed the fast push profile: a UDP heartbeat every 3.5 s per node
   (deploy/agent-fast-push.toml), a new agent sample every 5 s, spread over the interval;
   0.05 % of the nodes a minute change their reasons (a material change). ``--driven`` nodes
   go through the real core (every write decision is per node, so the figures scale linearly;
   they are printed for ``--nodes``). The steady state is measured after two refresh intervals.
   The outlier rule is off (it writes only on a verdict, and none comes here).
   *before*: the old behaviour (every touched node written every 5 s, every sample kept for the
   hour); *after*: the defaults (``refresh_interval`` 60 s; raw samples for 5 minutes and a
   rollup a minute on SQLite and Redis, rollups every 5 minutes and no raw samples on etcd).
2. **The history budget** per store at ``--nodes``: points written a second, bytes per point
   as stored (the codec's bytes plus the key each backend stores), bytes held for the hour.
3. **A real 3-member etcd** (three ``etcd`` processes on loopback, one cluster): its ceiling for
   the same write shape (``EtcdStore.save_nodes``: compare-and-swap transactions of 128 nodes,
   64 in flight, of the measured node size; from one client process, then from
   ``--ceiling-processes`` at once), then the *after* rate replayed on the ticker's
   cadence (0.25 s) with the history puts; the ratio ceiling / rate is the room to spare. The
   ceiling is what the client processes push: a lower bound of etcd's own.

Anchor: Kubernetes moved node heartbeats to Leases, cutting etcd writes at 5,000 nodes from
150 to 30 MB/min. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from nodewatch.config import Config, load_config
from nodewatch.coordinator.service import ROUTINE_PERSIST_INTERVAL, Coordinator
from nodewatch.model import (
    CheckResult,
    Event,
    HistorySample,
    NodeState,
    Registration,
    Report,
    SampleChunk,
)
from nodewatch.store.codec import (
    encode_chunk_body,
    encode_event,
    encode_node,
    encode_node_packed,
    encode_sample,
    encode_sample_body_packed,
)
from nodewatch.store.etcd import EtcdStore
from nodewatch.store.tiers import HistoryTiers
from nodewatch.testing import EtcdCluster, FakeClock, FakeProbe, find_binary

HEARTBEAT = 3.5  # FAST_PROFILE: a UDP heartbeat every 3.5 s
SAMPLE = 5.0  # the agent's sample_interval (default)
REASON_CHANGES_PER_MINUTE = 0.0005  # of the nodes: a material change without a transition
K8S = (5_000, 150.0, 30.0)  # nodes, MB/min before and after Leases
ETCD_KEY = len(b"/nodewatch/nodes/") + 10  # prefix + a 10-character node id
PREFIX = "/nodewatch"


@dataclass
class Counts:
    """What the counting store was asked to write (within the measured window)."""

    node_writes: int = 0
    node_bytes: dict[str, int] = field(default_factory=lambda: {"etcd": 0, "sqlite": 0})
    raw: int = 0
    rollups: int = 0
    history_bytes: dict[str, float] = field(default_factory=lambda: {
        "sqlite": 0, "etcd": 0, "redis": 0})
    raw_sizes: dict[str, list[float]] = field(default_factory=lambda: {
        "sqlite": [], "etcd": [], "redis": []})
    rollup_sizes: dict[str, list[float]] = field(default_factory=lambda: {
        "sqlite": [], "etcd": [], "redis": []})
    events: int = 0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def stored_sizes(sample: HistorySample) -> dict[str, float]:
    """Bytes of one history point as each backend stores it (key columns included)."""
    key = len(sample.node_id) + 8 + 4  # node_id, ts (REAL), seq
    sqlite = len(encode_sample_body_packed(sample)) + key + 4  # + bucket
    tier = "rollups" if sample.span else "history"
    etcd_key = len(f"{PREFIX}/{tier}/{sample.node_id}/") + 20 + 1 + 20
    body = len(encode_sample(sample))
    return {"sqlite": sqlite, "etcd": etcd_key + body, "redis": body + 8}  # zset score


class CountingStore:
    """A Store that keeps nothing but counts what it is asked to write, as each backend would
    encode it; ``measuring`` starts the window."""

    def __init__(self) -> None:
        self.counts = Counts()
        self.measuring = False
        self._revision = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def flush(self) -> None: ...

    async def load_nodes(self) -> list[NodeState]:
        return []

    async def get_node(self, node_id: str) -> NodeState | None:
        return None

    async def save_nodes(self, nodes: Sequence[NodeState]) -> list[str]:
        for node in nodes:
            self._revision += 1
            node.revision = self._revision
        if self.measuring and nodes:
            c = self.counts
            c.node_writes += len(nodes)
            c.batches += 1
            c.batch_sizes.append(len(nodes))
            c.node_bytes["etcd"] += sum(len(encode_node(n)) + ETCD_KEY for n in nodes)
            c.node_bytes["sqlite"] += sum(len(encode_node_packed(n)) + 18 for n in nodes)
        return []

    async def delete_node(self, node_id: str) -> bool:
        return True

    async def append_events(self, events: Sequence[Event]) -> None:
        if self.measuring:
            self.counts.events += len(events)
            for event in events:
                encode_event(event)

    async def events_after(self, after: str | None, limit: int = 1000) -> list[Event]:
        return []

    async def last_event_id(self) -> str | None:
        return None

    async def add_chunks(self, chunks: Sequence[SampleChunk]) -> None:
        """Counted as the samples they hold: on SQLite each a share of its chunk's one row
        (store/sqlite.py), on etcd and Redis one entry each (they write them so)."""
        if not self.measuring:
            return
        for chunk in chunks:
            row = len(encode_chunk_body(chunk)) + len(chunk.node_id) + 8 + 4 + 4
            for sample in chunk.samples():
                self._count(sample, {**stored_sizes(sample), "sqlite": row / len(chunk)})

    async def add_samples(self, samples: Sequence[HistorySample]) -> None:
        if not self.measuring:
            return
        for sample in samples:
            self._count(sample, stored_sizes(sample))

    def _count(self, sample: HistorySample, sizes: dict[str, float]) -> None:
        c = self.counts
        if sample.span:
            c.rollups += 1
        else:
            c.raw += 1
        for backend, size in sizes.items():
            c.history_bytes[backend] += size
            if len(c.raw_sizes[backend]) < 5000 and not sample.span:
                c.raw_sizes[backend].append(size)
            if len(c.rollup_sizes[backend]) < 5000 and sample.span:
                c.rollup_sizes[backend].append(size)

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        return []

    async def prune(self, now: float, history_ttl: float,
                    full_resolution: float | None = None) -> int:
        return 0

    async def get_meta(self, key: str) -> str | None:
        return None

    async def put_meta(self, key: str, value: str) -> None: ...

    async def probe_write(self, now: float) -> None: ...


class EtcdCountingStore(CountingStore):
    """The same, named so that the coordinator picks etcd's history tiers (store_label)."""


@dataclass
class Run:
    name: str
    counts: Counts
    window: float
    scale: float
    tiers: HistoryTiers

    def per_s(self, value: float) -> float:
        return value * self.scale / self.window


def fast_push_config(before: bool, etcd: bool) -> Config:
    overrides: dict[str, object] = {
        "coordinator.store": "etcd://127.0.0.1:2379/nodewatch" if etcd else "sqlite:///x.db",
        "detection.healthy_interval": "4s", "detection.unhealthy_interval": "500ms",
        "detection.down_interval": "4s", "detection.timeout": "1s",
        "detection.connect_timeout": "500ms", "detection.fall": 2, "detection.rise": 2,
        "detection.startup_grace": "0s",
        # The outlier rule judges every node on every tick (about 85 us a node a tick here):
        # it writes only on a verdict, none comes in this scenario, and it would make the
        # bench measure it instead of the write path.
        "outliers.enabled": False,
    }
    if before:  # the old behaviour: every sample for the hour, touched nodes every 5 s
        overrides |= {"coordinator.refresh_interval": "1h",
                      "detection.history_full_resolution": "1h",
                      "detection.etcd_history_full_resolution": "1h"}
    return load_config(None, overrides)


async def drive(name: str, driven: int, nodes: int, duration: float, before: bool,
                etcd: bool) -> Run:
    """The real coordinator's write path on a fake clock, as its ticker drives it."""
    cfg = fast_push_config(before, etcd)
    clock = FakeClock(1_764_000_000.0)
    store = EtcdCountingStore() if etcd else CountingStore()
    coord = Coordinator(cfg, store, clock=clock, probe=FakeProbe(clock))  # type: ignore[arg-type]
    await coord._restore()
    rng = random.Random(17)
    ids = [f"node-{i:05d}" for i in range(driven)]
    for node_id in ids:
        coord.register(Registration(node_id, f"10.{hash(node_id) % 250}.0.1:7301", 1, 0,
                                    clock()))
    await coord.persist()
    phases = {node_id: rng.random() * HEARTBEAT for node_id in ids}
    seqs = dict.fromkeys(ids, 0)
    reasons: dict[str, tuple[str, ...]] = dict.fromkeys(ids, ())
    tick = min(0.5, cfg.detection.unhealthy_interval / 2)  # the coordinator's ticker
    start = clock()
    measure_from = start + 2 * max(60.0, float(cfg.coordinator.refresh_interval)
                                   if not before else 10.0)
    measure_from = min(measure_from, start + duration / 2)
    # Heartbeats in time order: a heap would do, buckets of one tick are enough.
    slots: dict[int, list[str]] = {}
    for node_id in ids:
        slots.setdefault(int(phases[node_id] / tick), []).append(node_id)
    last_history = start
    last_routine = start
    steps = int(duration / tick)
    for step in range(steps):
        now = start + step * tick
        clock.now = now
        if not store.measuring and now >= measure_from:
            store.measuring = True
        cycle = int(HEARTBEAT / tick)
        for node_id in slots.get(step % cycle, ()):
            seqs[node_id] += 1
            if rng.random() < REASON_CHANGES_PER_MINUTE * HEARTBEAT / 60:
                reasons[node_id] = () if reasons[node_id] else ("disk almost full",)
            samples = int((now - start + phases[node_id]) / SAMPLE) + 1
            report = Report(incarnation=1, seq=seqs[node_id], ts=now, sample_interval=SAMPLE,
                            samples=samples, reasons=reasons[node_id],
                            system={"cpu_percent": round(rng.uniform(5, 60), 1),
                                    "mem_percent": round(rng.uniform(20, 80), 1),
                                    "load1": round(rng.uniform(0, 4), 2),
                                    "connections": float(rng.randrange(5, 400))},
                            load={"qps": float(rng.randrange(0, 500)),
                                  "pending_tasks": float(rng.randrange(0, 20)),
                                  "error_rate": round(rng.uniform(0, 0.01), 4)})
            coord.heartbeat(CheckResult(node_id, True, now, report=report, source="push"))
        coord._handle(coord.cluster.tick(now))
        history = now - last_history >= ROUTINE_PERSIST_INTERVAL
        if before:  # the old ticker: a full write of every touched node every 5 s
            routine = now - last_routine >= ROUTINE_PERSIST_INTERVAL
            if routine:
                last_routine = now
            await coord.persist(routine=routine)
        else:
            await coord.persist(history=history)
        if history:
            last_history = now
    window = start + steps * tick - measure_from
    return Run(name, store.counts, window, nodes / driven, coord.history_tiers)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def report_writes(runs: list[Run], nodes: int) -> None:
    print(f"\n== node writes at {nodes:,} nodes (fast push: heartbeat {HEARTBEAT}s, sample "
          f"{SAMPLE}s) ==")
    print(f"{'run':<22} {'nodes/s':>9} {'B/node':>7} {'node MB/min':>11} {'raw/s':>8} "
          f"{'rollups/s':>9} {'hist MB/min':>11} {'total MB/min':>12}  (bytes as etcd stores)")
    for run in runs:
        c = run.counts
        node_bps = run.per_s(c.node_bytes["etcd"])
        hist_bps = run.per_s(c.history_bytes["etcd"])
        per_node = c.node_bytes["etcd"] / max(1, c.node_writes)
        print(f"{run.name:<22} {run.per_s(c.node_writes):>9,.0f} {per_node:>7.0f} "
              f"{node_bps * 60 / 1e6:>11.1f} {run.per_s(c.raw):>8,.0f} "
              f"{run.per_s(c.rollups):>9,.1f} {hist_bps * 60 / 1e6:>11.1f} "
              f"{(node_bps + hist_bps) * 60 / 1e6:>12.1f}")
    k_nodes, k_before, k_after = K8S
    print(f"anchor: Kubernetes at {k_nodes:,} nodes, node heartbeats {k_before:.0f} -> "
          f"{k_after:.0f} MB/min with Leases; per {k_nodes:,} nodes here:")
    for run in runs:
        c = run.counts
        bps = run.per_s(c.node_bytes["etcd"] + c.history_bytes["etcd"])
        print(f"  {run.name:<20} {bps * 60 / 1e6 * k_nodes / nodes:>7.1f} MB/min")


def report_history(runs: list[Run], nodes: int) -> None:
    print(f"\n== history budget at {nodes:,} nodes for the hour (points held = raw for "
          "full_resolution + rollups for the rest) ==")
    print(f"{'run':<22} {'store':<7} {'tiers':<22} {'points/s':>9} {'B/raw':>6} {'B/rollup':>8} "
          f"{'points/node':>11} {'held GB':>8}")
    for run in runs:
        c = run.counts
        t = run.tiers
        tiers = (f"raw {t.raw_ttl:g}s" if t.raw else "no raw") + (
            f", {t.rollup:g}s rollups" if t.rolled else "")
        for backend in ("sqlite", "redis", "etcd"):
            if run.name.startswith("after") and ("etcd" in run.name) != (backend == "etcd"):
                continue
            raw_b, rolled_b = mean(c.raw_sizes[backend]), mean(c.rollup_sizes[backend])
            per_node_raw = t.raw_ttl / SAMPLE if t.raw else 0.0
            per_node_rolled = t.points_per_node(SAMPLE) - per_node_raw
            held = nodes * (per_node_raw * raw_b + per_node_rolled * rolled_b)
            print(f"{run.name:<22} {backend:<7} {tiers:<22} "
                  f"{run.per_s(c.raw + c.rollups):>9,.0f} {raw_b:>6.0f} {rolled_b:>8.0f} "
                  f"{t.points_per_node(SAMPLE):>11.0f} {held / 1e9:>8.2f}")


async def etcd_ceiling(store: EtcdStore, node_bytes: int, seconds: float,
                       worker: int = 0) -> float:
    """Nodes/s the cluster takes as store/etcd.py writes them: CAS txns of 128, 64 in flight."""
    pad = "x" * max(0, node_bytes - 200)
    nodes = [NodeState(f"c{worker}-{i:06d}", "10.0.0.1:7301", reasons=[pad] if pad else [])
             for i in range(128 * 64)]
    refused = 0

    async def save() -> int:
        nonlocal refused
        try:
            return len(nodes) - len(await store.save_nodes(nodes))
        except Exception as error:  # noqa: BLE001 - "etcdserver: too many requests": saturated
            if not refused:
                cause = (str(error) or type(error).__name__).splitlines()[0][:70]
                print(f"  ceiling writer {worker}: {cause}", flush=True)
            refused += 1
            await asyncio.sleep(0.1)
            for n in nodes:  # some transactions of the batch may have landed: read them back
                try:
                    got = await store.get_node(n.node_id)
                except Exception:  # noqa: BLE001 - still saturated: the next round reads again
                    return 0
                n.revision = got.revision if got is not None else 0
            return 0

    await save()  # created: from now on each write is an update
    written = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        for n in nodes:
            n.seq += 1
        written += await save()
    if refused:
        print(f"  ceiling writer {worker}: {refused} batches refused (etcd saturated)",
              flush=True)
    return written / (time.perf_counter() - began)


def _ceiling_worker(endpoints: list[str], node_bytes: int, seconds: float, worker: int) -> float:
    """One more client process for the ceiling (its own nodes, the same write shape)."""

    async def run() -> float:
        store = EtcdStore(endpoints, "/bench", timeout=10.0)
        await store.open()
        try:
            return await etcd_ceiling(store, node_bytes, seconds, worker)
        finally:
            await store.close()

    return asyncio.run(run())


async def etcd_ceilings(endpoints: list[str], node_bytes: int, seconds: float,
                        processes: int) -> float:
    """The ceiling from ``processes`` client processes at once (one client process may be
    the bound, not etcd)."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = await asyncio.gather(*(loop.run_in_executor(
            pool, _ceiling_worker, endpoints, node_bytes, seconds, i) for i in range(processes)))
    return sum(rates)


async def etcd_replay(store: EtcdStore, node_rate: float, rollup_rate: float, node_bytes: int,
                      seconds: float, fleet: int) -> tuple[float, float, float]:
    """The after rate on the ticker's cadence: (nodes/s achieved, p99 write ms, max write ms)."""
    tick = 0.25
    pad = "x" * max(0, node_bytes - 200)
    nodes = [NodeState(f"r-{i:06d}", "10.0.0.1:7301", reasons=[pad] if pad else [])
             for i in range(min(fleet, 100_000))]
    for at in range(0, len(nodes), 4096):
        await store.save_nodes(nodes[at:at + 4096])
    per_tick, rollups_per_tick = node_rate * tick, rollup_rate * tick
    carry = carry_r = 0.0
    cursor = 0
    latencies: list[float] = []
    written = 0
    began = time.perf_counter()
    next_tick = began
    while time.perf_counter() - began < seconds:
        carry += per_tick
        carry_r += rollups_per_tick
        count, carry = int(carry), carry - int(carry)
        rcount, carry_r = int(carry_r), carry_r - int(carry_r)
        batch = [nodes[(cursor + i) % len(nodes)] for i in range(count)]
        cursor += count
        for n in batch:
            n.seq += 1
        points = [HistorySample(f"r-{(cursor + i) % len(nodes):06d}", time.time(), cursor + i,
                                "healthy", {"cpu_percent": 31.2, "mem_percent": 44.5,
                                            "load1": 1.02, "connections": 120.0},
                                {"qps": 240.0, "pending_tasks": 8.5, "error_rate": 0.0048},
                                300.0, {"cpu_percent": 58.0, "load.qps": 480.0})
                  for i in range(rcount)]
        sent = time.perf_counter()
        await asyncio.gather(store.save_nodes(batch), store.add_samples(points))
        latencies.append((time.perf_counter() - sent) * 1000)
        written += len(batch)
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return written / elapsed, latencies[int(0.99 * (len(latencies) - 1))], latencies[-1]


async def etcd_part(runs: list[Run], seconds: float, nodes: int, processes: int) -> None:
    binary = find_binary("etcd")
    if binary is None:
        print("\netcd not installed: the 3-member replay is skipped")
        return
    after = next(r for r in runs if r.name == "after (etcd)")
    before = next(r for r in runs if r.name == "before")
    node_bytes = int(after.counts.node_bytes["etcd"] / max(1, after.counts.node_writes))
    with EtcdCluster(size=3, binary=binary) as cluster:
        one = await etcd_ceilings(cluster.endpoints, node_bytes, seconds, 1)
        ceiling = await etcd_ceilings(cluster.endpoints, node_bytes, seconds, processes) \
            if processes > 1 else one
        store = EtcdStore(cluster.endpoints, "/bench", history_ttl=3600.0, timeout=10.0)
        await store.open()
        try:
            rate = after.per_s(after.counts.node_writes)
            rollup_rate = after.per_s(after.counts.rollups)
            achieved, p99, worst = await etcd_replay(store, rate, rollup_rate, node_bytes,
                                                     seconds, nodes)
        finally:
            await store.close()
    old = before.per_s(before.counts.node_writes + before.counts.raw)
    print(f"\n== a real 3-member etcd ({', '.join(cluster.endpoints)}; one cluster) ==")
    print(f"ceiling, CAS txns of 128 nodes of {node_bytes} B, 64 in flight: one client process "
          f"{one:,.0f} node writes/s; {processes} processes {ceiling:,.0f} node writes/s "
          f"({ceiling * node_bytes * 60 / 1e6:,.0f} MB/min)")
    ceiling = max(ceiling, one)
    print(f"after, replayed on the 0.25 s ticker: {achieved:,.0f} node writes/s "
          f"(asked {rate:,.0f}) + {rollup_rate:,.0f} rollup puts/s; write p99 {p99:.1f} ms, "
          f"max {worst:.1f} ms")
    print(f"room to spare: ceiling / after = {ceiling / max(rate + rollup_rate, 1e-9):,.1f}x; "
          f"before asked {old:,.0f} puts/s = {old / ceiling:,.2f}x the ceiling")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--driven", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=240.0, help="virtual seconds")
    parser.add_argument("--etcd-seconds", type=float, default=10.0)
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--ceiling-processes", type=int, default=2,
                        help="client processes writing at once for the etcd ceiling")
    args = parser.parse_args()
    driven = min(args.driven, args.nodes)
    runs: list[Run] = []
    # "before" is one run for every backend: the old write path did not depend on the store.
    for name, before, etcd in (("before", True, False), ("after (sqlite, redis)", False, False),
                               ("after (etcd)", False, True)):
        began = time.perf_counter()
        runs.append(await drive(name, driven, args.nodes, args.duration, before, etcd))
        print(f"drove {name}: {driven:,} nodes through the coordinator for "
              f"{args.duration:g} virtual s in {time.perf_counter() - began:.1f}s "
              f"(measured the last {runs[-1].window:g}s; x{args.nodes / driven:g} to "
              f"{args.nodes:,})", flush=True)
    report_writes(runs, args.nodes)
    report_history(runs, args.nodes)
    if not args.no_etcd:
        await etcd_part(runs, args.etcd_seconds, args.nodes, args.ceiling_processes)


if __name__ == "__main__":
    asyncio.run(main())
