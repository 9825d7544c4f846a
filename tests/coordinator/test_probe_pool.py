"""The process probe: real worker processes checking real aiohttp servers on loopback.

Every wait is on a condition with a deadline. The only sleeps are stimuli: server-side holds
that keep checks in flight, and the length of a SIGSTOP that stalls a worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from nodewatch.api.metrics import CoordinatorMetrics
from nodewatch.config import NodeConfig, load_config
from nodewatch.coordinator.poller import CheckLost, HttpProbe
from nodewatch.coordinator.probe_pool import ProcessProbe
from nodewatch.coordinator.service import Coordinator
from nodewatch.model import CheckResult, FailureClass, Health
from nodewatch.store.open import open_store
from tests.coordinator.test_poller import (
    _HOSTS,
    Handler,
    Server,
    eventually,
    health_body,
    make_poller,
    servers,
    start_hanging_server,
    start_server,
    text_handler,
)
from tests.helpers import free_port

__all__ = ["servers"]  # the fixture, re-used from the poller's tests

PROBE_KW = {"timeout": 0.3, "connect_timeout": 0.2, "max_bytes": 4096, "concurrency": 16}


def alive(pid: int) -> bool:
    """Running and not a zombie (a reaped process has no /proc entry at all)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def pool() -> AsyncIterator[ProcessProbe]:
    probe = ProcessProbe(processes=2, clock=time.monotonic, **PROBE_KW)  # type: ignore[arg-type]
    await probe.open()
    yield probe
    await probe.aclose()


# A body with every Report field set, floats that do not round-trip through float32.
FULL_BODY = json.dumps({
    "node_id": "", "incarnation": 7, "seq": 42, "ts": 1764000000.123456789,
    "status": "degraded", "reasons": ["disk 97% full", "ünïcode"],
    "system": {"cpu_percent": 12.3456789, "load1": 0.1},
    "load": {"qps": 3.0, "pending_tasks": 0.30000000000000004},
    "sample_interval": 5.0, "samples": 11,
}).encode()


async def test_results_are_classified_like_the_in_process_probe(
        servers: list[Server], pool: ProcessProbe) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    cases = {
        "ok": await start_server(text_handler(200, FULL_BODY)),
        "http_status": await start_server(text_handler(503, b"busy", "text/plain")),
        "bad_body": await start_server(text_handler(200, b"<html>not json</html>")),
        "timeout": await start_server(hang),
    }
    servers += cases.values()
    addresses = {name: server.address for name, server in cases.items()}
    host = next(_HOSTS)
    addresses["refused"] = f"{host}:{free_port(host)}"
    local = HttpProbe(clock=time.monotonic, **PROBE_KW)  # type: ignore[arg-type]
    try:
        for name, address in addresses.items():
            before = time.monotonic()
            remote = await pool.check(name, address)
            after = time.monotonic()
            here = await local.check(name, address)
            assert (remote.node_id, remote.ok, remote.failure, remote.detail, remote.source) \
                == (here.node_id, here.ok, here.failure, here.detail, here.source), name
            assert remote.report == here.report, name
            # Timed in the worker, on the same clock: inside the window the call took here.
            assert before <= remote.at - remote.latency <= remote.at <= after, name
        ok = await pool.check("ok", addresses["ok"])
        assert ok.report is not None and ok.report.load["pending_tasks"] == 0.30000000000000004
        assert ok.report.reasons == ("disk 97% full", "ünïcode") and ok.report.samples == 11
        timeout = await pool.check("timeout", addresses["timeout"])
        assert timeout.failure is FailureClass.TIMEOUT and 0.25 <= timeout.latency < 0.8
    finally:
        await local.aclose()
        never.set()


async def test_a_node_always_goes_to_the_same_worker(servers: list[Server],
                                                     pool: ProcessProbe) -> None:
    for i in range(6):
        servers.append(await start_server(node_id=f"n{i}"))
    assert {pool.worker_for(f"n{i}") for i in range(6)} == {0, 1}  # both workers get nodes
    for _ in range(10):
        results = await asyncio.gather(*(pool.check(f"n{i}", s.address)
                                         for i, s in enumerate(servers)))
        assert all(r.ok for r in results), [r.detail for r in results]
    # Ten checks each, all on one kept-alive connection: one worker per node, never two.
    assert [len(s.peers) for s in servers] == [1] * 6


async def test_a_killed_worker_is_replaced_without_a_false_failure(
        servers: list[Server]) -> None:
    def slow(node_id: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(0.05)  # server side: keeps checks in flight
            return web.json_response(health_body(node_id))
        return handler

    for i in range(6):
        servers.append(await start_server(slow(f"n{i}")))
    probe = ProcessProbe(processes=2, clock=time.monotonic, **PROBE_KW)  # type: ignore[arg-type]
    results: list[CheckResult] = []
    poller = make_poller(probe, concurrency=6, interval=0.01, results=results)  # type: ignore[arg-type]
    ids = [f"n{i}" for i in range(6)]
    victim_nodes = [i for i, node_id in enumerate(ids) if probe.worker_for(node_id) == 0]
    assert victim_nodes
    async with poller:
        for node_id, server in zip(ids, servers, strict=True):
            poller.add(node_id, server.address, first_due=time.monotonic())
        victim = probe.pids[0]
        assert victim is not None
        await eventually(lambda: any(servers[i].current for i in victim_nodes),
                         message="a check in flight on worker 0")
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: probe.restarts == 1 and probe.pids[0] not in (None, victim),
                         message="a replacement worker")
        counts = [len(servers[i].requests) for i in victim_nodes]
        await eventually(lambda: all(len(servers[i].requests) >= c + 3
                                     for i, c in zip(victim_nodes, counts, strict=True)),
                         message="its nodes checked again")
    assert not alive(victim)
    assert poller.checks_lost >= 1  # the checks in flight were lost, not failed
    assert results and all(r.ok for r in results), [r.detail for r in results if not r.ok]


