"""Runs configured actions for the coordinator's action requests without ever blocking it.

``submit`` only schedules: each matching action becomes one job, bounded in number (beyond
``max_pending`` a job is refused with an ``action_failed`` event). Jobs for the same node and
action run one after another in submission order (a ``recovered`` never overtakes the
``unhealthy`` before it); different nodes run concurrently up to ``concurrency``. Each attempt
has the action's timeout; failures are retried with exponential backoff and jitter up to the
action's ``retries``, then reported as ``action_failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from nodewatch.config import Config
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Event, NodeState
from nodewatch.respond.actions import Action, ActionCall, ActionError, build_action

__all__ = ["ActionRunner", "Claims", "Emit"]

log = logging.getLogger("nodewatch.respond")


class Emit(Protocol):
    """How the runner reports back: the coordinator mints and stores an event."""

    def __call__(self, kind: str, node_id: str, reason: str, evidence: dict[str, Any]) -> None:
        ...


class Claims(Protocol):
    """Whether this coordinator may run an action now (``coordinator/runs.py``): ``run``,
    ``done`` (another coordinator ran it: settle without running) or ``fenced`` (not this
    coordinator's to run: left due, not settled); and the record that a run ended."""

    async def claim(self, request: ActionRequest, action: str, duration: float) -> str: ...

    async def keep(self, request: ActionRequest, action: str, duration: float) -> str: ...

    async def ended(self, request: ActionRequest, action: str, ok: bool) -> None: ...


class _Unclaimed:
    """One coordinator on its store: every action is this one's to run."""

    async def claim(self, request: ActionRequest, action: str, duration: float) -> str:
        return "run"

    async def keep(self, request: ActionRequest, action: str, duration: float) -> str:
        return "run"

    async def ended(self, request: ActionRequest, action: str, ok: bool) -> None:
        return None


RUN_SLACK = 30.0  # seconds a claimed run may wait for a free slot before a retry


def _context(req: ActionRequest) -> dict[str, str]:
    """The node and event a log record about this action is for (JSON logs' fields)."""
    return {"node_id": req.node_id, "event": req.kind}


def _no_emit(kind: str, node_id: str, reason: str, evidence: dict[str, Any]) -> None:
    log.info("%s %s: %s", kind, node_id, reason, extra={"node_id": node_id, "event": kind})


def _no_settle(request: ActionRequest) -> None:
    return None


def _no_nodes() -> Mapping[str, NodeState]:
    return {}


class ActionRunner:
    """The respond stage behind the coordinator's ``ActionSink`` protocol."""

    def __init__(
        self,
        actions: Sequence[Action],
        *,
        dry_run: bool = False,
        max_pending: int = 10_000,
        concurrency: int = 16,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        close_grace: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.actions = list(actions)
        self.dry_run = dry_run
        self.max_pending = max_pending
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.close_grace = close_grace
        self.rng = rng or random.Random()
        self._emit: Emit = _no_emit
        self._nodes: Callable[[], Mapping[str, NodeState]] = _no_nodes
        self._settled: Callable[[ActionRequest], None] = _no_settle
        self._claims: Claims = _Unclaimed()
        # id(call) -> (jobs of that call still running, whether one was fenced: then the
        # request is left due for its decider, never settled here)
        self._unsettled: dict[int, tuple[int, bool]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._jobs: set[asyncio.Task[None]] = set()
        self._node_jobs: dict[str, set[asyncio.Task[None]]] = {}
        self._key_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._by_kind: dict[str, list[Action]] = {}
        for action in self.actions:
            for kind in action.on:
                self._by_kind.setdefault(kind, []).append(action)
        # Decided once: the dry run path never builds a job.
        self._dispatch = self._record_dry_run if dry_run else self._schedule
        self.succeeded = 0
        self.failed = 0
        self.refused = 0

    @classmethod
    def from_config(cls, config: Config) -> ActionRunner:
        actions = [build_action(cfg, i) for i, cfg in enumerate(config.actions)]
        return cls(actions, dry_run=config.coordinator.dry_run)

    def bind(self, emit: Emit, nodes: Callable[[], Mapping[str, NodeState]],
             settled: Callable[[ActionRequest], None] = _no_settle,
             claims: Claims | None = None) -> None:
        """Connect to the coordinator: where events go, a read-only view of the nodes, whom
        to tell when a request is settled (every action for it ran or gave up), and whom to
        ask before a run (several coordinators on one store)."""
        self._emit = emit
        self._nodes = nodes
        self._settled = settled
        self._claims = claims or _Unclaimed()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------------ ActionSink

    def submit(self, request: ActionRequest, event: Event | None) -> None:
        """Never blocks and never raises: at worst the request is refused with an event."""
        matching = self._by_kind.get(request.kind)
        if not matching:
            asyncio.get_running_loop().call_soon(self._settled, request)
            return
        node = self._nodes().get(request.node_id)
        call = ActionCall(request=request, event=event.to_json() if event else None,
                          node=dataclasses.replace(node) if node is not None else None,
                          nodes=self._nodes)
        self._dispatch(call, matching)

    async def aclose(self) -> None:
        """Give running jobs a moment (``close_grace``) to finish, cancel the rest, close
        sessions."""
        if self._jobs:
            _, still = await asyncio.wait(set(self._jobs), timeout=self.close_grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for action in self.actions:
            await action.close()

    async def join(self, node_ids: Collection[str] | None = None) -> None:
        """Wait until every submitted job (of these nodes) has finished; callers bound it
        with a timeout."""
        while True:
            jobs = set(self._jobs) if node_ids is None else {
                t for i in node_ids for t in self._node_jobs.get(i, ())}
            if not jobs:
                return
            await asyncio.gather(*jobs, return_exceptions=True)

    def _node_job_done(self, node_id: str, task: asyncio.Task[None]) -> None:
        jobs = self._node_jobs.get(node_id)
        if jobs is not None:
            jobs.discard(task)
            if not jobs:
                del self._node_jobs[node_id]

    # ------------------------------------------------------------------ paths

    def _record_dry_run(self, call: ActionCall, matching: list[Action]) -> None:
        req = call.request
        would_run = [{"action": a.name, **a.describe(call)} for a in matching]
        # call_soon: the coordinator is in the middle of handling the outcome that asked.
        asyncio.get_running_loop().call_soon(
            self._emit, "action_dry_run", req.node_id,
            f"dry run: would run {len(matching)} action(s) for {req.kind}",
            {"dry_run": True, "would_run": would_run, "for_event": req.event_id,
             "on": req.kind})
        asyncio.get_running_loop().call_soon(self._settled, req)

    def _schedule(self, call: ActionCall, matching: list[Action]) -> None:
        loop = asyncio.get_running_loop()
        # Settled when the last of its jobs ends (a refused one ends at once).
        self._unsettled[id(call)] = (len(matching), False)
        for action in matching:
            if len(self._jobs) >= self.max_pending:
                self.refused += 1
                loop.call_soon(self._emit, "action_failed", call.request.node_id,
                               f"{action.name} for {call.request.kind} not run: "
                               f"{self.max_pending} actions already pending",
                               self._evidence(action, call, 0, "queue full"))
                self._job_done(call)
                continue
            key = (action.name, call.request.node_id)
            lock, users = self._key_locks.get(key) or (asyncio.Lock(), 0)
            self._key_locks[key] = (lock, users + 1)
            task = loop.create_task(self._job(action, call, key, lock),
                                    name=f"nodewatch-action-{action.name}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)
            node_jobs = self._node_jobs.setdefault(call.request.node_id, set())
            node_jobs.add(task)
            task.add_done_callback(functools.partial(self._node_job_done,
                                                     call.request.node_id))

    async def _job(self, action: Action, call: ActionCall, key: tuple[str, str],
                   lock: asyncio.Lock) -> None:
        cancelled = fenced = False
        try:
            # Tasks start in creation order and the lock is FIFO: per node, submission order.
            async with lock:
                verdict = await self._attempts(action, call)
                if verdict in ("ran", "failed"):
                    await self._claims.ended(call.request, action.name, verdict == "ran")
                fenced = verdict == "fenced"
        except asyncio.CancelledError:
            cancelled = True  # stopped, not run: it stays due and runs after the restart
            raise
        finally:
            held, users = self._key_locks[key]
            if users <= 1:
                del self._key_locks[key]
            else:
                self._key_locks[key] = (held, users - 1)
            if not cancelled:
                self._job_done(call, fenced)

    def _duration(self, action: Action) -> float:
        """How long a claim lives unless kept: one attempt, a backoff and a wait for a slot
        (it is kept before every retry); past it another coordinator may run it again."""
        return action.timeout + self.max_backoff + RUN_SLACK

    def _job_done(self, call: ActionCall, fenced: bool = False) -> None:
        left, was_fenced = self._unsettled.get(id(call), (1, False))
        fenced = fenced or was_fenced
        if left > 1:
            self._unsettled[id(call)] = (left - 1, fenced)
            return
        self._unsettled.pop(id(call), None)
        if fenced:
            log.info("%s on %s: not this coordinator's to run any more; left due for its "
                     "decider", call.request.kind, call.request.node_id,
                     extra=_context(call.request))
            return
        self._settled(call.request)

    async def _attempts(self, action: Action, call: ActionCall) -> str:
        """``ran`` or ``failed`` (after every retry); ``done`` or ``fenced`` as the claim
        answered before an attempt (another coordinator ran it; not this one's to run)."""
        req = call.request
        attempts = action.retries + 1
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                async with self._slots:
                    # Claimed (or kept) holding the slot, so that the claim's time is the
                    # attempt's, not a wait behind a backlog.
                    ask = self._claims.claim if attempt == 1 else self._claims.keep
                    verdict = await ask(req, action.name, self._duration(action))
                    if verdict != "run":
                        return verdict
                    async with asyncio.timeout(action.timeout):
                        await action.run(call)
                self.succeeded += 1
                log.info("%s for %s on %s done (attempt %d)", action.name, req.kind,
                         req.node_id, attempt, extra=_context(req))
                return "ran"
            except TimeoutError:
                error = f"timed out after {action.timeout:g}s"
            except ActionError as exc:
                error = str(exc)
            except Exception as exc:  # a bug in an action must not kill the runner
                error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("%s raised unexpectedly", action.name, extra=_context(req))
            if attempt < attempts:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + 0.5 * self.rng.random()  # jitter: retries never synchronize
                log.warning("%s for %s on %s failed (attempt %d of %d): %s; retry in %.2fs",
                            action.name, req.kind, req.node_id, attempt, attempts, error, delay,
                            extra=_context(req))
                await asyncio.sleep(delay)
        self.failed += 1
        log.warning("%s for %s on %s failed after %d attempts: %s", action.name, req.kind,
                    req.node_id, attempts, error, extra=_context(req))
        self._emit("action_failed", req.node_id,
                   f"{action.name} for {req.kind} failed after {attempts} attempts: {error}",
                   self._evidence(action, call, attempts, error))
        return "failed"

    @staticmethod
    def _evidence(action: Action, call: ActionCall, attempts: int, error: str
                  ) -> dict[str, Any]:
        return {"action": action.name, "on": call.request.kind,
                "for_event": call.request.event_id, "attempts": attempts, "error": error,
                **action.describe(call)}
