"""Action runs claimed in etcd, so that an action runs once across a change of decider.

A transition and its actions are stored first (``actions_due`` on the node); the respond stage
runs them after, and the settle is written after that. With several coordinators two gaps
remain: a decider that lost its lease while its write was in flight still ran the action
(its write landed; the next decider read it and ran it too), and a decider whose settle
write never landed (cut off from etcd right after the run) left the action due for the next
one. Both are closed here:

- Before an action runs, its run is claimed: ``P/runs/<event>/<kind>/<action>`` created only
  if absent, fenced by the decider's lease (``EtcdStore.fence``). A coordinator that is not
  the decider any more gets "fenced" and does not run it.
- When it ends (ran, or gave up after its retries), the record says so, unfenced: a decider
  deposed while the action ran still tells the next one. The next one, finding an ended
  record, settles the action without running it; finding a claim still running, waits for it
  until the claim's own deadline (the action's timeouts and retries), then runs it again with
  a warning: its holder crashed mid-run, or could not reach etcd for that long.

So an action runs once, except after a crash in the middle of it (run again: at least once)
or a holder cut off from etcd from its run's start to past its deadline (two runs, the second
logged). Records live ``RUN_TTL`` (2 h) on etcd leases. SQLite and Redis have one coordinator:
nothing is claimed there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from nodewatch.detect.outcome import ActionRequest
from nodewatch.store.etcd import EtcdStore

__all__ = ["EtcdRuns", "RunRecord"]

log = logging.getLogger("nodewatch.respond")

RETRY = 0.5  # seconds before a claim is tried again (etcd unreachable, lease being renewed)
MAX_RETRY = 5.0
POLL = 1.0  # how often a claim still running elsewhere is read again
END_ATTEMPTS = 3


class RunRecord(msgspec.Struct, frozen=True):
    """Who runs (ran) an action, and until when its claim holds (wall clock: compared by
    other processes)."""

    by: str
    state: str  # "running" or "ended"
    until: float = 0.0
    result: str = ""  # "ok" or "failed", once ended


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(RunRecord).decode


def run_name(request: ActionRequest, action: str) -> str:
    return f"{request.event_id}/{request.kind}/{action}"


class EtcdRuns:
    """The runner's ``Claims`` on an etcd store. ``may_decide(node_id)``: whether this
    coordinator decides for the node, or may again (a leader whose lease is unconfirmed):
    while it does, a claim refused by the fence is tried again (the fence moves to the new
    lease once the leadership is confirmed); once it does not, the action is left due for the
    decider."""

    def __init__(self, store: EtcdStore, identity: str, may_decide: Callable[[str], bool],
                 timeout: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.identity = identity
        self.may_decide = may_decide
        self.timeout = timeout
        self.clock = clock
        self.sleep = sleep
        self.reruns = 0  # claims taken over from a holder that never said its run ended
        self.skipped = 0  # actions found already run by another coordinator

    async def claim(self, request: ActionRequest, action: str, duration: float) -> str:
        """``run``: claimed, run it now. ``done``: another coordinator ran it: settle it
        without running. ``fenced``: not this coordinator's to run (left due)."""
        run = run_name(request, action)
        delay = RETRY
        revision: int | None = None  # of a claim whose time is up
        while True:
            if not self.may_decide(request.node_id):
                return "fenced"
            record = _encode(RunRecord(self.identity, "running", self.clock() + duration))
            try:
                async with asyncio.timeout(self.timeout):
                    if revision is None:
                        verdict, theirs, at = await self.store.claim_run(
                            run, request.node_id, record)
                    else:
                        verdict, theirs, at = await self.store.take_over_run(
                            run, request.node_id, record, revision)
            except Exception as error:  # noqa: BLE001 - timeouts and every etcd error alike
                log.warning("claiming %s for %s on %s failed (%s); trying again", action,
                            request.kind, request.node_id, type(error).__name__)
                await self.sleep(delay)
                delay = min(MAX_RETRY, delay * 2)
                continue
            if verdict == "claimed":
                if revision is not None:
                    self.reruns += 1
                    log.warning("%s for %s on %s: its previous run never said it ended by its "
                                "deadline; running it again", action, request.kind,
                                request.node_id)
                return "run"
            if verdict == "fenced":
                revision = None
                await self.sleep(delay)
                delay = min(MAX_RETRY, delay * 2)
                continue
            try:
                held = _decode(theirs)
            except msgspec.DecodeError:
                held = RunRecord("", "running", 0.0)  # unreadable: as a claim whose time is up
            if held.state == "ended":
                self.skipped += 1
                log.info("%s for %s on %s already ran (%s): not run again", action,
                         request.kind, request.node_id, held.by or "unknown")
                return "done"
            left = held.until - self.clock()
            if left > 0:
                revision = None
                await self.sleep(min(left, POLL))
                continue
            revision = at

    async def ended(self, request: ActionRequest, action: str, ok: bool) -> None:
        """Record that the run ended (bounded tries; a failure is logged, and the worst it
        costs is a second run by the next decider after the claim's deadline)."""
        record = _encode(RunRecord(self.identity, "ended", 0.0, "ok" if ok else "failed"))
        for attempt in range(1, END_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self.timeout):
                    await self.store.end_run(run_name(request, action), record)
                return
            except Exception as error:  # noqa: BLE001 - timeouts and every etcd error alike
                if attempt == END_ATTEMPTS:
                    log.warning("could not record that %s for %s on %s ended (%s): the next "
                                "decider may run it again after its deadline", action,
                                request.kind, request.node_id, type(error).__name__)
                    return
                await self.sleep(RETRY * attempt)
