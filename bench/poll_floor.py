"""Poller overhead floor: the Poller's checks/s and CPU per check vs. a bare aiohttp loop.

Starts N tiny health servers (one per loopback address 127.0.x.y) in a child process, then in
this process runs, against the same servers and in the same run:

1. ``bare``: ``concurrency`` coroutines doing ``session.get`` + read + msgspec decode round-robin
   over the nodes, as fast as they can: the floor any poller pays for aiohttp itself;
2. ``poller``: the real Poller + HttpProbe + check_health with every node always due
   (``interval_for`` = 0), equally saturated;
3. ``paced``: the Poller at a fixed rate (``--rate``; interval = nodes / rate) reporting lateness,
   next to a bare paced loop (a 10 ms ticker spawning a task per due check) at the same rate.

CPU is this process's CPU time (the servers run in the child), divided by checks. The servers are
a raw asyncio protocol rather than aiohttp.web so that on a small machine they are never the
bottleneck. Prints figures and ratios; nothing here is asserted in tests.

    .venv/bin/python bench/poll_floor.py --nodes 1000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from nodewatch.coordinator.poller import HttpProbe, Poller
from nodewatch.detect.scheduler import CheckScheduler
from nodewatch.model import CheckResult

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    HAVE_UVLOOP = False


# ----- the servers (child process) -----------------------------------------------------------


def loopback(i: int) -> str:
    """The i-th bench host: 127.0.1.2 ... 127.0.1.251, 127.0.2.2 ... (never 127.0.0.1)."""
    return f"127.0.{1 + i // 250}.{2 + i % 250}"


def response_for(node_id: str) -> bytes:
    body = json.dumps({"status": "ok", "node_id": node_id, "uptime": 1.0, "version": "0.1.0",
                       "incarnation": 1, "seq": 1, "ts": time.time(), "reasons": [],
                       "system": {"cpu_percent": 10.0, "mem_percent": 20.0, "load1": 0.1,
                                  "connections": 3},
                       "load": {"qps": 1, "pending_tasks": 0, "error_rate": 0.0}}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


class HealthProtocol(asyncio.Protocol):
    """Answers every request on a keep-alive connection with one fixed health response."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        requests = buffer.count(b"\r\n\r\n")
        if requests and self.transport is not None:
            self.transport.write(self.response * requests)
            buffer = buffer[buffer.rfind(b"\r\n\r\n") + 4:]
        self.buffer = buffer[-65536:]


async def serve(first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    addresses = []
    for i in range(first, first + count):
        host = loopback(i)
        response = response_for(f"n{i}")
        server = await loop.create_server(partial(HealthProtocol, response), host, 0,
                                          backlog=1024)
        port = server.sockets[0].getsockname()[1]
        addresses.append(f"{host}:{port}")
    print(json.dumps(addresses), flush=True)
    # Runs until the parent closes our stdin (or terminates us).
    await loop.run_in_executor(None, sys.stdin.read)


# ----- the clients (this process) ------------------------------------------------------------


@dataclass
class Figures:
    name: str
    checks: int
    failures: int
    wall: float
    cpu: float
    extra: str = ""

    @property
    def rate(self) -> float:
        return self.checks / self.wall if self.wall else 0.0

    @property
    def cpu_per_check_us(self) -> float:
        return self.cpu / self.checks * 1e6 if self.checks else float("inf")

    def line(self) -> str:
        return (f"{self.name:<8} {self.checks:>8} checks  {self.rate:>8.0f}/s  "
                f"{self.cpu_per_check_us:>7.1f} us CPU/check  cpu {self.cpu / self.wall:>4.0%}  "
                f"failures {self.failures}{'  ' + self.extra if self.extra else ''}")


# --gc-freeze: move everything alive after the warm-up (the kept-alive connections) out of the
# collector's reach, as a coordinator can do once its node set is loaded and connected.
GC_FREEZE = False


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, counter: Callable[[], tuple[int, int]], warmup: float,
                  duration: float, extra: Callable[[], str] | None = None,
                  on_warm: Callable[[], None] | None = None) -> Figures:
    """Wait out the warm-up (connections get established), then count over ``duration``."""
    await asyncio.sleep(warmup)
    # A full collection stalls the loop (about 180 ms with 10,000 kept-alive connections here):
    # do it before the window and let the backlog it causes drain before lateness is reset.
    gc.collect()
    if GC_FREEZE:
        gc.freeze()
    await asyncio.sleep(1.0)
    if on_warm is not None:
        on_warm()
    checks0, failures0 = counter()
    cpu0, wall0 = cpu_time(), time.perf_counter()
    await asyncio.sleep(duration)
    checks1, failures1 = counter()
    cpu1, wall1 = cpu_time(), time.perf_counter()
    if GC_FREEZE:
        gc.unfreeze()
    return Figures(name, checks1 - checks0, failures1 - failures0, wall1 - wall0, cpu1 - cpu0,
                   extra() if extra else "")


