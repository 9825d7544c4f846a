"""Prometheus exposition for the coordinator, read from its state at scrape time.

A custom collector rather than gauges updated on every check: the hot path stays free of
metric bookkeeping and a scrape costs one pass over counters the coordinator keeps anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nodewatch.coordinator.service import Coordinator
    from nodewatch.model import Event

__all__ = ["CoordinatorMetrics", "DETECTION_BUCKETS", "DetectionLatency"]


# Detection latency buckets (seconds): the fast profile confirms in about a second, the
# default one in 10 s (fall = 3 over unhealthy_interval = 5 s), a held confirmation takes longer.
DETECTION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class DetectionLatency:
    """How long each confirmation took from the first failed check of its streak, folded in at
    scrape time from the events the coordinator keeps in memory (``Coordinator.recent``): the
    hot path pays nothing; more events between two scrapes than it keeps are not counted."""

    def __init__(self) -> None:
        self.after = ""
        self.buckets = [0] * len(DETECTION_BUCKETS)
        self.count = 0
        self.total = 0.0

    def fold(self, events: Iterable[Event]) -> None:
        newest = self.after
        for event in events:
            if event.id <= self.after:
                continue
            newest = max(newest, event.id)
            if event.kind != "unhealthy":
                continue
            times = [c["at"] for c in event.evidence.get("checks", ())
                     if isinstance(c, dict) and isinstance(c.get("at"), int | float)]
            if not times:
                continue
            took = max(0.0, event.ts - min(times))
            self.count += 1
            self.total += took
            for i, bound in enumerate(DETECTION_BUCKETS):
                if took <= bound:
                    self.buckets[i] += 1
        self.after = newest

    def metric(self) -> HistogramMetricFamily:
        cumulative = [(f"{b:g}", n) for b, n in zip(DETECTION_BUCKETS, self.buckets, strict=True)]
        return HistogramMetricFamily(
            "nodewatch_detection_seconds",
            "From a node's first failed check of a streak to its confirmation as unhealthy",
            buckets=[*cumulative, ("+Inf", self.count)], sum_value=self.total)


class _CoordinatorCollector(Collector):
    def __init__(self, coord: Coordinator, udp_counts: Mapping[str, int] | None) -> None:
        self.coord = coord
        self.udp_counts = udp_counts
        self.detection = DetectionLatency()

    def collect(self) -> Iterator[Metric]:
        coord = self.coord
        counts = coord.cluster.counts()
        nodes = GaugeMetricFamily("nodewatch_nodes", "Watched nodes by health", labels=["health"])
        for health, count in counts.items():
            if health not in ("total", "schedulable"):
                nodes.add_metric([health], count)
        yield nodes
        yield GaugeMetricFamily("nodewatch_nodes_schedulable", "Nodes that may take new work",
                                value=counts["schedulable"])
        checks = CounterMetricFamily("nodewatch_checks", "Health checks completed")
        checks.add_metric([], coord.checks)
        yield checks
        failures = CounterMetricFamily("nodewatch_check_failures", "Failed checks by class",
                                       labels=["class"])
        for kind, count in sorted(coord.check_failures.items()):
            failures.add_metric([kind], count)
        yield failures
        events = CounterMetricFamily("nodewatch_events", "Events emitted by kind",
                                     labels=["kind"])
        for kind, count in sorted(coord.event_counts.items()):
            events.add_metric([kind], count)
        yield events
        pushes = CounterMetricFamily("nodewatch_heartbeats", "Pushed heartbeats received")
        pushes.add_metric([], coord.pushes)
        yield pushes
        stale = CounterMetricFamily("nodewatch_stale_reports", "Pushed reports ignored as stale")
        stale.add_metric([], coord.stale_reports)
        yield stale
        refused = CounterMetricFamily(
            "nodewatch_identity_rejections",
            "Requests refused for want of the node's credential (events are rate-limited)")
        refused.add_metric([], coord.identity_rejections)
        yield refused
        if self.udp_counts is not None:
            udp = CounterMetricFamily("nodewatch_udp_heartbeats",
                                      "UDP heartbeat datagrams by result", labels=["result"])
            for result, count in self.udp_counts.items():
                udp.add_metric([result], count)
            yield udp
            yield CounterMetricFamily(
                "nodewatch_udp_receive_drops",
                "UDP heartbeat datagrams the kernel dropped before the coordinator read them "
                "(receive buffer full)", value=coord.receive_drops.total)
            yield GaugeMetricFamily(
                "nodewatch_push_deadline_stretch",
                "How many times longer a healthy node's pushes may be missing before it is "
                "polled (above 1 while this coordinator drops heartbeats itself)",
                value=coord.cluster.push_stretch)
        yield GaugeMetricFamily("nodewatch_loop_lag_seconds", "Coordinator event-loop lag",
                                value=coord.loop_lag)
        yield GaugeMetricFamily("nodewatch_guard_on", "1 while the mass-failure guard holds",
                                value=float(coord.cluster.guard_on))
        yield from _health_metrics(coord)
        stats = coord.poller.stats()
        yield GaugeMetricFamily("nodewatch_checks_in_flight", "Checks running now",
                                value=stats["in_flight"])
        yield GaugeMetricFamily("nodewatch_check_lateness_p99_seconds",
                                "p99 of check start time against its due time",
                                value=stats["lateness_p99"])
        yield CounterMetricFamily(
            "nodewatch_checks_lost", "Checks lost with a poller process that died; they count "
            "neither for nor against their node", value=stats["checks_lost"])
        self.detection.fold(coord.recent)
        yield self.detection.metric()
        yield from _action_metrics(coord)
        restarts = getattr(coord.probe, "restarts", None)
        if isinstance(restarts, int):
            yield CounterMetricFamily("nodewatch_poller_process_restarts",
                                      "Poller processes replaced after they died or hung",
                                      value=restarts)


def _action_metrics(coord: Coordinator) -> Iterator[Metric]:
    """The respond stage's counters, when the coordinator's action sink keeps them."""
    runner = coord.actions
    counts = {result: getattr(runner, result, None) for result in ("succeeded", "failed",
                                                                   "refused")}
    if all(isinstance(n, int) for n in counts.values()):
        actions = CounterMetricFamily(
            "nodewatch_actions", "Actions finished by result (failed: after every retry; "
            "refused: the queue was full)", labels=["result"])
        for result, count in counts.items():
            actions.add_metric([result], float(count or 0))
        yield actions
    pending = getattr(runner, "pending", None)
    if isinstance(pending, int):
        yield GaugeMetricFamily("nodewatch_actions_pending", "Actions queued or running",
                                value=pending)


def _health_metrics(coord: Coordinator) -> Iterator[Metric]:
    """What /healthz judges, as gauges (the store's only once its health is tracked)."""
    health = coord.health()
    status = GaugeMetricFamily("nodewatch_coordinator_status",
                               "1 for the coordinator's current status (see /healthz)",
                               labels=["status"])
    for word in ("ok", "degraded", "failing"):
        status.add_metric([word], float(health.status == word))
    yield status
    yield GaugeMetricFamily("nodewatch_leader", "1 if this coordinator leads",
                            value=float(coord.role == "leader"))
    now = coord.clock()
    yield GaugeMetricFamily("nodewatch_in_grace", "1 during startup grace (nothing confirmed)",
                            value=float(coord.role == "leader" and now < coord.cluster.started_at
                                        + coord.policy.startup_grace))
    if coord.sharing is not None:
        yield GaugeMetricFamily("nodewatch_shares_held",
                                "Shares this coordinator holds (it decides for their nodes)",
                                value=len(coord.held_shares))
        yield GaugeMetricFamily("nodewatch_shares_wanted",
                                "Shares the assignment gives this coordinator",
                                value=coord.assignment.counts().get(coord.sharing_name, 0))
        yield GaugeMetricFamily("nodewatch_share_members", "Live coordinators sharing the fleet",
                                value=len(coord.members))
        yield CounterMetricFamily("nodewatch_share_takeovers",
                                  "Shares this coordinator took (joins and takeovers)",
                                  value=coord.sharing.takeovers)
    store = coord.store_health
    yield GaugeMetricFamily("nodewatch_store_available", "1 while the store takes writes",
                            value=float(store.available))
    down = 0.0 if store.available or store.since is None else max(0.0, now - store.since)
    yield GaugeMetricFamily("nodewatch_store_unavailable_seconds",
                            "How long the store has been unavailable (0 when available)",
                            value=down)
    yield GaugeMetricFamily("nodewatch_events_queued", "Events waiting for the store",
                            value=store.queued_events)
    yield CounterMetricFamily("nodewatch_events_dropped", "Events the store queue dropped",
                              value=store.dropped_events)
    yield CounterMetricFamily("nodewatch_store_writes_failed", "Store writes that failed",
                              value=store.writes_failed)


class CoordinatorMetrics:
    def __init__(self, coord: Coordinator, udp_counts: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_CoordinatorCollector(coord, udp_counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
