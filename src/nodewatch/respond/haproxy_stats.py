"""HAProxy as an observer of gray failures: its own per-server counters (``show stat`` over
the admin socket the haproxy action already uses) become callers' counts for the outlier rule,
so a real load balancer is an observer with no extra software (README, "Gray failures").

Three parts, each testable alone: :func:`parse_show_stat` (CSV by field name, pure),
:class:`StatDeltas` (per-interval deltas, counter resets, pure) and :class:`HaproxyObserver`
(the bounded poll loop the coordinator runs while it leads).
"""

from __future__ import annotations

import asyncio
import csv
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from nodewatch.config import ActionConfig, Config
from nodewatch.model import CallerObservation
from nodewatch.respond.actions import ActionError, haproxy_command, node_for_haproxy_server

__all__ = ["HaproxyObserver", "ObserveCallers", "ServerStats", "StatDeltas", "StatFormatError",
           "build_observers", "parse_show_stat", "show_stat_command"]

log = logging.getLogger("nodewatch.respond")

# The caller's verb (``Coordinator.observe_callers``): source, observations -> unknown node ids.
ObserveCallers = Callable[[str, Sequence[CallerObservation]], list[str]]
Command = Callable[[str, str], Awaitable[str]]

_PROXY_ROWS = ("FRONTEND", "BACKEND")
_STATUS_CLASSES = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")


class StatFormatError(ValueError):
    """The answer is not ``show stat`` CSV (no ``# pxname,svname,...`` header)."""


@dataclass(frozen=True, slots=True)
class ServerStats:
    """One server's cumulative counters as HAProxy reports them (a missing or empty field is
    None: older versions and ``mode tcp`` leave some out).

    ``responses`` is ``req_tot`` (HTTP responses the server sent: HAProxy counts a request
    there only once it was answered), else the ``hrsp_*`` classes summed; ``stot`` (sessions,
    retries included) stands in only when neither exists (``mode tcp``)."""

    server: str
    responses: int | None
    sessions: int | None
    http_5xx: int
    connect_errors: int  # econ: the request never reached the server
    response_errors: int  # eresp: the server broke off or sent garbage
    rtime_ms: float | None  # HAProxy's average over its last 1024 responses, not a p99
    status: str  # UP, DOWN, DRAIN, MAINT, "no check"...
    check_status: str  # L7OK, L4CON, ... ("" without health checks)

    @property
    def requests(self) -> int | None:
        """Requests the server was given: answered ones plus those that failed on the way."""
        if self.responses is not None:
            return self.responses + self.connect_errors + self.response_errors
        return self.sessions

    @property
    def errors(self) -> int:
        """What callers saw fail: 5xx answers, connections refused or broken, bad answers."""
        return self.http_5xx + self.connect_errors + self.response_errors


def show_stat_command(backend: str) -> str:
    """``show stat`` for one proxy's servers only (type 4 = servers, -1 = all of them)."""
    return f"show stat {backend} 4 -1"


def _int(row: Mapping[str, str | None], key: str) -> int | None:
    value = row.get(key)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def parse_show_stat(text: str, backend: str) -> dict[str, ServerStats]:
    """The servers of ``backend`` in a ``show stat`` answer, by server name; fields are read
    by the names of the ``# pxname,svname,...`` header, never by position (the column set
    grows with every HAProxy release). A row without a way to count requests is left out."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# pxname,")), None)
    if start is None:
        first = next((line for line in lines if line.strip()), "")
        raise StatFormatError(f"not show stat CSV: {first[:120]!r}")
    header = lines[start][2:].split(",")
    if "svname" not in header:
        raise StatFormatError("show stat header without svname")
    servers: dict[str, ServerStats] = {}
    for row in csv.DictReader(lines[start + 1:], fieldnames=header):
        name = row.get("svname") or ""
        if row.get("pxname") != backend or not name or name in _PROXY_ROWS:
            continue
        classes = [_int(row, key) for key in _STATUS_CLASSES]
        responses = _int(row, "req_tot")
        if responses is None and any(c is not None for c in classes):
            responses = sum(c or 0 for c in classes)
        sessions = _int(row, "stot")
        if responses is None and sessions is None:
            continue
        rtime = _int(row, "rtime")
        servers[name] = ServerStats(
            server=name, responses=responses, sessions=sessions,
            http_5xx=_int(row, "hrsp_5xx") or 0, connect_errors=_int(row, "econ") or 0,
            response_errors=_int(row, "eresp") or 0,
            rtime_ms=float(rtime) if rtime is not None else None,
            status=row.get("status") or "", check_status=row.get("check_status") or "")
    return servers


class StatDeltas:
    """Turns successive ``show stat`` snapshots into per-interval counts per node.

    The first snapshot of a server is its baseline. A counter that went back (HAProxy reloaded
    or its counters were cleared) makes that server's interval unknowable: it is skipped and
    the new value is the baseline. So is an interval longer than ``max_span`` (the outlier
    window): its requests would count in a window they mostly do not belong to."""

    def __init__(self, max_span: float) -> None:
        self.max_span = max_span
        self._last: dict[str, ServerStats] = {}
        self._at: float | None = None
        self.resets = 0  # servers whose interval was skipped for a counter that went back
        self.unnamed: set[str] = set()  # server names that cannot be node ids

    def advance(self, current: Mapping[str, ServerStats], now: float) -> list[CallerObservation]:
        """The observations of the interval since the previous snapshot (none for the first)."""
        span = None if self._at is None else now - self._at
        previous, self._last, self._at = self._last, dict(current), now
        if span is None or span <= 0 or span > self.max_span:
            return []
        out: list[CallerObservation] = []
        for name, stats in current.items():
            node_id = node_for_haproxy_server(name)
            if node_id is None:
                self.unnamed.add(name)
                continue
            before = previous.get(name)
            if before is None:
                continue  # a new server: this snapshot is its baseline
            observation = _delta(node_id, before, stats, span)
            if observation is None:
                self.resets += 1
            elif observation.requests > 0:
                out.append(observation)
        return out


def _delta(node_id: str, before: ServerStats, now: ServerStats,
           span: float) -> CallerObservation | None:
    """One server's interval; None when a counter went back (a reload or ``clear counters``)."""
    if (before.responses is None) != (now.responses is None):
        return None  # the counting changed under us (a different HAProxy): start again
    pairs = [(before.requests, now.requests), (before.http_5xx, now.http_5xx),
             (before.connect_errors, now.connect_errors),
             (before.response_errors, now.response_errors),
             (before.responses, now.responses), (before.sessions, now.sessions)]
    if any(a is not None and b is not None and b < a for a, b in pairs):
        return None
    requests = (now.requests or 0) - (before.requests or 0)
    errors = min(requests, now.errors - before.errors)
    answered = (now.responses or 0) - (before.responses or 0)
    # rtime is a running average: it says something of this interval only if it answered.
    latency = now.rtime_ms if answered > 0 else None
    return CallerObservation(node_id=node_id, requests=float(requests), errors=float(errors),
                             latency_p99_ms=latency, window=span)


