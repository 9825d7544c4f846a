"""One HTTP health check of a node's ``/health``: shared by the coordinator's poller and the
agent's ``/probe``, so that a peer's indirect check judges exactly like the coordinator does;
and the coordinator's side of that indirect check, asking a peer agent's ``/probe``.

The hot path is one keep-alive GET on a shared ``ClientSession``: timeouts and URLs are cached,
the body is decoded by the protocol's pre-built decoder straight into a typed struct.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from functools import lru_cache

import aiohttp
from yarl import URL

from nodewatch.model import CheckResult, FailureClass, PeerVote
from nodewatch.protocol import decode_health_body, decode_probe_reply

__all__ = ["HttpPeerProbe", "check_health", "parse_probe_reply"]

@lru_cache(maxsize=64)
def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    # ``sock_connect`` bounds the TCP handshake; ``connect`` also covers waiting for a pooled
    # connection, so both get the connect budget.
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect)


@lru_cache(maxsize=65536)
def _health_url(address: str) -> URL:
    return URL(f"http://{address}/health", encoded=True)


# Errors of the checking host's own resources: out of descriptors, memory, buffers or local
# ports. They say nothing about the node (one coordinator out of descriptors at 100,000 nodes
# confirmed dozens of live nodes on them in bench/fleet_udp.py).
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL})
# A timeout that fired this much past its budget was read late by a busy loop: the answer may
# have come in time and waited unread (a loaded coordinator's polls timed out at 0.63-0.8 s on
# a 0.5 s connect budget). A timeout on time is the node's.
LATE_FACTOR = 1.1
LATE_SLACK = 0.05  # seconds


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
        if os_error.errno in _LOCAL_ERRNOS:
            return FailureClass.LOCAL, f"cannot connect: {os_error.strerror or os_error}"
        return FailureClass.ERROR, f"cannot connect: {os_error.strerror or os_error}"
    if isinstance(exc, ConnectionRefusedError):
        return FailureClass.REFUSED, "connection refused"
    if isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS:
        return FailureClass.LOCAL, f"{exc.strerror or exc}"[:300]
    return FailureClass.ERROR, f"{type(exc).__name__}: {exc}"[:300]


def _late(exc: BaseException, latency: float, total: float, connect: float) -> bool:
    """Whether a timeout fired so far past its budget that the loop, not the node, was slow."""
    connecting = isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError)
    budget = connect if connecting else total
    return latency > budget * LATE_FACTOR + LATE_SLACK


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
        connect = min(connect_timeout, timeout)
        if failure is FailureClass.TIMEOUT and _late(exc, now - started, timeout, connect):
            failure, detail = FailureClass.LOCAL, f"{detail} after {now - started:.2f}s: read late"
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


def parse_probe_reply(peer_id: str, body: bytes) -> PeerVote | None:
    """A peer's ``GET /probe`` reply as its vote; None when it carries no usable verdict."""
    reply = decode_probe_reply(body)
    if reply is None or reply.failure == FailureClass.LOCAL.value:
        return None  # the peer could not check (its own descriptors, its own loop): no vote
    return PeerVote(peer_id=peer_id, reachable=reply.reachable,
                    detail=reply.failure or reply.detail)


class HttpPeerProbe:
    """``GET http://PEER/probe?target=HOST:PORT``: asks one peer agent to check a suspect node
    with the coordinator's timeouts, on a session of its own (opened by ``open``).

    A peer we cannot reach votes ``None`` (that is evidence about our own side); a peer that
    answers without a usable verdict (no ``/probe``, a bad body) casts no vote.

    ``tokens`` are the agent tokens (``[coordinator] agent_token``) sent as
    ``Authorization: Bearer``: an agent with a token answers ``/probe`` only with it. During a
    rotation a peer refusing one (401) is asked again with the next, and the token that worked
    is tried first from then on.
    """

    def __init__(self, *, timeout: float, connect_timeout: float,
                 tokens: Sequence[str] = ()) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._params = {"timeout": f"{timeout:g}", "connect_timeout": f"{connect_timeout:g}"}
        self._headers: list[dict[str, str]] = [
            {"Authorization": f"Bearer {token}"} for token in tokens if token] or [{}]
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the session (idempotent); it must be made inside the running loop."""
        if self._session is None or self._session.closed:
            # The peer spends up to ``timeout`` on the target; we allow as much again to
            # reach the peer, plus its own overhead.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout * 2 + 0.25,
                                              connect=self.connect_timeout),
                trust_env=False,
            )

    async def peer_check(self, peer_id: str, peer_address: str,
                         target_address: str) -> PeerVote | None:
        session = self._session
        if session is None:
            return None
        url = f"http://{peer_address}/probe"
        params = {"target": target_address, **self._params}
        for attempt, headers in enumerate(list(self._headers)):
            try:
                async with session.get(url, params=params, headers=headers) as resp:
                    if resp.status == 401 and attempt + 1 < len(self._headers):
                        continue  # a rotation: this peer may hold another accepted token
                    if resp.status != 200:
                        return None
                    body = await resp.read()
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                return PeerVote(peer_id=peer_id, reachable=None,
                                detail=f"peer unreachable: {type(exc).__name__}")
            except aiohttp.ClientError:
                return None
            if attempt:
                self._headers.remove(headers)
                self._headers.insert(0, headers)
            return parse_probe_reply(peer_id, body)
        return None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
