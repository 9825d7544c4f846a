"""Gray failures (issue 15): time from the start of a gray failure to unschedulable, p50/p99,
in simulation and with real processes, beside Panorama's 7 s; ejections in ``fleet-errors``.

Simulation (``nodewatch.detect.simulate_gray``): 1 node in ``--nodes`` (100) starts failing
20 % of its requests while healthy nodes run at about 0.2 % with noise; three load balancers
post counts every second, agents report every 5 s; ``--sim-runs`` seeded runs. ``fleet-errors``:
every node's rate rises to about 20 % within a second: every ejection is a false one.

Real processes: a ``nodewatch coordinator`` and ``--agents`` real agents on loopback, and this
script as a load balancer posting per-node counts (``POST /v1/observations``, 1 s windows,
binomial errors at each node's rate). Each of ``--rounds`` rounds picks a node that was never
ejected, sets it to 20 % errors at a random moment, and times until ``GET /v1/nodes/ID`` says
``schedulable: false``; then it recovers and the next round waits until it is back. Every wait
is bounded; nothing is asserted.

HAProxy as the only observer (``--lb-backends K``): K real agents, K application backends
(``nodewatch.testing.ErrorBackends``, ~0.2 % errors) behind a real haproxy whose servers are
named by node id, the coordinator's ``[[actions]] type = "haproxy"`` reading ``show stat``
every ``--observe-interval``, and a load loop sending ``--lb-rate`` requests a second through
haproxy. Nobody posts observations. Each of ``--lb-rounds`` rounds makes one backend fail 20 %
of its requests at a random moment and times until the coordinator lists the node
unschedulable; then it recovers, and the next round starts once it is READY in haproxy again.

    .venv/bin/python bench/gray_failure.py --sim-runs 100 --agents 20 --rounds 10
    .venv/bin/python bench/gray_failure.py --sim-runs 0 --agents 0 --lb-backends 10 --lb-rounds 20
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nodewatch.cli.processes import LocalCluster, http_json
from nodewatch.detect.simulate_gray import PANORAMA_S, GraySettings, binomial, simulate_gray
from nodewatch.testing import ErrorBackends, HaproxyServer, LoadLoop, free_port

CONFIG = """
[detection]
healthy_interval = "1s"
unhealthy_interval = "250ms"
timeout = "500ms"
connect_timeout = "250ms"
startup_grace = "0"

[outliers]
base_ejection_time = "2s"
clear_after = "1s"

[agent]
sample_interval = "1s"
heartbeat_interval = "1s"
# No CPU / memory rules: on a small shared machine the bench's own load can hold the CPU over
# 95 % for 30 s, and a degraded node is unschedulable for another reason than the one timed.
rules = []
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


def simulation(runs: int, nodes: int) -> str:
    """Prints both scenarios; returns the gray figures, to print beside the real ones."""
    beside = ""
    for scenario in ("gray", "fleet-errors"):
        r = simulate_gray(GraySettings(scenario=scenario, runs=runs, nodes=nodes)).to_json()
        if scenario == "gray":
            beside = (f"; simulation p50 {r['detection_p50']:.1f}s p99 "
                      f"{r['detection_p99']:.1f}s")
            print(f"simulation gray: {nodes} nodes x {r['profile']['runs']} runs: time to "
                  f"unschedulable p50 {r['detection_p50']:.1f}s p99 {r['detection_p99']:.1f}s "
                  f"max {r['detection_max']:.1f}s (Panorama {PANORAMA_S:g}s); "
                  f"{r['missed']} missed, {r['false_positives']} false ejections "
                  f"[{r['wall_s']:.0f}s wall]")
        else:
            print(f"simulation fleet-errors: {nodes} nodes x {r['profile']['runs']} runs: "
                  f"{r['profile']['ejections']} ejections, events {r['events']} "
                  f"[{r['wall_s']:.0f}s wall]")
    return beside


