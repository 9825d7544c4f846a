"""The detection core against many simulated nodes on a virtual clock, with scripted faults.

Proves the detection policy (thresholds, guard, gate, peer checks) at a scale nobody should
first try for real. The simulation drives the real :class:`~nodewatch.detect.cluster.Cluster`
exactly as the coordinator does (poll results, pushed heartbeats, missed-heartbeat expiries,
peer votes, registrations, ticks) and plays the poller and the network itself: a discrete-event
loop over one heap, no asyncio and no sockets, so 100,000 nodes run in seconds.

Every fault is scripted per node before the run (crash, hang, flapping restarts, slow answers
drawn from a latency distribution, a partition between the coordinator and some nodes, stalls
of the coordinator's own loop), so a check's outcome is known when it is scheduled and each
check costs one heap entry. Detection latency is the virtual time from a fault to the node's
``unhealthy`` event; a false positive is an ``unhealthy`` event for a node that was alive, a
false suspicion a ``suspect`` event for one.

The ``jitter`` scenario is about pushed heartbeats (HTTP/UDP, no lease): a share of the nodes is
jittery, its heartbeats delayed by a heavy tail and its process pausing now and then (as in a
long garbage collection: nothing sent, nothing answered, polls and peer probes included), while
some nodes crash. :func:`compare_suspicion` runs it under both ``[detection] suspicion`` values.

With several coordinators (``coordinators`` > 1, and the ``coordinator-loss`` and
``coordinator-join`` scenarios) the nodes fall into the shares of :mod:`nodewatch.detect.shares`
and each share is watched by its owner; :mod:`nodewatch.detect.simulate_shares` plays the
etcd leases, claims and watches. One ``Cluster`` still judges every node: every coordinator
mirrors every node, so that one holds the fleet-wide view the guard and the budget count; what
the ownership changes is who polls a node, who takes its pushes, and whose answers arrive. A
check, a push or a peer vote that reaches a coordinator no longer watching the node reaches
nobody. :func:`simulate_coordinators` repeats a scenario over seeded runs.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nodewatch.config import Config
from nodewatch.detect.cluster import Cluster
from nodewatch.detect.outcome import Outcome, ProbeRequest
from nodewatch.detect.policy import Policy
from nodewatch.detect.shares import share_of
from nodewatch.detect.simulate_shares import Handover, coordinator_join, coordinator_loss, steady
from nodewatch.model import (
    CheckResult,
    FailureClass,
    Health,
    NodeState,
    NodeStatus,
    PeerVote,
    Registration,
    Report,
)

__all__ = ["COORDINATOR_SCENARIOS", "SCENARIOS", "SimResult", "SimSettings", "compare_suspicion",
           "settings_from_config", "simulate", "simulate_coordinators"]

COORDINATOR_SCENARIOS = ("coordinator-loss", "coordinator-join")
SCENARIOS = ("crash", "hang", "flap", "slow", "partition", "slow-coordinator", "jitter",
             *COORDINATOR_SCENARIOS)

# What the scenario's --fraction means by default: the share of nodes that crash / hang / flap /
# answer slowly / sit behind the partition. The other scenarios add crashes at CRASH_FRACTION
# so that every scenario measures detection latency under its own stress.
DEFAULT_FRACTION = {"crash": 0.01, "hang": 0.01, "flap": 0.02, "slow": 0.10,
                    "partition": 0.10, "slow-coordinator": 0.01, "jitter": 0.20,
                    "coordinator-loss": 0.01, "coordinator-join": 0.0}
CRASH_FRACTION = 0.01

# The jitter scenario. Its nodes push every JITTER_HEARTBEAT seconds unless [agent]
# heartbeat_interval says otherwise. A jittery node's heartbeats are delayed by a lognormal
# (median 50 ms, p99 about 0.5 s, delivered in order as HTTP posts are), and about every
# PAUSE_EVERY seconds its process pauses for a Pareto time (from PAUSE_MIN, shape PAUSE_ALPHA,
# at most PAUSE_MAX: a node frozen for longer is failing, not jittery).
JITTER_HEARTBEAT = 1.0
PAUSE_EVERY, PAUSE_MIN, PAUSE_ALPHA, PAUSE_MAX = 30.0, 0.2, 1.5, 8.0

# Node states in the script (a partition is kept apart: a partitioned node is UP).
_UP, _CRASHED, _HUNG = 0, 1, 2
# Check outcomes carried in heap entries.
_OK, _REFUSED, _TIMEOUT = 0, 1, 2
# Heap entry kinds.
_CHECK, _VOTES, _SCRIPT, _HEARTBEAT, _EXPIRY = 0, 1, 2, 3, 4
_FAILOVER, _MEMBERSHIP = 5, 6  # several coordinators: an agent's failover; a share changes hands
_NODE_BITS = 21  # heap keys carry the node index in these bits
_BUCKET = 0.1  # seconds of virtual time per calendar-queue bucket

_REFUSED_LATENCY = 0.0005  # a crashed process's host answers RST at once
_NET_RTT = 0.001  # coordinator <-> agent on a LAN, for probes and pushes
_LAG_WINDOW = 1.0  # the coordinator's lag monitor keeps the max of its last 10 beats of 0.1 s
_TICK = 0.5  # the coordinator's ticker (PERSIST_INTERVAL)


@dataclass(frozen=True, slots=True)
class SimSettings:
    """One simulation run: the policy under test, the edge's timeouts, the scenario."""

    policy: Policy
    nodes: int = 1000
    duration: float = 600.0
    scenario: str = "crash"
    fraction: float | None = None
    crash_fraction: float = CRASH_FRACTION
    seed: int = 1
    timeout: float = 3.0  # [detection] timeout: a slower answer is a TIMEOUT failure
    probe_timeout: float = 3.0  # [agent] probe_timeout: how long a peer waits for the target
    heartbeat_interval: float = 0.0  # [agent] heartbeat_interval; 0 = pull only
    # Silence of this many heartbeat intervals counts as a failure (a lease); 0 = no lease, as
    # with HTTP/UDP pushes: only the poll that the pushes kept deferring finds the silence.
    heartbeat_grace: float = 2.5  # not in ``jitter``: its pushes are HTTP/UDP, judged by the core
    partition_s: float | None = None  # how long the partition lasts (default: a third of the run)
    coordinators: int = 1  # before the change: coordinator-join adds one, -loss kills one
    leader_ttl: float = 5.0  # [coordinator] leader_ttl: each coordinator's etcd lease
    watch_delay: float = 0.005  # from an etcd change to a watcher seeing it

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {', '.join(SCENARIOS)}")
        if self.nodes < 1:
            raise ValueError("nodes must be at least 1")
        if self.coordinators < 1:
            raise ValueError("coordinators must be at least 1")
        if self.scenario == "coordinator-loss" and self.coordinators < 2:
            raise ValueError("coordinator-loss needs at least 2 coordinators (one to take over)")
        if self.leader_ttl <= 0 or self.watch_delay < 0:
            raise ValueError("leader_ttl must be positive and watch_delay not negative")
        frac = self.main_fraction
        if not 0.0 <= frac <= 1.0 or not 0.0 <= self.crash_fraction <= 1.0:
            raise ValueError("fractions must be between 0 and 1")
        if self.duration < self.warmup + self.tail + 1.0:
            raise ValueError(f"duration {self.duration:g}s is too short for this policy: faults "
                             f"start after {self.warmup:g}s and stop {self.tail:g}s before the "
                             f"end so that each one can be detected")

    @property
    def multi(self) -> bool:
        """Several coordinators, each watching its shares."""
        return self.coordinators > 1 or self.scenario in COORDINATOR_SCENARIOS

    @property
    def detection_window(self) -> float:
        """The longest a crash of a watched node takes to confirm: its next check, then
        ``fall - 1`` unhealthy intervals, each up to ``jitter`` later."""
        p = self.policy
        return (p.healthy_interval + (p.fall - 1) * p.unhealthy_interval) * (1.0 + p.jitter)

    @property
    def push_timeout(self) -> float:
        """How long an agent waits on a push before it tries another coordinator (its
        ``timeout``, at most until its next push)."""
        return min(self.timeout, self.push_interval)

    @property
    def push_interval(self) -> float:
        """Seconds between a node's heartbeats; ``jitter`` always pushes."""
        if self.scenario == "jitter" and self.heartbeat_interval <= 0:
            return JITTER_HEARTBEAT
        return self.heartbeat_interval

    @property
    def lease_grace(self) -> float:
        """Silence that counts as a failure (a lease), in seconds; 0: none."""
        return 0.0 if self.scenario == "jitter" else self.heartbeat_grace * self.push_interval

    @property
    def main_fraction(self) -> float:
        return DEFAULT_FRACTION[self.scenario] if self.fraction is None else self.fraction

    @property
    def warmup(self) -> float:
        """Every node has been checked (and is healthy) before the first fault."""
        p = self.policy
        return p.healthy_interval * (1.0 + p.jitter) + p.rise * p.unhealthy_interval

    @property
    def tail(self) -> float:
        """No fault starts this close to the end, so that an undetected fault is a miss."""
        p = self.policy
        slowest = p.healthy_interval * (1.0 + p.jitter) + (p.fall + 1) * (
            p.unhealthy_interval * (1.0 + p.jitter) + self.timeout)
        return slowest + 2.0 * self.probe_timeout + 2.0 * self.timeout + 5.0


