"""One HTTP health check of a node's ``/health``: shared by the coordinator's poller and the
agent's ``/probe``, so that a peer's indirect check judges exactly like the coordinator does.

The hot path is one keep-alive GET on a shared ``ClientSession``: timeouts and URLs are cached,
the body is decoded by the protocol's pre-built decoder straight into a typed struct.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from functools import lru_cache

import aiohttp
from yarl import URL

from nodewatch.model import CheckResult, FailureClass
from nodewatch.protocol import decode_health_body

__all__ = ["check_health"]

@lru_cache(maxsize=64)
def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    # ``sock_connect`` bounds the TCP handshake; ``connect`` also covers waiting for a pooled
    # connection, so both get the connect budget.
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect)


@lru_cache(maxsize=65536)
def _health_url(address: str) -> URL:
    return URL(f"http://{address}/health", encoded=True)


def _classify(exc: BaseException) -> tuple[FailureClass, str]:
    """Map a client exception to the failure class carried in evidence."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return FailureClass.TIMEOUT, f"timed out ({type(exc).__name__})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
            return FailureClass.REFUSED, "connection refused"
        if isinstance(os_error, TimeoutError):
            return FailureClass.TIMEOUT, "connect timed out"
        return FailureClass.ERROR, f"cannot connect: {os_error.strerror or os_error}"
    if isinstance(exc, ConnectionRefusedError):
        return FailureClass.REFUSED, "connection refused"
    return FailureClass.ERROR, f"{type(exc).__name__}: {exc}"[:300]


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The body, or None when it is over ``max_bytes`` (never buffers more than the cap)."""
    length = response.content_length
    if length is not None:
        if length > max_bytes:
            return None
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(max_bytes + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)


async def check_health(
    session: aiohttp.ClientSession,
    node_id: str,
    address: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the check owns two budgets (total and connect)
    connect_timeout: float,
    max_bytes: int,
    clock: Callable[[], float],
    verify_node_id: bool = True,
) -> CheckResult:
    """GET ``http://{address}/health`` and judge it like the coordinator does.

    Fails on timeout, refused or other connection errors, a non-200 status, or a body that is
    not valid health JSON (including one over ``max_bytes``, or one that names another node
    when ``verify_node_id`` is set). Never raises for a network problem.
    """
    started = clock()
    try:
        async with session.get(
            _health_url(address),
            timeout=_timeout(timeout, min(connect_timeout, timeout)),
            allow_redirects=False,
        ) as response:
            status = response.status
            if status != 200:
                now = clock()
                return CheckResult(node_id, False, now, now - started,
                                   FailureClass.HTTP_STATUS, f"HTTP {status}")
            body = await _read_capped(response, max_bytes)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is classified; none escapes
        failure, detail = _classify(exc)
        now = clock()
        return CheckResult(node_id, False, now, now - started, failure, detail)
    now = clock()
    latency = now - started
    if body is None:
        return CheckResult(node_id, False, now, latency, FailureClass.BAD_BODY,
                           f"body larger than {max_bytes} bytes")
    try:
        parsed = decode_health_body(body)
    except ValueError as exc:
        return CheckResult(node_id, False, now, latency, FailureClass.BAD_BODY, str(exc)[:300])
    if verify_node_id and parsed.node_id and parsed.node_id != node_id:
        return CheckResult(node_id, False, now, latency, FailureClass.BAD_BODY,
                           f"answered as node {parsed.node_id!r}")
    return CheckResult(node_id, True, now, latency, None, "", parsed.report())
