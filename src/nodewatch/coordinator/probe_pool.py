"""A probe that runs the HTTP checks in K worker processes, for more checks/s than one core.

The coordinator process keeps the scheduler, the core and the store; each check it hands to
a worker costs it a few microseconds (one dict entry, a share of one msgpack write and read
per loop turn) instead of a whole aiohttp request. See :mod:`nodewatch.coordinator.probe_worker`
for the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import cast

import msgspec

from nodewatch.config import Config
from nodewatch.coordinator.poller import CheckLost
from nodewatch.coordinator.probe_worker import CLOCKS, HEADER, Request, frame
from nodewatch.coordinator.probes import HttpPeerProbe
from nodewatch.model import CheckResult, PeerVote

__all__ = ["ProcessProbe"]

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode_results = msgspec.msgpack.Decoder(list[tuple[int, CheckResult | None]]).decode

_YOUNG = 5.0  # a worker that dies sooner than this after its start is restarted with backoff
_MAX_BACKOFF = 5.0


class _Worker(asyncio.Protocol):
    """One worker process, its end of the socket, and the checks it has in flight."""

    def __init__(self, pool: ProcessProbe, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[asyncio.Future[CheckResult], float]] = {}
        self.outbox: list[Request] = []
        self.flushing = False
        self.buffer = bytearray()
        self.ready: asyncio.Future[None] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.backoff = 0.0
        self.accepting = True  # False while a crashing worker waits out its backoff

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        pending = self.pending
        while len(buffer) - start >= HEADER:
            size = int.from_bytes(buffer[start:start + HEADER], "little")
            end = start + HEADER + size
            if len(buffer) < end:
                break
            for request_id, result in _decode_results(memoryview(buffer)[start + HEADER:end]):
                entry = pending.pop(request_id, None)
                if entry is None or entry[0].done():
                    continue  # abandoned by a cancelled check
                if result is None:
                    entry[0].set_exception(CheckLost("the probe worker's loop stalled"))
                else:
                    entry[0].set_result(result)
            start = end
        del buffer[:start]
        if self.ready is not None and not self.ready.done():
            self.ready_at = time.monotonic()
            self.ready.set_result(None)  # the worker's first frame is an empty "ready" batch

    def flush(self) -> None:
        """Write every request queued this loop turn in one frame."""
        self.flushing = False
        transport = self.transport
        if transport is None or not self.outbox:
            return
        batch, self.outbox = self.outbox, []
        transport.write(frame(_encode(batch)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buffer.clear()
        self.pool._lost(self)


class ProcessProbe:
    """Hands each check to one of ``processes`` worker processes, each an :class:`HttpProbe`.

    A node always goes to the same worker (CRC32 of its id), so its kept-alive connection
    stays warm. Requests and results cross a socketpair as msgpack batches, one write per loop
    turn each way. Each worker's connector gets the whole ``concurrency``, not a share: hashing
    does not split the checks in flight evenly at every moment, and a check that queued for a
    connection slot would eat its connect timeout. Backpressure is the poller's: it never has
    more than ``concurrency`` checks in flight, so no queue here can hold more than that.

    A worker that dies (or answers nothing for ``timeout + hang_grace``, and is killed) is
    replaced at once, or after a growing backoff if it keeps dying young. Its checks in flight
    raise :class:`CheckLost`, and so do checks of its nodes during a backoff: the poller passes
    nothing to the core for them and tries the node again at its interval. A lost check is the
    coordinator's fault, so it must not count against the node as a failure would, nor as a
    success: it is simply not an observation, and cannot cause a false positive; the cost is
    one interval of delay for those nodes, once per crash. A worker whose own loop stalls past
    ``max_loop_lag`` reports its failed checks of that time as lost too, just as the
    coordinator's loop-lag gate holds confirmations when its own loop stalls.
    """

    # Checks start in another process, after the hand-over: the poller measures lateness from
    # the start the result reports (``at - latency``), not from the hand-over.
    measures_start = True

    def __init__(
        self,
        *,
        processes: int,
        timeout: float,
        connect_timeout: float,
        max_bytes: int,
        concurrency: int,
        keepalive_timeout: float = 75.0,
        max_loop_lag: float = 1.0,
        clock: Callable[[], float] = time.time,
        python: str = sys.executable,
        start_timeout: float = 30.0,
        hang_grace: float = 5.0,
        peer_tokens: Sequence[str] = (),
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        clock_name = next((name for name, fn in CLOCKS.items() if fn is clock), None)
        if clock_name is None:
            raise ValueError("a process probe needs a system-wide clock: time.time or "
                             "time.monotonic")
        self.processes = processes
        self.timeout = timeout
        # Peer probes are rare (one per suspect node): they go from this process.
        self._peers = HttpPeerProbe(timeout=timeout, connect_timeout=connect_timeout,
                                    tokens=peer_tokens)
        self._argv = [
            python, "-m", "nodewatch.coordinator.probe_worker", "--parent", str(os.getpid()),
            "--timeout", repr(timeout), "--connect-timeout", repr(min(connect_timeout, timeout)),
            "--max-bytes", str(max_bytes), "--concurrency", str(concurrency),
            "--keepalive-timeout", repr(keepalive_timeout), "--max-loop-lag", repr(max_loop_lag),
            "--clock", clock_name,
        ]
        self._start_timeout = start_timeout
        self._hang_grace = hang_grace  # beyond the timeout, before a silent worker is hung
        self._workers = [_Worker(self, i) for i in range(processes)]
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._closing = False
        self.restarts = 0
        self.lost = 0

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float] = time.time) -> ProcessProbe:
        """The probe for ``[coordinator] poller_processes`` > 1, with the same timeouts, body
        cap and keep-alive as :meth:`HttpProbe.from_config`."""
        detection = config.detection
        return cls(
            processes=config.coordinator.poller_processes,
            timeout=detection.timeout,
            connect_timeout=detection.connect_timeout,
            max_bytes=detection.max_response,
            concurrency=detection.concurrency,
            keepalive_timeout=max(15.0, 2.0 * detection.healthy_interval),
            max_loop_lag=config.coordinator.max_loop_lag,
            clock=clock,
            peer_tokens=config.coordinator.agent_tokens,
        )

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids, by index (None while one is being replaced)."""
        return [worker.pid for worker in self._workers]

    def worker_for(self, node_id: str) -> int:
        return zlib.crc32(node_id.encode()) % self.processes

    # ----- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Start every worker and wait until each has said it is ready; idempotent."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        await self._peers.open()
        await asyncio.gather(*(self._spawn(worker) for worker in self._workers))
        waits = [w.ready for w in self._workers if w.ready is not None]
        try:
            async with asyncio.timeout(self._start_timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            await self.aclose()
            raise RuntimeError(f"probe workers not ready after {self._start_timeout:g}s") from None
        self._watchdog = self._loop.create_task(self._watch(), name="nodewatch-probe-watchdog")

    async def aclose(self) -> None:
        """Close every socket (a worker exits on end of file) and reap every process; whatever
        is still running after two seconds is killed. Checks in flight raise CheckLost."""
        self._closing = True
        await self._peers.aclose()
        tasks = [t for t in (self._watchdog, *self._restarts) if t is not None]
        self._watchdog = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in self._workers:
            if worker.transport is not None:
                worker.transport.close()
        await asyncio.gather(*(self._reap(worker, grace=2.0) for worker in self._workers))
        for worker in self._workers:
            self._fail_pending(worker, "the probe is closing")
        self._loop = None

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = theirs.fileno()
            # Spawned from the loop thread on purpose: the worker's parent-death signal fires
            # when the thread that forked it exits, so an executor thread would not do.
            worker.process = await asyncio.create_subprocess_exec(
                *self._argv, "--fd", str(fd), pass_fds=(fd,), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.started_at = time.monotonic()
        worker.ready = loop.create_future()
        await loop.create_unix_connection(lambda: worker, sock=ours)
        worker.accepting = True
        worker.flush()  # requests queued while the worker was being replaced

    async def _reap(self, worker: _Worker, grace: float) -> int | None:
        process = worker.process
        if process is None:
            return None
        try:
            async with asyncio.timeout(grace):
                return await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return await process.wait()

    def _fail_pending(self, worker: _Worker, why: str) -> None:
        pending, worker.pending = worker.pending, {}
        worker.outbox.clear()
        for future, _sent in pending.values():
            if not future.done():
                future.set_exception(CheckLost(why))

    def _lost(self, worker: _Worker) -> None:
        """The worker's socket closed: its checks are lost, and unless we are closing, a new
        worker takes its place."""
        if self._closing:
            return
        self.lost += len(worker.pending)
        self._fail_pending(worker, f"probe worker {worker.pid} exited")
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(self._replace(worker), name=f"nodewatch-probe-{worker.index}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _replace(self, worker: _Worker) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()  # closed its socket but lingers: of no use any more
        code = await self._reap(worker, grace=5.0)
        young = time.monotonic() - worker.started_at < _YOUNG
        worker.backoff = min(max(2 * worker.backoff, 0.1), _MAX_BACKOFF) if young else 0.0
        log.error("probe worker %d (pid %s) exited with %s; %s", worker.index, worker.pid, code,
                  f"restarting in {worker.backoff:g}s" if worker.backoff else "restarting")
        while not self._closing:
            if worker.backoff:
                worker.accepting = False
                self.lost += len(worker.pending)
                self._fail_pending(worker, f"probe worker {worker.index} is restarting")
                await asyncio.sleep(worker.backoff)
            try:
                await self._spawn(worker)
            except OSError as exc:
                worker.backoff = min(max(2 * worker.backoff, 0.1), _MAX_BACKOFF)
                log.error("cannot start probe worker %d: %s", worker.index, exc)
                continue
            self.restarts += 1
            return

    async def _watch(self) -> None:
        """Kill a worker that has held a check far past its timeout: a hung worker would
        otherwise keep the poller's slots forever, and polling would silently stop."""
        limit = self.timeout + self._hang_grace
        while True:
            await asyncio.sleep(min(1.0, self._hang_grace / 4))
            now = time.monotonic()
            for worker in self._workers:
                oldest = next(iter(worker.pending.values()), None)
                process = worker.process
                if oldest is None or process is None or process.returncode is not None:
                    continue
                if worker.ready is not None and not worker.ready.done():
                    # Still starting (imports on a busy host): it has the start timeout, and
                    # the checks queued for it wait without counting against it.
                    waited, allowed = now - worker.started_at, self._start_timeout
                else:
                    waited, allowed = now - max(oldest[1], worker.ready_at), limit
                if waited > allowed:
                    log.error("probe worker %d (pid %d) has not answered for %.1fs: killing it",
                              worker.index, process.pid, waited)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()

    # ----- the hot path ---------------------------------------------------------------------

    async def check(self, node_id: str, address: str) -> CheckResult:
        worker = self._workers[zlib.crc32(node_id.encode()) % self.processes]
        if not worker.accepting or self._loop is None:
            self.lost += 1
            raise CheckLost(f"probe worker {worker.index} is restarting")
        loop = self._loop
        future: asyncio.Future[CheckResult] = loop.create_future()
        request_id = self._next_id = self._next_id + 1
        worker.pending[request_id] = (future, time.monotonic())
        worker.outbox.append((request_id, node_id, address))
        if not worker.flushing:
            worker.flushing = True
            loop.call_soon(worker.flush)
        try:
            return await future
        except asyncio.CancelledError:
            worker.pending.pop(request_id, None)
            raise

    async def peer_check(self, peer_id: str, peer_address: str,
                         target_address: str) -> PeerVote | None:
        return await self._peers.peer_check(peer_id, peer_address, target_address)