def settings_from_config(cfg: Config, **overrides: Any) -> SimSettings:
    """Settings for a ``--config`` file: the same thresholds the coordinator would use."""
    return SimSettings(policy=Policy.from_config(cfg), timeout=float(cfg.detection.timeout),
                       probe_timeout=float(cfg.agent.probe_timeout),
                       heartbeat_interval=float(cfg.agent.heartbeat_interval),
                       leader_ttl=float(cfg.coordinator.leader_ttl), **overrides)


@dataclass(slots=True)
class SimResult:
    nodes: int
    scenario: str
    simulated_s: float
    wall_s: float
    cpu_s: float
    checks: int
    heartbeats: int
    faults: int
    detected: int
    missed: int
    detection: list[float]
    false_positives: int
    false_positive_nodes: list[str]
    events: dict[str, int]
    held: dict[str, int]
    guard_on_s: float
    profile: dict[str, float | str] = field(default_factory=dict)
    false_suspicions: int = 0  # healthy -> suspect for a node that was alive
    # Several coordinators: the takeover's figures (empty with one coordinator, and not printed)
    coordination: dict[str, Any] = field(default_factory=dict)
    detection_near: list[float] = field(default_factory=list)  # deaths near the takeover
    detection_far: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        if not self.detection:
            return None
        ordered = sorted(self.detection)
        return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]

    def to_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        out: dict[str, Any] = {
            "nodes": self.nodes,
            "scenario": self.scenario,
            "simulated_s": self.simulated_s,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "checks": self.checks,
            "heartbeats": self.heartbeats,
            "observations_per_wall_s": round((self.checks + self.heartbeats)
                                             / max(self.wall_s, 1e-9)),
            "faults": self.faults,
            "detected": self.detected,
            "missed": self.missed,
            "detection_p50": rounded(self.percentile(50)),
            "detection_p99": rounded(self.percentile(99)),
            "detection_max": rounded(max(self.detection) if self.detection else None),
            "false_positives": self.false_positives,
            "false_positive_nodes": self.false_positive_nodes[:20],
            "false_suspicions": self.false_suspicions,
            "events": dict(sorted(self.events.items())),
            "held": dict(sorted(self.held.items())),
            "guard_on_s": round(self.guard_on_s, 3),
            "profile": self.profile,
        }
        if self.coordination:
            out["coordination"] = self.coordination
        return out