async def test_a_hung_worker_is_killed_and_replaced(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    probe = ProcessProbe(processes=1, clock=time.monotonic, hang_grace=0.3,
                         **PROBE_KW)  # type: ignore[arg-type]
    await probe.open()
    try:
        hung = probe.pids[0]
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(CheckLost):
            await asyncio.wait_for(probe.check("n1", server.address), 5.0)
        await eventually(lambda: probe.pids[0] not in (None, hung) and probe.restarts == 1,
                         message="a replacement worker")
        result = await probe.check("n1", server.address)
        assert result.ok
        assert not alive(hung)
    finally:
        await probe.aclose()


async def test_failures_while_the_worker_loop_stalled_are_lost_not_reported(
        servers: list[Server]) -> None:
    server, never = await start_hanging_server()
    servers.append(server)
    probe = ProcessProbe(processes=1, clock=time.monotonic, max_loop_lag=0.05,
                         **PROBE_KW)  # type: ignore[arg-type]
    await probe.open()
    try:
        worker = probe.pids[0]
        assert worker is not None
        check = asyncio.ensure_future(probe.check("n1", server.address))
        await eventually(lambda: server.current == 1, message="the check in flight")
        os.kill(worker, signal.SIGSTOP)
        await asyncio.sleep(0.4)  # the stimulus: a stall longer than the check's timeout
        os.kill(worker, signal.SIGCONT)
        with pytest.raises(CheckLost):
            await check  # a timeout we may have caused is no verdict on the node
        assert probe.pids[0] == worker and probe.restarts == 0
    finally:
        never.set()
        await probe.aclose()


async def test_close_leaves_no_child_process(servers: list[Server]) -> None:
    servers.append(server := await start_server(node_id="n1"))
    probe = ProcessProbe(processes=3, clock=time.monotonic, **PROBE_KW)  # type: ignore[arg-type]
    await probe.open()
    pids = [pid for pid in probe.pids if pid is not None]
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    assert (await probe.check("n1", server.address)).ok
    await probe.aclose()
    assert not any(alive(pid) for pid in pids)


PARENT = """
import asyncio, sys, time
from nodewatch.coordinator.probe_pool import ProcessProbe

async def main():
    probe = ProcessProbe(processes=2, timeout=1.0, connect_timeout=0.5, max_bytes=4096,
                         concurrency=4)
    await probe.open()
    print(*probe.pids, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_workers_die_with_a_killed_coordinator() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5.0
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "probe workers outlived their parent"
        time.sleep(0.02)


async def test_a_coordinator_with_two_poller_processes_detects_a_killed_node(
        servers: list[Server], tmp_path: Path) -> None:
    for i in range(4):
        servers.append(await start_server(node_id=f"n{i}"))
    cfg = load_config(None, {
        "coordinator.store": f"sqlite:///{tmp_path}/state.db",
        "coordinator.poller_processes": 2,
        "detection.healthy_interval": "200ms", "detection.unhealthy_interval": "100ms",
        "detection.timeout": "300ms", "detection.connect_timeout": "200ms",
        "detection.fall": 2, "detection.rise": 1, "detection.startup_grace": "0",
        "guard.indirect_probes": 0,
    })
    cfg.nodes = [NodeConfig(id=f"n{i}", address=s.address) for i, s in enumerate(servers)]
    coord = Coordinator(cfg, open_store(cfg.coordinator.store))
    await coord.start()
    try:
        assert isinstance(coord.probe, ProcessProbe) and len(coord.probe.pids) == 2
        nodes = coord.cluster.nodes
        await eventually(lambda: all(n.health is Health.HEALTHY for n in nodes.values()),
                         message="every node healthy")
        victim = servers.pop(1)  # the fixture must not clean it up twice
        await victim.runner.cleanup()
        await eventually(lambda: nodes["n1"].health is Health.UNHEALTHY, within=10.0,
                         message="n1 confirmed down")
        assert all(nodes[f"n{i}"].health is Health.HEALTHY for i in (0, 2, 3))
        assert coord.check_failures.get("refused", 0) >= 2
        pids = [pid for pid in coord.probe.pids if pid is not None]
        os.kill(pids[0], signal.SIGKILL)  # a worker dies: replaced, and counted in /metrics
        await eventually(lambda: coord.probe.restarts == 1, message="the worker replaced")
        text = CoordinatorMetrics(coord).render().decode()
        assert "nodewatch_poller_process_restarts_total 1.0" in text
        assert "nodewatch_checks_lost_total" in text
        assert all(nodes[f"n{i}"].health is Health.HEALTHY for i in (0, 2, 3))
    finally:
        await coord.stop()
    assert not any(alive(pid) for pid in pids)
