"""The poller against real aiohttp servers on distinct loopback addresses.

Every wait is on a condition with a deadline; the only sleeps are server-side (a handler that
holds a request to make overlap observable).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from nodewatch.coordinator.poller import CheckLost, HttpProbe, Poller
from nodewatch.detect.scheduler import CheckScheduler
from nodewatch.model import CheckResult, FailureClass
from nodewatch.testing import FakeClock, FakeProbe
from tests.helpers import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Distinct loopback hosts per server, so connection counts cannot mix between tests.
_HOSTS = (f"127.0.{a}.{b}" for a, b in itertools.product(range(1, 4), range(2, 255)))


def health_body(node_id: str, seq: int = 1) -> dict[str, object]:
    return {"status": "ok", "node_id": node_id, "uptime": 1.0, "version": "0.1.0",
            "incarnation": 1, "seq": seq, "ts": time.time(), "reasons": [],
            "system": {"cpu_percent": 1.0}, "load": {"qps": 2}}


@dataclass
class Server:
    """A real aiohttp server on its own loopback address that records what it saw."""

    host: str
    port: int
    runner: web.AppRunner
    requests: list[float] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    current: int = 0
    max_concurrent: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


async def start_server(handler: Handler | None = None, node_id: str = "n1") -> Server:
    host = next(_HOSTS)
    app = web.Application()
    server: Server

    async def healthy(request: web.Request) -> web.StreamResponse:
        return web.json_response(health_body(node_id, len(server.requests)))

    chosen = handler or healthy

    async def counting(request: web.Request) -> web.StreamResponse:
        server.requests.append(time.monotonic())
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            server.peers.add((peer[0], peer[1]))
        server.current += 1
        server.max_concurrent = max(server.max_concurrent, server.current)
        try:
            return await chosen(request)
        finally:
            server.current -= 1

    app.router.add_get("/health", counting)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    server = Server(host, port, runner)
    return server


async def start_hanging_server() -> tuple[Server, asyncio.Event]:
    """A node that accepts the request and answers only once the event is set (a hung
    process); set it before the server is cleaned up."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    return await start_server(hang), never


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        await server.runner.cleanup()


async def eventually(condition: Callable[[], object], within: float = 5.0,
                     message: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(0.005)


def make_poller(probe: HttpProbe | FakeProbe, *, concurrency: int = 8,
                interval: float | Callable[[str], float] = 60.0,
                on_result: Callable[[CheckResult], None] | None = None,
                results: list[CheckResult] | None = None) -> Poller:
    sink = results if results is not None else []
    interval_for = interval if callable(interval) else (lambda _node: float(interval))
    return Poller(probe, CheckScheduler(time.monotonic, random.Random(5)),
                  concurrency=concurrency, on_result=on_result or sink.append,
                  interval_for=interval_for, clock=time.monotonic)


def http_probe(timeout: float = 1.0, connect_timeout: float = 0.5, max_bytes: int = 4096,
               concurrency: int = 8) -> HttpProbe:
    return HttpProbe(timeout=timeout, connect_timeout=connect_timeout, max_bytes=max_bytes,
                     concurrency=concurrency, clock=time.monotonic)


async def check_once(address: str, node_id: str = "n1", **probe_kw: float) -> CheckResult:
    """Run one check of one node through a started Poller and return the delivered result."""
    results: list[CheckResult] = []
    poller = make_poller(http_probe(**probe_kw), results=results)  # type: ignore[arg-type]
    async with poller:
        poller.add(node_id, address, first_due=time.monotonic())
        await eventually(lambda: results, message="one result")
    assert len(results) == 1
    return results[0]


def text_handler(status: int, body: bytes, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)
    return handler


# ----- classification ------------------------------------------------------------------------


async def test_healthy_body_gives_ok_with_report(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    result = await check_once(server.address)
    assert result.ok and result.failure is None
    assert result.report is not None and result.report.incarnation == 1
    assert result.report.system == {"cpu_percent": 1.0}
    assert result.source == "poll"


async def test_handler_that_never_answers_times_out_within_timeout(
        servers: list[Server]) -> None:
    server, never = await start_hanging_server()
    servers.append(server)
    started = time.monotonic()
    result = await check_once(server.address, timeout=0.3, connect_timeout=0.2)
    assert not result.ok and result.failure is FailureClass.TIMEOUT
    # The lower bound is the behaviour (it waited for the timeout); the upper ones only catch
    # a hang, with ten times the expected 0.3 s.
    assert time.monotonic() - started < 3.0
    assert 0.25 <= result.latency < 3.0
    never.set()


async def test_closed_port_is_refused() -> None:
    host = next(_HOSTS)
    result = await check_once(f"{host}:{free_port(host)}")
    assert not result.ok and result.failure is FailureClass.REFUSED


async def test_http_500_is_http_status_with_the_status_in_detail(servers: list[Server]) -> None:
    servers.append(server := await start_server(text_handler(500, b"oops", "text/plain")))
    result = await check_once(server.address)
    assert not result.ok and result.failure is FailureClass.HTTP_STATUS
    assert "500" in result.detail


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"status": "ok"}', b"[1, 2, 3]",
                                  b'{"incarnation": "one", "seq": 1, "ts": 1.0}'])
