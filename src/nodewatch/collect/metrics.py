"""Prometheus exposition of the agent's report, through a private ``CollectorRegistry``.

The text is rendered at most once per report change and cached, so a scrape is as cheap as
serving ``/health``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from nodewatch.model import NodeStatus
from nodewatch.protocol import HealthDoc

__all__ = ["CONTENT_TYPE_LATEST", "MetricsRenderer"]


class _ReportCollector:
    """Reads the current report when the registry is rendered (never on its own)."""

    def __init__(self, current: Callable[[], HealthDoc],
                 state_writable: Callable[[], bool]) -> None:
        self._current = current
        self._state_writable = state_writable

    def collect(self) -> Iterator[Metric]:
        doc = self._current()
        yield InfoMetricFamily("nodewatch_agent", "The agent's identity.",
                               value={"node_id": doc.node_id, "version": doc.version})
        status = GaugeMetricFamily("nodewatch_agent_status",
                                   "1 for the node's current self-reported status.",
                                   labels=["status"])
        for word in NodeStatus:
            status.add_metric([word.value], 1.0 if doc.status is word else 0.0)
        yield status
        for name, help_text in (("incarnation", "Starts of this agent (persisted)."),
                                ("seq", "Report sequence number within the incarnation."),
                                ("uptime_seconds", "Seconds since the agent started."),
                                ("report_timestamp_seconds", "Time of the latest sample."),
                                ("reasons", "Number of reasons the node is not ok.")):
            value_of = {"incarnation": doc.incarnation, "seq": doc.seq,
                        "uptime_seconds": doc.uptime, "report_timestamp_seconds": doc.ts,
                        "reasons": len(doc.reasons)}
            yield GaugeMetricFamily(f"nodewatch_agent_{name}", help_text,
                                    value=float(value_of[name]))
        yield GaugeMetricFamily("nodewatch_agent_state_writable",
                                "1 while the state directory can be written.",
                                value=float(self._state_writable()))
        for key, reading in doc.system.items():
            yield GaugeMetricFamily(f"nodewatch_system_{key}", f"Host {key} (latest sample).",
                                    value=float(reading))
        load = GaugeMetricFamily("nodewatch_load", "Business load reported by the application.",
                                 labels=["name"])
        for key, reading in doc.load.items():
            load.add_metric([key], float(reading))
        yield load


class MetricsRenderer:
    """Renders once per report version; ``render(version)`` returns cached bytes otherwise."""

    def __init__(self, current: Callable[[], HealthDoc],
                 state_writable: Callable[[], bool] = lambda: True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ReportCollector(current, state_writable))
        self._version = -1
        self._text = b""

    def render(self, version: int) -> bytes:
        if version != self._version:
            self._text = generate_latest(self.registry)
            self._version = version
        return self._text
