"""A probe worker process: runs the coordinator's HTTP checks on its own core.

Started by :class:`nodewatch.coordinator.probe_pool.ProcessProbe` as
``python -m nodewatch.coordinator.probe_worker --fd N ...`` with one end of a socketpair. Requests
arrive as length-prefixed msgpack batches of ``(id, node_id, address)``; each is checked by an
ordinary :class:`HttpProbe` and answered, in batches, as ``(id, CheckResult)``, the result
exactly as this process measured it (``at`` and ``latency`` are taken here, on a clock that is
the same system-wide), or ``(id, None)`` for a failure while this loop stalled (lost, not a
verdict). End of file on the socket means "stop".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import cast

import msgspec

from nodewatch.coordinator.poller import HttpProbe
from nodewatch.model import CheckResult, FailureClass

__all__ = ["CLOCKS", "HEADER", "LagWatch", "Request", "WorkerProtocol", "frame", "main"]

HEADER = 4  # little-endian payload length before every frame
CLOCKS: dict[str, Callable[[], float]] = {"time": time.time, "monotonic": time.monotonic}
_PR_SET_PDEATHSIG = 1
_BEAT = 0.1

Request = tuple[int, str, str]

_encode = msgspec.msgpack.Encoder().encode
_decode_requests = msgspec.msgpack.Decoder(list[Request]).decode


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "little") + payload


class LagWatch:
    """This process's own loop lag, measured like the coordinator's (a short sleep that wakes
    late): a check that failed while the loop stalled may be a timeout we caused."""

    def __init__(self, max_lag: float) -> None:
        self.max_lag = max_lag
        self.last_beat = time.monotonic()
        self.last_stall_end = 0.0

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(_BEAT)
            now = time.monotonic()
            if now - before - _BEAT > self.max_lag:
                self.last_stall_end = now
            self.last_beat = now

    def stalled_since(self, started: float) -> bool:
        """Whether a stall overlapped ``[started, now]`` (``time.monotonic`` times)."""
        now = time.monotonic()
        return now - self.last_beat - _BEAT > self.max_lag or self.last_stall_end >= started


class WorkerProtocol(asyncio.Protocol):
    """Reads request batches, runs one task per check, writes the results once per loop turn."""

    def __init__(self, probe: HttpProbe, closed: asyncio.Future[None],
                 clock: Callable[[], float], lag: LagWatch) -> None:
        self._probe = probe
        self._clock = clock
        self._lag = lag
        self._closed = closed
        self._buffer = bytearray()
        # None instead of a result: the check is lost (it failed while our loop stalled).
        self._outbox: list[tuple[int, CheckResult | None]] = []
        self._flushing = False
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._transport.write(frame(_encode([])))  # "ready": the parent's open() waits for it

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER:
            size = int.from_bytes(buffer[start:start + HEADER], "little")
            end = start + HEADER + size
            if len(buffer) < end:
                break
            for request in _decode_requests(memoryview(buffer)[start + HEADER:end]):
                task = self._loop.create_task(self._run(*request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            start = end
        del buffer[:start]

    async def _run(self, request_id: int, node_id: str, address: str) -> None:
        started = self._clock()
        began = time.monotonic()
        result: CheckResult | None
        try:
            result = await self._probe.check(node_id, address)
        except Exception as exc:  # answered like the in-process poller does, never dropped
            now = self._clock()
            result = CheckResult(node_id, False, now, now - started, FailureClass.ERROR,
                                 f"probe error: {exc!r}"[:300])
        if not result.ok and self._lag.stalled_since(began):
            result = None
        self._outbox.append((request_id, result))
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        batch, self._outbox = self._outbox, []
        if batch and self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(_encode(batch)))

    def eof_received(self) -> bool:
        return False  # close our side too: the parent is stopping us

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for task in self._tasks:
            task.cancel()
        if not self._closed.done():
            self._closed.set_result(None)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the coordinator dies, even by ``kill -9``; exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(0)


async def _serve(args: argparse.Namespace) -> None:
    clock = CLOCKS[args.clock]
    probe = HttpProbe(timeout=args.timeout, connect_timeout=args.connect_timeout,
                      max_bytes=args.max_bytes, concurrency=args.concurrency,
                      clock=clock, keepalive_timeout=args.keepalive_timeout)
    await probe.open()
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    lag = LagWatch(args.max_loop_lag)
    beat = loop.create_task(lag.run())
    sock = socket.socket(fileno=args.fd)
    transport, _ = await loop.create_unix_connection(
        lambda: WorkerProtocol(probe, closed, clock, lag), sock=sock)
    try:
        await closed
    finally:
        beat.cancel()
        transport.close()
        await probe.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="nodewatch probe worker (internal)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--connect-timeout", type=float, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--keepalive-timeout", type=float, required=True)
    parser.add_argument("--max-loop-lag", type=float, default=1.0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="time")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    # The coordinator stops its workers by closing the socket (and they die with it): Ctrl-C
    # in a terminal or systemd's SIGTERM to the whole group must not take them from under a
    # coordinator that is still writing its last state, nor look like crashes to restart.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
