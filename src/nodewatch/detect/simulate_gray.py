"""Gray failures on a virtual clock: the real cluster facade fed by simulated callers.

Scenarios: ``gray`` (one node in ``nodes`` starts failing ``gray_error_rate`` of its requests
while it answers ``/health``; measured: the time from that start to the node's ``outlier``
event, i.e. unschedulable, over many seeded runs) and ``fleet-errors`` (every node's error rate
rises together, as when a shared dependency fails: every ejection is a false one). Load
balancers post per-node counts each ``observe_interval`` (``POST /v1/observations``) and agents
report their application's ``error_rate``/``qps`` every ``report_interval``; healthy nodes run at
about 0.2 % errors with per-node and per-second noise. Drained (ejected) nodes get no traffic.
Panorama (OSDI '18) reports gray failures detected in about 7 s: printed beside ours.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nodewatch.detect.cluster import Cluster
from nodewatch.detect.policy import Policy
from nodewatch.detect.simulate import SimResult
from nodewatch.model import CallerObservation, CheckResult, Health, NodeState, Report

__all__ = ["GRAY_SCENARIOS", "GraySettings", "PANORAMA_S", "binomial", "simulate_gray"]

GRAY_SCENARIOS = ("gray", "fleet-errors")
PANORAMA_S = 7.0  # Panorama's reported detection time for gray failures
_TICK = 0.5  # the coordinator's ticker (PERSIST_INTERVAL)


@dataclass(frozen=True, slots=True)
class GraySettings:
    policy: Policy = field(default_factory=Policy)
    scenario: str = "gray"
    nodes: int = 100
    runs: int = 50
    seed: int = 1
    warmup: float = 30.0  # evidence fills its windows before the fault starts
    after: float = 30.0  # simulated time after the fault starts
    observers: int = 3  # load balancers reporting counts
    observe_interval: float = 1.0
    report_interval: float = 5.0  # agent reports (heartbeats or polls)
    qps: float = 100.0  # median requests per second per node (lognormal spread)
    base_error_rate: float = 0.002
    gray_error_rate: float = 0.2
    fleet_error_rate: float = 0.2  # fleet-errors: everyone's rate after the rise
    rise_spread: float = 1.0  # fleet-errors: the nodes' onsets spread over this many seconds

    def __post_init__(self) -> None:
        if self.scenario not in GRAY_SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of "
                             f"{', '.join(GRAY_SCENARIOS)}")
        if self.nodes < 2 or self.runs < 1 or self.observers < 0:
            raise ValueError("expected at least 2 nodes, 1 run and 0 observers")


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial draw, cheap for large n (normal approximation past 50 expected)."""
    if n <= 0 or p <= 0:
        return 0
    mean = n * p
    if mean > 50 and n * (1 - p) > 50:
        return max(0, min(n, round(rng.gauss(mean, math.sqrt(mean * (1 - p))))))
    # Poisson-ish: the number of errors among n requests, drawn by inversion.
    count, threshold, prob = 0, rng.random(), (1 - p) ** n
    cumulative = prob
    while cumulative < threshold and count < n:
        count += 1
        prob *= (n - count + 1) / count * p / (1 - p)
        cumulative += prob
    return count