class Observer(threading.Thread):
    """A load balancer's counts, per node, every second; ``rates`` is set by the bench."""

    def __init__(self, url: str, ids: list[str], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.url, self.ids, self.rng = url, ids, rng
        self.rates = {i: 0.002 for i in ids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            batch = []
            for node_id in self.ids:
                requests = max(0, round(self.rng.gauss(100.0, 10.0)))
                batch.append({"node_id": node_id, "requests": requests,
                              "errors": binomial(self.rng, requests, self.rates[node_id])})
            http_json(f"{self.url}/v1/observations", "POST",
                      {"source": "bench-lb", "window": 1.0, "observations": batch})


def wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def real(agents: int, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            workdir=Path(tmp), coordinator_listen=f"127.0.0.1:{free_port()}",
            config_text=CONFIG) as c:
        c.start_coordinator()
        ids = [f"gray-{i}" for i in range(agents)]
        for k, node_id in enumerate(ids):
            host = f"127.0.31.{k + 1}"
            c.start_agent(node_id, f"{host}:{free_port(host)}")
        wait(lambda: sum(n["health"] == "healthy" for n in c.nodes()) == agents, 60.0,
             "every agent healthy")
        observer = Observer(c.url, ids, rng)
        observer.start()
        time.sleep(6.0)  # the windows fill with normal figures
        times: list[float] = []
        for node_id in rng.sample(ids, min(rounds, agents)):
            time.sleep(rng.uniform(0.0, 1.0))
            started = time.monotonic()
            observer.rates[node_id] = 0.2
            wait(lambda n=node_id: (c.node(n) or {}).get("schedulable") is False, 30.0,
                 f"{node_id} unschedulable")
            times.append(time.monotonic() - started)
            print(f"round {len(times):3d} {node_id}: unschedulable after {times[-1]:.2f}s")
            observer.rates[node_id] = 0.002
            wait(lambda n=node_id: (c.node(n) or {}).get("schedulable") is True, 60.0,
                 f"{node_id} back")
        observer.stop.set()
        ejected = sum(1 for e in c.events() if e["kind"] == "outlier")
        print(f"real processes: {agents} agents x {len(times)} gray failures (20 % errors, one "
              f"observer): time to unschedulable p50 {statistics.median(times):.2f}s p99 "
              f"{pct(times, 99):.2f}s max {max(times):.2f}s (Panorama {PANORAMA_S:g}s); "
              f"{ejected - len(times)} other ejections")


def haproxy_observer(backends: int, rounds: int, rate: float, observe_interval: str,
                     seed: int, beside: str = "") -> None:
    rng = random.Random(seed)
    ids = [f"app-{i}" for i in range(backends)]
    with tempfile.TemporaryDirectory() as tmp, ErrorBackends(ids, seed=seed) as apps:
        for node_id in ids:
            apps.rates[node_id] = 0.002
        with HaproxyServer(Path(tmp) / "haproxy", apps.addresses) as lb:
            config = CONFIG + f"""
[[actions]]
type = "haproxy"
socket = "{lb.socket}"
backend = "be"
timeout = "2s"
observe_interval = "{observe_interval}"
"""
            with LocalCluster(workdir=Path(tmp) / "cluster",
                              coordinator_listen=f"127.0.0.1:{free_port()}",
                              config_text=config) as c:
                c.start_coordinator()
                for k, node_id in enumerate(ids):
                    host = f"127.0.32.{k + 1}"
                    c.start_agent(node_id, f"{host}:{free_port(host)}")
                wait(lambda: sum(n["health"] == "healthy" for n in c.nodes()) == backends,
                     60.0, "every agent healthy")
                wait(lambda: set(lb.states().values()) == {"READY"}, 20.0, "haproxy ready")
                budget = 30.0 + rounds * 40.0
                began = time.monotonic()
                with LoadLoop(lb.url, rate=rate, workers=8, max_requests=int(rate * budget),
                              max_seconds=budget) as load:
                    time.sleep(6.0)  # the windows fill with normal figures
                    times = _lb_rounds(c, lb, apps, rng, ids, rounds)
                achieved = sum(load.statuses.values()) / (time.monotonic() - began)
                statuses = dict(load.statuses)
                sent = sum(statuses.values())
                ejected = sum(1 for e in c.events() if e["kind"] == "outlier")
    eject_after = 2.0  # the default [outliers] eject_after
    print(f"haproxy as the only observer: {backends} backends behind haproxy, show stat every "
          f"{observe_interval}, {rate:g} req/s asked, {achieved:.0f} req/s sent ({sent} in all, "
          f"{statuses.get(0, 0)} unanswered)"
          f", {len(times)} gray failures (20 % errors): time to unschedulable p50 "
          f"{statistics.median(times):.2f}s p99 {pct(times, 99):.2f}s max {max(times):.2f}s "
          f"(Panorama {PANORAMA_S:g}s{beside}); of which eject_after {eject_after:g}s, so the "
          f"rule saw the outlier after p50 {statistics.median(times) - eject_after:.2f}s; "
          f"{ejected - len(times)} other ejections")


def _ejected(node: dict[str, Any] | None) -> bool:
    """Unschedulable as an outlier (not for another reason, e.g. a degraded agent)."""
    return bool(node) and node["schedulable"] is False and node.get("outlier") is not None


def _lb_rounds(c: LocalCluster, lb: HaproxyServer, apps: ErrorBackends, rng: random.Random,
               ids: list[str], rounds: int) -> list[float]:
    times: list[float] = []
    order = [rng.sample(ids, len(ids)) for _ in range(math.ceil(rounds / len(ids)))]
    for node_id in [n for block in order for n in block][:rounds]:
        wait(lambda n=node_id: (c.node(n) or {}).get("schedulable") is True, 30.0,
             f"{node_id} schedulable before its round")
        time.sleep(rng.uniform(0.0, 1.0))
        started = time.monotonic()
        apps.rates[node_id] = 0.2
        wait(lambda n=node_id: _ejected(c.node(n)), 30.0, f"{node_id} an unschedulable outlier")
        times.append(time.monotonic() - started)
        node = c.node(node_id) or {}
        print(f"round {len(times):3d} {node_id}: unschedulable after {times[-1]:.2f}s "
              f"(health {node.get('health')}, {(node.get('outlier') or {}).get('reason', '')})")
        apps.rates[node_id] = 0.002
        wait(lambda n=node_id: (c.node(n) or {}).get("schedulable") is True
             and lb.states().get(n) == "READY", 120.0, f"{node_id} back")
        time.sleep(5.0)  # its window fills with normal figures before the next round
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-runs", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--agents", type=int, default=20, help="real agents (0: none)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lb-backends", type=int, default=0,
                        help="haproxy as the only observer, in front of this many backends")
    parser.add_argument("--lb-rounds", type=int, default=10)
    parser.add_argument("--lb-rate", type=float, default=300.0, help="requests a second")
    parser.add_argument("--observe-interval", default="1s")
    args = parser.parse_args()
    beside = simulation(args.sim_runs, args.nodes) if args.sim_runs else ""
    if args.agents:
        real(args.agents, args.rounds, args.seed)
    if args.lb_backends:
        haproxy_observer(args.lb_backends, args.lb_rounds, args.lb_rate,
                         args.observe_interval, args.seed, beside)


if __name__ == "__main__":
    main()