class _Script:
    """Each node's scripted life: state transitions in time, and answer latencies."""

    def __init__(self, s: SimSettings, rng: random.Random, around: float | None = None) -> None:
        self.n = n = s.nodes
        self.transitions: list[list[tuple[float, int]] | None] = [None] * n
        self.restarts: list[tuple[float, int]] = []  # (time, node) a flapping node comes back
        self.faults: list[tuple[int, float, float]] = []  # (node, start, end) of outages
        self.partitioned = bytearray(n)
        self.partition = (math.inf, math.inf)
        self.slow = bytearray(n)
        self.stalls: list[tuple[float, float]] = []
        self.jittery = bytearray(n)
        self.pauses: dict[int, tuple[list[float], list[float]]] = {}  # node: (starts, ends)
        first, last = s.warmup, s.duration - s.tail
        picks = list(range(n))
        rng.shuffle(picks)
        main = round(n * s.main_fraction)
        chosen, rest = picks[:main], picks[main:]
        side = rest[:round(n * s.crash_fraction)] if s.scenario in (
            "slow", "partition", "slow-coordinator") else []
        if s.scenario in ("crash", "hang"):
            state = _CRASHED if s.scenario == "crash" else _HUNG
            for i in chosen:
                self._down(i, rng.uniform(first, last), state, math.inf)
        elif s.scenario == "coordinator-loss":
            # Half of the deaths at any moment, half around the kill (``around``): before it,
            # during the lease's expiry and the takeover, and after.
            window = s.detection_window
            for j, i in enumerate(chosen):
                if j % 2 and around is not None:
                    t = rng.uniform(max(first, around - window),
                                    min(last, around + s.leader_ttl + window))
                else:
                    t = rng.uniform(first, last)
                self._down(i, t, _CRASHED, math.inf)
        elif s.scenario == "flap":
            for i in chosen:
                t = rng.uniform(first, first + 0.5 * (last - first))
                while t < last:
                    down = rng.uniform(5.0, 120.0)
                    self._down(i, t, _CRASHED, t + down)
                    self.restarts.append((t + down, i))
                    t += down + rng.uniform(60.0, 600.0)
        elif s.scenario == "slow":
            for i in chosen:
                self.slow[i] = 1
        elif s.scenario == "partition":
            start = first
            length = s.partition_s if s.partition_s is not None else (last - first) / 3.0
            self.partition = (start, start + length)
            for i in chosen:
                self.partitioned[i] = 1
        elif s.scenario == "slow-coordinator":
            t = first
            while t < s.duration:
                t += rng.expovariate(1.0 / 20.0)
                stall = min(8.0, rng.lognormvariate(0.0, 0.8))
                self.stalls.append((t, t + stall))
                t += stall
        elif s.scenario == "jitter":
            for i in chosen:
                self.jittery[i] = 1
                self.pauses[i] = self._pauses(s.duration, rng)
            # Crashes hit jittery and steady nodes alike: both detection times count.
            side = rng.sample(range(n), round(n * s.crash_fraction))
        for i in side:
            self._down(i, rng.uniform(first, last), _CRASHED, math.inf)
        self.stall_starts = [a for a, _ in self.stalls]

    def _down(self, i: int, start: float, state: int, end: float) -> None:
        steps = self.transitions[i]
        if steps is None:
            steps = self.transitions[i] = []
        steps.append((start, state))
        if end != math.inf:
            steps.append((end, _UP))
        self.faults.append((i, start, end))

    @staticmethod
    def _pauses(duration: float, rng: random.Random) -> tuple[list[float], list[float]]:
        starts: list[float] = []
        ends: list[float] = []
        t = rng.expovariate(1.0 / PAUSE_EVERY)
        while t < duration:
            pause = min(PAUSE_MAX, PAUSE_MIN * rng.paretovariate(PAUSE_ALPHA))
            starts.append(t)
            ends.append(t + pause)
            t += pause + rng.expovariate(1.0 / PAUSE_EVERY)
        return starts, ends

    def resume_at(self, i: int, t: float) -> float:
        """When node ``i``, if paused at ``t``, runs again (``t`` if it is not paused)."""
        pauses = self.pauses.get(i)
        if pauses is None:
            return t
        starts, ends = pauses
        k = bisect_right(starts, t) - 1
        return ends[k] if k >= 0 and t < ends[k] else t

    def state_at(self, i: int, t: float) -> int:
        steps = self.transitions[i]
        if steps is None:
            return _UP
        k = bisect_right(steps, (t, 9)) - 1
        return _UP if k < 0 else steps[k][1]

    def fault_start(self, i: int, t: float) -> float:
        """When the outage the node is in at ``t`` began."""
        steps = self.transitions[i]
        assert steps is not None
        return steps[bisect_right(steps, (t, 9)) - 1][0]

    def cut_off(self, i: int, t: float) -> bool:
        """The coordinator cannot reach the node (peers still can)."""
        return bool(self.partitioned[i]) and self.partition[0] <= t < self.partition[1]

    def defer(self, t: float) -> float:
        """When a coordinator that stalls gets round to something due at ``t``."""
        k = bisect_right(self.stall_starts, t) - 1
        if k >= 0 and t < self.stalls[k][1]:
            return self.stalls[k][1]
        return t

    def lag_at(self, t: float) -> float:
        """The loop lag the coordinator measures at ``t`` (its last stall, for one window)."""
        k = bisect_right(self.stall_starts, t) - 1
        if k >= 0:
            start, end = self.stalls[k]
            if t < end + _LAG_WINDOW:
                return end - start
        return 0.0