async def test_non_json_or_wrong_shape_body_is_bad_body(servers: list[Server],
                                                        body: bytes) -> None:
    servers.append(server := await start_server(text_handler(200, body)))
    result = await check_once(server.address)
    assert not result.ok and result.failure is FailureClass.BAD_BODY
    assert result.detail


async def test_oversize_body_is_bad_body_at_the_cap(servers: list[Server]) -> None:
    padded = health_body("n1") | {"padding": "x" * 10_000}
    servers.append(server := await start_server(text_handler(200, json.dumps(padded).encode())))
    result = await check_once(server.address, max_bytes=4096)
    assert not result.ok and result.failure is FailureClass.BAD_BODY
    assert "4096" in result.detail


async def test_oversize_chunked_body_without_length_is_capped_too(
        servers: list[Server]) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    servers.append(server := await start_server(chunked))
    result = await check_once(server.address, max_bytes=4096)
    assert not result.ok and result.failure is FailureClass.BAD_BODY


# ----- scheduling, concurrency, keep-alive --------------------------------------------------


async def test_concurrency_bound_is_respected(servers: list[Server]) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # server side: holds requests so that overlap is visible
        return web.json_response(health_body(request.query.get("n", "x")))

    for _ in range(12):
        servers.append(await start_server(slow))
    total_concurrent = 0
    peak = 0
    results: list[CheckResult] = []

    def on_result(result: CheckResult) -> None:
        results.append(result)

    probe = http_probe(concurrency=3)
    poller = make_poller(probe, concurrency=3, interval=0.01, on_result=on_result)
    async with poller:
        now = time.monotonic()
        for i, server in enumerate(servers):
            poller.add(f"n{i}", server.address, first_due=now)

        def enough() -> bool:
            nonlocal peak, total_concurrent
            total_concurrent = sum(s.current for s in servers)
            peak = max(peak, total_concurrent)
            return len(results) >= 36

        await eventually(enough, within=10.0, message="36 results")
    assert poller.max_in_flight == 3  # saturated: exactly the bound, never more
    assert peak <= 3
    assert all(s.max_concurrent <= 1 for s in servers)  # a node is never checked twice at once


async def test_keep_alive_reuses_connections(servers: list[Server]) -> None:
    for i in range(4):
        servers.append(await start_server(node_id=f"n{i}"))
    results: list[CheckResult] = []
    poller = make_poller(http_probe(), concurrency=4, interval=0.005, results=results)
    async with poller:
        now = time.monotonic()
        for i, server in enumerate(servers):
            poller.add(f"n{i}", server.address, first_due=now)
        await eventually(lambda: all(len(s.requests) >= 15 for s in servers), within=10.0,
                         message="15 checks per node")
    assert all(r.ok for r in results), [r.detail for r in results if not r.ok][:3]
    # 60+ checks over 4 nodes: one connection per node (a spare one at most).
    assert all(len(s.peers) <= 2 for s in servers), [len(s.peers) for s in servers]


