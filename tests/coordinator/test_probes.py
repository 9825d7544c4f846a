"""The shared /health check: every failure class, the body cap, and a good report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from nodewatch.coordinator.probes import HttpPeerProbe, check_health, parse_probe_reply
from nodewatch.model import CheckResult, FailureClass, NodeStatus, PeerVote
from nodewatch.protocol import parse_health_body
from tests.helpers import free_port

GOOD = (b'{"status":"degraded","node_id":"n1","uptime":1.0,"version":"0.1.0","incarnation":4,'
        b'"seq":18,"ts":1764000000.5,"reasons":["cpu"],"system":{"cpu_percent":12.5},'
        b'"load":{"qps":42}}')


class Target:
    """A tiny server whose /health answer each test scripts."""

    def __init__(self) -> None:
        self.status = 200
        self.body = GOOD
        self.chunked = False
        self.hang = asyncio.Event()
        self.hanging = False

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.hanging:
            await self.hang.wait()
        if self.chunked:
            response = web.StreamResponse(status=self.status)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(self.body), 100):
                await response.write(self.body[i:i + 100])
            await response.write_eof()
            return response
        return web.Response(body=self.body, status=self.status, content_type="application/json")


@pytest.fixture
async def target() -> AsyncIterator[tuple[Target, str]]:
    state = Target()
    app = web.Application()
    app.router.add_get("/health", state.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield state, f"127.0.0.1:{port}"
    state.hang.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def check(session: aiohttp.ClientSession, address: str, node_id: str = "n1",
                total: float = 2.0, max_bytes: int = 65536) -> CheckResult:
    return await check_health(session, node_id, address, timeout=total, connect_timeout=1.0,
                              max_bytes=max_bytes, clock=time.monotonic)


async def test_good_body_becomes_a_report(target: tuple[Target, str],
                                          session: aiohttp.ClientSession) -> None:
    _, address = target
    result = await check(session, address)
    assert result.ok and result.failure is None and result.latency >= 0
    assert result.report is not None
    assert (result.report.incarnation, result.report.seq) == (4, 18)
    assert result.report.status is NodeStatus.DEGRADED
    assert result.report.reasons == ("cpu",)
    assert result.report.load == {"qps": 42.0}


async def test_non_200_is_http_status(target: tuple[Target, str],
                                      session: aiohttp.ClientSession) -> None:
    state, address = target
    state.status = 503
    result = await check(session, address)
    assert not result.ok and result.failure is FailureClass.HTTP_STATUS
    assert "503" in result.detail


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"seq":1}', b'{"incarnation":-1,'
                                  b'"seq":1,"ts":1}', b'{"incarnation":1,"seq":1,"ts":1,'
                                  b'"status":"weird"}'])
async def test_bad_body_is_bad_body(target: tuple[Target, str], session: aiohttp.ClientSession,
                                    body: bytes) -> None:
    state, address = target
    state.body = body
    result = await check(session, address)
    assert not result.ok and result.failure is FailureClass.BAD_BODY and result.detail


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_cap_is_bad_body(target: tuple[Target, str],
                                             session: aiohttp.ClientSession,
                                             chunked: bool) -> None:
    state, address = target
    state.chunked = chunked
    state.body = GOOD[:-1] + b', "pad":"' + b"x" * 5000 + b'"}'
    result = await check(session, address, max_bytes=1024)
    assert not result.ok and result.failure is FailureClass.BAD_BODY
    assert "1024" in result.detail
    state.body = GOOD
    assert (await check(session, address, max_bytes=1024)).ok


async def test_chunked_good_body_is_read_whole(target: tuple[Target, str],
                                               session: aiohttp.ClientSession) -> None:
    state, address = target
    state.chunked = True
    assert (await check(session, address)).ok


async def test_body_naming_another_node_is_bad_body(target: tuple[Target, str],
                                                    session: aiohttp.ClientSession) -> None:
    _, address = target
    result = await check(session, address, node_id="other")
    assert not result.ok and result.failure is FailureClass.BAD_BODY
    assert "n1" in result.detail


async def test_closed_port_is_refused(session: aiohttp.ClientSession) -> None:
    result = await check(session, f"127.0.0.1:{free_port()}")
    assert not result.ok and result.failure is FailureClass.REFUSED


async def test_slow_answer_is_timeout(target: tuple[Target, str],
                                      session: aiohttp.ClientSession) -> None:
    state, address = target
    state.hanging = True
    result = await check(session, address, total=0.2)
    assert not result.ok and result.failure is FailureClass.TIMEOUT


def test_parse_health_body_raises_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="health"):
        parse_health_body(b'{"incarnation": "x"}')
    report = parse_health_body(GOOD)
    assert report.seq == 18 and report.system == {"cpu_percent": 12.5}


async def test_a_peer_probe_asks_the_peers_probe_and_parses_its_vote() -> None:
    asked: list[dict[str, str]] = []
    answers = {"up": (200, b'{"reachable": true, "detail": "HTTP 200"}'),
               "down": (200, b'{"reachable": false, "failure": "refused"}'),
               "no-probe": (404, b'{"error": "not found"}'),
               "garbled": (200, b'{"reachable": "maybe"}')}

    async def probe(request: web.Request) -> web.Response:
        asked.append(dict(request.query))
        status, body = answers[request.query["target"]]
        return web.Response(body=body, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/probe", probe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    peers = HttpPeerProbe(timeout=0.5, connect_timeout=0.25)
    await peers.open()
    try:
        peer = f"127.0.0.1:{port}"
        assert await peers.peer_check("p", peer, "up") == PeerVote("p", True, "HTTP 200")
        assert await peers.peer_check("p", peer, "down") == PeerVote("p", False, "refused")
        assert await peers.peer_check("p", peer, "no-probe") is None
        assert await peers.peer_check("p", peer, "garbled") is None
        assert asked[0] == {"target": "up", "timeout": "0.5", "connect_timeout": "0.25"}
        gone = await peers.peer_check("p", f"127.0.0.1:{free_port()}", "up")
        assert gone is not None and gone.reachable is None
        assert gone.detail.startswith("peer unreachable")
    finally:
        await peers.aclose()
        await runner.cleanup()


def test_a_probe_reply_that_is_not_json_casts_no_vote() -> None:
    assert parse_probe_reply("p", b"<html>") is None
    assert parse_probe_reply("p", b'{"reachable": true}') == PeerVote("p", True, "")


async def test_a_timeout_read_late_by_a_busy_loop_is_the_checkers_not_the_nodes(
        target: tuple[Target, str], session: aiohttp.ClientSession) -> None:
    state, address = target
    state.hanging = True
    # The loop is busy for 0.6 s while a 0.2 s check waits: its timeout fires 0.4 s late.
    asyncio.get_running_loop().call_later(0.05, time.sleep, 0.6)
    result = await check(session, address, total=0.2)
    assert not result.ok and result.failure is FailureClass.LOCAL
    assert "read late" in result.detail and result.latency >= 0.6
    on_time = await check(session, address, total=0.2)  # the loop is free again
    assert on_time.failure is FailureClass.TIMEOUT


async def test_a_check_out_of_descriptors_is_the_checkers_not_the_nodes(
        session: aiohttp.ClientSession) -> None:
    address = f"127.0.0.1:{free_port()}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):  # every free number below the limit taken
            while len(fillers) < top + 1:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        result = await check(session, address)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not result.ok and result.failure is FailureClass.LOCAL, result
    assert "Too many open files" in result.detail


def test_a_peer_that_could_not_check_casts_no_vote() -> None:
    assert parse_probe_reply("p", b'{"reachable": false, "failure": "local"}') is None
    assert parse_probe_reply("p", b'{"reachable": false, "failure": "timeout"}') == PeerVote(
        "p", False, "timeout")
