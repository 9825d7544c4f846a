"""The coordinator service: wires the pure core to its edges (poller, store, actions, API).

Everything that decides lives in ``detect.cluster.Cluster``; this module only moves inputs in
and outcomes out: results to the core, events and node state to the store, action requests to
the respond stage, indirect probes to peer agents (through the probe), new events to API waiters.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import random
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from nodewatch.config import Config
from nodewatch.coordinator.health import (
    CoordinatorHealth,
    OutageClock,
    ReceiveDrops,
    Signals,
    judge,
)
from nodewatch.coordinator.poller import HttpProbe, Poller, Probe
from nodewatch.detect import identity
from nodewatch.detect.cluster import MANY_UNKNOWN, Cluster
from nodewatch.detect.groups import GroupSummary
from nodewatch.detect.journal import EVENT_SLOTS, RoutineRefresh
from nodewatch.detect.outcome import ActionRequest, Outcome, ProbeRequest
from nodewatch.detect.policy import Policy
from nodewatch.detect.scheduler import CheckScheduler
from nodewatch.detect.shares import SHARES, Assignment, share_of
from nodewatch.errors import ConfigError
from nodewatch.model import (
    CallerObservation,
    CheckResult,
    Event,
    FailureClass,
    Health,
    HistorySample,
    NodeState,
    RegisterDecision,
    Registration,
    Report,
    SampleChunk,
    event_id,
    event_number,
)
from nodewatch.protocol import (
    AgentLease,
    HeartbeatBody,
    credential_hash,
    lease_proven,
    new_credential,
    node_heartbeat_key,
)
from nodewatch.store.base import Fenced, Store, StoreUnavailable, store_label
from nodewatch.store.codec import material_digest
from nodewatch.store.tiers import HistoryTiers, SampleChunks

if TYPE_CHECKING:
    from nodewatch.coordinator.leadership import Leadership
    from nodewatch.coordinator.shares import ShareKeeper
    from nodewatch.respond.runner import Claims

__all__ = ["ActionSink", "BindableSink", "CallerObserver", "Coordinator", "EVENT_SETTLE",
           "LAG_BEAT", "MAX_RETRY_BACKOFF", "NoActions", "NotLeader", "NotOwner",
           "PERSIST_INTERVAL", "RECENT_EVENTS", "ROUTINE_PERSIST_INTERVAL", "StoreHealth"]

log = logging.getLogger("nodewatch.coordinator")

RECENT_EVENTS = 10_000
PERSIST_INTERVAL = 0.5
# How often pending history points are written (one batch, not one commit per tick). Routine
# node state is written on its own slow refresh, ``[coordinator] refresh_interval``.
ROUTINE_PERSIST_INTERVAL = 5.0
# Shared coordinators: how old an event must be before readers get it (see events_after).
EVENT_SETTLE = 2.0
# Shared coordinators: how long a released share's running actions may take to finish.
RELEASE_ACTIONS_WAIT = 10.0
# How often the lag monitor wakes. The lag is how late a sleep wakes, so the beat only sets how
# quickly a stall is seen (well within max_loop_lag, 1 s by default); each wake-up of an
# otherwise idle coordinator costs about what 10 heartbeats do, so it is not 10 a second.
LAG_BEAT = 0.25
LOCAL_WARN_EVERY = 60.0  # seconds between warnings of checks failing on this side
# While the store fails, background writes are retried with a doubling pause up to this.
MAX_RETRY_BACKOFF = 10.0

T = TypeVar("T")
_HEALTHY = Health.HEALTHY.value


@dataclass(slots=True)
class StoreHealth:
    """The store as the coordinator sees it (for /healthz and metrics).

    ``since`` is when it became unavailable (``None`` while available); ``queued_events`` the
    events held in memory for it, ``dropped_events`` those dropped because the queue
    (``[coordinator] max_queued_events``) was full (oldest first; an ``events_lost`` event is
    written on recovery; node state is always current in memory, so no state is lost);
    ``writes_failed`` the failed write attempts since start.
    """

    available: bool = True
    since: float | None = None
    cause: str = ""
    queued_events: int = 0
    dropped_events: int = 0
    writes_failed: int = 0


class NotLeader(Exception):
    """A follower refuses what only the leader may do; the message names the leader (the HTTP
    edge answers 503 with it)."""

    def __init__(self, leader: str, unconfirmed: str = "") -> None:
        if unconfirmed:
            message = (f"this coordinator's leadership is unconfirmed ({unconfirmed}); it "
                       f"takes commands again once etcd answers and it is still the leader")
        else:
            message = f"this coordinator is a follower; the leader is {leader or 'being elected'}"
        super().__init__(message)
        self.leader = leader
        self.unconfirmed = unconfirmed


class NotOwner(NotLeader):
    """With shared coordinators (``coordination = "shares"``): the node is in another
    coordinator's share. ``owner`` is that coordinator's API URL ("" while the share is being
    taken over); the HTTP edge forwards the request there."""

    def __init__(self, node_id: str, share: int, owner: str) -> None:
        Exception.__init__(self, f"node {node_id!r} is in share {share}, watched by "
                                 f"{owner or 'nobody yet (the share is being taken over)'}")
        self.leader = owner
        self.unconfirmed = ""
        self.owner = owner
        self.share = share


async def _nothing() -> list[str]:
    return []


class ActionSink(Protocol):
    """The respond stage as the coordinator sees it: takes requests, never blocks."""

    def submit(self, request: ActionRequest, event: Event | None) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BindableSink(Protocol):
    """A sink that reports back (e.g. ``action_failed``) and reads the nodes it acts on."""

    def bind(self, emit: Callable[[str, str, str, dict[str, Any]], None],
             nodes: Callable[[], Mapping[str, NodeState]],
             settled: Callable[[ActionRequest], None], claims: Claims | None = None
             ) -> None: ...


class CallerObserver(Protocol):
    """A reader of callers' counts that runs while this coordinator leads (the HAProxy
    observer, ``respond/haproxy_stats.py``): ``run`` loops until cancelled, handing what it
    read to ``observe`` (``Coordinator.observe_callers``'s signature)."""

    async def run(self, observe: Callable[[str, Sequence[CallerObservation]], list[str]]
                  ) -> None: ...


class NoActions:
    """Used when no ``[[actions]]`` are configured: requests are only recorded in events."""

    def submit(self, request: ActionRequest, event: Event | None) -> None:
        log.debug("no action configured for %s on %s", request.kind, request.node_id)

    async def aclose(self) -> None:
        return None


def _probe_for(config: Config, clock: Callable[[], float]) -> Probe:
    """In-process HTTP checks, or ``[coordinator] poller_processes`` worker processes."""
    if config.coordinator.poller_processes > 1:
        from nodewatch.coordinator.probe_pool import ProcessProbe

        return ProcessProbe.from_config(config, clock=clock)
    return HttpProbe.from_config(config.detection, clock=clock,
                                 peer_tokens=config.coordinator.agent_tokens)


class _LeaderRole:
    """The leader's verbs: it acts on outcomes, writes node state and registers agents; it
    mirrors nothing (the store's node state is its own)."""

    name = "leader"

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord

    def require_leader(self) -> None:
        return None

    def require_owner(self, node_id: str) -> None:
        return None

    def restrict(self, outcome: Outcome) -> None:
        return None  # the leader does all an outcome asks

    async def persist(self, routine: bool, history: bool) -> None:
        await self._coord._write(routine, history)

    def leader_address(self) -> str:
        return self._coord.leader or self._coord.config.coordinator.listen

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        return None

    def mirror_events(self, events: list[Event]) -> None:
        return None

    def agent_published(self, lease: AgentLease) -> None:
        self._coord._register_lease(lease)

    def agent_lease_expired(self, node_id: str) -> None:
        self._coord._lease_expired(node_id)

    async def hand_over(self, leader: str) -> None:
        await self._coord._stop_leading(leader)


class _FollowerRole:
    """A follower's verbs: its core is a read-only mirror of the store, kept by watch; it
    refuses what only the leader may do, and neither acts nor writes."""

    name = "follower"

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord

    def require_leader(self) -> None:
        raise NotLeader(self._coord.leader)

    def require_owner(self, node_id: str) -> None:
        raise NotLeader(self._coord.leader)

    def restrict(self, outcome: Outcome) -> None:
        outcome.actions.clear()
        outcome.probes.clear()

    async def persist(self, routine: bool, history: bool) -> None:
        return None  # the leader writes; a follower's state comes from the store

    def leader_address(self) -> str:
        return self._coord.leader

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        self._coord._mirror_nodes(nodes, deleted, reset)

    def mirror_events(self, events: list[Event]) -> None:
        self._coord._mirror_events(events)

    def agent_published(self, lease: AgentLease) -> None:
        return None

    def agent_lease_expired(self, node_id: str) -> None:
        return None

    async def hand_over(self, leader: str) -> None:
        return None  # not leading: nothing to stop


class _UnconfirmedLeaderRole:
    """A leader that lost its lease because etcd did not answer (see ``leadership``): it keeps
    polling and observing, and queues transitions and their actions in memory; it neither
    writes nor acts, and refuses commands, until etcd confirms it is still the only leader
    (``confirm_leader``: write, then act) or names another (``become_follower``: drop)."""

    name = "leader (unconfirmed)"

    def __init__(self, coord: Coordinator, cause: str) -> None:
        self._coord = coord
        self.cause = cause

    def require_leader(self) -> None:
        raise NotLeader("", unconfirmed=self.cause)

    def require_owner(self, node_id: str) -> None:
        raise NotLeader("", unconfirmed=self.cause)

    def restrict(self, outcome: Outcome) -> None:
        return None  # actions are queued, and run only after their transitions are stored

    async def persist(self, routine: bool, history: bool) -> None:
        return None  # held: another leader may have written meanwhile; confirm_leader writes

    def leader_address(self) -> str:
        return ""  # no confirmed leader known

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        return None

    def mirror_events(self, events: list[Event]) -> None:
        return None

    def agent_published(self, lease: AgentLease) -> None:
        self._coord._register_lease(lease)

    def agent_lease_expired(self, node_id: str) -> None:
        self._coord._lease_expired(node_id)

    async def hand_over(self, leader: str) -> None:
        await self._coord._stop_leading(leader)


class _SharedRole:
    """One of several active coordinators (``coordination = "shares"``): it decides for the
    nodes of the shares it holds (polls, confirms, acts, writes) and mirrors the others from
    the store, so that it answers reads for the whole fleet and its guard and budget count
    the whole fleet. A verb about another coordinator's node raises NotOwner (the HTTP edge
    forwards it to the owner)."""

    name = "shared"

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord

    def require_leader(self) -> None:
        return None  # node-agnostic verbs (callers' counts) keep what concerns held shares

    def require_owner(self, node_id: str) -> None:
        self._coord.require_owner(node_id)

    def restrict(self, outcome: Outcome) -> None:
        owns = self._coord.owns
        outcome.actions[:] = [a for a in outcome.actions if owns(a.node_id)]
        outcome.probes[:] = [p for p in outcome.probes if owns(p.node_id)]

    async def persist(self, routine: bool, history: bool) -> None:
        await self._coord._write(routine, history)

    def leader_address(self) -> str:
        return self._coord.config.coordinator.listen

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        owns = self._coord.owns
        held = self._coord.cluster.nodes
        # An echo of an older write of ours (a share just released) never replaces a newer
        # copy: revisions only grow.
        fresh = [n for n in nodes if not owns(n.node_id) and not (
            n.node_id in held and held[n.node_id].revision > n.revision)]
        self._coord.cluster.mirror(fresh,
                                   [i for i in deleted if not owns(i)], reset=False,
                                   now=self._coord.clock())

    def mirror_events(self, events: list[Event]) -> None:
        self._coord._merge_events(events)

    def agent_published(self, lease: AgentLease) -> None:
        if self._coord.owns(lease.node_id):
            self._coord._register_lease(lease)

    def agent_lease_expired(self, node_id: str) -> None:
        if self._coord.owns(node_id):
            self._coord._lease_expired(node_id)

    async def hand_over(self, leader: str) -> None:
        return None


_Role = _LeaderRole | _FollowerRole | _UnconfirmedLeaderRole | _SharedRole


class Coordinator:
    """One coordinator process's state and background tasks.

    What differs between leader and follower is decided once, when the role changes: the role
    object installed then (``_LeaderRole`` or ``_FollowerRole``) carries those verbs.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        probe: Probe | None = None,
        actions: ActionSink | None = None,
        rng: random.Random | None = None,
        leadership: Leadership | None = None,
        sharing: ShareKeeper | None = None,
        observers: Sequence[CallerObserver] = (),
    ) -> None:
        self.config = config
        # With coordination = "shares": the etcd edge that keeps the members and claims this
        # coordinator's shares (coordinator/shares.py); it calls acquire_shares and friends.
        self.sharing = sharing
        self.held_shares: frozenset[int] = frozenset()
        self.share_count = SHARES
        self.members: dict[str, str] = {}  # member name -> its API URL
        self.assignment = Assignment.of(())
        self.shares_short_since: float | None = None if sharing is None else clock()
        self._share_epoch = 0  # bumped when every share is lost: work begun before it stops
        self._event_marks: dict[str, int] = {}  # the other members' event watermarks
        self._share_index: tuple[tuple[int, int], dict[int, list[str]]] = ((0, -1), {})
        self.observers = list(observers)
        # With several coordinators on etcd, only the elected leader polls, confirms failures,
        # runs actions and writes node state; a follower mirrors the store and serves reads.
        self.leadership = leadership
        self._role: _Role = (_SharedRole(self) if sharing is not None
                             else _LeaderRole(self) if leadership is None
                             else _FollowerRole(self))
        self.leader = ""
        # For /healthz: since when nobody is known to lead (with an election), the guard has
        # been on, the loop has lagged over max_loop_lag.
        self.leaderless_since: float | None = None if leadership is None else clock()
        self.guard_since: float | None = None
        self.lagging_since: float | None = None
        self._lead_tasks: list[asyncio.Task[None]] = []
        self.store = store
        self.clock = clock
        self.policy = Policy.from_config(config)
        self.rng = rng or random.Random()
        self.probe: Probe = probe or _probe_for(config, clock)
        self.actions: ActionSink = actions or NoActions()
        self.cluster = Cluster(self.policy, now=clock(), rng=self.rng)
        self.poller = Poller(
            self.probe,
            CheckScheduler(clock, self.rng),
            concurrency=config.detection.concurrency,
            on_result=self.on_result,
            interval_for=self.interval_for,
            clock=clock,
            fallback_interval=config.detection.unhealthy_interval,
        )
        self.started_at = clock()
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self._new_events = asyncio.Event()
        self._pending_events: list[Event] = []
        # History as stored (store/tiers.py): raw samples for the last minutes, rollups after;
        # samples gathered per node into chunks, then chunks and rollups wait for a write.
        self.history_tiers = HistoryTiers.from_config(
            config, etcd=store_label(store).startswith("etcd"))
        self._history = SampleChunks(self.history_tiers)
        self._pending_chunks: list[SampleChunk] = []  # closed raw chunks, not yet stored
        self._pending_points: list[HistorySample] = []  # closed rollups, not yet stored
        self._refresh = RoutineRefresh(float(config.coordinator.refresh_interval),
                                       material_digest)
        self._persist_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_beat = clock()
        self.loop_lag = 0.0
        self.checks = 0
        self.check_failures: dict[str, int] = {}
        self.event_counts: dict[str, int] = {}
        self.stale_reports = 0
        self.pushes = 0
        self.identity_rejections = 0  # requests refused for want of a node's credential
        self.receive_drops = ReceiveDrops()  # fed by the UDP endpoint (api/udp.py)
        self._local_warned = -math.inf  # when _warn_local last spoke
        self._pending_actions: list[tuple[ActionRequest, Event | None]] = []
        # Several coordinators on one etcd: runs are claimed there (coordinator/runs.py).
        self.claims: Claims | None = None
        self._sample_marks: dict[str, tuple[int, int]] = {}
        self._last_history_write = clock()
        self._running = False
        self._last_stored_event: str | None = None
        self.store_name = store_label(store)
        self.store_timeout = float(config.coordinator.store_timeout)
        self.store_health = StoreHealth()
        self._lost_unnoted = 0  # dropped events not yet told in an events_lost event
        # When the outage began (kept across a flapping store's brief recoveries) and when
        # to retry: health.OutageClock.
        self._outage = OutageClock(PERSIST_INTERVAL, MAX_RETRY_BACKOFF)
        # After a probe write alone brought the store back, the next background write is a
        # full one: the routine node state held back during the outage goes out at once.
        self._write_all_next = False

    @property
    def role(self) -> str:
        """``leader``, ``follower`` or ``leader (unconfirmed)`` (for /healthz and logs;
        behaviour goes by the role object).

        ``leader (unconfirmed)``: this coordinator led, then could not reach etcd for a whole
        lease TTL. It still polls and observes, but writes nothing, runs no action and refuses
        commands until etcd confirms it is still the leader; a health check should count it as
        *no confirmed leader* (``status()["leader"]`` is then ``""``). ``unconfirmed_cause``
        says why."""
        return self._role.name

    @property
    def unconfirmed_cause(self) -> str:
        """Why the leadership is unconfirmed (etcd unreachable, ...); ``""`` otherwise."""
        return self._role.cause if isinstance(self._role, _UnconfirmedLeaderRole) else ""

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Restore everything from the store, then start watching with a grace period (or,
        with an election, follow until elected)."""
        await self.store.open()
        nodes = await self._restore()
        self._running = True
        self._last_beat = self.clock()
        if isinstance(self.actions, BindableSink):
            claims = {"claims": self.claims} if self.claims is not None else {}
            self.actions.bind(self.record_event, lambda: self.cluster.nodes,
                              self._action_settled, **claims)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._lag_monitor(), name="nodewatch-lag")]
        await self._check_coordination()
        if self.sharing is not None:
            self.cluster.scope = self.owns
            self.cluster.budget.share(0.0)
            await self._lead()
            self.sharing.start(self)
            log.info("coordinator started, sharing: %d nodes loaded, joining the members",
                     len(nodes))
            return
        if self.leadership is not None:
            self.leadership.start(self)
            log.info("coordinator started as a follower: %d nodes loaded, campaigning",
                     len(nodes))
            return
        await self._lead()
        log.info("coordinator started: %d nodes restored, grace %.1fs", len(nodes),
                 self.policy.startup_grace)

    async def _check_coordination(self) -> None:
        """All coordinators of one etcd must coordinate alike: an elected leader and sharers
        would both decide the same nodes. Refuse to start beside the other kind."""
        keeper = self.sharing or self.leadership
        if keeper is None:
            return
        store = keeper.store
        if self.sharing is not None:
            other = await self._bounded(store.get_raw(store.key("election", "leader")),
                                        "read") is not None
            theirs = "elects a leader (coordination = \"election\")"
        else:
            members, _ = await self._bounded(store.list_raw("nodes!members"), "read")
            other = bool(members)
            theirs = "shares the fleet (coordination = \"shares\")"
        if other:
            await self.store.close()
            raise ConfigError(f"another coordinator of this store {theirs}: every coordinator "
                              "of one store must use the same [coordinator] coordination")

    async def _restore(self) -> list[NodeState]:
        """A fresh core from the store's nodes and last event, in startup grace."""
        nodes = await self._bounded(self.store.load_nodes(), "read")
        last = await self._bounded(self.store.last_event_id(), "read")
        now = self.clock()
        self.cluster = Cluster(self.policy, now=now, rng=self.rng, nodes=nodes,
                               next_event=(event_number(last) + 1) if last else 1)
        self.cluster.take_dirty()  # freshly loaded: nothing to write back
        # What the store holds is what was loaded: refreshes start from now, spread out.
        self._refresh = RoutineRefresh(self._refresh.interval, material_digest)
        self._refresh.stored(nodes, now)
        self._history = SampleChunks(self.history_tiers)
        self._last_stored_event = last
        self.cluster.restart_grace(now)
        return nodes

    async def _lead(self) -> None:
        """Poll every watched node, tick the core's timers, prune history; write it all.
        Sharing, the poller starts empty: nodes join it with their shares."""
        if self.sharing is None:
            self._role = _LeaderRole(self)
        # Stored but never settled: the last leader (or this process, before a crash) died
        # between a transition and its action. Taken before anything new is decided.
        due = self.cluster.due_actions() if self.sharing is None else []
        now = self.clock()
        if self.sharing is None:
            for static in self.config.nodes:
                self._handle(self.cluster.add_static(static.id, static.address, static.labels,
                                                     now))
            # With UDP heartbeats on and many nodes unknown (a start beside a pushing fleet),
            # an unknown node is expected to push before its first poll: checked first within
            # one healthy_interval, spread, rather than within unhealthy_interval (nothing is
            # confirmed in the startup grace anyway). A push that comes first puts its poll
            # off (Cluster.poll_deadline has the figures).
            spread_out = (bool(self.config.coordinator.heartbeat_udp)
                          and self.cluster.table.unknown_count > MANY_UNKNOWN)
            spread = float(self.config.detection.healthy_interval)
            for node in self.cluster.nodes.values():
                if node.health is not Health.DEAD and node.node_id not in self.poller:
                    first = (now + self.rng.uniform(0.0, spread)
                             if spread_out and node.health is Health.UNKNOWN else None)
                    self.poller.add(node.node_id, node.address, first_due=first)
        await self.poller.start()
        loop = asyncio.get_running_loop()
        self._lead_tasks = [
            loop.create_task(self._ticker(), name="nodewatch-tick"),
            loop.create_task(self._retention(), name="nodewatch-retention"),
            # Callers' counts are the leader's to judge: the observers run only while it leads.
            *(loop.create_task(observer.run(self._observe_while_leading),
                               name=f"nodewatch-observer-{i}")
              for i, observer in enumerate(self.observers)),
        ]
        await self.persist()
        if due:
            log.warning("running %d stored actions that never ran: %s", len(due),
                        ", ".join(f"{r.kind} {r.node_id}" for r in due[:10]))
        for request in due:
            self._submit(request, None)

    def _submit(self, request: ActionRequest, event: Event | None) -> None:
        """Hand a stored decision to the respond stage; a sink that does not report back
        settles it at once (nothing will run it)."""
        self.actions.submit(request, event)
        if not isinstance(self.actions, BindableSink):
            self._action_settled(request)

    def _action_settled(self, request: ActionRequest) -> None:
        """Every action for the request ran or gave up: it is no longer due (written with the
        next write; a crash before that runs it again: at least once)."""
        self.cluster.settle_action(request.node_id, request.event_id, request.kind)

    async def become_leader(self) -> None:
        """Elected: reload everything from the store (the old leader's last word), observe
        through ``startup_grace``, then lead. What the old leader did is in the node state
        (``cleaned_up``, drains), so no action runs twice."""
        await self._restore()
        self.leader = self.config.coordinator.listen
        self.leaderless_since = None
        await self._lead()
        log.info("elected leader: %d nodes, grace %.1fs", len(self.cluster.nodes),
                 self.policy.startup_grace)

    async def become_unconfirmed(self, cause: str) -> None:
        """The lease was lost because etcd did not answer: keep observing, hold writes and
        actions (see ``_UnconfirmedLeaderRole``). Only a leader becomes unconfirmed."""
        if isinstance(self._role, _LeaderRole):
            self._role = _UnconfirmedLeaderRole(self, cause)
            self.leaderless_since = self.clock()
            log.warning("leadership unconfirmed (%s): observing, holding writes and actions",
                        cause)

    async def confirm_leader(self) -> None:
        """etcd answered and nobody else led meanwhile: lead on, writing what was queued (in
        order, compare-and-swap on node revisions) and then running the held actions."""
        self._role = _LeaderRole(self)
        self.leader = self.config.coordinator.listen
        self.leaderless_since = None
        log.info("leadership confirmed: writing %d queued events, running %d held actions",
                 len(self._pending_events), len(self._pending_actions))
        try:
            await self.persist(routine=True)
        except Exception:  # nothing is dropped: the ticker writes it on its next try
            log.exception("writing what was queued failed; retrying")

    async def become_follower(self, leader: str) -> None:
        """Not (or no longer) the leader: stop polling, ticking and writing node state."""
        previous, self._role = self._role, _FollowerRole(self)
        self.leader = leader
        if leader:
            self.leaderless_since = None
        elif self.leaderless_since is None:
            self.leaderless_since = self.clock()
        await previous.hand_over(leader)

    async def _stop_leading(self, leader: str) -> None:
        """The leader stepping down: no more polls, ticks or actions."""
        # Decisions not stored yet are the next leader's to make: never act on them later,
        # nor write them (their event numbers are the next leader's too).
        self._pending_actions.clear()
        dropped = {e.id for e in self._pending_events}
        self._pending_events.clear()
        self._history = SampleChunks(self.history_tiers)
        self._pending_chunks.clear()
        self._pending_points.clear()
        if dropped:
            kept = [e for e in self.recent if e.id not in dropped]
            self.recent.clear()
            self.recent.extend(kept)
            log.warning("dropped %d events never stored", len(dropped))
        tasks, self._lead_tasks = self._lead_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.poller.stop()
        for node_id in list(self.cluster.nodes):
            self.poller.remove(node_id)  # the next term polls what the store then holds
        log.warning("now a follower (leader: %s)", leader or "being elected")

    # ------------------------------------------------------------------ shares

    def may_decide(self, node_id: str) -> bool:
        """Whether an action for the node may still run here: this coordinator decides for
        it, or may again (a leader whose lease is unconfirmed)."""
        return isinstance(self._role, (_LeaderRole, _UnconfirmedLeaderRole, _SharedRole)) \
            and self.owns(node_id)

    def owns(self, node_id: str) -> bool:
        """Sharing: whether the node's share is held here (always, without sharing)."""
        return self.sharing is None or share_of(node_id) in self.held_shares

    def owner_url(self, node_id: str) -> str:
        """The API URL of the coordinator the assignment gives the node to ("" if none)."""
        return self.members.get(self.assignment.owner(node_id), "")

    def require_owner(self, node_id: str) -> None:
        if not self.owns(node_id):
            owner = self.assignment.owner(node_id)
            url = "" if owner == self.sharing_name else self.members.get(owner, "")
            raise NotOwner(node_id, share_of(node_id), url)

    def member_hosts(self) -> set[str]:
        """The hosts of the member coordinators' URLs (trusted to say whom they forward)."""
        hosts = set()
        for url in self.members.values():
            host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            hosts.add(host)
        return hosts

    @property
    def sharing_name(self) -> str:
        return self.sharing.identity if self.sharing is not None else ""

    def set_members(self, members: Mapping[str, str], assignment: Assignment) -> None:
        """The live coordinators (name -> API URL) and the assignment they imply."""
        self.members = dict(members)
        self.assignment = assignment
        self._note_shares()

    def _note_shares(self) -> None:
        """Since when this coordinator holds fewer shares than it wins (for /healthz)."""
        wanted = self.assignment.counts().get(self.sharing_name, 0)
        short = wanted == 0 or len(self.held_shares) < wanted
        if not short:
            self.shares_short_since = None
        elif self.shares_short_since is None:
            self.shares_short_since = self.clock()

    def start_sharing(self, slot: int) -> None:
        """Joined the members: this coordinator mints its events in its own slot."""
        self.cluster.event_sequence.use_slot(slot)
        self.cluster.share_groups({})

    def group_summaries(self) -> dict[str, Any]:
        """This coordinator's part of every outlier group, for the other members."""
        return {group: summary.to_json()
                for group, summary in sorted(self.cluster.outliers.summaries.items())}

    def set_peer_groups(self, peers: Mapping[str, Mapping[str, GroupSummary]]) -> None:
        """The other members' parts of the outlier groups (see detect/groups.py)."""
        self.cluster.share_groups(peers)

    async def acquire_shares(self, shares: frozenset[int]) -> None:
        """Claimed in etcd, and the mirror holds the previous owner's last word: decide for
        these nodes from now on. Their deadlines restart here (each is polled once within
        ``unhealthy_interval``, spread, whatever its stored last_seen); an action stored as
        due and never settled (its owner died between the transition and the action) runs."""
        if not shares:
            return
        self.held_shares = self.held_shares | shares
        self.cluster.budget.share(len(self.held_shares) / self.share_count)
        now = self.clock()
        spread = float(self.config.detection.unhealthy_interval)
        for static in self.config.nodes:
            if share_of(static.id) in shares:
                self._handle(self.cluster.add_static(static.id, static.address, static.labels,
                                                     now))
        index = self._nodes_by_share()
        taken = [self.cluster.nodes[i] for k in sorted(shares) for i in index.get(k, ())
                 if i in self.cluster.nodes]
        self.cluster.adopt(n.node_id for n in taken)
        for node in taken:
            if node.health is not Health.DEAD and node.node_id not in self.poller:
                self.poller.add(node.node_id, node.address,
                                first_due=now + self.rng.uniform(0.0, spread))
        due = self.cluster.due_actions(n.node_id for n in taken)
        for request in due:
            self._submit(request, None)
        self._note_shares()
        log.info("took shares %s: %d nodes, %d stored actions due", _share_list(shares),
                 len(taken), len(due))

    def _nodes_by_share(self) -> dict[int, list[str]]:
        """Node ids by share, kept until the set of node ids changes (a takeover of many
        shares at 100,000 nodes must not scan the fleet once per share)."""
        version = (id(self.cluster), self.cluster.revisions.members)
        if self._share_index[0] != version:
            index: dict[int, list[str]] = {}
            for node_id in self.cluster.nodes:
                index.setdefault(share_of(node_id), []).append(node_id)
            self._share_index = (version, index)
        return self._share_index[1]

    async def release_shares(self, shares: frozenset[int]) -> None:
        """Another coordinator wins these shares now: leave it the last word in the store.
        While still deciding for them, the actions already handed on for their nodes run to
        their end (bounded by ``RELEASE_ACTIONS_WAIT``); then this coordinator stops deciding
        (out of scope, off the poller) and writes what is pending, their settling included,
        so that the next holder neither repeats nor misses one. Nodes go unwatched only from
        that write until the next holder's claim comes back (milliseconds). The keeper
        deletes the claims afterwards."""
        if not shares:
            return
        index = self._nodes_by_share()
        nodes = [i for k in shares for i in index.get(k, ())]
        epoch = self._share_epoch
        join = getattr(self.actions, "join", None)
        if join is not None and nodes:
            try:
                async with asyncio.timeout(RELEASE_ACTIONS_WAIT):
                    await join(nodes)
            except TimeoutError:
                log.warning("releasing shares with actions still running after %gs: the next "
                            "holder runs them again (at least once)", RELEASE_ACTIONS_WAIT)
        if epoch != self._share_epoch:
            return  # the lease was lost meanwhile: nothing more to hand over
        self.held_shares = self.held_shares - shares
        self.cluster.budget.share(len(self.held_shares) / self.share_count)
        for node_id in nodes:
            self.poller.remove(node_id)
        # Their history so far goes with this last write: the next holder gathers on.
        chunks, points = self._history.close(nodes)
        self._pending_chunks += chunks
        self._pending_points += points
        try:
            await self.persist(routine=True)
        except StoreUnavailable as exc:
            log.warning("releasing shares with writes pending: %s", exc)
        self._note_shares()
        log.info("released shares %s", _share_list(shares))

    def lose_shares(self, cause: str, shares: frozenset[int] | None = None) -> None:
        """The membership lease is lost (``shares`` None: every share), or some claims are:
        etcd expires (or has expired) them, and other coordinators take them. Decide nothing
        more for their nodes; decisions not stored yet are the next owners' to make (from the
        store), so they are dropped, never acted on later."""
        everything = shares is None
        lost = self.held_shares if shares is None else self.held_shares & shares
        if everything:
            self._share_epoch += 1
        self.held_shares = self.held_shares - lost
        self.cluster.budget.share(len(self.held_shares) / self.share_count)
        index = self._nodes_by_share()
        nodes = set(self.cluster.nodes) if everything else {
            i for k in lost for i in index.get(k, ())}
        self._pending_actions[:] = [(r, e) for r, e in self._pending_actions
                                    if r.node_id not in nodes]
        dropped = {e.id for e in self._pending_events
                   if e.node_id in nodes or (everything and not e.node_id)}
        self._pending_events[:] = [e for e in self._pending_events if e.id not in dropped]
        self._history.forget(nodes)
        self._pending_chunks[:] = [c for c in self._pending_chunks if c.node_id not in nodes]
        if dropped:
            kept = [e for e in self.recent if e.id not in dropped]
            self.recent.clear()
            self.recent.extend(kept)
        for node_id in nodes:
            self.poller.remove(node_id)
        if everything:
            self.cluster.take_dirty()
        else:
            for node_id in nodes:
                self.cluster.dirty.forget_pending(node_id)
        self._note_shares()
        if lost:
            log.error("lost %s (%s): %d shares, %d events never stored dropped",
                      "every share" if everything else f"shares {_share_list(lost)}", cause,
                      len(lost), len(dropped))

    def node_ids(self) -> list[str]:
        return list(self.cluster.nodes)

    def event_watermark(self) -> int:
        """Every event this coordinator stores from now on has a higher number than this:
        the first of those waiting for the store, less one, or the clock's floor."""
        if self._pending_events:
            return event_number(self._pending_events[0].id) - 1
        return max(0, int(self.clock() * 1000) * EVENT_SLOTS - 1)

    def set_event_marks(self, marks: Mapping[str, int]) -> None:
        """The other members' event watermarks (see ``events_after``)."""
        self._event_marks = dict(marks)

    def _merge_events(self, events: list[Event]) -> None:
        """Other coordinators' events, merged into ``recent`` in id order (ids sort by time
        across coordinators); this coordinator's own come back by watch and are skipped."""
        slot = self.cluster.event_sequence.slot
        fresh = [e for e in events if slot is None or event_number(e.id) % EVENT_SLOTS != slot]
        if not fresh:
            return
        for event in fresh:
            self.cluster.event_sequence.witness(event_number(event.id))
            if self.recent and event.id < self.recent[-1].id:
                at = len(self.recent)
                while at > 0 and self.recent[at - 1].id > event.id:
                    at -= 1
                if at == 0 and len(self.recent) == self.recent.maxlen:
                    continue  # older than anything retained: readers get it from the store
                if len(self.recent) == self.recent.maxlen:
                    self.recent.popleft()
                    at -= 1
                self.recent.insert(at, event)
            else:
                self.recent.append(event)
        self._new_events.set()
        self._new_events = asyncio.Event()

    def mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        """A follower's copy of the leader's node state, kept by watch (reads only)."""
        self._role.mirror_nodes(nodes, deleted, reset)

    def _mirror_nodes(self, nodes: list[NodeState], deleted: list[str], reset: bool) -> None:
        self.cluster.mirror(nodes, deleted, reset=reset)

    def mirror_events(self, events: list[Event]) -> None:
        """A follower's copy of the leader's new events, kept by watch."""
        self._role.mirror_events(events)

    def _mirror_events(self, events: list[Event]) -> None:
        if not events:
            return
        self.recent.extend(events)
        self._last_stored_event = events[-1].id
        self._new_events.set()
        self._new_events = asyncio.Event()

    def agent_published(self, lease: AgentLease) -> None:
        """An agent in etcd lease mode announced itself: register it if it is new or was
        restarted (the poller then confirms it as usual)."""
        self._role.agent_published(lease)

    def _register_lease(self, lease: AgentLease) -> None:
        """Anyone who may write to etcd can publish under a node's key, so an enrolled node's
        announcement must carry its proof (``protocol.lease_proof``); one that does not is
        refused like a register without the credential. A node known only from etcd holds no
        credential: there, etcd's own access control is its identity (see ARCHITECTURE)."""
        node = self.cluster.nodes.get(lease.node_id)
        if node is not None and node.incarnation >= lease.incarnation \
                and node.address == lease.address:
            return
        if node is not None and (node.credential_hash or node.revoked or node.reenrol_address):
            keys = [bytes.fromhex(k) for k in (node.udp_key, node.previous_udp_key) if k]
            if not any(lease_proven(lease, key) for key in keys):
                self.reject(lease.node_id, via="lease", claimant="etcd",
                            reason="etcd announcement without the node's proof")
                return
            if node.previous_hash and keys and lease_proven(lease, keys[0]) and node.udp_key:
                self.cluster.credential_proven(lease.node_id)  # the current key proved it
        self._register(Registration(node_id=lease.node_id, address=lease.address,
                                   incarnation=lease.incarnation, last_seq=lease.last_seq,
                                   last_ts=lease.last_ts, version=lease.version,
                                   labels=dict(lease.labels)))

    def agent_lease_expired(self, node_id: str) -> None:
        """An agent's liveness key expired: a failed check, then confirm by polling."""
        self._role.agent_lease_expired(node_id)

    def _lease_expired(self, node_id: str) -> None:
        if node_id not in self.cluster.nodes:
            return
        self.on_result(CheckResult(node_id=node_id, ok=False, at=self.clock(),
                                   failure=FailureClass.LEASE_EXPIRED,
                                   detail="agent lease expired", source="lease"))
        if node_id in self.poller:
            self.poller.check_now(node_id)

    async def stop(self) -> None:
        """Stop watching, write what is pending, close the store. Idempotent."""
        if not self._running:
            return
        self._running = False
        if self.leadership is not None:
            await self.leadership.stop()
        if self.sharing is not None:
            await self.sharing.pause()  # no claim or takeover now; the lease (and shares) kept
        await self.poller.stop()
        for task in self._tasks + self._lead_tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._lead_tasks, return_exceptions=True)
        self._tasks, self._lead_tasks = [], []
        try:
            await self.persist(routine=True)  # hands the last stored decisions' actions over
        except StoreUnavailable as exc:
            log.error("stopping with writes not stored: %s", exc)
        await self.actions.aclose()
        try:
            await self.persist()  # what the actions reported meanwhile (action_failed)
        except StoreUnavailable as exc:
            log.error("stopping with writes not stored: %s", exc)
        if self.sharing is not None:
            # Written first, then the lease revoked (and nothing written after it): the other
            # members take the shares at once, from this one's last word.
            await self.sharing.stop()
            self.held_shares = frozenset()
        await self.store.close()

    # ------------------------------------------------------------------ inputs

    def interval_for(self, node_id: str) -> float:
        return self.cluster.interval_for(node_id)

    def _gate_on_stall(self) -> None:
        """If the lag monitor has not run for a while, the loop itself stalled: results that
        arrive now may be timeouts we caused, so the gate must know before they are judged."""
        stalled = self.clock() - self._last_beat - LAG_BEAT
        if stalled > self.policy.max_loop_lag and stalled > self.cluster.loop_lag:
            self.cluster.set_loop_lag(stalled)

    def on_result(self, result: CheckResult) -> None:
        """A poll finished (called by the poller on the loop)."""
        if result.node_id not in self.cluster.nodes:
            return
        self._gate_on_stall()
        self.checks += 1
        if not result.ok and result.failure is not None:
            key = result.failure.value
            self.check_failures[key] = self.check_failures.get(key, 0) + 1
            if result.failure is FailureClass.LOCAL:
                self._warn_local(result)
        self._observe(result)

    def _warn_local(self, result: CheckResult) -> None:
        """A check that failed on this side (no evidence, ``Cluster.observe`` drops it): said
        once a minute, since it means the coordinator cannot watch its nodes properly."""
        now = self.clock()
        if now - self._local_warned < LOCAL_WARN_EVERY:
            return
        self._local_warned = now
        log.warning("health checks fail on the coordinator's side (%s; %d so far): no "
                    "evidence about the nodes, which are checked again; raise the descriptor "
                    "limit (ulimit -n, LimitNOFILE) or share the nodes among more coordinators",
                    result.detail, self.check_failures.get(FailureClass.LOCAL.value, 0))

    def _observe(self, result: CheckResult) -> Outcome:
        node = self.cluster.nodes[result.node_id]
        seq_before = (node.incarnation, node.seq)
        outcome = self.cluster.observe(result)
        if outcome.stale:
            self.stale_reports += 1
            return outcome
        if result.report is not None and self._new_sample(node, result.report, seq_before):
            self._history.add(node.node_id, result.at, node.seq, node.health.value, node.system,
                              node.load)
        self._handle(outcome)
        return outcome

    def _new_sample(self, node: NodeState, report: Report, seq_before: tuple[int, int]) -> bool:
        """History gets one point per sample the agent took, not one per heartbeat or poll
        (a heartbeat takes a new seq even between samples)."""
        if (node.incarnation, node.seq) == seq_before:
            return False
        if report.samples < 0:
            return True  # the node does not count its samples: every new seq is one
        key = (report.incarnation, report.samples)
        if self._sample_marks.get(node.node_id) == key:
            return False
        self._sample_marks[node.node_id] = key
        return True

    def note_receive_drops(self, dropped: int, now: float, received: int = 0) -> None:
        """A UDP endpoint's reading of the kernel's drops on its socket (every second), with
        the datagrams it read meanwhile: kept for ``/healthz`` and ``/metrics``, and push
        deadlines stretched while the share dropped says overload
        (``ReceiveDrops.overloaded``, ``Cluster.note_receive_drops``)."""
        self.receive_drops.note(dropped, now, received)
        self.cluster.note_receive_drops(self.receive_drops.overloaded(now))

    def routine_heartbeat(self, node: NodeState, body: HeartbeatBody, at: float) -> bool:
        """A pushed heartbeat whose tag was good, applied straight from its decoded body when
        it is routine (``Cluster.routine_push``): no Report, no CheckResult, no outcome, no
        stall check (a success judges nothing). True when applied; False: nothing was
        changed, and the caller takes the full path (``heartbeat``). Raises NotOwner or
        NotLeader as ``heartbeat`` does. At 100,000 pushing nodes this is most of what the
        coordinator does (bench/fleet_udp.py), so it does the least it can. ``node`` is the
        body's node as the caller looked it up on this loop turn (not looked up twice)."""
        node_id = body.node_id
        self._role.require_owner(node_id)
        cluster = self.cluster
        if not cluster.routine_push(node, body, at):
            return False
        self.pushes += 1
        samples = body.samples
        key = (body.incarnation, samples)
        if samples < 0 or self._sample_marks.get(node_id) != key:
            if samples >= 0:
                self._sample_marks[node_id] = key
            self._history.add(node_id, at, body.seq, _HEALTHY, body.system, body.load)
        self.poller.defer(node_id, at + cluster.push_deadline(node))
        return True

    def heartbeat(self, result: CheckResult) -> Outcome:
        """A pushed heartbeat; raises UnknownNode, returns an outcome with ``stale`` set.

        An accepted push stands in for the next poll: the poll is pushed back by one interval,
        so a pushing node costs no polls while its pushes arrive and is polled once they stop.
        """
        self._role.require_owner(result.node_id)
        self._gate_on_stall()
        self.pushes += 1
        outcome = self._observe(result)
        if not outcome.stale:
            node_id = result.node_id
            self.poller.defer(node_id, result.at + self.cluster.poll_deadline(node_id))
        return outcome

    def register(self, reg: Registration) -> tuple[RegisterDecision, NodeState]:
        self._role.require_owner(reg.node_id)
        return self._register(reg)

    def _register(self, reg: Registration) -> tuple[RegisterDecision, NodeState]:
        decision, outcome = self.cluster.register(reg, self.clock())
        node = self.cluster.nodes[reg.node_id]
        if node.node_id in self.poller:
            self.poller.update_address(node.node_id, node.address)
        else:
            self.poller.add(node.node_id, node.address, first_due=self.clock())
        self._handle(outcome)
        return decision, node

    def observe_callers(self, source: str,
                        observations: Sequence[CallerObservation]) -> list[str]:
        """What callers saw of nodes (a load balancer, a service, a peer; the HAProxy reader
        too): evidence for the outlier rule, kept in memory and judged on the next tick, so
        nothing is written here; ejections are written with their events like any
        transition. ``source`` names the caller (distinct sources count as observers).
        Returns the node ids not known here. Only the leader judges (NotLeader otherwise)."""
        self._role.require_leader()
        return self.cluster.observe_callers(source, observations, self.clock())

    def _observe_while_leading(self, source: str,
                               observations: Sequence[CallerObservation]) -> list[str]:
        """An observer's counts; dropped while the leadership is unconfirmed (the observer
        keeps polling, the counts of that time are simply not evidence)."""
        try:
            return self.observe_callers(source, observations)
        except NotLeader:
            return []

    def heartbeat_phase(self, node_id: str, interval: float) -> float:
        """Where in its interval a node should push: spread by a hash, never synchronized."""
        if interval <= 0:
            return 0.0
        return (zlib.crc32(node_id.encode()) / 2**32) * interval

    async def command(self, name: str, node_id: str, reason: str = "", *,
                      address: str = "") -> Outcome:
        """drain / undrain / approve / revoke / remove, acknowledged (returned) once durably
        stored; raises UnknownNode or Conflict, or StoreUnavailable after undoing it in memory.
        ``address``: for approve, the claim the operator means (see ``Cluster.approve``)."""
        self._role.require_owner(node_id)
        before = copy.deepcopy(self.cluster.node(node_id))
        outcome = self._apply_command(name, node_id, reason, address)
        await self._store_outcome(node_id, before, outcome)
        return outcome

    def check_identity(self, node_id: str, credential: str, *, via: str,
                       claimant: str) -> None:
        """A heartbeat for ``node_id`` presenting ``credential`` (the secret; '' for none):
        raises IdentityRejected (after recording it, rate-limited) unless it proves the node's
        credential, or the node has none on record. Unknown nodes pass (the caller answers
        404)."""
        self._role.require_owner(node_id)
        node = self.cluster.node(node_id)
        verdict = identity.verify(node, credential_hash(credential))
        if verdict in ("rejected", "revoked", "reenrol"):
            self.reject(node_id, via=via, claimant=claimant,
                        reason="no credential" if not credential else "wrong credential")
            raise identity.IdentityRejected(f"node {node_id!r} is enrolled: its own node "
                                            "credential is required")
        if verdict == "valid" and node is not None and node.previous_hash:
            self.cluster.credential_proven(node_id)  # the previous one is not needed any more

    def reject(self, node_id: str, *, via: str, claimant: str, reason: str,
               claimed_address: str = "") -> None:
        """Record a request refused for want of the node's credential (rate-limited event);
        it changes nothing else."""
        self.identity_rejections += 1
        self._handle(self.cluster.reject_identity(node_id, self.clock(), via=via,
                                                  claimant=claimant, reason=reason,
                                                  claimed_address=claimed_address))

    def _issue(self, node: NodeState | None, verdict: identity.Verdict,
               now: float) -> tuple[str, identity.Credential | None]:
        """A new credential when this registration gets one: enrolment, re-enrolment, a node
        without one on record, or a rotation that is due (``rotate_credentials_after``)."""
        rotate = float(self.config.coordinator.rotate_credentials_after)
        due = verdict in ("new", "open", "reenrol", "revoked", "previous") or (
            verdict == "valid" and node is not None and rotate > 0
            and now - node.credential_at >= rotate)
        if not due:
            return "", None
        secret = new_credential()
        return secret, identity.Credential(credential_hash(secret),
                                           node_heartbeat_key(secret).hex())

    async def enrol(self, reg: Registration, credential: str = "",
                    claimant: str = "") -> tuple[RegisterDecision, NodeState, str]:
        """``register`` for the HTTP edge: answered once stored, else undone and refused.

        ``credential`` is what the agent presented (the secret; '' for none); a registration
        for an enrolled node that does not prove it raises IdentityRejected and changes
        nothing but the node's pending claim. Returns the decision, the node and a newly
        issued credential ('' when none), to send back in the answer only."""
        self._role.require_owner(reg.node_id)
        now = self.clock()
        node_before = self.cluster.node(reg.node_id)
        verdict = identity.verify(node_before, credential_hash(credential), reg.address,
                                  registering=True, source=claimant)
        if verdict == "rejected":
            self.reject(reg.node_id, via="register", claimant=claimant,
                        reason="no credential" if not credential else "wrong credential",
                        claimed_address=reg.address)
            raise identity.IdentityRejected(
                f"node {reg.node_id!r} is enrolled and this registration does not prove its "
                "credential; the claim is held for an operator (nodewatch approve "
                f"{reg.node_id} re-enrols it from {reg.address})")
        secret, issue = self._issue(node_before, verdict, now)
        before = copy.deepcopy(node_before)
        # What the agent presented stays accepted until it proves the new credential (then
        # "valid" clears it): a retry after a lost answer is "previous" and gets another one.
        # Never a revoked credential.
        presented = credential_hash(credential) if verdict != "revoked" else ""
        decision, outcome = self.cluster.register(reg, now, verdict=verdict, issue=issue,
                                                  presented=presented)
        try:
            await self._store_outcome(reg.node_id, before, outcome)
        except StoreUnavailable:
            if before is None:
                self.poller.remove(reg.node_id)
            raise
        node = self.cluster.nodes[reg.node_id]
        if node.node_id in self.poller:
            self.poller.update_address(node.node_id, node.address)
        else:
            self.poller.add(node.node_id, node.address, first_due=self.clock())
        return decision, node, secret

    async def _store_outcome(self, node_id: str, before: NodeState | None,
                             outcome: Outcome) -> None:
        """Write an operator's outcome with everything pending; hand it on once stored. If
        the write fails the outcome is undone in memory (node back to ``before``, events taken
        back), so that nothing refused is applied later; where the store cannot tell whether
        it landed, the node is re-read from the store until it answers."""
        if not outcome:
            return
        try:
            await self._write(routine=False, history=False, outcome=outcome)
        except StoreUnavailable as exc:
            # An uncertain write may have stored the events: their numbers are not taken
            # back (the store ignores an id it holds, so a reused one would be lost).
            self.cluster.restore(node_id, before, () if exc.uncertain else outcome.events)
            before = copy.deepcopy(before)  # the core owns the restored node now
            if exc.uncertain:
                asyncio.get_running_loop().create_task(self._converge(node_id, before))
                note = f"may have been applied; check GET /v1/nodes/{node_id}"
            else:
                note = "nothing was changed"
            raise StoreUnavailable(exc.store, f"{exc.cause}; {note}",
                                   uncertain=exc.uncertain) from exc
        self._handle(outcome, stored=True)

    async def _converge(self, node_id: str, before: NodeState | None) -> None:
        """After an uncertain write: adopt what the store holds for the node, once it answers
        (unless the node changed again meanwhile)."""
        pause = PERSIST_INTERVAL
        while self._running:
            try:
                stored = await self._bounded(self.store.get_node(node_id), "read")
            except StoreUnavailable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_BACKOFF)
                continue
            if self.cluster.nodes.get(node_id) == before and stored != before:
                log.warning("node %s: adopting the stored state after an uncertain write",
                            node_id, extra={"node_id": node_id})
                self.cluster.restore(node_id, stored)
                if stored is None:
                    self.poller.remove(node_id)
                elif node_id not in self.poller:
                    self.poller.add(node_id, stored.address)
            return

    def _apply_command(self, name: str, node_id: str, reason: str, address: str = "") -> Outcome:
        now = self.clock()
        if name == "drain":
            outcome = self.cluster.drain(node_id, reason, now)
        elif name == "undrain":
            outcome = self.cluster.undrain(node_id, now)
        elif name == "approve":
            outcome = self.cluster.approve(node_id, now, address=address, note=reason)
        elif name == "remove":
            outcome = self.cluster.remove(node_id, now)
        elif name == "revoke":
            outcome = self.cluster.revoke(node_id, now)
        else:
            raise ValueError(f"unknown command {name!r}")
        return outcome

    def record_event(self, kind: str, node_id: str, reason: str,
                     evidence: dict[str, Any]) -> None:
        """An event from an edge (the respond stage's ``action_failed``, dry runs)."""
        self._handle(self.cluster.record(kind, node_id, reason, evidence, self.clock()))

    # ------------------------------------------------------------------ outcomes

    def _handle(self, outcome: Outcome, stored: bool = False) -> None:
        """Hand an outcome on; ``stored``: its events and node state are written already
        (an operator's outcome), so its actions run now and removed nodes are deleted."""
        if not outcome:
            return
        self._role.restrict(outcome)  # only the leader acts; a follower's core is a mirror
        if outcome.events:
            if not stored:
                self._pending_events.extend(outcome.events)
                self._bound_queue()
            self.recent.extend(outcome.events)
            for event in outcome.events:
                self.event_counts[event.kind] = self.event_counts.get(event.kind, 0) + 1
                if event.kind in ("guard_on", "guard_off"):
                    self.guard_since = event.ts if event.kind == "guard_on" else None
                log.info("event %s %s %s->%s: %s", event.node_id or "-", event.kind,
                         event.from_, event.to, event.reason,
                         extra={"node_id": event.node_id, "event": event.kind})
            self._new_events.set()
            self._new_events = asyncio.Event()
        by_id = {e.id: e for e in outcome.events}
        for request in outcome.actions:
            # Run only once the transition behind it is stored: a leader that dies before the
            # write leaves the decision to its successor, which then acts once, not twice.
            if stored:
                self._submit(request, by_id.get(request.event_id))
            else:
                self._pending_actions.append((request, by_id.get(request.event_id)))
        for probe in outcome.probes:
            asyncio.get_running_loop().create_task(self._indirect_probe(probe))
        for node_id in outcome.check_now:
            if node_id in self.poller:
                self.poller.check_now(node_id)
        for node_id in outcome.removed:
            self.poller.remove(node_id)
            self._history.forget([node_id])
            self._sample_marks.pop(node_id, None)
            if not stored:
                asyncio.get_running_loop().create_task(self._delete(node_id))
        for event in outcome.events:
            if event.kind == "dead":
                self.poller.remove(event.node_id)

    async def _delete(self, node_id: str) -> None:
        try:
            await self._bounded(self.store.delete_node(node_id))
        except StoreUnavailable as exc:
            log.warning("could not delete node %s: %s", node_id, exc, extra={"node_id": node_id})

    async def _indirect_probe(self, request: ProbeRequest) -> None:
        """Ask healthy peers, through the probe, to check the suspect node; their votes go to
        the core (a peer that gave no usable verdict casts none)."""
        answers = await asyncio.gather(
            *(self.probe.peer_check(peer_id, peer_address, request.address)
              for peer_id, peer_address in request.peers))
        votes = [vote for vote in answers if vote is not None]
        if not self._running:
            return
        self._handle(self.cluster.peer_votes(request.node_id, votes, self.clock()))

    # ------------------------------------------------------------------ persistence

    async def persist(self, routine: bool = False, history: bool = False) -> None:
        """Write changed nodes, new events and history; serialized so CAS revisions chain.

        Transitions and commands are written every time, and so is a routine observation that
        changed something material (the agent's status or reasons, ...: ``RoutineRefresh``);
        a node that saw only routine ones (a new seq, load figures, last_seen) is written
        again once per ``[coordinator] refresh_interval``, spread over it, or on stop and
        whenever ``routine`` is set. A crash loses at most that much of them, and nothing any
        decision depends on: a stored seq is behind what an agent will claim, never ahead.
        History points go through the tiers (``HistoryTiers``) and are written every
        ``ROUTINE_PERSIST_INTERVAL`` or along with anything else; ``history`` writes them now,
        for a reader of history. (Writing history on every tick made a commit and an fsync
        four times a second for data that changes every 5 s.)
        Only the leader writes; a follower's state comes from the store.
        """
        await self._role.persist(routine, history)

    async def _bounded(self, work: Awaitable[T], action: str = "write",
                       deadline: float | None = None) -> T:
        """One store call, bounded by ``store_timeout`` (or by ``deadline``, a loop time, for
        the calls of one command's write); any failure is a StoreUnavailable naming the store
        and the cause. A timeout leaves it unknown whether a write landed (the request was
        sent), and so does any error of a network store."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.store_timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except StoreUnavailable:
            raise
        except TimeoutError:
            raise StoreUnavailable(self.store_name,
                                   f"no answer within store_timeout {self.store_timeout:g}s",
                                   uncertain=True, action=action) from None
        except Exception as exc:  # noqa: BLE001 - every backend's errors, typed once here
            cause = str(exc) or type(exc).__name__
            raise StoreUnavailable(self.store_name, cause, action=action,
                                   uncertain=not self.store_name.startswith("sqlite")) from exc

    def _bound_queue(self) -> None:
        """At most ``max_queued_events`` events wait for the store: past it the oldest are
        dropped and counted (an ``events_lost`` event tells on recovery). Node state is not
        queued (the core always holds the current state), so none is lost; history samples
        are bounded the same way."""
        limit = self.config.coordinator.max_queued_events
        excess = len(self._pending_events) - limit
        if excess > 0:
            # An events_lost note queued by a brief recovery may be dropped itself: carry its
            # count over, so that the next recovery still tells every loss.
            carried = sum(int(e.evidence.get("dropped", 0))
                          for e in self._pending_events[:excess] if e.kind == "events_lost")
            del self._pending_events[:excess]
            self._lost_unnoted += excess + carried
            self.store_health.dropped_events += excess
            log.warning("store unavailable: dropped the %d oldest queued events (queue full "
                        "at %d)", excess, limit)
        chunks = self._pending_chunks
        held = sum(len(c) for c in chunks)
        while chunks and held > limit:  # counted in samples, as events are
            held -= len(chunks.pop(0))
        if len(self._pending_points) > limit:
            del self._pending_points[:len(self._pending_points) - limit]
        self.store_health.queued_events = len(self._pending_events)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        health = self.store_health
        if self._outage.failed(self.clock()):
            log.error("store unavailable: %s; detection goes on from memory, writes are "
                      "queued and retried", exc)
        health.available, health.since = False, self._outage.since
        health.cause = exc.cause
        health.writes_failed += 1

    def _store_ok(self) -> None:
        health = self.store_health
        now = self.clock()
        since = self._outage.recovered(now)
        if since is not None:
            log.warning("store available again, %.1fs after its outage began", now - since)
        health.available, health.since, health.cause = True, None, ""
        if self._lost_unnoted:
            lost, self._lost_unnoted = self._lost_unnoted, 0
            self._handle(self.cluster.record(
                "events_lost", "", f"{lost} events dropped while the store was unavailable "
                "(queue full); node states are current", {"dropped": lost}, self.clock()))
        health.queued_events = len(self._pending_events)

    async def _write(self, routine: bool, history: bool, outcome: Outcome | None = None) -> None:
        """Write what is pending (and ``outcome``'s events, an operator's, not yet queued).

        On failure nothing pending is dropped (it is retried with backoff; the queue is
        bounded) and StoreUnavailable is raised; ``outcome``'s events are not requeued: the
        caller undoes that outcome.

        An operator's write (``outcome`` given) has one deadline, ``store_timeout`` from now,
        for everything it waits on: the persist lock (a hung background write may hold it)
        and each of its store calls. So a command is answered within about ``store_timeout``.
        """
        deadline: float | None = None
        if outcome is not None:
            deadline = asyncio.get_running_loop().time() + self.store_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    await self._persist_lock.acquire()
            except TimeoutError:
                # Nothing of ours was sent: certain that nothing changed.
                raise StoreUnavailable(
                    self.store_name, "a previous write got no answer within store_timeout "
                    f"{self.store_timeout:g}s") from None
        else:
            await self._persist_lock.acquire()
        try:
            await self._write_locked(routine, history, outcome, deadline)
        finally:
            self._persist_lock.release()

    def _ours(self, nodes: list[NodeState], events: list[Event],
              actions: list[tuple[ActionRequest, Event | None]]
              ) -> tuple[list[NodeState], list[Event], list[tuple[ActionRequest, Event | None]]]:
        """Sharing: what a write may carry of the nodes this coordinator decides for. What is
        left of a share given up (a settle or an ``action_failed`` of an action that ended
        after the release) is the new holder's to write, and the fence would refuse it with
        the rest of the write, again on every retry."""
        owns = self.owns
        mine = [n for n in nodes if owns(n.node_id)]
        kept = [e for e in events if not e.node_id or owns(e.node_id)]
        acts = [a for a in actions if owns(a[0].node_id)]
        dropped = len(events) - len(kept)
        if dropped:
            log.info("dropped %d events of nodes another coordinator decides for now "
                     "(they ended after their share moved)", dropped)
        return mine, kept, acts

    async def _write_locked(self, routine: bool, history: bool, outcome: Outcome | None,
                            deadline: float | None) -> None:
        """The write itself, with the persist lock held (see ``_write``)."""
        nodes = self._take_nodes(routine, outcome is None)
        events, self._pending_events = self._pending_events, []
        extra = list(outcome.events) if outcome is not None else []
        removed = list(outcome.removed) if outcome is not None else []
        samples: list[HistorySample] = []
        chunks: list[SampleChunk] = []
        if routine or history or nodes or events or extra:
            chunks, samples = self._take_points(final=routine and not self._running)
        actions, self._pending_actions = self._pending_actions, []
        if self.sharing is not None:
            nodes, events, actions = self._ours(nodes, events, actions)
        wrote = bool(nodes or events or samples or chunks or extra or removed)
        probed = False
        try:
            if outcome is None and not self.store_health.available:
                # After a failure only a write that needs new room tells a store that is back
                # from a full disk that still takes a small write in place. First and alone:
                # if it fails, nothing else was written (the rest is requeued, not doubled).
                await self._bounded(self.store.probe_write(self.clock()), deadline=deadline)
                probed = not wrote
            # Issued together, so a store that groups writes commits them as one.
            conflicts, _, _, _ = await self._bounded(asyncio.gather(
                self.store.save_nodes(nodes) if nodes else _nothing(),
                self.store.append_events(events + extra) if events or extra
                else _nothing(),
                self.store.add_samples(samples) if samples else _nothing(),
                self.store.add_chunks(chunks) if chunks else _nothing(),
            ), deadline=deadline)
            for node_id in removed:
                await self._bounded(self.store.delete_node(node_id), deadline=deadline)
            if conflicts:
                log.warning("store refused stale writes for %d nodes: %s",
                            len(conflicts), ", ".join(conflicts[:10]))
                # Ours again on the stored revision, now: what we answer must be stored.
                await self._reload(conflicts, deadline)
                again = [self.cluster.nodes[i] for i in sorted(self.cluster.take_dirty(
                    routine=False)) if i in self.cluster.nodes]
                self._refresh.stored(again, self.clock())
                lost = await self._bounded(self.store.save_nodes(again), deadline=deadline) \
                    if again else []
                if lost:
                    self.cluster.mark_dirty(lost)
                    raise StoreUnavailable(self.store_name, "compare-and-swap lost twice "
                                           f"for {', '.join(lost[:10])}")
            if wrote:
                await self._bounded(self.store.flush(), deadline=deadline)
        except StoreUnavailable as exc:
            # Nothing is dropped on a store error: it is all written on a later try.
            self.cluster.mark_dirty(n.node_id for n in nodes)
            self._pending_events[:0] = events
            self._pending_points[:0] = samples
            self._pending_chunks[:0] = chunks
            self._pending_actions[:0] = actions
            self._bound_queue()
            if isinstance(exc, Fenced):
                # Not an outage: the lease that made this coordinator the decider is gone.
                # Held until the election or the share keeper says who decides now (a
                # follower drops it all; a leader confirmed on a new lease writes it).
                log.warning("write refused: %s", exc)
            else:
                self._store_failed(exc)
            raise
        except BaseException:
            self.cluster.mark_dirty(n.node_id for n in nodes)
            self._pending_events[:0] = events
            self._pending_points[:0] = samples
            self._pending_chunks[:0] = chunks
            self._pending_actions[:0] = actions
            raise
        self._store_ok()
        self._write_all_next = probed
        for request, event in actions:  # their transitions are durable now
            if self.owns(request.node_id):
                self._submit(request, event)
            # else its share was released meanwhile: stored as due, the next holder runs it

    def _take_nodes(self, routine: bool, background: bool) -> list[NodeState]:
        """The nodes to write now. Changed ones always; with ``routine``, every node that
        saw anything (a full write); in a ``background`` write, routine observations sorted
        by the refresh: material changes now, the others when their refresh is due. An
        operator's write takes only changed nodes (the rest wait for the next tick)."""
        now = self.clock()
        known = self.cluster.nodes
        ids = self.cluster.take_dirty(routine=False)
        if routine:
            ids |= self.cluster.take_dirty(routine=True) | self._refresh.take_all()
        elif background:
            touched, pushed = self.cluster.take_routine()
            ids |= self._refresh.sort(touched, known)
            ids |= self._refresh.sort(pushed, known, pushed=True)
            ids |= self._refresh.due(now, known)
        nodes = [known[i] for i in sorted(ids) if i in known]
        self._refresh.stored(nodes, now)  # the content is taken now (stores encode it now)
        return nodes

    def _take_points(self, final: bool) -> tuple[list[SampleChunk], list[HistorySample]]:
        """The pending history as the tiers store it: raw chunks (if the raw tier is on) and
        rollups, those that closed and those waiting since a failed write (``final``: every
        chunk and rollup being gathered, on stop)."""
        chunks, points = self._history.take(self.clock(), final)
        chunks, self._pending_chunks = self._pending_chunks + chunks, []
        points, self._pending_points = self._pending_points + points, []
        return chunks, points

    async def _reload(self, node_ids: Sequence[str], deadline: float | None = None) -> None:
        """After losing a compare-and-swap, take the stored revision and write ours again."""
        for node_id in node_ids:
            stored = await self._bounded(self.store.get_node(node_id), "read", deadline)
            node = self.cluster.nodes.get(node_id)
            if stored is not None and node is not None:
                node.revision = stored.revision
                self.cluster.mark_dirty([node_id])

    # ------------------------------------------------------------------ background tasks

    async def _lag_monitor(self) -> None:
        """Measure event-loop lag: how late a short sleep wakes up. Feeds the self-health gate."""
        window: deque[float] = deque(maxlen=10)
        while True:
            before = self.clock()
            await asyncio.sleep(LAG_BEAT)
            now = self.clock()
            self._last_beat = now
            window.append(max(0.0, now - before - LAG_BEAT))
            self.loop_lag = max(window)
            self.cluster.set_loop_lag(self.loop_lag)
            if self.loop_lag <= self.policy.max_loop_lag:
                self.lagging_since = None
            elif self.lagging_since is None:
                self.lagging_since = now - self.loop_lag

    async def _ticker(self) -> None:
        interval = min(PERSIST_INTERVAL, self.policy.unhealthy_interval / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                self._handle(self.cluster.tick(self.clock()))
                now = self.clock()
                if self._outage.waiting(now):
                    continue  # detection went on; the store is retried after its backoff
                history = now - self._last_history_write >= ROUTINE_PERSIST_INTERVAL
                await self.persist(routine=self._write_all_next, history=history)
                if history:
                    self._last_history_write = now
            except StoreUnavailable as exc:
                log.debug("persist failed, retrying with backoff: %s", exc)
            except Exception:
                log.exception("tick failed; retrying")

    async def _retention(self) -> None:
        tiers = self.history_tiers
        ttl = tiers.ttl
        while True:
            await asyncio.sleep(min(60.0, ttl / 10))
            try:
                removed = await self._bounded(self.store.prune(self.clock(), ttl,
                                                               tiers.raw_ttl))
                if removed:
                    log.debug("retention removed %d history samples", removed)
            except Exception:
                log.exception("retention failed; retrying")

    # ------------------------------------------------------------------ reads

    async def wait_for_events(self, after: str | None, wait: float, limit: int) -> list[Event]:
        """Events after ``after``; if none yet, wait up to ``wait`` seconds for the next ones."""
        deadline = self.clock() + wait
        while True:
            # Take the waiter before reading: an event that lands while we read still wakes us.
            waiter = self._new_events
            events = await self.events_after(after, limit)
            remaining = deadline - self.clock()
            if events or remaining <= 0:
                return events
            if self.sharing is not None and self.recent and (after is None
                                                             or self.recent[-1].id > after):
                remaining = min(remaining, EVENT_SETTLE / 4)  # some are settling: look again
            try:
                await asyncio.wait_for(waiter.wait(), timeout=remaining)
            except TimeoutError:
                if self.clock() >= deadline:
                    return []

    async def events_after(self, after: str | None, limit: int) -> list[Event]:
        """Events after ``after`` in id order. With shared coordinators, only up to the
        lowest of the other members' watermarks: another coordinator's event comes in with
        its write, and a reader's cursor must not have passed its id by then (ids sort by
        time across coordinators); a member whose store writes stall holds the stream back
        rather than let its events land behind a cursor."""
        events = await self._events_after(after, limit)
        if self.sharing is None or not events:
            return events
        # Every other member says up to which number its events are stored (its watermark,
        # published every half second); one not heard from yet counts as EVENT_SETTLE ago.
        settle = max(0, int((self.clock() - EVENT_SETTLE) * 1000)) * EVENT_SLOTS
        marks = [self._event_marks.get(m, settle) for m in self.members
                 if m != self.sharing_name]
        if not marks:
            return events
        horizon = event_id(min(marks))
        return [e for e in events if e.id <= horizon]

    async def _events_after(self, after: str | None, limit: int) -> list[Event]:
        recent = self.recent
        if recent and after is not None and after >= recent[0].id:
            out: list[Event] = []
            for event in reversed(recent):
                if event.id <= after:
                    break
                out.append(event)
            out.reverse()
            return out[:limit]
        if self.store_health.available:
            try:
                await self.persist()
            except StoreUnavailable:
                pass  # the retained ones can still be read
        if self.store_health.available:
            return await self._bounded(self.store.events_after(after, limit), "read")
        # The store fails: what it holds, then what waits for it (from memory); if it cannot
        # even be read, the events retained in memory.
        try:
            stored = await self._bounded(self.store.events_after(after, limit), "read")
        except StoreUnavailable:
            stored = []
        top = stored[-1].id if stored else after
        queued = [e for e in self.recent if top is None or e.id > top]
        return (stored + queued)[:limit]

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        """One node's history: what is stored (pending points written first, if the store
        can), then the raw samples still being gathered into a chunk (store/tiers.py)."""
        try:
            await self.persist(history=True)
        except StoreUnavailable:
            pass
        # Taken before the read: a chunk that closes and is written meanwhile is then in one
        # of the two (or both: the same samples count once), never in neither. Chunks a failed
        # write left pending are read here too.
        fresh = max(since, self.clock() - self.history_tiers.raw_ttl)  # what retention keeps
        gathered = [s for c in self._pending_chunks if c.node_id == node_id
                    for s in c.samples() if s.ts >= fresh]
        gathered += self._history.samples(node_id, fresh)
        stored = await self._bounded(self.store.history(node_id, since), "read")
        if not gathered:
            return stored
        seen = {(s.ts, s.seq) for s in stored if not s.span}
        return sorted([*stored, *(s for s in gathered if (s.ts, s.seq) not in seen)],
                      key=attrgetter("ts"))

    def last_event_id(self) -> str | None:
        return self.recent[-1].id if self.recent else self._last_stored_event

    def health(self) -> CoordinatorHealth:
        """``ok``, ``degraded`` or ``failing`` and why (the rules: ``coordinator/health.py``)."""
        counts = self.cluster.counts()
        cfg = self.config.coordinator
        return judge(Signals(
            now=self.clock(),
            leads=self.role == "leader" or bool(self.held_shares),
            sharing=self.sharing is not None,
            shares_held=len(self.held_shares),
            shares_wanted=self.assignment.counts().get(self.sharing_name, 0),
            shares_short_since=self.shares_short_since,
            elected=self.leadership is not None,
            leader="" if self.unconfirmed_cause else self.leader,
            leaderless_since=self.leaderless_since,
            unconfirmed_cause=self.unconfirmed_cause,
            leader_ttl=float(cfg.leader_ttl),
            grace_until=self.cluster.started_at + self.policy.startup_grace,
            guard_on=self.cluster.guard_on,
            guard_since=self.guard_since,
            loop_lag=self.loop_lag,
            max_loop_lag=self.policy.max_loop_lag,
            lagging_since=self.lagging_since,
            store=self.store_health,
            store_name=self.store_name,
            store_timeout=float(cfg.store_timeout),
            watchable_nodes=counts["total"] - counts.get(Health.DEAD.value, 0),
            polled_nodes=len(self.poller),
            udp_drops=self.receive_drops.recent(self.clock()),
            drop_window=self.receive_drops.window,
            push_stretch=self.cluster.push_stretch,
        ))

    def status(self) -> dict[str, Any]:
        counts = self.cluster.counts()
        health = self.health()
        store: StoreHealth | None = self.store_health
        return {
            "status": health.status,
            "reasons": health.reasons,
            "store": None if store is None else _store_view(store, self.clock()),
            "role": self.role,
            "leader": self._role.leader_address(),
            "uptime": round(self.clock() - self.started_at, 3),
            "loop_lag": round(self.loop_lag, 4),
            "guard": self.cluster.guard_on,
            "in_grace": self.clock() < self.cluster.started_at + self.policy.startup_grace,
            "dry_run": self.policy.dry_run,
            "nodes": counts,
            "checks": self.checks,
            "poller": self.poller.stats(),
            **({"shares": self.shares_view()} if self.sharing is not None else {}),
        }

    def shares_view(self) -> dict[str, Any]:
        """For /healthz: what this coordinator holds and how the members split the fleet."""
        counts = self.assignment.counts()
        return {
            "name": self.sharing_name,
            "total": self.share_count,
            "held": len(self.held_shares),
            "wanted": counts.get(self.sharing_name, 0),
            "members": [{"name": name, "url": self.members.get(name, ""), "shares": count}
                        for name, count in counts.items()],
        }


def _share_list(shares: frozenset[int]) -> str:
    ordered = sorted(shares)
    return ",".join(map(str, ordered[:16])) + (f",… ({len(ordered)})" if len(ordered) > 16 else "")


def _store_view(store: StoreHealth, now: float) -> dict[str, Any]:
    since = store.since
    return {
        "available": store.available,
        "since": since,
        "unavailable_for": 0.0 if store.available or since is None else round(now - since, 3),
        "cause": store.cause,
        "queued_events": store.queued_events,
        "dropped_events": store.dropped_events,
        "writes_failed": store.writes_failed,
    }
