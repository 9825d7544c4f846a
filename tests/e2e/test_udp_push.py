"""End to end with UDP heartbeats: real coordinator and agent processes on the fast push
profile (heartbeats every 1 s defer polls by 1.5 s); a killed agent is confirmed quickly."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, wait_until

TOKEN = "e2e-udp-token"
FAST_PUSH = """
[coordinator]
agent_token = "{token}"
heartbeat_udp = "127.0.0.1:{udp_port}"

[detection]
healthy_interval = "1500ms"
unhealthy_interval = "300ms"
timeout = "500ms"
connect_timeout = "300ms"
fall = 3
rise = 2
startup_grace = "0"

[agent]
sample_interval = "1s"
heartbeat_interval = "1s"
heartbeat_transport = "udp"
agent_token = "{token}"
"""


def metric(c: LocalCluster, name: str) -> float:
    with urllib.request.urlopen(f"{c.url}/metrics", timeout=2) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


UDP_OK = 'nodewatch_udp_heartbeats_total{result="ok"}'


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    config = FAST_PUSH.format(token=TOKEN, udp_port=free_port())
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=config) as c:
        c.start_coordinator()
        for i in range(1, 4):
            host = f"127.0.4.{i}"
            c.start_agent(f"udp-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: len(c.nodes()) == 3
                   and all(n["health"] == "healthy" for n in c.nodes()),
                   timeout=20, message="three healthy nodes")
        yield c


def test_udp_pushes_arrive_and_a_killed_agent_is_confirmed_within_seconds(
        cluster: LocalCluster) -> None:
    # Heartbeats arrive over UDP, and while they do nobody is polled.
    wait_until(lambda: metric(cluster, UDP_OK) >= 6, timeout=10, message="UDP heartbeats")
    checks = metric(cluster, "nodewatch_checks_total")
    pushed = metric(cluster, UDP_OK)
    wait_until(lambda: metric(cluster, UDP_OK) >= pushed + 9, timeout=10,
               message="three more seconds of UDP heartbeats")
    assert metric(cluster, "nodewatch_checks_total") <= checks + 1  # a rare straggler at most
    assert metric(cluster, 'nodewatch_udp_heartbeats_total{result="bad_tag"}') == 0

    killed = time.time()
    cluster.agents["udp-2"].signal(signal.SIGKILL)
    wait_until(lambda: (cluster.node("udp-2") or {}).get("health") == "unhealthy", timeout=15,
               message="udp-2 confirmed unhealthy")
    [unhealthy] = [e for e in cluster.events()
                   if e["node_id"] == "udp-2" and e["kind"] == "unhealthy"]
    assert unhealthy["ts"] - killed < 10.0  # generous: the profile aims at about 3 s
    assert {c["class"] for c in unhealthy["evidence"]["checks"]} == {"refused"}
    for node_id in ("udp-1", "udp-3"):
        assert (cluster.node(node_id) or {}).get("health") == "healthy"


def test_a_udp_agent_the_coordinator_forgot_registers_again_within_a_heartbeat(
        cluster: LocalCluster) -> None:
    # The agent's periodic HTTP heartbeat is 5 minutes away: only the coordinator's UDP
    # "unknown node" reply can bring it back this soon.
    status, _ = http_json(f"{cluster.url}/v1/nodes/udp-1", method="DELETE")
    assert status == 200
    wait_until(lambda: (cluster.node("udp-1") or {}).get("health") == "healthy", timeout=10,
               message="udp-1 registered again and healthy")
    assert metric(cluster, 'nodewatch_udp_heartbeats_total{result="unknown"}') >= 1
    kinds = [e["kind"] for e in cluster.events() if e["node_id"] == "udp-1"]
    assert "removed" in kinds and kinds.index("removed") < len(kinds) - 1
