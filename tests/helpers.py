"""Helpers for tests that run real processes: free ports, waiting on conditions, binaries."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest

from nodewatch.testing import find_binary, free_port, port_open

__all__ = ["IN_CI", "async_wait_until", "free_port", "interruptible", "loopback_connections",
           "port_open", "require_binary", "wait_until"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def interruptible() -> None:
    """``preexec_fn`` for a child a test stops with SIGINT (Ctrl-C): a runner started in the
    background by a non-interactive shell ignores SIGINT, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require_binary(name: str) -> str:
    """Path of a server binary; a missing one skips on a laptop and fails under CI."""
    found = find_binary(name)
    if found is None:
        message = f"{name} is not installed (scripts/dev.sh test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> object:
    """Poll a condition until it is truthy; fail with ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], Awaitable[object]], within: float = 10.0,
                           interval: float = 0.02, message: str = "condition") -> object:
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(interval)


@contextmanager
def loopback_connections(count: int) -> Iterator[None]:
    """Hold ``count`` real ESTABLISHED loopback connections (both ends in this process)."""
    socks: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(count)
        try:
            for _ in range(count):
                socks.append(socket.create_connection(listener.getsockname(), timeout=2))
                socks.append(listener.accept()[0])
            yield
        finally:
            for sock in socks:
                sock.close()