def _latency_fn(s: SimSettings, script: _Script, rng: random.Random) -> Callable[[int], float]:
    """Answer latency of a live node, decided once per run (no branch per check on settings).

    Draws come from a pre-drawn table of 65,536 samples per distribution: a table lookup is a
    tenth of the cost of ``lognormvariate``, and 2**16 points resolve a p99.99 tail.
    """
    getrandbits = rng.getrandbits

    def table(mu: float, sigma: float) -> list[float]:
        return [rng.lognormvariate(mu, sigma) for _ in range(1 << 16)]

    if s.scenario != "slow":
        lan = table(-6.2, 0.5)  # LAN: median 2 ms
        return lambda i: lan[getrandbits(16)]
    slow = script.slow
    # A heavy tail for everyone (median 50 ms, p99 about 0.5 s) and overloaded nodes with a
    # median of 500 ms and a p99 of about 2 s: slow is alive, and must never be confirmed down.
    tail, overloaded = table(-3.0, 1.0), table(-0.69, 0.6)
    return lambda i: overloaded[getrandbits(16)] if slow[i] else tail[getrandbits(16)]


def _push_delay_fn(s: SimSettings, script: _Script, rng: random.Random) -> Callable[[int], float]:
    """How long a heartbeat takes to reach the coordinator: a LAN round trip, or in ``jitter``
    a heavy tail for the jittery nodes (median 50 ms, p99 about 0.5 s)."""
    if s.scenario != "jitter":
        return lambda i: _NET_RTT
    getrandbits = rng.getrandbits
    heavy = [_NET_RTT + rng.lognormvariate(-3.0, 1.0) for _ in range(1 << 16)]
    jittery = script.jittery
    return lambda i: heavy[getrandbits(16)] if jittery[i] else _NET_RTT


