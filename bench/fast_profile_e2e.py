"""The fast push profile with real processes: from ``kill -9`` of an agent to ``unhealthy``.

The simulation (detection_quality.py) gives the profile's p99 on a virtual clock; this runs the
real thing on loopback: a ``nodewatch coordinator`` configured exactly as
``deploy/coordinator-fast-push.toml`` (plus a UDP port and an agent token), ``--agents`` real
agents as ``deploy/agent-fast-push.toml`` sets them up (UDP heartbeat every 3.5 s), then
``--kills`` rounds of: wait a random part of a heartbeat interval (so the kill lands anywhere
in the agent's cycle), SIGKILL one agent, time until the coordinator's ``unhealthy`` event,
restart the agent and wait until it is healthy again. Prints each latency and p50 / max;
nothing is asserted. Every wait is bounded.

    .venv/bin/python bench/fast_profile_e2e.py --agents 6 --kills 20
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from nodewatch.cli.processes import LocalCluster
from nodewatch.collect.run import load_agent_config
from nodewatch.config import format_duration, load_config
from nodewatch.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-fast-profile"


def config_text() -> str:
    """The deploy examples' detection and agent settings, on loopback ports of our own."""
    det = load_config(ROOT / "deploy" / "coordinator-fast-push.toml").detection
    agent = load_agent_config(str(ROOT / "deploy" / "agent-fast-push.toml"), {})
    keys = ("healthy_interval", "unhealthy_interval", "down_interval", "timeout",
            "connect_timeout")
    durations = "\n".join(f'{k} = "{format_duration(getattr(det, k))}"' for k in keys)
    return f"""
[coordinator]
agent_token = "{TOKEN}"
heartbeat_udp = "127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"

[detection]
{durations}
fall = {det.fall}
rise = {det.rise}
startup_grace = "0"

[agent]
agent_token = "{TOKEN}"
heartbeat_interval = "{format_duration(agent.heartbeat_interval)}"
heartbeat_transport = "{agent.heartbeat_transport}"
probe_timeout = "{format_duration(agent.probe_timeout)}"
"""


def wait_for(what: str, predicate: Any, timeout: float, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout:g}s")
        time.sleep(step)


def health(cluster: LocalCluster, node_id: str) -> str:
    return str((cluster.node(node_id) or {}).get("health", "?"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="every event after each kill")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    text = config_text()
    heartbeat = float(load_agent_config(str(ROOT / "deploy" / "agent-fast-push.toml"),
                                        {}).heartbeat_interval)
    latencies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="nw-fast-e2e-") as tmp, LocalCluster(
            workdir=Path(tmp), coordinator_listen=f"127.0.0.1:{free_port()}",
            config_text=text) as cluster:
        cluster.start_coordinator()
        addresses = {}
        for i in range(args.agents):
            host = f"127.0.6.{i + 1}"
            addresses[f"fast-{i}"] = f"{host}:{free_port(host)}"
            cluster.start_agent(f"fast-{i}", addresses[f"fast-{i}"])
        wait_for("every agent healthy", lambda: len(cluster.nodes()) == args.agents and all(
            n["health"] == "healthy" for n in cluster.nodes()), 30)
        print(f"{args.agents} agents, UDP heartbeat every {heartbeat:g}s; {args.kills} kills",
              flush=True)
        for k in range(args.kills):
            node_id = f"fast-{k % args.agents}"
            time.sleep(rng.uniform(0.0, heartbeat))  # anywhere in the agent's cycle
            seen = {e["id"] for e in cluster.events() if e["node_id"] == node_id}
            killed = time.time()
            cluster.agents[node_id].signal(signal.SIGKILL)
            wait_for(f"{node_id} unhealthy", lambda n=node_id: health(cluster, n) == "unhealthy",
                     30, step=0.05)
            [event] = [e for e in cluster.events() if e["node_id"] == node_id
                       and e["kind"] == "unhealthy" and e["id"] not in seen]
            latency = float(event["ts"]) - killed
            latencies.append(latency)
            classes = sorted({c["class"] for c in event["evidence"].get("checks", [])})
            if args.verbose:
                for e in cluster.events():
                    if e["node_id"] == node_id and e["id"] not in seen:
                        print(f"    +{float(e['ts']) - killed:5.2f}s {e['kind']}: {e['reason']}")
            print(f"kill {k + 1:>3} {node_id}: unhealthy after {latency:5.2f}s "
                  f"(checks: {', '.join(classes)})", flush=True)
            cluster.agents[node_id].stop()
            cluster.start_agent(node_id, addresses[node_id])
            wait_for(f"{node_id} healthy again",
                     lambda n=node_id: health(cluster, n) == "healthy", 30, step=0.05)
    ordered = sorted(latencies)
    print(f"kill -9 to unhealthy over {len(ordered)} kills: p50 {statistics.median(ordered):.2f}s"
          f", max {ordered[-1]:.2f}s (simulated p99 for this profile: about 4.5 s)", flush=True)


if __name__ == "__main__":
    main()
