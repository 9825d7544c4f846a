"""The coordinator's judgement of itself, for ``/healthz``, ``/metrics`` and whoever routes to
it (a load balancer, systemd): ``ok``, ``degraded`` or ``failing``, with the reasons.

Pure: plain inputs in (``Signals``), a ``CoordinatorHealth`` out; the service gathers the
signals, the API answers 503 when failing.

- **degraded** — still doing its job, but someone should know: startup grace (observing, not
  confirming yet), the guard on (holding confirmations on purpose), events queued for the
  store, the store unavailable for less than ``store_timeout`` (changes are still answered in
  time), no leader for less than the election lease (an election in progress), the loop
  lagging over ``max_loop_lag`` (confirmations held by the gate, for a while), heartbeat
  datagrams dropped by the kernel for want of room in the receive buffer within the last
  ``DROP_WINDOW`` (more pushes than this coordinator keeps up with: its silence judgements are
  then partly its own doing, and polls have to sort them out; push deadlines are stretched
  while the drops are ``OVERLOAD_DROP_SHARE`` of what came within ``STRETCH_WINDOW``, so
  that those polls do not feed the overload).
- **failing** — cannot do its job: the store unavailable for ``store_timeout`` or longer
  (every change gets 503 now), no leader anywhere for longer than the lease (nobody detects,
  nobody acts), the leader's poller watching none of the nodes it holds (nobody is being
  checked), the loop lagging badly (``LAG_FAILING_FACTOR`` times ``max_loop_lag``) or
  lagging for ``LAG_FAILING_AFTER`` seconds on end (no failure confirmed for that long).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = ["CoordinatorHealth", "DROP_WINDOW", "FLAP_MEMORY", "LAG_FAILING_AFTER",
           "LAG_FAILING_FACTOR", "OVERLOAD_DROP_SHARE", "OutageClock", "ReceiveDrops",
           "STRETCH_WINDOW", "Signals", "StoreHealth", "judge"]

Status = Literal["ok", "degraded", "failing"]

LAG_FAILING_FACTOR = 5.0  # loop lag this many times max_loop_lag: failing at once
LAG_FAILING_AFTER = 30.0  # seconds lagging over max_loop_lag on end: failing
DROP_WINDOW = 60.0  # seconds: heartbeats the kernel dropped this recently make it degraded
STRETCH_WINDOW = 10.0  # seconds over which the share of heartbeats dropped is judged
# Push deadlines are stretched (Cluster.note_receive_drops) while the kernel dropped at least
# this share of the heartbeats that came within STRETCH_WINDOW: overload, where each dropped
# push costs a poll and the polls cost more drops. Below it (a loop stall now and then drops
# a burst) a missed push is polled as ever, and detection keeps its time.
OVERLOAD_DROP_SHARE = 0.05
# A store that fails again this soon after it recovered is still in the same outage.
FLAP_MEMORY = 30.0


@dataclass(slots=True)
class OutageClock:
    """When the store's outage began and when to try it next, kept across brief recoveries.

    A store can take some writes and refuse others: a full disk reuses the room in the pages
    it has, so a node's state rewritten in place passes while new history and events fail.
    If each such success ended the outage, its clock would restart at every flap (``/healthz``
    would say ``ok`` or ``degraded`` for a disk that loses every history point) and the retry
    backoff would never grow. So a failure within ``memory`` seconds of the last recovery
    continues the outage that recovery ended: its start and its backoff. A store that stays
    up for ``memory`` seconds starts afresh.
    """

    first_backoff: float
    max_backoff: float
    memory: float = FLAP_MEMORY
    since: float | None = None  # the current outage's start; None while available
    retry_at: float = 0.0  # background writes wait until then while unavailable
    _began: float | None = None  # the last outage's start, while it may still go on
    _recovered_at: float = 0.0
    _backoff: float = 0.0

    def failed(self, now: float) -> bool:
        """A write failed at ``now``; True when this begins (or resumes) an outage."""
        began = self.since is None
        if began:
            flapping = self._began is not None and now - self._recovered_at < self.memory
            if not flapping:
                self._began, self._backoff = now, self.first_backoff
            self.since = self._began
        self.retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)
        return began

    def recovered(self, now: float) -> float | None:
        """A write succeeded at ``now``; the outage's start when this ends one."""
        since, self.since, self.retry_at = self.since, None, 0.0
        if since is not None:
            self._recovered_at = now
        return since

    def waiting(self, now: float) -> bool:
        """Unavailable, and not yet time to try again."""
        return self.since is not None and now < self.retry_at