def simulate(s: SimSettings) -> SimResult:  # noqa: C901 - one event loop, kept in one place
    """Run the scenario to ``s.duration`` virtual seconds and judge every ``unhealthy`` event."""
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    rng = random.Random(s.seed)
    handover = _handover(s) if s.multi else None
    script = _Script(s, rng, handover.event_at if handover is not None else None)
    latency = _latency_fn(s, script, rng)
    push_delay = _push_delay_fn(s, script, rng)
    # A paused node answers when it runs again: polls and peer probes wait for it.
    resume_at = script.resume_at if script.pauses else None
    policy = s.policy
    n = s.nodes
    if n >= 1 << _NODE_BITS:
        raise ValueError(f"at most {(1 << _NODE_BITS) - 1} nodes")
    ids = [f"n{i}" for i in range(n)]
    index = {nid: i for i, nid in enumerate(ids)}
    empty: dict[str, float] = {}
    ok_status = NodeStatus.OK
    # A steady cluster: every node known and healthy, the coordinator past its startup grace.
    cluster = Cluster(policy, now=0.0, rng=random.Random(s.seed + 1), nodes=[
        NodeState(node_id=ids[i], address=f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:7301",
                  health=Health.HEALTHY, incarnation=1, seq=0) for i in range(n)])
    cluster.restart_grace(-policy.startup_grace)
    cluster.take_dirty()
    observe = cluster.observe
    interval_for = cluster.interval_for
    poll_deadline = cluster.poll_deadline
    timeout = s.timeout
    defer = script.defer if script.stalls else None
    lag_at = script.lag_at if script.stalls else None
    state_at = script.state_at
    cut_off = script.cut_off
    has_script = bytearray(t is not None for t in script.transitions)
    partitioned = script.partitioned

    # A calendar queue: entries are appended to buckets of _BUCKET seconds and only the bucket
    # being run is a heap. One heap of every node's next check thrashed the cache at 100,000
    # nodes (a pop cost 5 us, a fifth of the run); a bucket heap holds a few hundred entries.
    # Entries are (time, key): two-element tuples compare fast. The key orders ties by
    # insertion and carries the node and the kind; what a check found is kept per node (a node
    # has one live check at a time), anything rarer in ``payload``.
    end = s.duration
    n_buckets = int(end / _BUCKET) + 2
    buckets: list[list[tuple[float, int]] | None] = [None] * n_buckets
    active: list[tuple[float, int]] = []
    current_bucket = 0
    heappush = heapq.heappush

    def push(at: float, key: int) -> None:
        b = int(at * (1.0 / _BUCKET))
        if b <= current_bucket:
            heappush(active, (at, key))
        elif b < n_buckets:
            bucket = buckets[b]
            if bucket is None:
                buckets[b] = [(at, key)]
            else:
                bucket.append((at, key))
        # else: after the end of the run, never needed

    counter = 0
    step = 1 << (_NODE_BITS + 3)
    current = [0] * n  # key of the node's live check (check_now replaces it; -1: not watched)
    started = [0.0] * n  # when that check starts (a started check is in flight)
    found = bytearray(n)  # what the live check found: _OK, _REFUSED or _TIMEOUT
    took = [0.0] * n  # its latency as the coordinator measures it
    recheck = bytearray(n)
    watched = bytearray(b"\x01") * n
    seq = [0] * n
    incarnation = [1] * n
    last_heartbeat = [0.0] * n
    heartbeat_sent = [0.0] * n
    expiry_armed = bytearray(n)
    payload: dict[int, list[PeerVote]] = {}

    failures = (None, FailureClass.REFUSED, FailureClass.TIMEOUT)
    details = ("", "connection refused", "timed out")
    checks = heartbeats = 0

    # ----------------------------------------------------------- several coordinators
    multi = handover is not None
    share = [share_of(nid) for nid in ids] if multi else []
    share_watcher = list(handover.initial) if handover is not None else []
    by = [0] * n if multi else []  # the coordinator that started the node's live check
    pushes_to = [share_watcher[k] for k in share]  # the coordinator each agent pushes to
    nodes_of: list[list[int]] = [[] for _ in share_watcher]
    for i, k in enumerate(share):
        nodes_of[k].append(i)
    victim = handover.victim if handover is not None else -1
    killed_at = handover.event_at if handover is not None and victim >= 0 else math.inf
    awaiting = bytearray(n)  # a node whose share lost its watcher, until its new owner hears it
    awaiting_left = 0
    last_seen_again = math.nan
    asked_by: dict[int, int] = {}  # votes' heap key -> the coordinator that asked the peers
    takeover_rng = random.Random(s.seed + 3)

    def seen_again(i: int, t: float) -> None:
        nonlocal awaiting_left, last_seen_again
        awaiting[i] = 0
        awaiting_left -= 1
        last_seen_again = t

    def start_check(i: int, due: float) -> None:
        """Decide the check's outcome from the script at its start; one heap entry."""
        nonlocal counter
        if multi:
            w = share_watcher[share[i]]
            if w < 0:  # nobody watches the node's share: the next owner polls it on its claim
                current[i] = 0
                started[i] = math.inf
                return
            by[i] = w
        start = defer(due) if defer is not None else due
        st = state_at(i, start) if has_script[i] else _UP
        if st == _UP and not (partitioned[i] and cut_off(i, start)):
            lat = latency(i)
            if resume_at is not None:
                lat += resume_at(i, start) - start
            if lat < timeout:
                code, done = _OK, start + lat
            else:
                code, done = _TIMEOUT, start + timeout
        elif st == _CRASHED:
            code, done = _REFUSED, start + _REFUSED_LATENCY
        else:
            code, done = _TIMEOUT, start + timeout
        if defer is not None:
            processed = defer(done)
            if code == _OK and processed - start > timeout:
                code = _TIMEOUT  # our own stall made the answer late: it timed out
            done = processed
        counter += step
        key = counter | (i << 3) | _CHECK
        current[i] = key
        started[i] = start
        found[i] = code
        took[i] = done - start
        push(done, key)

    def check_now(i: int, now: float) -> None:
        if not watched[i]:
            return
        if started[i] <= now:
            recheck[i] = 1  # in flight: another check follows it at once (as the poller does)
        else:
            start_check(i, now)

    def push_other(at: float, i: int, kind: int) -> int:
        nonlocal counter
        counter += step
        key = counter | (i << 3) | kind
        push(at, key)
        return key

    # ----------------------------------------------------------- outcomes, judged
    event_counts: Counter[str] = Counter()
    held: Counter[str] = Counter()
    detection: list[float] = []
    detected_faults: set[tuple[int, float]] = set()
    fault_latency: dict[tuple[int, float], float] = {}
    confirmations: Counter[tuple[int, float]] = Counter()
    false_positive_nodes: list[str] = []
    false_suspicions = 0
    guard_since: float | None = None
    guard_on_s = 0.0

    def handle(out: Outcome, now: float) -> None:
        nonlocal guard_since, guard_on_s, false_suspicions
        for event in out.events:
            kind = event.kind
            event_counts[kind] += 1
            if kind == "suspect" and event.from_ == Health.HEALTHY.value:
                i = index[event.node_id]
                if not has_script[i] or state_at(i, now) == _UP:
                    false_suspicions += 1
            elif kind == "unhealthy":
                i = index[event.node_id]
                st = state_at(i, now) if has_script[i] else _UP
                if st == _UP:
                    false_positive_nodes.append(event.node_id)
                else:
                    fault = (i, script.fault_start(i, now))
                    confirmations[fault] += 1
                    if fault not in detected_faults:
                        detected_faults.add(fault)
                        detection.append(now - fault[1])
                        fault_latency[fault] = now - fault[1]
            elif kind == "suspect" and event.from_ == "suspect":
                held[event.reason] += 1
            elif kind == "held":
                held["held: budget"] += 1
            elif kind == "dead":
                i = index[event.node_id]
                watched[i] = 0
                current[i] = -1
                if multi and awaiting[i]:
                    seen_again(i, now)
            elif kind == "guard_on":
                guard_since = now
            elif kind == "guard_off" and guard_since is not None:
                guard_on_s += now - guard_since
                guard_since = None
        for probe in out.probes:
            ask_peers(probe, now)
        for node_id in out.check_now:
            check_now(index[node_id], now)

    def ask_peers(probe: ProbeRequest, now: float) -> None:
        """The peers' answers, as the coordinator's gather of ``GET /probe`` would get them."""
        target = index[probe.node_id]
        target_state = state_at(target, now) if has_script[target] else _UP
        votes: list[PeerVote] = []
        answered = now
        for peer_id, _ in probe.peers:
            j = index[peer_id]
            peer_state = state_at(j, now) if has_script[j] else _UP
            # A paused peer takes the request when it runs again; a paused target answers
            # the peer when it does.
            at = now if resume_at is None else resume_at(j, now)
            if peer_state == _CRASHED:
                answered = max(answered, now + _REFUSED_LATENCY)
                votes.append(PeerVote(peer_id, None, "peer unreachable"))
            elif peer_state == _HUNG or (partitioned[j] and cut_off(j, now)) or (
                    at - now >= 2.0 * timeout):
                answered = max(answered, now + 2.0 * timeout)  # the session's total timeout
                votes.append(PeerVote(peer_id, None, "peer unreachable"))
            elif target_state == _CRASHED:
                answered = max(answered, at + 2 * _NET_RTT)
                votes.append(PeerVote(peer_id, False, "refused"))
            elif target_state == _HUNG:
                answered = max(answered, at + _NET_RTT + s.probe_timeout)
                votes.append(PeerVote(peer_id, False, "timeout"))
            else:
                # Alive (a partition is between the coordinator and the node, not the peers).
                lat = latency(target)
                if resume_at is not None:
                    lat += resume_at(target, at + _NET_RTT) - (at + _NET_RTT)
                ok = lat < s.probe_timeout
                answered = max(answered, at + _NET_RTT + (lat if ok else s.probe_timeout))
                votes.append(PeerVote(peer_id, ok, "" if ok else "timeout"))
        key = push_other(defer(answered) if defer is not None else answered, target, _VOTES)
        payload[key] = votes
        if multi:
            asked_by[key] = share_watcher[share[target]]

    # ----------------------------------------------------------- the run
    spread = rng.uniform
    hb = s.push_interval
    grace = s.lease_grace
    for i in range(n):
        start_check(i, spread(0.0, policy.healthy_interval))
        if hb > 0:
            at = spread(0.0, hb)
            if resume_at is not None:
                at = resume_at(i, at)
            heartbeat_sent[i] = at
            push_other(at + push_delay(i), i, _HEARTBEAT)
            last_heartbeat[i] = at
            if grace > 0:
                push_other(at + grace, i, _EXPIRY)
                expiry_armed[i] = 1
    for at, i in script.restarts:
        push_other(at, i, _SCRIPT)
    changes = handover.changes if handover is not None else []
    for j, (at, _, _) in enumerate(changes):
        push_other(at, j, _MEMBERSHIP)

    def change_hands(k: int, c: int, t: float) -> None:
        """Share ``k`` is watched by coordinator ``c`` from ``t`` on (-1: by nobody)."""
        nonlocal awaiting_left
        share_watcher[k] = c
        if c < 0:
            for i in nodes_of[k]:
                if watched[i] and not awaiting[i]:
                    awaiting[i] = 1
                    awaiting_left += 1
            return
        # The new owner has every node's stored state (the one Cluster), but not the old
        # owner's memory: no peer probe is pending for it. It restarts the share's deadlines
        # from now and polls each node once, spread over one unhealthy interval.
        forget = cluster.peers.forget
        for i in nodes_of[k]:
            if not watched[i]:
                continue
            forget(ids[i])
            recheck[i] = 0  # asked of a check that reached nobody
            start_check(i, t + takeover_rng.uniform(0.0, policy.unhealthy_interval))
            if hb > 0:
                last_heartbeat[i] = t
                if grace > 0 and not expiry_armed[i]:
                    expiry_armed[i] = 1
                    push_other(t + grace, i, _EXPIRY)

    def accept_push(i: int, t: float, sent: float) -> None:
        """A heartbeat the node's watcher takes."""
        nonlocal heartbeats
        heartbeats += 1
        seq[i] += 1
        out = observe(CheckResult(ids[i], True, t, _NET_RTT, None, "", Report(
            incarnation[i], seq[i], sent, ok_status, (), empty, empty), "push"))
        if out:
            handle(out, t)
        if not out.stale and watched[i] and started[i] > t:
            # As Coordinator.heartbeat: an accepted push sets the node's next poll at
            # its deadline (a check in flight is left alone).
            start_check(i, t + poll_deadline(ids[i]))
        last_heartbeat[i] = t
        if grace > 0 and not expiry_armed[i]:
            expiry_armed[i] = 1
            push_other(t + grace, i, _EXPIRY)
        if multi and awaiting[i]:
            seen_again(i, t)

    def routed(i: int, t: float, sent: float) -> bool:
        """Whether a push reaches the node's watcher: a live coordinator that does not own the
        node redirects the agent to the owner (the round trip is not modelled); a push to a
        killed one goes unanswered, and the agent tries another after its push timeout."""
        w = share_watcher[share[i]]
        to = pushes_to[i]
        if to == w:
            return True
        if to == victim and t >= killed_at:
            push_other(sent + s.push_timeout, i, _FAILOVER)
            return False
        if w >= 0:
            pushes_to[i] = w
            return True
        return False  # between a release and the next claim: the agent pushes again later

    next_tick = _TICK
    pop = heapq.heappop
    heapify = heapq.heapify
    tick = cluster.tick
    node_mask = (1 << _NODE_BITS) - 1
    lease_detail = f"no heartbeat for {grace:g}s"
    while True:
        if not active:
            current_bucket += 1
            if current_bucket >= n_buckets:
                break
            bucket = buckets[current_bucket]
            if bucket is None:
                continue
            buckets[current_bucket] = None
            heapify(bucket)
            active = bucket
            continue
        t, key = pop(active)
        if t > end:
            break
        while next_tick <= t:
            out = tick(next_tick)
            if out:
                handle(out, next_tick)
            next_tick += _TICK
            if defer is not None:
                next_tick = defer(next_tick)
        if lag_at is not None:
            cluster.set_loop_lag(lag_at(t))
        kind = key & 7
        i = (key >> 3) & node_mask
        if kind == _CHECK:
            if current[i] != key:
                continue  # replaced by check_now, or the node went dead
            if multi:
                if by[i] != share_watcher[share[i]]:
                    continue  # its coordinator died or let the share go: the answer is lost
                if awaiting[i]:
                    seen_again(i, t)
            checks += 1
            nid = ids[i]
            code = found[i]
            if code == _OK:
                seq[i] += 1
                out = observe(CheckResult(nid, True, t, took[i], None, "", Report(
                    incarnation[i], seq[i], t, ok_status, (), empty, empty)))
            else:
                out = observe(CheckResult(nid, False, t, took[i], failures[code], details[code]))
            if out:
                handle(out, t)
                if current[i] != key:
                    continue  # handle() rescheduled it already, or it went dead
            if recheck[i]:
                recheck[i] = 0
                start_check(i, t)
            else:
                start_check(i, t + interval_for(nid))
        elif kind == _HEARTBEAT:
            sent = heartbeat_sent[i]
            if (not has_script[i] or state_at(i, sent) == _UP) and not (
                    partitioned[i] and cut_off(i, sent)) and (not multi or routed(i, t, sent)):
                accept_push(i, t, sent)
            sent += hb
            if resume_at is not None:
                sent = resume_at(i, sent)  # a paused agent sends when it runs again
            heartbeat_sent[i] = sent
            arrive = max(t, sent + push_delay(i))  # in order, as one agent's posts are
            push_other(defer(arrive) if defer is not None else arrive, i, _HEARTBEAT)
        elif kind == _EXPIRY:
            deadline = last_heartbeat[i] + grace
            if deadline > t + 1e-9:
                push_other(deadline, i, _EXPIRY)
                continue
            expiry_armed[i] = 0
            if not watched[i] or (multi and share_watcher[share[i]] < 0):
                continue  # nobody holds the lease's deadline; the next owner restarts it
            # As the coordinator does when an agent's lease expires: a failure, then poll now.
            out = observe(CheckResult(ids[i], False, t, 0.0, FailureClass.LEASE_EXPIRED,
                                      lease_detail, source="lease"))
            if out:
                handle(out, t)
            check_now(i, t)
        elif kind == _VOTES:
            votes = payload.pop(key)
            if multi and asked_by.pop(key) != share_watcher[share[i]]:
                continue  # the coordinator that asked is gone or let the share go
            out = cluster.peer_votes(ids[i], votes, t)
            if out:
                handle(out, t)
        elif kind == _FAILOVER:
            # The agent's push went unanswered: it asks another coordinator, which tells it
            # the owner once the share has been claimed (until then it names the dead one).
            w = share_watcher[share[i]]
            if pushes_to[i] == victim and w >= 0 and (
                    not has_script[i] or state_at(i, t) == _UP):
                pushes_to[i] = w
                accept_push(i, t, t)
        elif kind == _MEMBERSHIP:
            _, k, c = changes[i]
            change_hands(k, c, t)
        else:  # _SCRIPT: a flapping node's agent starts again and registers
            incarnation[i] += 1
            node = cluster.nodes[ids[i]]
            _, out = cluster.register(Registration(
                node_id=ids[i], address=node.address, incarnation=incarnation[i],
                last_seq=seq[i], last_ts=script.fault_start(i, t - 1e-9)), t)
            if not watched[i]:
                watched[i] = 1
                started[i] = math.inf
            handle(out, t)
    if guard_since is not None:
        guard_on_s += end - guard_since

    faults = [f for f in script.faults if f[1] < end]
    missed = sum(1 for i, start, _ in faults if (i, start) not in detected_faults)
    near: list[float] = []
    far: list[float] = []
    coordination: dict[str, Any] = {}
    if handover is not None:
        watched_again = last_seen_again if awaiting_left == 0 else math.inf
        # Near the takeover: a death of a node of a moved share from one detection window
        # before the change until its new owner heard from every node of it.
        near_from = handover.event_at - s.detection_window
        for (i, start), latency_s in fault_latency.items():
            is_near = share[i] in handover.moved and near_from <= start <= watched_again
            (near if is_near else far).append(latency_s)
        coordination = _coordination(s, handover, watched_again, near, far,
                                     sum(len(nodes_of[k]) for k in handover.moved),
                                     max(confirmations.values(), default=0))
    return SimResult(
        nodes=n, scenario=s.scenario, simulated_s=end, wall_s=time.perf_counter() - wall0,
        cpu_s=time.process_time() - cpu0,
        checks=checks, heartbeats=heartbeats, faults=len(faults), detected=len(detection),
        missed=missed, detection=detection, false_positives=len(false_positive_nodes),
        false_suspicions=false_suspicions,
        false_positive_nodes=false_positive_nodes, events=dict(event_counts), held=dict(held),
        guard_on_s=guard_on_s,
        profile={"healthy_interval": policy.healthy_interval,
                 "unhealthy_interval": policy.unhealthy_interval, "fall": policy.fall,
                 "rise": policy.rise, "timeout": s.timeout,
                 "heartbeat_interval": hb, "suspicion": policy.suspicion},
        coordination=coordination, detection_near=near, detection_far=far,
    )