async def test_rescheduling_honours_interval_for(servers: list[Server]) -> None:
    fast, slow = await start_server(node_id="fast"), await start_server(node_id="slow")
    servers += [fast, slow]
    intervals = {"fast": 0.05, "slow": 0.25}
    poller = make_poller(http_probe(), interval=intervals.__getitem__)
    async with poller:
        now = time.monotonic()
        poller.add("fast", fast.address, first_due=now)
        poller.add("slow", slow.address, first_due=now)
        await eventually(lambda: len(slow.requests) >= 3, within=5.0, message="3 slow checks")
    for server, interval in ((fast, 0.05), (slow, 0.25)):
        gaps = [b - a for a, b in itertools.pairwise(server.requests)]
        # Next check is completed_at + interval, so a gap is never shorter than the interval.
        assert gaps and min(gaps) >= interval * 0.9, (interval, gaps)
    assert len(fast.requests) > 2 * len(slow.requests)


async def test_interval_change_by_the_core_applies_to_the_next_check() -> None:
    """on_result runs before rescheduling, so the core's new interval is used at once."""
    probe = FakeProbe(FakeClock())  # result times are the fake's; the poller uses its own clock
    probe.set("n1", FailureClass.TIMEOUT)
    interval = {"n1": 60.0}
    results: list[CheckResult] = []

    def core(result: CheckResult) -> None:
        results.append(result)
        interval["n1"] = 0.01 if not result.ok else 60.0  # unhealthy: check faster

    poller = make_poller(probe, interval=interval.__getitem__, on_result=core)
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic())
        await eventually(lambda: len(results) >= 5, message="fast re-checks after a failure")
        assert all(r.failure is FailureClass.TIMEOUT for r in results)
        assert poller.stats()["failures"] == {"timeout": len(results)}


async def test_first_checks_of_a_loaded_set_are_spread_over_the_interval() -> None:
    poller = make_poller(FakeProbe(FakeClock()), interval=10.0)
    start = time.monotonic()
    for i in range(200):
        poller.add(f"n{i}", "127.0.0.1:1")
    dues = sorted(d for i in range(200) if (d := poller._scheduler.due_of(f"n{i}")) is not None)
    assert len(dues) == 200
    assert start <= dues[0] and dues[-1] <= time.monotonic() + 10.0
    assert dues[-1] - dues[0] > 8.0  # spread, not a burst


async def test_check_now_runs_an_immediate_recheck(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    results: list[CheckResult] = []
    poller = make_poller(http_probe(), interval=60.0, results=results)
    async with poller:
        poller.add("n1", server.address, first_due=time.monotonic())
        await eventually(lambda: len(results) == 1, message="first check")
        poller.check_now("n1")
        await eventually(lambda: len(results) == 2, message="the immediate re-check")
    assert len(server.requests) == 2


async def test_check_now_during_a_check_follows_it_at_once() -> None:
    gate = asyncio.Event()
    calls: list[str] = []

    class GatedProbe:
        async def check(self, node_id: str, address: str) -> CheckResult:
            calls.append(address)
            await gate.wait()
            return CheckResult(node_id, True, time.monotonic())

    results: list[CheckResult] = []
    poller = make_poller(GatedProbe(), interval=60.0, results=results)  # type: ignore[arg-type]
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic())
        await eventually(lambda: calls, message="check in flight")
        poller.update_address("n1", "127.0.0.1:2")
        poller.check_now("n1")
        assert poller.stats()["in_flight"] == 1
        gate.set()
        await eventually(lambda: len(results) == 2, message="the follow-up check")
    assert calls == ["127.0.0.1:1", "127.0.0.1:2"]