class HaproxyObserver:
    """Polls one backend's ``show stat`` every ``interval`` and hands each interval's counts
    to ``observe`` as source ``haproxy:<backend>``.

    Every poll is bounded by ``timeout``; a failing socket or an answer that is not CSV is
    logged once per outage and retried on the next beat, so it costs detection nothing. The
    coordinator runs :meth:`run` only while it leads (a lead task), so followers never poll."""

    def __init__(self, socket_path: str, backend: str, *, interval: float, timeout: float,
                 max_span: float, clock: Callable[[], float] | None = None,
                 command: Command = haproxy_command) -> None:
        self.socket_path = socket_path
        self.backend = backend
        self.interval = interval
        self.timeout = timeout
        self.max_span = max_span
        self.source = f"haproxy:{backend}"
        self._clock = clock
        self._command = command
        self.deltas = StatDeltas(max_span)
        self.outage: str = ""  # what is failing now, "" while the socket answers
        self.polls = 0
        self._told_unknown: frozenset[str] = frozenset()
        self._told_unnamed: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg: ActionConfig, max_span: float) -> HaproxyObserver:
        """For one ``[[actions]] type = "haproxy"`` entry: its socket, backend and timeout."""
        return cls(cfg.socket, cfg.backend, interval=float(cfg.observe_interval),
                   timeout=min(float(cfg.timeout), max_span), max_span=max_span)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def poll_once(self, observe: ObserveCallers) -> int:
        """One snapshot: read, parse, take the deltas, hand them on. Returns how many
        observations went to ``observe`` (0 for a baseline or a failed poll)."""
        self.polls += 1
        try:
            async with asyncio.timeout(self.timeout):
                text = await self._command(self.socket_path, show_stat_command(self.backend))
            servers = parse_show_stat(text, self.backend)
        except (ActionError, StatFormatError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.timeout:g}s"
            if not self.outage:
                log.warning("haproxy observer %s: %s; retrying every %gs (counts of the "
                            "outage are skipped)", self.source, why, self.interval)
            self.outage = why
            self.deltas = StatDeltas(self.max_span)  # the gap is not one interval
            return 0
        if self.outage:
            log.info("haproxy observer %s: answering again", self.source)
            self.outage = ""
        observations = self.deltas.advance(servers, self._now())
        self._tell_unnamed()
        if observations:
            self._tell_unknown(observe(self.source, observations))
        return len(observations)

    def _tell_unnamed(self) -> None:
        unnamed = frozenset(self.deltas.unnamed)
        if unnamed - self._told_unnamed:
            log.info("haproxy observer %s: servers that cannot be node ids are not observed: "
                     "%s", self.source, ", ".join(sorted(unnamed)[:10]))
        self._told_unnamed = unnamed

    def _tell_unknown(self, unknown: list[str]) -> None:
        """Log a new set of servers the coordinator does not know, once."""
        names = frozenset(unknown)
        if names - self._told_unknown:
            log.info("haproxy observer %s: servers that are no known node: %s", self.source,
                     ", ".join(sorted(names)[:10]))
        self._told_unknown = names

    async def run(self, observe: ObserveCallers) -> None:
        """Poll on a steady beat until cancelled; a fresh baseline for every term."""
        self.deltas = StatDeltas(self.max_span)
        loop = asyncio.get_running_loop()
        beat = loop.time()
        while True:
            try:
                await self.poll_once(observe)
            except Exception:  # the caller's verb failing must not end the observer
                log.exception("haproxy observer %s: poll failed; retrying", self.source)
            beat += self.interval
            now = loop.time()
            if beat < now:  # a slow poll: skip the beats it missed rather than burst
                beat = now + self.interval - (now - beat) % self.interval
            await asyncio.sleep(beat - now)


def build_observers(config: Config) -> list[HaproxyObserver]:
    """One observer per ``[[actions]] type = "haproxy"`` with ``observe`` (the default),
    none while the outlier rule is off (nobody would read the counts)."""
    if not config.outliers.enabled:
        return []
    window = float(config.outliers.window)
    return [HaproxyObserver.from_config(action, window) for action in config.actions
            if action.type == "haproxy" and action.observe]
