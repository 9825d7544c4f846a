"""The agent's side of the coordinator API: register on start (retrying with backoff while
the coordinator is down) and push heartbeats; never blocks the agent's own HTTP API."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import msgspec
from yarl import URL

from nodewatch.protocol import (
    CREDENTIAL_HEADER,
    MAX_DATAGRAM,
    OWNER_HEADER,
    HeartbeatBody,
    RegisterAnswer,
    RegisterBody,
    decode_udp_reply,
    encode_heartbeat_datagram,
    heartbeat_key,
    node_heartbeat_key,
    split_host_port,
)
from nodewatch.tls import TlsFailure, explain_tls_failure, probe_handshake

__all__ = ["CoordinatorClient", "HeartbeatOutcome", "Redirected", "RegistrationRejected",
           "RegistrationThrottled", "UdpHeartbeatSender", "retry_after_seconds"]

log = logging.getLogger("nodewatch.agent")

_encoder = msgspec.json.Encoder()
JSON_HEADERS = {"Content-Type": "application/json"}


_answer_decoder = msgspec.json.Decoder(RegisterAnswer)


class RegistrationRejected(Exception):
    """The coordinator answered with a 4xx other than a passing problem: retrying won't help
    until something changes, so retry slowly."""


class Redirected(Exception):
    """A shared coordinator named the node's owner: register there at once."""