async def test_update_address_moves_checks_to_the_new_server(servers: list[Server]) -> None:
    old, new = await start_server(node_id="n1"), await start_server(node_id="n1")
    servers += [old, new]
    results: list[CheckResult] = []
    poller = make_poller(http_probe(), interval=0.01, results=results)
    async with poller:
        poller.add("n1", old.address, first_due=time.monotonic())
        await eventually(lambda: len(old.requests) >= 2, message="checks at the old address")
        poller.update_address("n1", new.address)
        await eventually(lambda: len(new.requests) >= 2, message="checks at the new address")
        seen_old = len(old.requests)
        await eventually(lambda: len(new.requests) >= 5, message="more checks at the new one")
    assert len(old.requests) <= seen_old + 1  # at most the one in flight when it moved
    assert poller.address_of("n1") == new.address


async def test_removed_node_is_not_checked_or_reported_again(servers: list[Server]) -> None:
    hold = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await hold.wait()
        return web.json_response(health_body("n1"))

    servers.append(server := await start_server(held))
    results: list[CheckResult] = []
    poller = make_poller(http_probe(), interval=0.01, results=results)
    async with poller:
        poller.add("n1", server.address, first_due=time.monotonic())
        await eventually(lambda: server.current == 1, message="check in flight")
        assert poller.remove("n1") is True
        hold.set()
        await eventually(lambda: poller.stats()["checks_done"] == 1, message="check finished")
        assert results == []  # the in-flight result of a removed node is dropped
    assert len(server.requests) == 1 and "n1" not in poller


async def test_probe_and_core_errors_do_not_kill_the_workers() -> None:
    class BrokenProbe:
        async def check(self, node_id: str, address: str) -> CheckResult:
            raise RuntimeError("bug in the probe")

    seen: list[CheckResult] = []

    def flaky_core(result: CheckResult) -> None:
        seen.append(result)
        raise ValueError("bug in the core")

    poller = make_poller(BrokenProbe(), concurrency=1, interval=0.01,  # type: ignore[arg-type]
                         on_result=flaky_core)
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic())
        await eventually(lambda: len(seen) >= 3, message="results keep coming")
    assert all(r.failure is FailureClass.ERROR and "bug in the probe" in r.detail for r in seen)


