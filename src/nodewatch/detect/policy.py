"""Detection policy: every threshold the core needs, decided once from the config."""

from __future__ import annotations

import random
from dataclasses import dataclass

from nodewatch.config import Config


@dataclass(frozen=True, slots=True)
class Policy:
    healthy_interval: float = 30.0
    unhealthy_interval: float = 5.0
    down_interval: float = 0.0  # 0: unhealthy_interval
    jitter: float = 0.1
    fall: int = 3
    rise: int = 2
    dead_after: float = 3600.0
    startup_grace: float = 45.0
    max_loop_lag: float = 1.0
    guard_fraction: float = 0.5
    guard_min_nodes: int = 4
    indirect_probes: int = 2
    max_rejoins: int = 3
    auto_approve: bool = False
    max_fraction: float = 0.2
    max_rate: float = 10.0  # cleanups per minute
    drain_deadline: float = 600.0
    dry_run: bool = False

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
            max_loop_lag=float(cfg.coordinator.max_loop_lag),
            guard_fraction=cfg.guard.fraction,
            guard_min_nodes=cfg.guard.min_nodes,
            indirect_probes=cfg.guard.indirect_probes,
            max_rejoins=cfg.review.max_rejoins,
            auto_approve=cfg.review.auto_approve,
            max_fraction=cfg.budget.max_fraction,
            max_rate=cfg.budget.max_rate,
            drain_deadline=float(cfg.budget.drain_deadline),
            dry_run=cfg.coordinator.dry_run,
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

    def budget_limit(self, total_nodes: int) -> int:
        """Most nodes that may be out (cleaned up) at once: a fraction, never fewer than one."""
        return max(1, int(total_nodes * self.max_fraction))
