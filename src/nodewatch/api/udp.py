"""UDP heartbeats: the coordinator's lean push edge, one signed datagram per heartbeat.

A datagram is a msgspec-encoded ``HeartbeatBody`` (msgpack, or JSON when it starts with
``{``) followed, when an agent token is configured, by a 32-byte HMAC-SHA256 tag over those
bytes. The tag is checked before anything is decoded; the body is decoded straight into the
struct with the HTTP API's constraints and fed to ``Coordinator.heartbeat`` exactly like
``POST /v1/heartbeat``. Nothing is sent back: a dropped datagram is only counted (by result,
in ``/metrics``), never logged with its content. Replays are stale by ``(incarnation, seq)``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from typing import Any, cast

import msgspec

from nodewatch.api.schemas import HeartbeatBody
from nodewatch.collect.report import MAX_DATAGRAM, TAG_SIZE, heartbeat_key
from nodewatch.coordinator import Coordinator, NotLeader
from nodewatch.detect.machine import UnknownNode
from nodewatch.detect.types import CheckResult, NodeStatus, Report

__all__ = ["RESULTS", "UdpHeartbeats", "push_result", "split_udp_address",
           "start_udp_heartbeats"]

log = logging.getLogger("nodewatch.coordinator")

RECEIVE_BUFFER = 4 * 1024 * 1024  # absorbs a loop stall at thousands of heartbeats/s
RESULTS = ("ok", "stale", "unknown", "bad_tag", "malformed", "oversize", "not_leader", "error")
_JSON_START = ord("{")


_STATUS = {s.value: s for s in NodeStatus}


def push_result(body: HeartbeatBody, at: float) -> CheckResult:
    """A validated heartbeat as the core's observation (HTTP and UDP alike)."""
    return CheckResult(node_id=body.node_id, ok=True, at=at, source="push", report=Report(
        incarnation=body.incarnation, seq=body.seq, ts=body.ts, status=_STATUS[body.status],
        reasons=tuple(body.reasons), system=body.system, load=body.load,
        sample_interval=body.sample_interval, samples=body.samples))


class UdpHeartbeats(asyncio.DatagramProtocol):
    """The datagram endpoint; ``counts`` holds how many datagrams ended in each result."""

    def __init__(self, coord: Coordinator, token: str) -> None:
        self.coord = coord
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.transport: asyncio.DatagramTransport | None = None
        self._key = heartbeat_key(token)
        self._msgpack = msgspec.msgpack.Decoder(HeartbeatBody)
        self._json = msgspec.json.Decoder(HeartbeatBody)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self.transport is None:
            raise RuntimeError("the UDP endpoint is not open")
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            result = self._receive(data)
        except Exception:  # never let one datagram take the endpoint down; never log content
            log.exception("UDP heartbeat handling failed")
            result = "error"
        self.counts[result] += 1

    def _receive(self, data: bytes) -> str:
        if len(data) > MAX_DATAGRAM:
            return "oversize"
        if not data:
            return "malformed"
        payload: bytes | memoryview = data
        key = self._key
        if key:
            if len(data) <= TAG_SIZE:
                return "bad_tag"
            payload = memoryview(data)[:-TAG_SIZE]
            if not hmac.compare_digest(hmac.digest(key, payload, "sha256"), data[-TAG_SIZE:]):
                return "bad_tag"
        try:
            if data[0] == _JSON_START:
                body = self._json.decode(payload)
            else:
                body = self._msgpack.decode(payload)
        except msgspec.DecodeError:  # also every constraint HeartbeatBody sets
            return "malformed"
        coord = self.coord
        if body.node_id not in coord.cluster.nodes:
            return "unknown"
        try:
            outcome = coord.heartbeat(push_result(body, coord.clock()))
        except UnknownNode:
            return "unknown"
        except NotLeader:
            return "not_leader"
        return "stale" if outcome.stale else "ok"

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP heartbeat socket error: %s", type(exc).__name__)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def split_udp_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start_udp_heartbeats(coord: Coordinator, listen: str | None = None) -> UdpHeartbeats:
    """Bind ``listen`` (default ``[coordinator] heartbeat_udp``) and feed ``coord``; the caller
    closes the returned endpoint (``close()``) before stopping the coordinator."""
    cc = coord.config.coordinator
    host, port = split_udp_address(listen or cc.heartbeat_udp)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: UdpHeartbeats(coord, cc.agent_token), local_addr=(host, port))
    protocol.transport = transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # best effort: the kernel caps it at net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass
    if not cc.agent_token:
        log.warning("UDP heartbeats on %s without an agent token: datagrams are not "
                    "authenticated", listen or cc.heartbeat_udp)
    return protocol
