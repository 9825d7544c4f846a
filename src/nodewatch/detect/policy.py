"""Detection policy: every threshold the core needs, decided once from the config."""

from __future__ import annotations

import random
from dataclasses import dataclass

from nodewatch.config import Config

__all__ = ["Policy"]


# The defaults are read from the config model, the only place a default is written.
_DEFAULT = Config()
_DET, _CO = _DEFAULT.detection, _DEFAULT.coordinator
_GUARD, _REVIEW, _BUDGET = _DEFAULT.guard, _DEFAULT.review, _DEFAULT.budget
_OUT = _DEFAULT.outliers


@dataclass(frozen=True, slots=True)
class Policy:
    healthy_interval: float = float(_DET.healthy_interval)
    unhealthy_interval: float = float(_DET.unhealthy_interval)
    down_interval: float = float(_DET.down_interval)  # 0: unhealthy_interval
    jitter: float = _DET.jitter
    fall: int = _DET.fall
    rise: int = _DET.rise
    dead_after: float = float(_DET.dead_after)
    startup_grace: float = float(_DET.startup_grace)
    suspicion: str = _DET.suspicion  # "fixed" | "phi": how a pushing node's silence is judged
    phi_threshold: float = _DET.phi_threshold
    phi_window: int = _DET.phi_window
    phi_min_samples: int = _DET.phi_min_samples
    phi_min_std: float = float(_DET.phi_min_std)
    phi_pause: float = float(_DET.phi_pause)
    max_loop_lag: float = float(_CO.max_loop_lag)
    guard_fraction: float = _GUARD.fraction
    guard_min_nodes: int = _GUARD.min_nodes
    indirect_probes: int = _GUARD.indirect_probes
    max_rejoins: int = _REVIEW.max_rejoins
    auto_approve: bool = _REVIEW.auto_approve
    address_change: str = _REVIEW.address_change
    max_fraction: float = _BUDGET.max_fraction
    max_rate: float = _BUDGET.max_rate  # cleanups per minute
    drain_deadline: float = float(_BUDGET.drain_deadline)
    dry_run: bool = _CO.dry_run
    outliers: bool = _OUT.enabled
    outlier_group_by: str = _OUT.group_by
    outlier_window: float = float(_OUT.window)
    outlier_min_requests: float = _OUT.min_requests
    outlier_min_sources: int = _OUT.min_sources
    outlier_min_nodes: int = _OUT.min_nodes
    outlier_error_margin: float = _OUT.error_margin
    outlier_factor: float = _OUT.factor
    outlier_latency_margin: float = float(_OUT.latency_margin)
    outlier_latency_factor: float = _OUT.latency_factor
    outlier_eject_after: float = float(_OUT.eject_after)
    outlier_clear_after: float = float(_OUT.clear_after)
    base_ejection_time: float = float(_OUT.base_ejection_time)
    max_ejection_time: float = float(_OUT.max_ejection_time)
    max_ejection_fraction: float = _OUT.max_ejection_fraction
    group_rise_fraction: float = _OUT.group_rise_fraction

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        det = cfg.detection
        return cls(
            healthy_interval=float(det.healthy_interval),
            unhealthy_interval=float(det.unhealthy_interval),
            down_interval=float(det.down_interval),
            jitter=det.jitter,
            fall=det.fall,
            rise=det.rise,
            dead_after=float(det.dead_after),
            startup_grace=float(det.startup_grace),
            suspicion=det.suspicion,
            phi_threshold=det.phi_threshold,
            phi_window=det.phi_window,
            phi_min_samples=det.phi_min_samples,
            phi_min_std=float(det.phi_min_std),
            phi_pause=float(det.phi_pause),
            max_loop_lag=float(cfg.coordinator.max_loop_lag),
            guard_fraction=cfg.guard.fraction,
            guard_min_nodes=cfg.guard.min_nodes,
            indirect_probes=cfg.guard.indirect_probes,
            max_rejoins=cfg.review.max_rejoins,
            auto_approve=cfg.review.auto_approve,
            address_change=cfg.review.address_change,
            max_fraction=cfg.budget.max_fraction,
            max_rate=cfg.budget.max_rate,
            drain_deadline=float(cfg.budget.drain_deadline),
            dry_run=cfg.coordinator.dry_run,
            outliers=cfg.outliers.enabled,
            outlier_group_by=cfg.outliers.group_by,
            outlier_window=float(cfg.outliers.window),
            outlier_min_requests=cfg.outliers.min_requests,
            outlier_min_sources=cfg.outliers.min_sources,
            outlier_min_nodes=cfg.outliers.min_nodes,
            outlier_error_margin=cfg.outliers.error_margin,
            outlier_factor=cfg.outliers.factor,
            outlier_latency_margin=float(cfg.outliers.latency_margin),
            outlier_latency_factor=cfg.outliers.latency_factor,
            outlier_eject_after=float(cfg.outliers.eject_after),
            outlier_clear_after=float(cfg.outliers.clear_after),
            base_ejection_time=float(cfg.outliers.base_ejection_time),
            max_ejection_time=float(cfg.outliers.max_ejection_time),
            max_ejection_fraction=cfg.outliers.max_ejection_fraction,
            group_rise_fraction=cfg.outliers.group_rise_fraction,
        )

    @property
    def confirmed_down_interval(self) -> float:
        """Between checks of a node confirmed unhealthy: it costs polls for as long as it is
        down, and a node that pushes announces its own recovery."""
        return self.down_interval or self.unhealthy_interval

    @property
    def fall_span(self) -> float:
        """How long a streak of failed checks must last before ``fall`` of them confirm a node:
        ``fall`` checks ``unhealthy_interval`` apart span ``fall - 1`` intervals, less jitter
        (a check may come that much early). The quick re-check after the first failure adds a
        failure but no time, so it cannot stand in for an interval; nor can extra checks (a
        lease expiry and the poll it asks for, repeated peer probes): only the span counts.
        0 with ``fall = 1``: the first failure confirms."""
        return (self.fall - 1) * self.unhealthy_interval * (1.0 - self.jitter)

    @property
    def detection_window(self) -> float:
        """How long a node can go unobserved before the coordinator could have confirmed it."""
        return self.healthy_interval + self.fall * self.unhealthy_interval

    @property
    def guard_window(self) -> float:
        """How far back the guard counts nodes going suspect.

        SPEC names ``unhealthy_interval × fall``; but healthy nodes are polled only every
        ``healthy_interval``, so a partition is discovered over a whole detection window, and
        a shorter window never sees most of it at once (measured in the simulation: 53 false
        positives for a 60 % partition at default thresholds). The longer of the two is used.
        """
        return max(self.unhealthy_interval * self.fall, self.detection_window)

    def jittered(self, interval: float, rng: random.Random) -> float:
        """``interval`` spread by ±jitter so that checks never synchronize."""
        if not self.jitter:
            return interval
        return interval * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))

    def ejection_limit(self, group_size: int) -> int:
        """Most nodes of a group out as outliers at once: a fraction, never fewer than one."""
        return max(1, int(group_size * self.max_ejection_fraction))

    def ejection_time(self, ejections: int) -> float:
        """Envoy's back-off: ``base_ejection_time`` x ejections, at most ``max_ejection_time``."""
        return min(self.base_ejection_time * ejections,
                   max(self.base_ejection_time, self.max_ejection_time))

    def budget_limit(self, total_nodes: int) -> int:
        """Most nodes that may be out (cleaned up) at once: a fraction, never fewer than one."""
        return max(1, int(total_nodes * self.max_fraction))
