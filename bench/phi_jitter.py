"""φ accrual against the fixed deadline on jittery pushing nodes (the simulation's ``jitter``
scenario): false confirmations, false suspicions and crash detection time, side by side.

Every row runs the same nodes, jitter, pauses and crashes (one seed). For each profile of
confirmation thresholds there are three rows: the fixed deadline at a tight ``healthy_interval``
(as fast as φ's median, and what it costs on jittery nodes), the fixed deadline at the loose
``healthy_interval`` the jittery nodes need, and φ with that loose one as its cap (never later
than the fixed deadline: detection can only be faster). Nothing is asserted.

    .venv/bin/python bench/phi_jitter.py --nodes 2000 --duration 30m
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from nodewatch.config import parse_duration
from nodewatch.detect.policy import Policy
from nodewatch.detect.simulate import (
    DEFAULT_FRACTION,
    JITTER_HEARTBEAT,
    PAUSE_ALPHA,
    PAUSE_EVERY,
    PAUSE_MAX,
    PAUSE_MIN,
    SimResult,
    SimSettings,
    simulate,
)


@dataclass(frozen=True)
class Profile:
    name: str
    policy: Policy  # healthy_interval is the loose deadline (and φ's cap)
    tight: float  # the tight fixed deadline
    timeout: float
    note: str


PROFILES = [
    Profile("default", Policy(), 5.0, 3.0,
            "defaults: poll 30s / 5s, fall 3, timeout 3s; tight fixed deadline 5s"),
    Profile("fast", Policy(healthy_interval=10.0, unhealthy_interval=0.5), 2.0, 1.0,
            "poll 10s / 500ms, fall 3, timeout 1s; tight fixed deadline 2s"),
]


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def row(label: str, result: SimResult) -> str:
    return (f"  {label:<22} {result.false_positives:>6} {result.false_suspicions:>9} "
            f"{secs(result.percentile(50)):>8} {secs(result.percentile(99)):>8} "
            f"{secs(max(result.detection) if result.detection else None):>8} "
            f"{result.detected:>4}/{result.faults:<4} {result.checks:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--duration", default="30m")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION["jitter"],
                        help="share of jittery nodes")
    parser.add_argument("--crash-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", choices=[p.name for p in PROFILES], action="append")
    args = parser.parse_args()
    duration = float(parse_duration(args.duration))
    print(f"jitter: {args.nodes} nodes pushing every {JITTER_HEARTBEAT:g}s, "
          f"{args.fraction:.0%} jittery (delays lognormal, median 50 ms; pauses about every "
          f"{PAUSE_EVERY:g}s, Pareto from {PAUSE_MIN:g}s, shape {PAUSE_ALPHA:g}, at most "
          f"{PAUSE_MAX:g}s), {args.crash_fraction:.0%} crash; {duration:g}s simulated")
    header = (f"  {'suspicion':<22} {'false':>6} {'false':>9} {'p50':>8} {'p99':>8} "
              f"{'max':>8} {'found':>9} {'polls':>8}\n"
              f"  {'':<22} {'conf.':>6} {'suspect':>9}")
    for profile in PROFILES:
        if args.profile and profile.name not in args.profile:
            continue
        loose = profile.policy
        runs = [
            (f"fixed {profile.tight:g}s", replace(loose, healthy_interval=profile.tight)),
            (f"fixed {loose.healthy_interval:g}s", loose),
            (f"phi (cap {loose.healthy_interval:g}s)", replace(loose, suspicion="phi")),
        ]
        print(f"\n{profile.name}: {profile.note}; phi: threshold {loose.phi_threshold:g}, "
              f"window {loose.phi_window}, min_std {loose.phi_min_std:g}s, "
              f"pause {loose.phi_pause:g}s")
        print(header)
        for label, policy in runs:
            result = simulate(SimSettings(
                policy=policy, nodes=args.nodes, duration=duration, scenario="jitter",
                fraction=args.fraction, crash_fraction=args.crash_fraction, seed=args.seed,
                timeout=profile.timeout, probe_timeout=profile.timeout))
            print(row(label, result), flush=True)


if __name__ == "__main__":
    main()
