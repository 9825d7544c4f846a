"""Prometheus exposition for the coordinator, read from its state at scrape time.

A custom collector rather than gauges updated on every check: the hot path stays free of
metric bookkeeping and a scrape costs one pass over counters the coordinator keeps anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nodewatch.coordinator.service import Coordinator

__all__ = ["CoordinatorMetrics"]


class _CoordinatorCollector(Collector):
    def __init__(self, coord: Coordinator, udp_counts: Mapping[str, int] | None) -> None:
        self.coord = coord
        self.udp_counts = udp_counts

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
        if self.udp_counts is not None:
            udp = CounterMetricFamily("nodewatch_udp_heartbeats",
                                      "UDP heartbeat datagrams by result", labels=["result"])
            for result, count in self.udp_counts.items():
                udp.add_metric([result], count)
            yield udp
        yield GaugeMetricFamily("nodewatch_loop_lag_seconds", "Coordinator event-loop lag",
                                value=coord.loop_lag)
        yield GaugeMetricFamily("nodewatch_guard_on", "1 while the mass-failure guard holds",
                                value=float(coord.cluster.guard_on))
        stats = coord.poller.stats()
        yield GaugeMetricFamily("nodewatch_checks_in_flight", "Checks running now",
                                value=stats["in_flight"])
        yield GaugeMetricFamily("nodewatch_check_lateness_p99_seconds",
                                "p99 of check start time against its due time",
                                value=stats["lateness_p99"])
        yield CounterMetricFamily(
            "nodewatch_checks_lost", "Checks lost with a poller process that died; they count "
            "neither for nor against their node", value=stats["checks_lost"])
        restarts = getattr(coord.probe, "restarts", None)
        if isinstance(restarts, int):
            yield CounterMetricFamily("nodewatch_poller_process_restarts",
                                      "Poller processes replaced after they died or hung",
                                      value=restarts)


class CoordinatorMetrics:
    def __init__(self, coord: Coordinator, udp_counts: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_CoordinatorCollector(coord, udp_counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