class ReceiveDrops:
    """The kernel's count of heartbeat datagrams dropped on the UDP socket (receive buffer
    full), as the endpoint reads it: the total since the endpoint opened, and how many of
    them fell within the last ``window`` seconds."""

    def __init__(self, window: float = DROP_WINDOW) -> None:
        self.window = window
        self.total = 0
        self._steps: deque[tuple[float, int]] = deque()  # (when, how many) of each increase
        # (when, dropped, read) of each reading within STRETCH_WINDOW, for the share dropped
        self._readings: deque[tuple[float, int, int]] = deque()

    def note(self, dropped: int, now: float, received: int = 0) -> None:
        """``dropped`` more since the endpoint's last reading (each endpoint counts its own),
        and ``received``: how many it read meanwhile."""
        if dropped > 0:
            self._steps.append((now, dropped))
            self.total += dropped
        self._readings.append((now, dropped, received))
        self._expire(now)

    def overloaded(self, now: float) -> bool:
        """Whether the kernel dropped at least ``OVERLOAD_DROP_SHARE`` of the heartbeats that
        came in the last ``STRETCH_WINDOW`` seconds."""
        self._expire(now)
        dropped = sum(d for _, d, _ in self._readings)
        came = dropped + sum(r for _, _, r in self._readings)
        return dropped > 0 and dropped >= OVERLOAD_DROP_SHARE * came

    def recent(self, now: float) -> int:
        self._expire(now)
        return sum(count for _, count in self._steps)

    def _expire(self, now: float) -> None:
        steps = self._steps
        while steps and steps[0][0] < now - self.window:
            steps.popleft()
        readings = self._readings
        while readings and readings[0][0] < now - STRETCH_WINDOW:
            readings.popleft()