class RegistrationThrottled(Exception):
    """The coordinator is admitting registrations at its bounded rate (HTTP 429): come back
    after ``retry_after`` seconds (its ``Retry-After``), plus jitter."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"coordinator is busy (HTTP 429); retry after {retry_after:g}s")
        self.retry_after = retry_after


# Bounds on an honoured Retry-After: a missing or unreadable one means one second, and no
# coordinator can send an agent away for more than this.
MAX_RETRY_AFTER = 120.0
ANSWER_WITHIN = 1.0  # seconds a coordinator has to answer a UDP heartbeat that asked


def retry_after_seconds(header: str | None) -> float:
    """``Retry-After`` as seconds (delta-seconds; an HTTP date or garbage counts as 1 s)."""
    try:
        value = float(header) if header else 1.0
    except ValueError:
        value = 1.0
    if not math.isfinite(value) or value < 0:
        value = 1.0
    return min(MAX_RETRY_AFTER, value)


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    status: int  # HTTP status, or 0 when the coordinator could not be reached
    detail: str = ""
    owner: str = ""  # the coordinator that watches this node (OWNER_HEADER), when named


_TLS_HINTS = {
    "untrusted": "set [agent] tls_ca to the CA that signed the coordinator's certificate",
    "client_cert_required": "set [agent] tls_cert and tls_key",
    "client_cert_rejected": "[agent] tls_cert must be a client certificate (extendedKeyUsage "
                            "clientAuth) signed by the coordinator's tls_client_ca",
}


def tls_problem(failure: TlsFailure, url: str) -> str:
    """One log line for a failed TLS handshake, with the [agent] keys that fix it."""
    hint = _TLS_HINTS.get(failure.kind)
    return failure.describe(url) + (f" ({hint})" if hint else "")


class CoordinatorClient:
    """POSTs to ``{url}/v1/register`` and ``{url}/v1/heartbeat`` with the agent token.

    ``ssl_context`` (from ``[agent] tls_ca/tls_cert/tls_key``) is used for every request to
    an https coordinator; None keeps the library default (system CAs, no client certificate).
    ``client_certificate`` says whether that context presents one (for failure messages).
    """

    def __init__(self, url: str | Sequence[str], token: str,
                 session: Callable[[], aiohttp.ClientSession],
                 *, request_timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None,
                 client_certificate: bool = False, credential: str = "") -> None:
        # Several coordinators sharing the fleet: any of them takes a registration (and
        # forwards it to the node's owner); heartbeats go to the owner it names.
        self.urls = [u.rstrip("/") for u in ([url] if isinstance(url, str) else url)] or [""]
        self.url = self.urls[0]
        self._session = session
        self._ssl_context = ssl_context
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._client_certificate = client_certificate
        self._https = self.url.startswith("https://")
        self._headers = dict(JSON_HEADERS)
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.set_credential(credential)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout,
                                              connect=min(2.0, request_timeout))

    def failover(self) -> None:
        """The current coordinator does not answer: try the next configured one."""
        if self.url in self.urls:
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
        else:
            self.url = self.urls[0]

    def follow(self, owner: str) -> bool:
        """Send to ``owner`` from now on, if it is one of the configured coordinators (a
        name from anywhere else is ignored: the node's credential goes only where the
        operator said). True when the target changed."""
        owner = owner.rstrip("/")
        if not owner or owner == self.url or owner not in self.urls:
            return False
        self.url = owner
        return True

    def set_credential(self, credential: str) -> None:
        """The node credential to prove from now on (sent in ``CREDENTIAL_HEADER``)."""
        if credential:
            self._headers[CREDENTIAL_HEADER] = credential
        else:
            self._headers.pop(CREDENTIAL_HEADER, None)

    async def register(self, payload: RegisterBody) -> RegisterAnswer:
        """One attempt; raises on any failure (the caller retries)."""
        async with self._session().post(f"{self.url}/v1/register", data=_encoder.encode(payload),
                                        headers=self._headers, timeout=self._timeout,
                                        ssl=self._ssl, allow_redirects=False) as response:
            if response.status in (307, 308):
                # A shared coordinator sends a node with a client certificate to its owner;
                # followed only to a configured coordinator (the credential goes nowhere else).
                owner = response.headers.get(OWNER_HEADER, "")
                if self.follow(owner):
                    raise Redirected(owner)
                raise RegistrationRejected(f"coordinator sent this node to {owner or '?'}, "
                                           "which is not one of [agent] coordinator")
            body = await response.content.read(1 << 20)
            if response.status == 429:
                raise RegistrationThrottled(
                    retry_after_seconds(response.headers.get("Retry-After")))
            if response.status >= 500:
                raise ConnectionError(f"coordinator answered HTTP {response.status}")
            if response.status >= 400:
                raise RegistrationRejected(
                    f"coordinator refused registration: HTTP {response.status} "
                    f"{body[:200].decode(errors='replace')}")
            try:
                return _answer_decoder.decode(body) if body.strip() else RegisterAnswer()
            except msgspec.DecodeError as exc:
                raise ConnectionError(f"unreadable register answer: {exc}") from None

    async def register_until_done(self, payload: Callable[[], RegisterBody],
                                  *, first_delay: float = 0.2,
                                  max_delay: float = 10.0) -> RegisterAnswer:
        """Retry with jittered exponential backoff until the coordinator accepts; a 429 is
        honoured: its Retry-After, plus up to a second of jitter so that the agents sent away
        together do not all come back together."""
        delay = first_delay
        attempt = 0
        throttled = 0
        redirects = 0
        while True:
            attempt += 1
            try:
                return await self.register(payload())
            except Redirected as exc:
                log.info("registering with the node's coordinator %s", exc)
                redirects += 1
                if redirects <= len(self.urls):
                    continue  # at once; sent round in circles, back off like a failure
            except RegistrationThrottled as exc:
                throttled += 1
                if throttled == 1 or throttled % 10 == 0:
                    log.info("%s (attempt %d)", exc, attempt)
                await asyncio.sleep(exc.retry_after + random.uniform(0.0, 1.0))
                continue
            except RegistrationRejected as exc:
                log.warning("%s; retrying in %.0fs", exc, max_delay)
                await asyncio.sleep(max_delay)
                continue
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if len(self.urls) > 1:
                    self.failover()
                    if attempt <= len(self.urls):
                        continue  # another coordinator at once, then back off
                failure = await self._tls_failure(exc)
                if failure is not None:
                    # A configuration problem on one side: say so each time, retry slowly.
                    log.warning("cannot register: %s; retrying in %.0fs",
                                tls_problem(failure, self.url), max_delay)
                    await asyncio.sleep(max_delay)
                    continue
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("cannot register with %s (%s); retrying", self.url,
                                type(exc).__name__ if not str(exc) else exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(max_delay, delay * 2)

    async def _tls_failure(self, exc: BaseException) -> TlsFailure | None:
        """Why a request to an https coordinator failed, when TLS is the reason."""
        if not self._https:
            return None
        failure = explain_tls_failure(exc)
        if failure is None:
            # A rejected client certificate reaches aiohttp as a bare "server disconnected".
            failure = await asyncio.to_thread(probe_handshake, self.url, self._ssl_context,
                                              presents_certificate=self._client_certificate)
        return failure

    async def heartbeat(self, payload: HeartbeatBody,
                        client_timeout: aiohttp.ClientTimeout | None = None
                        ) -> HeartbeatOutcome:
        """One heartbeat; never raises for network trouble (the next one will follow)."""
        try:
            async with self._session().post(f"{self.url}/v1/heartbeat",
                                            data=_encoder.encode(payload), headers=self._headers,
                                            timeout=client_timeout or self._timeout,
                                            ssl=self._ssl, allow_redirects=False) as response:
                detail = "" if response.status < 300 else (await response.content.read(300)
                                                             ).decode(errors="replace")
                return HeartbeatOutcome(response.status, detail,
                                        response.headers.get(OWNER_HEADER, ""))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = explain_tls_failure(exc)
            if failure is not None:
                return HeartbeatOutcome(0, tls_problem(failure, self.url))
            return HeartbeatOutcome(0, str(exc) or type(exc).__name__)



class UdpHeartbeatSender(asyncio.DatagramProtocol):
    """Fire-and-forget heartbeats to the coordinator's UDP port, signed with the node's key
    (derived from its credential) once enrolled, else with the agent token's.

    ``send`` never waits: it returns False (send this one over HTTP) only when the datagram
    would be over the size cap or the socket is gone. The coordinator answers when it does not
    know the node; a reply with a good tag for this node and incarnation sets ``unknown_heard``
    and calls ``on_unknown``, and the agent then sends its next heartbeat over HTTP at once,
    whose 404 is the authoritative answer (so a replayed reply can cost one HTTP heartbeat,
    never a wrong decision). A datagram sent with ``confirm`` asks for an "applied" answer;
    ``unanswered`` says when it did not come in time (the agent's next heartbeat then goes
    over HTTP).
    """

    def __init__(self, token: str, node_id: str = "", incarnation: int = 0,
                 on_unknown: Callable[[], None] | None = None, credential: str = "") -> None:
        # Heartbeats are tagged with the node's own key once it has one. The coordinator tags
        # an "unknown node" reply with the key the heartbeat it answers was tagged with (it
        # remembers the keys of nodes it forgot), so a reply may carry either.
        self._key = heartbeat_key(token)
        self._send_key = node_heartbeat_key(credential) or self._key
        self._transport: asyncio.DatagramTransport | None = None
        self.node_id = node_id
        self.incarnation = incarnation
        self.on_unknown = on_unknown
        self.unknown_heard = False
        self.sent = 0
        self.confirmed = 0
        self._awaiting: int | None = None  # the seq of the datagram that asked, unanswered
        self._asked_at = 0.0

    @classmethod
    async def open(cls, offer: str, coordinator_url: str, token: str, node_id: str = "",
                   incarnation: int = 0, on_unknown: Callable[[], None] | None = None,
                   credential: str = "") -> UdpHeartbeatSender:
        """Connect to the offered HOST:PORT; a wildcard host means the coordinator URL's host."""
        host, port = split_host_port(offer, default_host="0.0.0.0")
        if host in ("0.0.0.0", "::"):
            host = URL(coordinator_url).host or "127.0.0.1"
        sender = cls(token, node_id, incarnation, on_unknown, credential)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: sender, remote_addr=(host, port))
        return sender

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = decode_udp_reply(data, self._send_key)
        if reply is None and self._send_key != self._key:
            reply = decode_udp_reply(data, self._key)
        if (reply is None or reply.node_id != self.node_id
                or reply.incarnation != self.incarnation):
            return  # not for us, or forged: ignored (an unanswered confirm asks over HTTP)
        if reply.status == 200:
            if reply.seq == self._awaiting:  # an answer to an older one confirms nothing new
                self._awaiting = None
                self.confirmed += 1
            return
        if reply.status not in (404, 421):
            return
        self.unknown_heard = True
        if self.on_unknown is not None:
            self.on_unknown()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: the coordinator restarts, or died. Ask over HTTP now, whose
        # answer (or failure, then the next coordinator) says where to send.
        log.debug("UDP heartbeat: %s", type(exc).__name__)
        self.unknown_heard = True
        if self.on_unknown is not None:
            self.on_unknown()

    @property
    def asking(self) -> bool:
        """A datagram asked for an answer and it has not come yet."""
        return self._awaiting is not None

    def unanswered(self) -> bool:
        """A datagram asked for an answer and none came within ``ANSWER_WITHIN`` (a
        coordinator answers within its batch window, a tenth of a second, under load too)."""
        return (self._awaiting is not None
                and time.monotonic() - self._asked_at >= ANSWER_WITHIN)

    def send(self, payload: HeartbeatBody, confirm: bool = False) -> bool:
        """Send one heartbeat; ``confirm``: ask the coordinator to answer once it is applied."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if confirm:
            payload = msgspec.structs.replace(payload, confirm=True)
        datagram = encode_heartbeat_datagram(payload, self._send_key)
        if len(datagram) > MAX_DATAGRAM:
            return False
        transport.sendto(datagram)
        self.sent += 1
        if confirm:
            self._awaiting = payload.seq
            self._asked_at = time.monotonic()
        return True

    def forget_confirm(self) -> None:
        """The unanswered confirm is settled otherwise (an HTTP heartbeat asked instead)."""
        self._awaiting = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
