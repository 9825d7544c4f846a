"""The poller: the coordinator's HTTP edge, running due health checks for the pure core.

One shared keep-alive ``ClientSession``, one timer for the earliest due time (the scheduler's
heap decides who is next, not a sleeping task per node), and a fixed pool of ``concurrency``
worker coroutines. A worker that finishes a check takes the next due node straight from the
heap, so under load there is no hand-off at all; idle workers wait on a future that the timer
resolves. Nothing here decides health: results go to ``on_result``, the next interval comes
from ``interval_for``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import aiohttp

from nodewatch.config import DetectionConfig
from nodewatch.coordinator.probes import HttpPeerProbe, check_health
from nodewatch.detect.scheduler import CheckScheduler, DeferralWheel
from nodewatch.model import CheckResult, FailureClass, PeerVote

__all__ = ["CheckLost", "ClosableProbe", "HttpProbe", "OpenableProbe", "Poller", "Probe"]

log = logging.getLogger(__name__)

_TIMER_SLACK = 0.001
_DEFER_AHEAD = 1.0  # deferred entries are moved on up to this early, in batches
_PARK_SLOT = 0.1  # seconds: the deferral wheel's slot (a parked check is handed out this early)


class CheckLost(Exception):
    """The check reached no verdict for a reason on the coordinator's side (a probe worker
    process died or stalled): it says nothing about the node, so the poller passes nothing on
    and checks the node again at its interval."""


class Probe(Protocol):
    """The seam between the coordinator and the network: one check of one node, never raising
    for a network problem (it is a failed :class:`CheckResult` instead); :class:`CheckLost` when
    the coordinator itself could not check. And one indirect check: a peer agent asked to check
    a suspect node, whose answer is its vote (``reachable=None`` when the peer could not be
    reached), or None when it gave no usable verdict."""

    async def check(self, node_id: str, address: str) -> CheckResult: ...

    async def peer_check(self, peer_id: str, peer_address: str,
                         target_address: str) -> PeerVote | None: ...


@runtime_checkable
class OpenableProbe(Protocol):
    """A probe that sets up resources (a session, worker processes) in ``Poller.start``."""

    async def open(self) -> object: ...


@runtime_checkable
class ClosableProbe(Protocol):
    """A probe that owns resources (a session, sockets) that ``Poller.stop`` releases."""

    async def aclose(self) -> None: ...


class HttpProbe:
    """``GET http://ADDRESS/health`` on one shared ``aiohttp.ClientSession``.

    The connector is sized for the poller's concurrency so that a check never queues for a
    connection slot (that wait would eat into its connect timeout and look like a slow node).
    Keep-alive outlives the check interval so that a healthy node costs no TCP handshake per
    check; a connection the node closed meanwhile is retried once by aiohttp (GET is
    idempotent), so it does not turn into a false failure. Cookies are never stored and bodies
    are asked for uncompressed: health bodies are small, and decompression would be CPU spent on
    every check plus a way around the size cap.

    Each idle kept-alive connection holds one file descriptor: watching N nodes needs about N
    descriptors (``ulimit -n``).
    """

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        max_bytes: int,
        concurrency: int,
        clock: Callable[[], float] = time.time,
        keepalive_timeout: float = 75.0,
        dns_cache_ttl: float = 300.0,
        peers: HttpPeerProbe | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self._peers = peers or HttpPeerProbe(timeout=timeout,
                                             connect_timeout=self.connect_timeout)
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.keepalive_timeout = keepalive_timeout
        self.dns_cache_ttl = dns_cache_ttl
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, detection: DetectionConfig,
                    clock: Callable[[], float] = time.time,
                    peer_tokens: Sequence[str] = ()) -> HttpProbe:
        """The probe for a ``[detection]`` table. Keep-alive covers two healthy intervals, so
        a connection survives the longest normal gap between two checks of one node;
        ``peer_tokens`` (the agent tokens) authorise its peer probes."""
        return cls(
            timeout=detection.timeout,
            connect_timeout=detection.connect_timeout,
            max_bytes=detection.max_response,
            concurrency=detection.concurrency,
            clock=clock,
            keepalive_timeout=max(15.0, 2.0 * detection.healthy_interval),
            peers=HttpPeerProbe(timeout=detection.timeout,
                                connect_timeout=detection.connect_timeout, tokens=peer_tokens),
        )

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The shared session, once opened (tests inspect its connector)."""
        return self._session

    async def open(self) -> aiohttp.ClientSession:
        """Create the shared session (idempotent); it must be made inside the running loop."""
        await self._peers.open()
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.concurrency,
                limit_per_host=0,
                use_dns_cache=True,
                ttl_dns_cache=int(self.dns_cache_ttl),
                keepalive_timeout=self.keepalive_timeout,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "nodewatch-coordinator"},
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    async def check(self, node_id: str, address: str) -> CheckResult:
        session = self._session
        if session is None:
            session = await self.open()
        return await check_health(
            session,
            node_id,
            address,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            max_bytes=self.max_bytes,
            clock=self._clock,
        )

    async def peer_check(self, peer_id: str, peer_address: str,
                         target_address: str) -> PeerVote | None:
        return await self._peers.peer_check(peer_id, peer_address, target_address)

    async def aclose(self) -> None:
        """Close the sessions and every pooled connection."""
        await self._peers.aclose()
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


