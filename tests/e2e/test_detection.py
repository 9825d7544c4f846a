"""End to end: a real coordinator and real agents as processes on 127.0.x.y addresses."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, wait_until

FAST = """
[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
timeout = "300ms"
connect_timeout = "200ms"
fall = 3
rise = 2
startup_grace = "{grace}"

[agent]
sample_interval = "1s"
"""


def make_cluster(tmp_path: Path, grace: str = "0") -> LocalCluster:
    return LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                        config_text=FAST.format(grace=grace))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with make_cluster(tmp_path) as c:
        c.start_coordinator()
        for i in range(1, 4):
            host = f"127.0.2.{i}"
            c.start_agent(f"web-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: all(n["health"] == "healthy" for n in c.nodes())
                   and len(c.nodes()) == 3, timeout=20, message="three healthy nodes")
        yield c


def events_of(c: LocalCluster, node_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in c.events() if e["node_id"] == node_id and e["kind"] == kind]


def health(c: LocalCluster, node_id: str) -> str:
    node = c.node(node_id)
    return node["health"] if node else "?"


def test_killed_agent_is_confirmed_unhealthy_only_after_fall_failures(
    cluster: LocalCluster,
) -> None:
    cluster.agents["web-2"].signal(signal.SIGKILL)
    wait_until(lambda: health(cluster, "web-2") == "unhealthy", timeout=10,
               message="web-2 unhealthy")
    [suspect] = [e for e in events_of(cluster, "web-2", "suspect") if e["from"] == "healthy"]
    [unhealthy] = events_of(cluster, "web-2", "unhealthy")
    assert unhealthy["ts"] > suspect["ts"]
    checks = unhealthy["evidence"]["checks"]
    assert len(checks) >= 3, "confirmed before fall consecutive failures"
    assert {c["class"] for c in checks} == {"refused"}
    # fall 3 spans (3 - 1) x 200 ms less 10 % jitter from the first failure; the quick re-check
    # after it does not count (issue 11: this kill was once confirmed 207 ms after it).
    assert checks[-1]["at"] - checks[0]["at"] >= 0.36 - 1e-6
    assert unhealthy["ts"] - suspect["ts"] >= 0.36 - 1e-6
    assert re.match(r"\d+ consecutive failed checks over \d+\.\ds, last: ", unhealthy["reason"])
    # Peers were asked and could not reach it either: that is in the evidence too.
    assert all(not vote["reachable"] for vote in unhealthy["evidence"].get("peers", []))
    assert health(cluster, "web-1") == "healthy" and health(cluster, "web-3") == "healthy"
    node = cluster.node("web-2")
    assert node is not None and node["schedulable"] is False


def test_hung_agent_times_out_then_recovers_after_rise(cluster: LocalCluster) -> None:
    agent = cluster.agents["web-3"]
    agent.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: health(cluster, "web-3") == "unhealthy", timeout=10,
                   message="web-3 unhealthy")
        [unhealthy] = events_of(cluster, "web-3", "unhealthy")
        assert {c["class"] for c in unhealthy["evidence"]["checks"]} == {"timeout"}
    finally:
        agent.signal(signal.SIGCONT)
    wait_until(lambda: health(cluster, "web-3") == "healthy", timeout=10,
               message="web-3 back to healthy")
    [recovered] = events_of(cluster, "web-3", "recovered")
    assert recovered["evidence"]["successes"] >= 2
    assert recovered["from"] == "unhealthy" and recovered["to"] == "healthy"


def test_self_reported_degraded_makes_node_unschedulable(cluster: LocalCluster) -> None:
    address = cluster.agents["web-1"].address
    status, _ = http_json(f"http://{address}/health", "PUT",
                          {"status": "degraded", "reason": "disk almost full"})
    assert status == 200
    wait_until(lambda: (cluster.node("web-1") or {}).get("node_status") == "degraded",
               timeout=10, message="web-1 degraded")
    node = cluster.node("web-1")
    assert node is not None
    assert node["health"] == "healthy" and node["schedulable"] is False
    assert any("disk almost full" in r for r in node["reasons"])
    assert events_of(cluster, "web-1", "degraded")
    http_json(f"http://{address}/health", "PUT", {"status": "ok"})
    wait_until(lambda: (cluster.node("web-1") or {}).get("schedulable") is True, timeout=10,
               message="web-1 schedulable again")


def test_coordinator_kill_9_restart_loses_nothing_and_grace_holds(tmp_path: Path) -> None:
    with make_cluster(tmp_path, grace="3s") as c:
        c.start_coordinator()
        for i in range(1, 4):
            host = f"127.0.3.{i}"
            c.start_agent(f"db-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: len(c.nodes()) == 3 and all(n["health"] == "healthy"
                                                       for n in c.nodes()),
                   timeout=20, message="three healthy nodes")
        http_json(f"{c.url}/v1/nodes/db-1/drain", "POST", {"reason": "maintenance"})
        before_nodes = {n["node_id"]: (n["health"], n["admin"]) for n in c.nodes()}
        before_events = [e["id"] for e in c.events()]
        assert c.coordinator is not None
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.popen.wait(5)  # type: ignore[union-attr]
        # While the coordinator is down, one node hangs: after the restart it must be held
        # as suspect during startup_grace, and confirmed only after it.
        c.agents["db-3"].signal(signal.SIGSTOP)
        try:
            restarted = time.time()
            c.start_coordinator()
            after_nodes = {n["node_id"]: (n["health"], n["admin"]) for n in c.nodes()}
            assert set(after_nodes) == set(before_nodes)
            assert after_nodes["db-1"][1] == "drained"
            assert [e["id"] for e in c.events()][: len(before_events)] == before_events
            wait_until(lambda: health(c, "db-3") == "unhealthy", timeout=15,
                       message="db-3 confirmed after grace")
            [unhealthy] = events_of(c, "db-3", "unhealthy")
            assert unhealthy["ts"] >= restarted + 3.0
            held = [e for e in events_of(c, "db-3", "suspect")
                    if e["reason"].startswith("held: startup grace")]
            assert held, "the grace period was not visible in the events"
            assert health(c, "db-2") == "healthy"
        finally:
            c.agents["db-3"].signal(signal.SIGCONT)


def test_no_process_left_behind(tmp_path: Path) -> None:
    with make_cluster(tmp_path) as c:
        c.start_coordinator()
        agent = c.start_agent("solo", f"127.0.4.1:{free_port('127.0.4.1')}")
        pids = [agent.pid, c.coordinator.pid if c.coordinator else 0]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