def _one_run(s: GraySettings, seed: int) -> tuple[float | None, list[str], Counter[str], int,
                                                   int]:
    """One fleet, one fault; returns (time to outlier or None, falsely ejected, events,
    agent reports, observer batches)."""
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(s.nodes)]
    qps = [s.qps * rng.lognormvariate(0.0, 0.3) for _ in ids]
    base = [s.base_error_rate * rng.lognormvariate(0.0, 0.4) for _ in ids]
    cluster = Cluster(s.policy, now=0.0, rng=random.Random(seed + 1), nodes=[
        NodeState(node_id=i, address=f"10.0.{k >> 8}.{k & 255}:7301", health=Health.HEALTHY,
                  incarnation=1) for k, i in enumerate(ids)])
    cluster.restart_grace(-s.policy.startup_grace)
    start = s.warmup + rng.uniform(0.0, s.observe_interval)
    gray = rng.randrange(s.nodes)
    onset = [start + rng.uniform(0.0, s.rise_spread) for _ in ids]
    if s.scenario == "gray":
        onset = [math.inf] * s.nodes
        onset[gray] = start
    fault_rate = s.gray_error_rate if s.scenario == "gray" else s.fleet_error_rate
    fault_scale = [rng.uniform(0.75, 1.25) for _ in ids]  # the rise is not uniform either

    def rate(k: int, t: float) -> float:
        return fault_rate * fault_scale[k] if t >= onset[k] else base[k]

    end = start + s.after
    report_at = [rng.uniform(0.0, s.report_interval) for _ in ids]
    observe_at = [rng.uniform(0.0, s.observe_interval) for _ in range(s.observers)]
    seq = [0] * s.nodes
    events: Counter[str] = Counter()
    found: float | None = None
    false: list[str] = []
    reports = batches = 0
    t = 0.0
    while t < end:
        t += _TICK
        for k, node_id in enumerate(ids):
            while report_at[k] <= t:
                at = report_at[k]
                report_at[k] += s.report_interval
                seq[k] += 1
                reports += 1
                node = cluster.nodes[node_id]
                served = 0.0 if node.outlier is not None and not node.outlier.dry_run else qps[k]
                load = {"qps": round(served, 1), "error_rate": round(rate(k, at), 5)}
                cluster.observe(CheckResult(node_id, True, at, 0.001, report=Report(
                    1, seq[k], at, load=load), source="push"))
        for j in range(s.observers):
            while observe_at[j] <= t:
                at = observe_at[j]
                observe_at[j] += s.observe_interval
                batches += 1
                batch = []
                for k, node_id in enumerate(ids):
                    node = cluster.nodes[node_id]
                    if node.outlier is not None and not node.outlier.dry_run:
                        continue  # drained: the load balancer sends it nothing new
                    requests = max(0, round(rng.gauss(1.0, 0.1) * qps[k] * s.observe_interval
                                            / s.observers))
                    batch.append(CallerObservation(node_id, float(requests), float(
                        binomial(rng, requests, rate(k, at - s.observe_interval / 2))),
                        window=s.observe_interval))
                cluster.observe_callers(f"lb-{j}", batch, at)
        for event in cluster.tick(t).events:
            events[event.kind] += 1
            if event.kind != "outlier":
                continue
            k = ids.index(event.node_id)
            if s.scenario == "gray" and k == gray and found is None:
                found = event.ts - start
            else:
                false.append(event.node_id)
    return found, false, events, reports, batches


def simulate_gray(s: GraySettings) -> SimResult:
    """``runs`` seeded runs of the scenario; detection is the time to unschedulable."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    detection: list[float] = []
    false: list[str] = []
    events: Counter[str] = Counter()
    reports = batches = missed = 0
    for run in range(s.runs):
        found, wrong, counted, r, b = _one_run(s, s.seed * 100_003 + run)
        if found is not None:
            detection.append(found)
        elif s.scenario == "gray":
            missed += 1
        false += wrong
        events += counted
        reports += r
        batches += b
    p = s.policy
    profile: dict[str, Any] = {
        "runs": s.runs, "observers": s.observers, "observe_interval": s.observe_interval,
        "report_interval": s.report_interval, "qps": s.qps,
        "base_error_rate": s.base_error_rate,
        "fault_error_rate": s.gray_error_rate if s.scenario == "gray" else s.fleet_error_rate,
        "window": p.outlier_window, "eject_after": p.outlier_eject_after,
        "error_margin": p.outlier_error_margin, "factor": p.outlier_factor,
        "min_requests": p.outlier_min_requests, "panorama_s": PANORAMA_S,
        "ejections": events.get("outlier", 0)}
    return SimResult(
        nodes=s.nodes, scenario=s.scenario, simulated_s=s.runs * (s.warmup + s.after),
        wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0,
        checks=reports, heartbeats=batches, faults=s.runs if s.scenario == "gray" else 0,
        detected=len(detection), missed=missed, detection=detection,
        false_positives=len(false), false_positive_nodes=false, events=dict(events),
        held={}, guard_on_s=0.0, profile=profile)
