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
  record, settles the action without running it; finding a claim still running, waits until
  the claim's own lease expires (as long as the action's timeouts, retries and backoff take;
  etcd times it, so no host's clock matters), then runs it again with a warning: its holder
  crashed mid-run, or could not reach etcd for that long.

So an action runs once, except after a crash in the middle of it (run again: at least once)
or a holder cut off from etcd from its run's start until its claim expired (two runs, the
second logged). Ended records live ``RUN_TTL`` (2 h) on etcd leases. SQLite and Redis have one
coordinator: nothing is claimed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
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
    """Who runs (ran) an action. A running claim is on a lease of the run's longest duration,
    so it ends by itself when its holder dies (timed by etcd, not by any host's clock)."""

    by: str
    state: str  # "running" or "ended"
    result: str = ""  # "ok" or "failed", once ended
    nonce: str = ""  # tells this claim from the holder's other claims of the same run


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(RunRecord).decode


def _read(value: bytes) -> RunRecord | None:
    try:
        return _decode(value)
    except msgspec.DecodeError:
        return None


def run_name(request: ActionRequest, action: str) -> str:
    return f"{request.event_id}/{request.kind}/{action}"


class EtcdRuns:
    """The runner's ``Claims`` on an etcd store. ``may_decide(node_id)``: whether this
    coordinator decides for the node, or may again (a leader whose lease is unconfirmed):
    while it does, a claim refused by the fence is tried again (the fence moves to the new
    lease once the leadership is confirmed); once it does not, the action is left due for the
    decider."""

    def __init__(self, store: EtcdStore, identity: str, may_decide: Callable[[str], bool],
                 timeout: float,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.identity = identity
        self.may_decide = may_decide
        self.timeout = timeout
        self.sleep = sleep
        self.reruns = 0  # claims taken over from a holder that never said its run ended
        self.skipped = 0  # actions found already run by another coordinator
        self._mine: dict[str, tuple[bytes, int]] = {}  # run -> our claim's record, lease

    async def claim(self, request: ActionRequest, action: str, duration: float) -> str:
        """``run``: claimed, run it now. ``done``: another coordinator ran it: settle it
        without running. ``fenced``: not this coordinator's to run (left due)."""
        run = run_name(request, action)
        verdict = await self._claim(run, request, action, duration, self._record())
        if verdict != "run":
            self._mine.pop(run, None)
        return verdict

    async def keep(self, request: ActionRequest, action: str, duration: float) -> str:
        """Before a retry: the claim kept alive for another ``duration``, as ``claim``
        answers. An expired claim (the wait for a retry outlasted it) is claimed again, and
        so may turn out to be another coordinator's by now."""
        run = run_name(request, action)
        mine = self._mine.get(run)
        if not self.may_decide(request.node_id):
            self._mine.pop(run, None)
            return "fenced"
        if mine is not None:
            with contextlib.suppress(Exception):  # unknown: claim again, which tells
                async with asyncio.timeout(self.timeout):
                    if await self.store.refresh_run(mine[1]):
                        return "run"
        verdict = await self._claim(run, request, action, duration,
                                    mine[0] if mine is not None else self._record())
        if verdict != "run":
            self._mine.pop(run, None)
        return verdict

    def _record(self) -> bytes:
        return _encode(RunRecord(self.identity, "running", nonce=secrets.token_hex(8)))

    async def _claim(self, run: str, request: ActionRequest, action: str, duration: float,
                     record: bytes) -> str:
        delay = RETRY
        waited = False  # on another's claim that then expired without saying it ended
        revision = 0  # of a claim that cannot expire by itself (no lease, unreadable)
        while True:
            if not self.may_decide(request.node_id):
                return "fenced"
            try:
                async with asyncio.timeout(self.timeout):
                    verdict, theirs, at, lease = await self.store.claim_run(
                        run, request.node_id, record, duration, revision)
                if verdict == "taken" and theirs == record:
                    verdict = "claimed"  # an earlier try of ours landed, unanswered
                elif verdict == "taken":
                    held = _read(theirs)
                    if held is not None and held.state == "ended":
                        self.skipped += 1
                        log.info("%s for %s on %s already ran (%s): not run again", action,
                                 request.kind, request.node_id, held.by or "unknown")
                        return "done"
                    if held is None or not lease:
                        revision = at  # replaced, not waited out: it never expires
                        continue
                    waited = True
                    await self._wait_out(run, at, request.node_id)
                    continue
            except Exception as error:  # noqa: BLE001 - timeouts and every etcd error alike
                log.warning("claiming %s for %s on %s failed (%s); trying again", action,
                            request.kind, request.node_id, type(error).__name__)
                await self.sleep(delay)
                delay = min(MAX_RETRY, delay * 2)
                continue
            if verdict == "claimed":
                self._mine[run] = (record, lease)
                if waited or revision:
                    self.reruns += 1
                    log.warning("%s for %s on %s: its previous run's claim expired without "
                                "saying it ended; running it again", action, request.kind,
                                request.node_id)
                return "run"
            revision = 0  # fenced: the fence moves to a new lease once the leadership is back
            await self.sleep(delay)
            delay = min(MAX_RETRY, delay * 2)

    async def _wait_out(self, run: str, revision: int, node_id: str) -> None:
        """Until the claim read at ``revision`` is gone (its lease expired: etcd times it) or
        replaced (ended, or taken by another), or this coordinator no longer decides."""
        while self.may_decide(node_id):
            await self.sleep(POLL)
            async with asyncio.timeout(self.timeout):
                current = await self.store.get_run(run)
            if current is None or current[1] != revision:
                return

    async def ended(self, request: ActionRequest, action: str, ok: bool) -> None:
        """Record that the run ended (bounded tries; a failure is logged, and the worst it
        costs is a second run by the next decider after the claim's deadline)."""
        self._mine.pop(run_name(request, action), None)
        record = _encode(RunRecord(self.identity, "ended", "ok" if ok else "failed"))
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