def _handover(s: SimSettings) -> Handover:
    """The run's membership change, at a random moment (its own seeded random stream, so the
    nodes' script does not depend on it)."""
    rng = random.Random(s.seed + 2)
    first, last = s.warmup, s.duration - s.tail
    if s.scenario == "coordinator-loss":
        at = rng.uniform(first, max(first, last - s.leader_ttl - s.detection_window))
        return coordinator_loss(s.coordinators, at, s.leader_ttl, s.watch_delay, rng,
                                s.duration)
    if s.scenario == "coordinator-join":
        return coordinator_join(s.coordinators, rng.uniform(first, last), s.watch_delay, rng,
                                s.duration)
    return steady(s.coordinators)


def _stats(values: list[float]) -> dict[str, float | int | None]:
    """p50 / p99 / max (nearest rank, as :meth:`SimResult.percentile`) and the count."""
    ordered = sorted(v for v in values if not math.isnan(v))

    def rank(q: float) -> float | None:
        if not ordered:
            return None
        value = ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]
        return None if math.isinf(value) else round(value, 3)

    return {"p50": rank(50), "p99": rank(99), "max": rank(100), "n": len(ordered)}


def _coordination(s: SimSettings, h: Handover, watched_again: float, near: list[float],
                  far: list[float], nodes_moved: int, confirmations_max: int) -> dict[str, Any]:
    """One run's takeover figures (times from the kill or the join)."""
    since = h.event_at

    def after(at: float) -> float | None:
        return None if math.isnan(at) or math.isinf(at) or not h.event else round(at - since, 3)

    return {
        "coordinators": s.coordinators,
        "event": h.event,
        "event_at": None if not h.event else round(since, 3),
        "victim": h.names[h.victim] if h.victim >= 0 else None,
        "shares_held": {name: h.held(j) for j, name in enumerate(h.names)},
        "shares_moved": len(h.moved),
        "nodes_moved": nodes_moved,
        "lease_expired_after": after(h.lease_expired_at),
        "claimed_after": after(h.claimed_at),
        "watched_again_after": after(watched_again) if h.moved else None,
        "unwatched_max": round(h.unwatched_max(s.duration), 3),
        "doubly_watched_max": round(h.doubly_watched_max(), 3),
        "detection_near": _stats(near),
        "detection_far": _stats(far),
        "confirmations_max": confirmations_max,
        "leader_ttl": s.leader_ttl,
        "watch_delay": s.watch_delay,
        "detection_window": round(s.detection_window, 3),
    }