def session_like_probe(concurrency: int) -> aiohttp.ClientSession:
    """The bare loop gets the same session settings as HttpProbe: only the layers differ."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=300,
                                     keepalive_timeout=75.0)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 auto_decompress=False,
                                 headers={"Accept-Encoding": "identity"})


_decoder = msgspec.json.Decoder()


def prebuilt_urls(addresses: list[str]) -> list[URL]:
    """URLs parsed once: the bare loop is a tuned one, so the ratio is not flattered by the
    bare loop re-parsing a URL string per request."""
    return [URL(f"http://{a}/health", encoded=True) for a in addresses]


async def bare_get(session: aiohttp.ClientSession, url: URL,
                   limits: aiohttp.ClientTimeout) -> bool:
    try:
        async with session.get(url, timeout=limits) as response:
            body = await response.read()
            _decoder.decode(body)
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
        return False


async def run_bare(addresses: list[str], concurrency: int, warmup: float,
                   duration: float) -> Figures:
    urls = prebuilt_urls(addresses)
    limits = aiohttp.ClientTimeout(total=3.0, connect=1.0, sock_connect=1.0)
    done = [0, 0]
    position = 0
    async with session_like_probe(concurrency) as session:

        async def worker() -> None:
            nonlocal position
            while True:
                url = urls[position]
                position = (position + 1) % len(urls)
                ok = await bare_get(session, url, limits)
                done[0] += 1
                done[1] += not ok

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            return await measure("bare", lambda: (done[0], done[1]), warmup, duration)
        finally:
            await cancel_all(tasks)


async def run_bare_paced(addresses: list[str], concurrency: int, rate: float, warmup: float,
                         duration: float) -> Figures:
    """A naive paced loop: every 10 ms spawn the checks that fell due, a task each."""
    urls = prebuilt_urls(addresses)
    limits = aiohttp.ClientTimeout(total=3.0, connect=1.0, sock_connect=1.0)
    done = [0, 0]
    limit = asyncio.Semaphore(concurrency)
    async with session_like_probe(concurrency) as session:

        async def one(url: URL) -> None:
            async with limit:
                ok = await bare_get(session, url, limits)
            done[0] += 1
            done[1] += not ok

        tasks: set[asyncio.Task[None]] = set()

        async def ticker() -> None:
            started = time.perf_counter()
            issued = 0
            while True:
                due = int((time.perf_counter() - started) * rate)
                for _ in range(due - issued):
                    task = asyncio.create_task(one(urls[issued % len(urls)]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    issued += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        try:
            return await measure("bare/pc", lambda: (done[0], done[1]), warmup, duration)
        finally:
            await cancel_all([task, *tasks])


async def run_poller(addresses: list[str], concurrency: int, interval: float, warmup: float,
                     duration: float, name: str) -> Figures:
    clock = time.monotonic
    probe = HttpProbe(timeout=3.0, connect_timeout=1.0, max_bytes=64 * 1024,
                      concurrency=concurrency, clock=clock)
    scheduler = CheckScheduler(clock, random.Random(1))
    done = [0, 0]

    def on_result(result: CheckResult) -> None:
        done[0] += 1
        done[1] += not result.ok

    poller = Poller(probe, scheduler, concurrency=concurrency, on_result=on_result,
                    interval_for=lambda _node: interval, clock=clock)
    async with poller:
        for i, address in enumerate(addresses):
            poller.add(f"n{i}", address, first_due=None if interval else clock())

        def lateness() -> str:
            stats = poller.stats()
            return (f"lateness p50 {stats['lateness_p50'] * 1000:.1f} ms  "
                    f"p99 {stats['lateness_p99'] * 1000:.1f} ms  "
                    f"max {stats['lateness_max'] * 1000:.1f} ms")

        return await measure(name, lambda: (done[0], done[1]), warmup, duration,
                             extra=lateness if interval else None,
                             on_warm=scheduler.lateness.reset)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def ratio(a: Figures, b: Figures) -> str:
    return f"{a.cpu_per_check_us / b.cpu_per_check_us:.2f}x"


async def main_async(args: argparse.Namespace, addresses: list[str]) -> None:
    print(f"{len(addresses)} health servers on {loopback(0)} .. "
          f"{loopback(len(addresses) - 1)}, concurrency {args.concurrency}, "
          f"{args.duration:g}s per run, loop {type(asyncio.get_running_loop()).__module__}")
    runs: list[tuple[str, Callable[[], Awaitable[Figures]]]] = []
    for _ in range(args.rounds):
        runs += [
            ("bare", lambda: run_bare(addresses, args.concurrency, args.warmup,
                                      args.duration)),
            ("poller", lambda: run_poller(addresses, args.concurrency, 0.0, args.warmup,
                                          args.duration, "poller")),
        ]
    results: dict[str, list[Figures]] = {}
    for name, run in runs:
        figures = await run()
        results.setdefault(name, []).append(figures)
        print(figures.line(), flush=True)
    bare = min(results["bare"], key=lambda f: f.cpu_per_check_us)
    poller = min(results["poller"], key=lambda f: f.cpu_per_check_us)
    print(f"saturated: poller/bare CPU per check = {ratio(poller, bare)} "
          f"(target <= 1.5x); checks/s {poller.rate:.0f} vs {bare.rate:.0f}")
    if args.rate > 0:
        interval = len(addresses) / args.rate
        paced_bare = await run_bare_paced(addresses, args.concurrency, args.rate,
                                          args.warmup, args.duration)
        print(paced_bare.line(), flush=True)
        results["bare_paced"] = [paced_bare]
        paced = await run_poller(addresses, args.concurrency, interval, max(args.warmup,
                                 interval + 1.0), args.duration, "poller/pc")
        print(paced.line(), flush=True)
        results["poller_paced"] = [paced]
        print(f"paced at {args.rate:g}/s (interval {interval:g}s): poller/bare CPU per "
              f"check = {ratio(paced, paced_bare)}")
    if args.json:
        out: dict[str, Any] = {name: [vars(f) | {"rate": f.rate,
                                                 "cpu_per_check_us": f.cpu_per_check_us}
                                      for f in figs] for name, figs in results.items()}
        print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="checks/s for the paced comparison; 0 skips it")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gc-threshold0", type=int, default=0,
                        help="gc.set_threshold(N, 20, 10): fewer young collections, far fewer "
                             "objects promoted to the old generation, rare full collections")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after each warm-up (long-lived connection objects)")
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)  # FIRST:COUNT
    args = parser.parse_args()
    global GC_FREEZE
    GC_FREEZE = args.gc_freeze
    if args.gc_threshold0:
        gc.set_threshold(args.gc_threshold0, 20, 10)
    run: Callable[[Coroutine[Any, Any, None]], None] = (
        uvloop.run if HAVE_UVLOOP and not args.no_uvloop else asyncio.run)
    if args.serve:
        first, count = (int(part) for part in args.serve.split(":"))
        run(serve(first, count))
        return
    # The servers live in child processes so that their CPU is not counted as the client's;
    # several of them above a few thousand nodes, because each child holds two descriptors per
    # node (listening + accepted) and ``ulimit -n`` is often 20,000 or less.
    per_child = 4000
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve", f"{first}:{min(per_child, args.nodes - first)}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for first in range(0, args.nodes, per_child)
    ]
    try:
        addresses: list[str] = []
        for child in children:
            assert child.stdout is not None
            addresses += json.loads(child.stdout.readline())
        run(main_async(args, addresses))
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()  # a child exits when its stdin closes
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