class _Alarm:
    """One loop timer, kept at the earliest time it was asked for; ``fire`` clears it first,
    so the callback may arm it again."""

    __slots__ = ("callback", "due", "handle")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.handle: asyncio.TimerHandle | None = None
        self.due = 0.0

    @property
    def armed(self) -> bool:
        return self.handle is not None

    def arm(self, loop: asyncio.AbstractEventLoop, due: float, now: float) -> None:
        if self.handle is not None:
            if self.due <= due:
                return
            self.handle.cancel()
        self.due = due
        self.handle = loop.call_later(max(0.0, due - now), self.fire)

    def fire(self) -> None:
        self.handle = None
        self.callback()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _Node:
    """The poller's view of one watched node: where to reach it and what to do after its check."""

    __slots__ = ("address", "busy", "deferred", "recheck")

    def __init__(self, address: str) -> None:
        self.address = address
        self.busy = False  # a check is in flight
        self.recheck = False  # check again right after the one in flight (check_now, new address)
        self.deferred = 0.0  # pushes arrived: when its due time comes, move it to this instead
        # (a node whose due time came while deferred waits in the poller's DeferralWheel)


class Poller:
    """Runs due checks with at most ``concurrency`` in flight and reschedules each node at
    ``completed_at + interval_for(node_id)``.

    ``on_result`` is called synchronously on the event loop, one result at a time, before the
    node is rescheduled, so the core can change the node's interval (healthy vs unhealthy, with
    jitter) and ``interval_for`` already sees it. A node is never checked twice at once.
    """

    def __init__(
        self,
        probe: Probe,
        scheduler: CheckScheduler,
        *,
        concurrency: int,
        on_result: Callable[[CheckResult], None],
        interval_for: Callable[[str], float],
        clock: Callable[[], float] = time.time,
        fallback_interval: float = 5.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._probe = probe
        self._scheduler = scheduler
        self._concurrency = concurrency
        self._on_result = on_result
        self._interval_for = interval_for
        self._clock = clock
        self._fallback_interval = fallback_interval
        self._nodes: dict[str, _Node] = {}
        self._idle: deque[asyncio.Future[tuple[str, float]]] = deque()
        self._workers: list[asyncio.Task[None]] = []
        self._timer = _Alarm(self._on_timer)
        # Nodes whose due time came while pushes deferred them: parked until their deferral,
        # moved on there while pushes go on, back on the heap once they stop.
        self._wheel = DeferralWheel(_PARK_SLOT)
        self._wheel_timer = _Alarm(self._on_wheel)
        self._loop: asyncio.AbstractEventLoop | None = None
        # A probe whose checks start in another process says so: lateness is then measured
        # from the start its result reports, which includes the hand-over.
        self._late_from_result = bool(getattr(probe, "measures_start", False))
        self.checks_done = 0
        self.checks_lost = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.failures: Counter[FailureClass] = Counter()

    # ----- the watched node set -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def address_of(self, node_id: str) -> str | None:
        node = self._nodes.get(node_id)
        return None if node is None else node.address

    def add(self, node_id: str, address: str, first_due: float | None = None) -> None:
        """Watch a node (or replace its address). Without ``first_due`` the first check lands at
        a random point of the node's interval, so a freshly loaded set is never synchronised."""
        if node_id in self._nodes:
            self.update_address(node_id, address)
            if first_due is not None:
                self._schedule(node_id, first_due, soon=True)
            return
        self._nodes[node_id] = _Node(address)
        if first_due is None:
            interval = self._safe_interval(node_id)
            first_due = self._clock() + self._scheduler.rng.uniform(0.0, interval)
        self._schedule(node_id, first_due)

    def remove(self, node_id: str) -> bool:
        """Stop watching a node; a check in flight finishes but its result is dropped."""
        node = self._nodes.pop(node_id, None)
        self._scheduler.remove(node_id)
        self._wheel.unpark(node_id)
        return node is not None

    def update_address(self, node_id: str, address: str) -> None:
        """Point future checks at a new address; a check in flight at the old address is
        followed at once by one at the new address, so the core does not wait a full interval
        to learn whether the node is reachable where it now says it is."""
        node = self._nodes.get(node_id)
        if node is None:
            raise KeyError(node_id)
        if node.address == address:
            return
        node.address = address
        if node.busy:
            node.recheck = True

    def defer(self, node_id: str, due: float) -> None:
        """Put off the node's next check until ``due``: a node that pushes heartbeats is polled
        only once its pushes stop. O(1): the heap entry is moved only when it comes due, so a
        heartbeat costs one attribute write, not a heap operation. A ``due`` earlier than the
        scheduled check (φ suspicion judged the node's silence sooner than its poll interval,
        right after a poll) moves the check forward: one heap operation, only then."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        node.deferred = due
        if node.busy:
            return
        parked = self._wheel.parked_from(node_id)
        if parked is not None:  # moved on when its slot comes, unless due before that
            if due < parked:
                self._park(node_id, due)
            return
        scheduled = self._scheduler.due_of(node_id)
        if scheduled is not None and due < scheduled:
            self._schedule(node_id, due)

    def check_now(self, node_id: str) -> None:
        """Check the node as soon as a worker is free (e.g. after a lease expired), without
        waiting for its due time; if a check is in flight, another follows right after it."""
        node = self._nodes.get(node_id)
        if node is None:
            raise KeyError(node_id)
        node.deferred = 0.0  # asked for now: no push stands in for this check
        self._wheel.unpark(node_id)
        if node.busy:
            node.recheck = True
        else:
            self._schedule(node_id, self._clock(), soon=True)

    # ----- statistics -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and benchmarks; lateness is due time vs. actual start."""
        lateness = self._scheduler.lateness
        return {
            "nodes": len(self._nodes),
            "parked": len(self._wheel),
            "checks_done": self.checks_done,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "failures": {cls.value: n for cls, n in self.failures.items()},
            "checks_lost": self.checks_lost,
            "lateness_count": lateness.count,
            "lateness_p50": lateness.percentile(50),
            "lateness_p99": lateness.percentile(99),
            "lateness_max": lateness.max,
        }

    # ----- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._workers)

    async def start(self) -> None:
        """Start the worker pool and the timer; idempotent."""
        if self._workers:
            return
        self._loop = asyncio.get_running_loop()
        if isinstance(self._probe, OpenableProbe):
            await self._probe.open()
        self._workers = [
            self._loop.create_task(self._worker(), name=f"nodewatch-poller-{i}")
            for i in range(self._concurrency)
        ]
        self._arm_wheel()

    async def stop(self) -> None:
        """Cancel the workers (checks in flight are abandoned, their results dropped), cancel
        the timer and close the probe's session. The node set and schedule are kept."""
        workers, self._workers = self._workers, []
        self._timer.cancel()
        self._wheel_timer.cancel()
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        while self._idle:
            self._idle.popleft().cancel()
        self.in_flight = 0
        # A node whose check was abandoned, or that the timer had just handed to a worker, is
        # in neither the heap nor flight: make it due at once so a restart checks it again.
        now = self._clock()
        for node_id, node in self._nodes.items():
            node.busy = False
            node.recheck = False
            if node_id not in self._scheduler and node_id not in self._wheel:
                self._scheduler.schedule(node_id, now)
        if isinstance(self._probe, ClosableProbe):
            await self._probe.aclose()

    async def __aenter__(self) -> Poller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ----- internals ------------------------------------------------------------------------

    def _safe_interval(self, node_id: str) -> float:
        try:
            return float(self._interval_for(node_id))
        except Exception:
            log.exception("interval_for(%r) failed; using %ss", node_id, self._fallback_interval)
            return self._fallback_interval

    def _schedule(self, node_id: str, due: float, *, soon: bool = False) -> None:
        if soon:
            self._scheduler.schedule_soon(node_id, due)
        else:
            self._scheduler.schedule(node_id, due)
        # Only idle workers wait on the timer; busy ones pull from the heap when they finish.
        if self._idle and (not self._timer.armed or due < self._timer.due):
            self._arm_timer()

    def _arm_timer(self) -> None:
        """Make sure the timer fires at the earliest due time (one timer for all nodes)."""
        loop = self._loop
        if loop is None or not self._workers:
            return
        due = self._scheduler.next_due()
        if due is not None:
            self._timer.arm(loop, due, self._clock())

    def _park(self, node_id: str, due: float) -> None:
        """Put the node in the wheel until ``due`` (pushes stood in for its check)."""
        self._wheel.park(node_id, due)
        if not self._wheel_timer.armed or due < self._wheel_timer.due:
            self._arm_wheel()

    def _arm_wheel(self) -> None:
        loop = self._loop
        if loop is None or not self._workers:
            return
        due = self._wheel.next_due()
        if due is not None:
            self._wheel_timer.arm(loop, due, self._clock())

    def _on_wheel(self) -> None:
        """Slots whose time came: a node that pushes moved on again is parked at its new
        deferral; one whose pushes stopped goes back on the heap, due at its deferral (within
        the slot, so its check starts on time)."""
        now = self._clock()
        nodes, wheel, schedule = self._nodes, self._wheel, self._scheduler.schedule
        horizon = now + _TIMER_SLACK
        moved = False
        for node_id in wheel.take(horizon):
            node = nodes.get(node_id)
            if node is None or node.busy:
                continue  # removed, or a check started meanwhile (check_now)
            due = node.deferred
            if due >= horizon + wheel.slot:
                wheel.park(node_id, due)
                continue
            node.deferred = 0.0
            schedule(node_id, due)
            moved = True
        if moved and self._idle:
            self._arm_timer()
        self._arm_wheel()

    def _on_timer(self) -> None:
        """Hand every node due now to an idle worker; re-arm if idle workers are left.

        Entries that pushes deferred are moved to their new time here, without waking a worker,
        and those due within ``_DEFER_AHEAD`` are moved now too: with every node pushing, heap
        entries come due as often as nodes are watched, and one timer wake-up (plus a worker's)
        per entry was most of what a pushed heartbeat cost. Real checks keep their due time.
        """
        idle = self._idle
        scheduler = self._scheduler
        pop_one = scheduler.pop_one
        nodes = self._nodes
        # Timers may fire a hair early (the loop's clock is not ours and libuv rounds to
        # milliseconds); starting a check 1 ms early beats re-arming for the remainder.
        now = self._clock()
        start_by = now + _TIMER_SLACK
        while idle:
            waiter = idle[0]
            if waiter.done():  # cancelled by stop()
                idle.popleft()
                continue
            item = pop_one(now + _DEFER_AHEAD)
            if item is None:
                break
            node_id, due = item
            node = nodes.get(node_id)
            if node is None:
                continue  # removed since it was scheduled
            if node.deferred > due:
                self._park(node_id, node.deferred)  # pushes stood in for this check
                continue
            if due > start_by:
                scheduler.schedule(node_id, due)  # a real check, not due yet: keep its time
                break
            idle.popleft()
            waiter.set_result(item)
        if idle:
            self._arm_timer()

    async def _worker(self) -> None:
        """Check due nodes, one at a time, until cancelled."""
        loop = asyncio.get_running_loop()
        scheduler = self._scheduler
        pop_one = scheduler.pop_one
        lateness = scheduler.lateness
        nodes = self._nodes
        probe_check = self._probe.check
        clock = self._clock
        idle = self._idle
        late_from_result = self._late_from_result
        while True:
            item = pop_one(clock())
            if item is None:
                waiter: asyncio.Future[tuple[str, float]] = loop.create_future()
                idle.append(waiter)
                self._arm_timer()
                item = await waiter
            node_id, due = item
            node = nodes.get(node_id)
            if node is None:
                continue  # removed between the pop and now
            if node.deferred > due:
                self._park(node_id, node.deferred)  # pushes stood in for this check
                continue
            node.busy = True
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
            started = clock()
            if not late_from_result:
                lateness.record(started - due)
            try:
                result = await probe_check(node_id, node.address)
            except asyncio.CancelledError:
                node.busy = False  # stop() makes the node due again for a restart
                self.in_flight -= 1
                raise
            except CheckLost:
                node.busy = False
                self.in_flight -= 1
                self.checks_lost += 1
                if nodes.get(node_id) is node:
                    # Asked for again meanwhile (check_now, a new address): once more at once;
                    # otherwise at its interval, so a worker in restart backoff is not a busy loop.
                    retry = node.recheck
                    node.recheck = False
                    due = clock() if retry else clock() + self._safe_interval(node_id)
                    self._schedule(node_id, due, soon=True)
                continue
            except Exception as exc:  # a probe bug must not lose the node or kill the worker
                log.exception("probe failed on %s", node_id, extra={"node_id": node_id})
                result = CheckResult(node_id, False, clock(), clock() - started,
                                     FailureClass.ERROR, f"probe error: {exc!r}"[:300])
            if late_from_result:
                lateness.record(result.at - result.latency - due)
            node.busy = False
            self.in_flight -= 1
            self.checks_done += 1
            if nodes.get(node_id) is not node:
                continue  # removed (or removed and re-added) while in flight: stale result
            if not result.ok and result.failure is not None:
                self.failures[result.failure] += 1
            try:
                self._on_result(result)
            except Exception:
                log.exception("on_result failed for %s", node_id, extra={"node_id": node_id})
            if node.recheck:
                node.recheck = False
                self._schedule(node_id, clock(), soon=True)
            else:
                # soon=True: a check_now from on_result (a node just went suspect) must not be
                # pushed back by a whole interval.
                self._schedule(node_id, clock() + self._safe_interval(node_id), soon=True)