class StoreHealth(Protocol):
    """What the store's failure handling exposes as ``Coordinator.store_health``."""

    @property
    def available(self) -> bool: ...

    @property
    def since(self) -> float | None: ...

    @property
    def cause(self) -> str: ...

    @property
    def queued_events(self) -> int: ...

    @property
    def dropped_events(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Signals:
    """Everything the judgement reads, as plain values (times are UNIX seconds)."""

    now: float
    leads: bool = True  # this coordinator holds the leadership (always, without an election)
    elected: bool = False  # several coordinators on etcd: there is an election
    leader: str = ""  # the leader's address as known here ('' when nobody holds the lease)
    leaderless_since: float | None = None
    # This coordinator led, then etcd stopped answering: it observes on but writes and acts
    # not (coordinator/leadership.py); it counts as no leader, with this cause.
    unconfirmed_cause: str = ""
    leader_ttl: float = 5.0
    grace_until: float = 0.0
    guard_on: bool = False
    guard_since: float | None = None
    loop_lag: float = 0.0
    max_loop_lag: float = 1.0
    lagging_since: float | None = None
    store: StoreHealth | None = None  # None: the store's health is not tracked
    store_name: str = ""  # how messages name it: ``sqlite (path)``, ``redis (url)``, ...
    store_timeout: float = 3.0
    sharing: bool = False  # coordination = "shares": this coordinator decides for its shares
    shares_held: int = 0
    shares_wanted: int = 0  # what the assignment gives it among the members it sees
    shares_short_since: float | None = None  # since when it holds fewer than it wins
    watchable_nodes: int = 0  # nodes held that are not dead
    polled_nodes: int = 0  # nodes the poller watches
    udp_drops: int = 0  # heartbeat datagrams the kernel dropped within the last drop_window
    drop_window: float = DROP_WINDOW
    push_stretch: float = 1.0  # Cluster.push_stretch: > 1 while heartbeats are dropped


@dataclass(frozen=True, slots=True)
class CoordinatorHealth:
    status: Status
    reasons: list[str] = field(default_factory=list)

    @property
    def failing(self) -> bool:
        return self.status == "failing"


def _at(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _since(now: float, ts: float | None) -> str:
    if ts is None:
        return ""
    return f" since {_at(ts)} ({max(0.0, now - ts):.0f}s)"


def judge(s: Signals) -> CoordinatorHealth:
    """``ok``, ``degraded`` or ``failing`` with one short reason per condition found."""
    failing: list[str] = []
    degraded: list[str] = []
    store = s.store
    if store is not None:
        dropped = f", {store.dropped_events} events dropped" if store.dropped_events else ""
        queued = store.queued_events
        if not store.available:
            # An unknown start counts as long: nothing says it is brief.
            down = float("inf") if store.since is None else s.now - store.since
            cause = f": {store.cause}" if store.cause else ""
            name = f"store {s.store_name}" if s.store_name else "store"
            text = (f"{name} unavailable{_since(s.now, store.since)}{cause} "
                    f"({queued} events queued{dropped})")
            (failing if down >= s.store_timeout else degraded).append(text)
        elif queued:
            degraded.append(f"{queued} events queued for the store{dropped}")
    if s.elected and not s.leads and not s.leader:
        alone = float("inf") if s.leaderless_since is None else s.now - s.leaderless_since
        text = f"no leader{_since(s.now, s.leaderless_since)}"
        if s.unconfirmed_cause:
            text += f": this coordinator's leadership is unconfirmed ({s.unconfirmed_cause})"
            (failing if alone > s.leader_ttl else degraded).append(text)
        elif alone > s.leader_ttl:
            failing.append(text + ": nobody holds the election lease")
        else:
            degraded.append(text + ": election in progress")
    if s.sharing and (s.shares_held < s.shares_wanted or s.shares_wanted == 0):
        short = 0.0 if s.shares_short_since is None else s.now - s.shares_short_since
        if s.shares_wanted == 0:
            text = "holds no share: not (yet) a member (is etcd reachable?)"
        else:
            text = (f"holds {s.shares_held} of the {s.shares_wanted} shares it wins"
                    f"{_since(s.now, s.shares_short_since)}: taking over")
        (failing if short > 2 * s.leader_ttl else degraded).append(text)
    if s.leads:
        if s.polled_nodes == 0 and s.watchable_nodes > 0 and not s.sharing:
            failing.append(f"poller watches 0 of {s.watchable_nodes} nodes while leading")
        if s.now < s.grace_until:
            degraded.append(f"in startup grace until {_at(s.grace_until)} "
                            f"({s.grace_until - s.now:.0f}s left)")
        if s.guard_on:
            degraded.append(f"guard on{_since(s.now, s.guard_since)}: "
                            "failures are not confirmed")
    if s.loop_lag > s.max_loop_lag:
        text = (f"loop lag {s.loop_lag:.2f}s over max_loop_lag {s.max_loop_lag:g}s"
                f"{_since(s.now, s.lagging_since)}")
        lagging = 0.0 if s.lagging_since is None else s.now - s.lagging_since
        if s.loop_lag >= LAG_FAILING_FACTOR * s.max_loop_lag or lagging >= LAG_FAILING_AFTER:
            failing.append(text)
        else:
            degraded.append(text)
    if s.udp_drops:
        stretched = (f"; push deadlines stretched {s.push_stretch:g}x and timeouts "
                     "confirm no failure meanwhile" if s.push_stretch > 1 else "")
        degraded.append(f"{s.udp_drops} UDP heartbeats dropped in the last "
                        f"{s.drop_window:.0f}s (receive buffer full): more pushes than this "
                        "coordinator keeps up with; share the nodes among more coordinators"
                        + stretched)
    if failing:
        return CoordinatorHealth("failing", failing + degraded)
    if degraded:
        return CoordinatorHealth("degraded", degraded)
    return CoordinatorHealth("ok", [])