def simulate_coordinators(s: SimSettings, runs: int) -> SimResult:
    """The scenario over ``runs`` seeded runs (seeds ``s.seed``, ``s.seed + 1``, ...), each
    with its own moment of the kill or the join: the counts summed, the detection latencies
    pooled, and in ``coordination`` the takeover figures over the runs."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    results = [simulate(replace(s, seed=s.seed + r)) for r in range(runs)]
    first = results[0]
    events: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for r in results:
        events.update(r.events)
        held.update(r.held)
    per_run = [r.coordination for r in results]

    def over_runs(key: str, never: bool = True) -> dict[str, float | int | None]:
        """A run where it did not happen counts as never (inf: no p99 then) if ``never``."""
        return _stats([math.inf if c[key] is None else c[key] for c in per_run
                       if c[key] is not None or (never and c["shares_moved"])])

    moved_counts = [c["shares_moved"] for c in per_run]
    near = [v for r in results for v in r.detection_near]
    far = [v for r in results for v in r.detection_far]
    coordination = {
        "coordinators": s.coordinators,
        "runs": runs,
        "event": first.coordination["event"],
        "leader_ttl": s.leader_ttl,
        "watch_delay": s.watch_delay,
        "detection_window": first.coordination["detection_window"],
        "lease_expired_after": over_runs("lease_expired_after", never=False),
        "claimed_after": over_runs("claimed_after"),
        "watched_again_after": over_runs("watched_again_after"),
        "unwatched_max": max(c["unwatched_max"] for c in per_run),
        "doubly_watched_max": max(c["doubly_watched_max"] for c in per_run),
        "shares_moved": {"min": min(moved_counts), "max": max(moved_counts),
                         "mean": round(sum(moved_counts) / runs, 1)},
        "nodes_moved_mean": round(sum(c["nodes_moved"] for c in per_run) / runs),
        "detection_near": _stats(near),
        "detection_far": _stats(far),
        "confirmations_max": max(c["confirmations_max"] for c in per_run),
        "per_run": per_run,
    }
    return SimResult(
        nodes=s.nodes, scenario=s.scenario, simulated_s=s.duration,
        wall_s=sum(r.wall_s for r in results), cpu_s=sum(r.cpu_s for r in results),
        checks=sum(r.checks for r in results), heartbeats=sum(r.heartbeats for r in results),
        faults=sum(r.faults for r in results), detected=sum(r.detected for r in results),
        missed=sum(r.missed for r in results),
        detection=[v for r in results for v in r.detection],
        false_positives=sum(r.false_positives for r in results),
        false_positive_nodes=[f"run {k}: {node}" for k, r in enumerate(results)
                              for node in r.false_positive_nodes],
        false_suspicions=sum(r.false_suspicions for r in results),
        events=dict(events), held=dict(held), guard_on_s=sum(r.guard_on_s for r in results),
        profile=first.profile, coordination=coordination, detection_near=near,
        detection_far=far,
    )


def compare_suspicion(s: SimSettings) -> dict[str, SimResult]:
    """The same scenario (same seed, so the same faults and jitter) judged with the fixed
    deadline and with φ accrual: ``{"fixed": ..., "phi": ...}``."""
    return {suspicion: simulate(replace(s, policy=replace(s.policy, suspicion=suspicion)))
            for suspicion in ("fixed", "phi")}
