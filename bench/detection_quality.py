"""Detection quality: every scenario of the simulation at the default thresholds and at faster
profiles, with what each profile costs the coordinator.

For each profile and scenario: p50/p99/max time from a fault (a crash, or a hang in ``hang``)
to ``unhealthy``, false positives (alive nodes confirmed unhealthy), and the coordinator CPU the
profile's traffic would cost per 1,000 nodes, from the simulated polls and heartbeats per node
times the CPU per poll and per heartbeat that ``bench/heartbeat_cost.py`` measured (pass
yours with ``--cpu-per-poll-us`` / ``--cpu-per-heartbeat-us`` / ``--cpu-per-udp-heartbeat-us``).
A UDP profile sends every heartbeat over UDP: the one per ``UDP_CONFIRM_INTERVAL`` that asks
for an answer costs about what any datagram does, and HTTP follows only when the answer is
lost. ``FAST_PROFILE`` is the one the
issue's goal is about (crash <= 5 s p99 at <= 2 % of a core per 1,000 nodes); heartbeat_cost.py
measures it as deployed, and deploy/*-fast-push.toml configures it. Prints a table next to
the default detection times of Kubernetes, Nomad
and HAProxy; nothing is asserted.

    .venv/bin/python bench/detection_quality.py --nodes 2000 --duration 10m
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from nodewatch.collect.agent import UDP_CONFIRM_INTERVAL
from nodewatch.config import parse_duration
from nodewatch.detect.policy import Policy
from nodewatch.detect.simulate import COORDINATOR_SCENARIOS, SCENARIOS, SimSettings, simulate


@dataclass(frozen=True)
class Profile:
    name: str
    policy: Policy
    timeout: float
    heartbeat_interval: float = 0.0
    heartbeat_grace: float = 2.5
    note: str = ""
    transport: str = "http"

    @property
    def udp_share(self) -> float:
        """The share of heartbeats sent over UDP: all of them with a coordinator that answers
        the datagram that asks (HTTP only after an answer was lost, not modelled)."""
        return 1.0 if self.transport == "udp" and self.heartbeat_interval > 0 else 0.0


# The fast push profile: heartbeats every 1 s defer the poll by healthy_interval = 1.5 s, so a
# node is polled only once its pushes stop; then 3 failed checks 500 ms apart confirm it.
FAST_PUSH = Policy(healthy_interval=1.5, unhealthy_interval=0.5)


PROFILES = [
    Profile("default", Policy(), 3.0, note="poll 30s / 5s, fall 3, timeout 3s"),
    Profile("fast-poll", Policy(healthy_interval=2.0, unhealthy_interval=1.0), 1.0,
            note="poll 2s / 1s, fall 3, timeout 1s"),
    Profile("push-1s", Policy(healthy_interval=30.0, unhealthy_interval=1.0), 1.0,
            heartbeat_interval=1.0, heartbeat_grace=2.5,
            note="heartbeat 1s, silent 2.5s = failure, poll 30s / 1s, timeout 1s"),
    Profile("push-2s", Policy(healthy_interval=30.0, unhealthy_interval=1.0), 1.0,
            heartbeat_interval=2.0, heartbeat_grace=1.6,
            note="heartbeat 2s, silent 3.2s = failure, poll 30s / 1s, timeout 1s"),
    Profile("push-http-1s", FAST_PUSH, 1.0, heartbeat_interval=1.0, heartbeat_grace=0.0,
            note="HTTP heartbeat 1s defers polls 1.5s; then poll 500ms, fall 3, timeout 1s"),
    Profile("push-udp-1s", FAST_PUSH, 1.0, heartbeat_interval=1.0, heartbeat_grace=0.0,
            transport="udp",
            note=f"UDP heartbeat 1s (1 per {UDP_CONFIRM_INTERVAL:g}s answered) defers polls 1.5s; "
                 "then poll 500ms, fall 3, timeout 1s"),
    Profile("push-udp-3.5s-f2", Policy(healthy_interval=4.0, unhealthy_interval=0.5, fall=2,
                                       down_interval=4.0), 1.0,
            heartbeat_interval=3.5, heartbeat_grace=0.0, transport="udp",
            note=f"UDP heartbeat 3.5s (1 per {UDP_CONFIRM_INTERVAL:g}s answered) defers polls 4s; "
                 "then poll 500ms, fall 2 (the missed heartbeat was the first sign), timeout 1s; "
                 "a node confirmed down is polled every 4s"),
    Profile("push-udp-3s", Policy(healthy_interval=3.5, unhealthy_interval=0.5), 1.0,
            heartbeat_interval=3.0, heartbeat_grace=0.0, transport="udp",
            note=f"UDP heartbeat 3s (1 per {UDP_CONFIRM_INTERVAL:g}s answered) defers polls 3.5s; "
                 "then poll 500ms, fall 3, timeout 1s"),
]

FAST_PROFILE = "push-udp-3.5s-f2"
# The whole coordinator's CPU per UDP heartbeat in heartbeat_cost.py's profile run at 1,000
# nodes (idle work and store writes included; about 54 us at 5,000 nodes).
UDP_DEFAULT_US = 64.0

OTHERS = [("Kubernetes (node-monitor-grace-period)", "40-50 s"),
          ("Nomad (heartbeat TTL)", "about 20 s"),
          ("HAProxy (inter 2s x fall 3)", "6 s")]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--duration", default="10m")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpu-per-poll-us", type=float, default=150.0,
                        help="coordinator CPU per poll (bench/coordinator_scale.py)")
    parser.add_argument("--cpu-per-heartbeat-us", type=float, default=146.0,
                        help="coordinator CPU per HTTP heartbeat (heartbeat_cost.py)")
    parser.add_argument("--cpu-per-udp-heartbeat-us", type=float, default=UDP_DEFAULT_US,
                        help="coordinator CPU per UDP heartbeat (heartbeat_cost.py)")
    parser.add_argument("--profiles", default=",".join(p.name for p in PROFILES))
    args = parser.parse_args()
    duration = float(parse_duration(args.duration))
    wanted = set(args.profiles.split(","))
    # One coordinator's detection; the coordinators' scenarios have `nodewatch simulate`.
    runs = [(s, None) for s in SCENARIOS if s not in COORDINATOR_SCENARIOS] + [("partition", 0.6)]
    print(f"{args.nodes} nodes x {duration:g}s simulated per run; CPU model: "
          f"{args.cpu_per_poll_us:g} us/poll, {args.cpu_per_heartbeat_us:g} us/HTTP heartbeat, "
          f"{args.cpu_per_udp_heartbeat_us:g} us/UDP heartbeat")
    print(f"{'profile':<10} {'scenario':<20} {'faults':>6} {'p50':>6} {'p99':>6} {'max':>6} "
          f"{'missed':>6} {'FP':>4} {'polls/n/s':>9} {'core%/1k':>8} {'wall':>6}  held by")
    for profile in PROFILES:
        if profile.name not in wanted:
            continue
        for scenario, fraction in runs:
            result = simulate(SimSettings(
                policy=profile.policy, nodes=args.nodes, duration=duration, scenario=scenario,
                fraction=fraction, seed=args.seed, timeout=profile.timeout,
                probe_timeout=profile.timeout, heartbeat_interval=profile.heartbeat_interval,
                heartbeat_grace=profile.heartbeat_grace))
            per_node_s = 1.0 / (args.nodes * duration)
            udp = profile.udp_share
            per_heartbeat = (udp * args.cpu_per_udp_heartbeat_us
                             + (1.0 - udp) * args.cpu_per_heartbeat_us)
            cost = (result.checks * args.cpu_per_poll_us
                    + result.heartbeats * per_heartbeat) * per_node_s * 1e-6
            held = ", ".join(f"{k.removeprefix('held: ')} {v}"
                             for k, v in sorted(result.held.items())
                             if k != "confirming through peers")
            if result.guard_on_s:
                held += f"; guard on {result.guard_on_s:.0f}s"
            label = scenario if fraction is None else f"{scenario} {fraction:.0%}"
            print(f"{profile.name:<10} {label:<20} {result.faults:>6} "
                  f"{fmt(result.percentile(50)):>6} {fmt(result.percentile(99)):>6} "
                  f"{fmt(max(result.detection) if result.detection else None):>6} "
                  f"{result.missed:>6} {result.false_positives:>4} "
                  f"{result.checks * per_node_s:>9.3f} {cost * 1000 * 100:>7.2f}% "
                  f"{result.wall_s:>5.1f}s  {held}", flush=True)
        print(f"{'':<10} ({profile.note})")
    print("default detection times elsewhere, for comparison:")
    for name, figure in OTHERS:
        print(f"  {name:<40} {figure}")


if __name__ == "__main__":
    main()