async def test_stop_closes_the_session_and_cancels_cleanly(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    probe = http_probe()
    results: list[CheckResult] = []
    poller = make_poller(probe, interval=0.01, results=results)
    await poller.start()
    session = probe.session
    assert session is not None
    poller.add("n1", server.address, first_due=time.monotonic())
    await eventually(lambda: len(results) >= 3, message="a few checks")
    await poller.stop()
    assert session.closed and not poller.running
    done = poller.stats()["checks_done"]
    stats = poller.stats()
    assert stats["in_flight"] == 0 and stats["lateness_count"] >= done
    assert "n1" in poller  # the node set survives a stop; a restart resumes it
    assert poller._scheduler.due_of("n1") is not None
    await poller.start()
    await eventually(lambda: poller.stats()["checks_done"] > done, message="resumed checks")
    await poller.stop()


async def test_stop_during_checks_leaves_every_node_scheduled_for_a_restart() -> None:
    gate = asyncio.Event()

    class HeldProbe:
        async def check(self, node_id: str, address: str) -> CheckResult:
            await gate.wait()
            return CheckResult(node_id, True, time.monotonic())

    poller = make_poller(HeldProbe(), concurrency=2, interval=60.0)  # type: ignore[arg-type]
    await poller.start()
    for i in range(5):
        poller.add(f"n{i}", "127.0.0.1:1", first_due=time.monotonic())
    await eventually(lambda: poller.stats()["in_flight"] == 2, message="two checks in flight")
    await poller.stop()
    assert all(poller._scheduler.due_of(f"n{i}") is not None for i in range(5))
    assert poller.stats()["checks_done"] == 0


async def test_lateness_is_recorded_per_check(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    results: list[CheckResult] = []
    poller = make_poller(http_probe(), interval=0.02, results=results)
    async with poller:
        poller.add("n1", server.address, first_due=time.monotonic())
        await eventually(lambda: len(results) >= 10, message="10 checks")
    stats = poller.stats()
    assert stats["lateness_count"] >= 10
    assert 0.0 <= stats["lateness_p50"] <= stats["lateness_p99"] <= stats["lateness_max"] < 0.5


async def test_deferred_node_is_not_checked_until_its_deferral_but_check_now_wins() -> None:
    probe = FakeProbe(FakeClock())
    results: list[CheckResult] = []
    poller = make_poller(probe, interval=0.05, results=results)
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic() + 0.05)
        poller.defer("n1", time.monotonic() + 60.0)  # a push stands in for the coming checks
        poller.add("n2", "127.0.0.1:2", first_due=time.monotonic())
        await eventually(lambda: sum(r.node_id == "n2" for r in results) >= 4,
                         message="n2 checked several times meanwhile")
        assert not [r for r in results if r.node_id == "n1"]
        assert "n1" in poller._wheel and poller.stats()["parked"] == 1  # parked, not lost
        poller.check_now("n1")  # e.g. a lease expired: no deferral stands in for this
        await eventually(lambda: any(r.node_id == "n1" for r in results),
                         message="n1 checked at once")


async def test_a_pushing_node_stays_parked_while_pushes_go_on_and_is_checked_once_they_stop(
) -> None:
    """Pushes move a parked node on inside the deferral wheel (no heap entry while they go
    on); once they stop, its check starts at the last deferral, not before."""
    probe = FakeProbe(FakeClock())
    results: list[CheckResult] = []
    poller = make_poller(probe, interval=0.05, results=results)
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic() + 0.05)
        last = 0.0
        for _ in range(20):  # a push every 50 ms, each putting the check off by 300 ms
            last = time.monotonic() + 0.3
            poller.defer("n1", last)
            await asyncio.sleep(0.05)
            assert poller._scheduler.due_of("n1") is None or not poller._wheel
        assert not results and "n1" in poller._wheel
        await asyncio.sleep(max(0.0, last - 0.03 - time.monotonic()))
        assert not results  # handed out of its slot early, but checked at its deferral
        await eventually(lambda: bool(results), message="n1 checked once its pushes stopped")
        assert "n1" not in poller._wheel


async def test_a_deferral_earlier_than_the_scheduled_check_brings_it_forward() -> None:
    """φ suspicion may judge a pushing node's silence sooner than its poll interval."""
    probe = FakeProbe(FakeClock())
    results: list[CheckResult] = []
    poller = make_poller(probe, interval=60.0, results=results)
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic() + 60.0)
        due = time.monotonic() + 0.05
        poller.defer("n1", due)
        assert poller._scheduler.due_of("n1") == due
        await eventually(lambda: any(r.node_id == "n1" for r in results),
                         message="n1 checked at its push deadline")


async def test_a_lost_check_reaches_nobody_and_the_node_is_tried_at_its_interval() -> None:
    """CheckLost (the coordinator could not check) is no observation: no result, no failure."""
    calls: list[float] = []

    class LosingProbe:
        async def check(self, node_id: str, address: str) -> CheckResult:
            calls.append(time.monotonic())
            raise CheckLost("worker died")

    results: list[CheckResult] = []
    poller = make_poller(LosingProbe(), interval=0.05, results=results)  # type: ignore[arg-type]
    async with poller:
        poller.add("n1", "127.0.0.1:1", first_due=time.monotonic())
        await eventually(lambda: len(calls) >= 3, message="tried again")
    assert results == [] and poller.checks_lost >= 3
    assert poller.stats()["failures"] == {} and poller.stats()["checks_done"] == 0
    assert min(b - a for a, b in itertools.pairwise(calls)) >= 0.045  # at the interval, no spin
