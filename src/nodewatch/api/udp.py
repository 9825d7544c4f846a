"""UDP heartbeats: the coordinator's lean push edge, one signed datagram per heartbeat.

A datagram is a msgspec-encoded ``HeartbeatBody`` (msgpack, or JSON when it starts with
``{``) followed by a 32-byte HMAC-SHA256 tag over those bytes: keyed with the node's own key
(``protocol.node_heartbeat_key`` of its credential, stored by the coordinator) once the node
is enrolled, with the agent token's before (none without a token). Only the ``node_id`` is
read before the tag is checked (to choose the key); the body is decoded straight into the
struct with the HTTP API's constraints and fed to ``Coordinator.heartbeat`` exactly like
``POST /v1/heartbeat``. The answers are a tagged "unknown node" reply (``UdpReply``), so an
agent the coordinator forgot registers again at once, and "applied" to the rare datagram that
asks (``confirm``: one a minute per agent), so that an agent knows its datagrams arrive
without an HTTP heartbeat, which costs the coordinator several times more. A dropped
datagram is only counted (by result, in ``/metrics``), never logged with its content. Replays
are stale by ``(incarnation, seq)`` and never answered "applied".
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import msgspec

from nodewatch.coordinator.service import Coordinator, NotLeader, NotOwner
from nodewatch.detect.outcome import UnknownNode
from nodewatch.model import CheckResult, NodeState, Report
from nodewatch.protocol import (
    MAX_DATAGRAM,
    TAG_SIZE,
    HeartbeatBody,
    UdpReply,
    encode_udp_reply,
    heartbeat_key,
    peek_node_id,
    split_host_port,
    untagged,
)

__all__ = ["DROP_SAMPLE_EVERY", "RESULTS", "UdpHeartbeats", "kernel_drops", "push_result",
           "start_udp_heartbeats"]

log = logging.getLogger("nodewatch.coordinator")

RECEIVE_BUFFER = 4 * 1024 * 1024  # absorbs a loop stall at thousands of heartbeats/s
BATCH_WINDOW = 0.1  # seconds the socket rests after a drain, so that wake-ups come in batches
MAX_BATCH = 1024  # datagrams per wake-up, so that a flood cannot starve the loop
DROP_SAMPLE_EVERY = 1.0  # seconds between readings of the kernel's drop count for the socket
RESULTS = ("ok", "stale", "unknown", "bad_tag", "malformed", "oversize", "not_leader",
           "not_owner", "error")
_JSON_START = ord("{")
MAX_REMEMBERED_KEYS = 100_000


def push_result(body: HeartbeatBody, at: float) -> CheckResult:
    """A validated heartbeat as the core's observation (HTTP and UDP alike)."""
    return CheckResult(node_id=body.node_id, ok=True, at=at, source="push", report=Report(
        incarnation=body.incarnation, seq=body.seq, ts=body.ts, status=body.status,
        reasons=tuple(body.reasons), system=body.system, load=body.load,
        sample_interval=body.sample_interval, samples=body.samples))


class UdpHeartbeats:
    """The datagram endpoint; ``counts`` holds how many datagrams ended in each result.

    A plain non-blocking socket read by the loop's reader callback rather than an asyncio
    datagram transport: each wake-up drains every datagram waiting (up to ``MAX_BATCH``), then
    stops watching the socket for ``batch_window`` seconds so that the next wake-up finds a
    batch. At a few thousand heartbeats a second, the per-wake-up cost (epoll, the callback,
    the transport's bookkeeping) was most of what a heartbeat cost; batching pays it once per
    window instead. The window only delays when a heartbeat is applied (10 ms against seconds
    of detection time); the receive buffer holds what arrives meanwhile.
    """

    def __init__(self, coord: Coordinator, token: str | Sequence[str], sock: socket.socket,
                 batch_window: float = BATCH_WINDOW) -> None:
        self.coord = coord
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.replies = 0
        self.confirms = 0  # "applied" answers to datagrams that asked (also in replies)
        self.drops = 0  # datagrams the kernel dropped on this socket (as last read)
        self.batch_window = batch_window
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        # One key per accepted agent token (old and new during a rotation); a reply is
        # tagged with the key its heartbeat was.
        tokens = (token,) if isinstance(token, str) else tuple(token)
        self._keys = tuple(heartbeat_key(t) for t in tokens if t) or (b"",)
        self._token_keys = list(self._keys)  # handed out, never changed
        self._last_keys: dict[str, bytes] = {}  # node id -> its key, for forgotten nodes
        # node id -> (udp_key, previous_udp_key, their bytes): the keys decoded once per
        # credential, not once per datagram.
        self._node_keys: dict[str, tuple[str, str, list[bytes]]] = {}
        self._msgpack = msgspec.msgpack.Decoder(HeartbeatBody)
        self._json = msgspec.json.Decoder(HeartbeatBody)
        self._loop.add_reader(self._fd, self._readable)
        # Datagrams the kernel dropped (receive buffer full) never reach _drain: its own
        # count, read every DROP_SAMPLE_EVERY, is how a coordinator that cannot keep up knows.
        self._inode = os.fstat(self._fd).st_ino
        self._drops_seen = kernel_drops(self._inode) or 0
        self._received_seen = 0  # datagrams read by the last reading of the drops
        self._sampler: asyncio.TimerHandle | None = self._loop.call_later(
            DROP_SAMPLE_EVERY, self._sample_drops)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._closed:
            raise RuntimeError("the UDP endpoint is closed")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def _sample_drops(self) -> None:
        self._sampler = None
        if self._closed:
            return
        total = kernel_drops(self._inode)
        if total is not None:
            dropped = (total - self._drops_seen) % 2**32  # the kernel's counter is 32 bits
            self._drops_seen = total
            drops = self.coord.receive_drops
            now = self.coord.clock()
            if dropped and not drops.recent(now):  # once per spell, not every second
                log.warning("UDP heartbeat receive buffer full: %d datagrams dropped in the "
                            "last %gs (more pushes than this coordinator keeps up with)",
                            dropped, DROP_SAMPLE_EVERY)
            self.drops += dropped
            received = sum(self.counts.values())
            self.coord.note_receive_drops(dropped, now, received - self._received_seen)
            self._received_seen = received
        self._sampler = self._loop.call_later(DROP_SAMPLE_EVERY, self._sample_drops)

    def _readable(self) -> None:
        handled = self._drain()
        if handled and self.batch_window > 0 and not self._closed:
            self._loop.remove_reader(self._fd)
            self._resume = self._loop.call_later(self._rest(handled), self._resume_reading)

    def _rest(self, handled: int) -> float:
        """A full batch means more is waiting: take it on the next loop turn, not a window
        later, so the window never caps how many heartbeats a second get in."""
        return 0.0 if handled >= MAX_BATCH else self.batch_window

    def _resume_reading(self) -> None:
        """After a window: take what arrived meanwhile; keep resting while heartbeats keep
        coming (no epoll changes under steady load), watch the socket again once it is quiet."""
        self._resume = None
        if self._closed:
            return
        handled = self._drain()
        if handled:
            self._resume = self._loop.call_later(self._rest(handled), self._resume_reading)
        else:
            self._loop.add_reader(self._fd, self._readable)

    def _drain(self) -> int:
        """Handle the datagrams waiting now (at most ``MAX_BATCH``); returns how many."""
        recvfrom = self._sock.recvfrom
        counts = self.counts
        handled = 0
        while handled < MAX_BATCH:
            try:
                data, addr = recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. an ICMP error queued on the socket: not fatal
                log.debug("UDP heartbeat socket error: %s", type(exc).__name__)
                break
            handled += 1
            try:
                result = self._receive(data, addr)
            except Exception:  # never let one datagram take the endpoint down; never log content
                log.exception("UDP heartbeat handling failed")
                result = "error"
            counts[result] += 1
        return handled

    def _receive(self, data: bytes, addr: Any) -> str:
        if len(data) > MAX_DATAGRAM:
            return "oversize"
        if not data:
            return "malformed"
        if len(data) > TAG_SIZE and data[0] != _JSON_START:
            # The common datagram (msgpack, tagged): decoded once, straight into the struct,
            # then its tag checked with the key of the node it names; nothing is applied
            # before the tag is good. Anything else (no tag, JSON, a body that does not
            # decode) takes the general path below, which peeks the node id first.
            payload = memoryview(data)[:-TAG_SIZE]
            try:
                body = self._msgpack.decode(payload)
            except msgspec.DecodeError:
                return self._receive_peeked(data, addr)
            node = self.coord.cluster.node(body.node_id)
            keys = self._keys_for(body.node_id, node)
            if b"" in keys:
                return self._receive_peeked(data, addr)
            tag = data[-TAG_SIZE:]
            for key in keys:  # protocol.untagged, inline: the same check, on the same view
                if hmac.compare_digest(hmac.digest(key, payload, "sha256"), tag):
                    return self._apply(body, node, key, addr)
            if node is not None and (node.udp_key or node.revoked or node.reenrol_address):
                self._reject(node.node_id, addr)
            return "bad_tag"
        return self._receive_peeked(data, addr)

    def _receive_peeked(self, data: bytes, addr: Any) -> str:
        node_id = peek_node_id(data)
        node = self.coord.cluster.node(node_id) if node_id else None
        payload: bytes | memoryview | None = None
        for key in self._keys_for(node_id, node):
            payload = untagged(data, key)
            if payload is not None:
                break
        if payload is None:
            if node is not None and (node.udp_key or node.revoked or node.reenrol_address):
                self._reject(node.node_id, addr)
            return "bad_tag"
        try:
            if data[0] == _JSON_START:
                body = self._json.decode(payload)
            else:
                body = self._msgpack.decode(payload)
        except msgspec.DecodeError:  # also every constraint HeartbeatBody sets
            return "malformed"
        return self._apply(body, node, key, addr)

    def _apply(self, body: HeartbeatBody, node: NodeState | None, key: bytes,
               addr: Any) -> str:
        """A heartbeat whose tag was good under ``key`` (the key of ``node``, the node it
        names, when the coordinator knows it)."""
        proven = (node is not None and bool(node.previous_hash) and bool(node.udp_key)
                  and key == bytes.fromhex(node.udp_key))
        coord = self.coord
        if node is None:  # looked up just now, on this loop turn
            self._reply_unknown(body, addr, key)
            return "unknown"
        try:
            if coord.routine_heartbeat(node, body, coord.clock()):
                if proven:
                    coord.cluster.credential_proven(body.node_id)
                if body.confirm:
                    self._confirm(body, addr, key)
                return "ok"
            outcome = coord.heartbeat(push_result(body, coord.clock()))
        except UnknownNode:
            self._reply_unknown(body, addr, key)
            return "unknown"
        except NotOwner:
            # Another coordinator's node (shares moved): the agent asks over HTTP at once,
            # which is forwarded to the owner and answered with its name.
            self._reply_unknown(body, addr, key, status=421)
            return "not_owner"
        except NotLeader:
            return "not_leader"
        if proven:  # signed with the current key: the previous credential is not needed
            coord.cluster.credential_proven(body.node_id)
        if outcome.stale:
            return "stale"  # never answered: a replay must not confirm anything
        if body.confirm:
            self._confirm(body, addr, key)
        return "ok"

    def _keys_for(self, node_id: str | None, node: NodeState | None) -> list[bytes]:
        """The keys a datagram for ``node`` may be tagged with: the node's own (and, during a
        rotation, its previous one) once it is enrolled, else the agent token's; none while
        its credential is revoked or a re-enrolment is pending. For a node the coordinator
        does not know (any more), also the key it last had here, so that a forgotten agent
        still hears the tagged "unknown node" reply."""
        if node is None:
            last = self._last_keys.get(node_id or "")
            return self._token_keys if last is None else [*self._keys, last]
        if not (node.udp_key or node.revoked or node.reenrol_address):
            return self._token_keys
        cached = self._node_keys.get(node.node_id)
        if cached is not None and cached[0] is node.udp_key and cached[1] is node.previous_udp_key:
            return cached[2]  # the same credential as last time: no hex decoding per datagram
        keys = [bytes.fromhex(k) for k in (node.udp_key, node.previous_udp_key) if k]
        if len(self._node_keys) >= MAX_REMEMBERED_KEYS:
            self._node_keys.clear()  # a bound, not a cache policy: rarely reached
        self._node_keys[node.node_id] = (node.udp_key, node.previous_udp_key, keys)
        if keys:
            if len(self._last_keys) >= MAX_REMEMBERED_KEYS:
                self._last_keys.clear()
            self._last_keys[node.node_id] = keys[0]
        return keys

    def _reject(self, node_id: str, addr: Any) -> None:
        """A datagram for an enrolled node without its key's tag: recorded (rate-limited)."""
        try:
            self.coord.reject(node_id, via="udp", claimant=str(addr[0]) if addr else "",
                              reason="UDP heartbeat not signed with the node's key")
        except NotLeader:
            pass

    def _reply_unknown(self, body: HeartbeatBody, addr: Any, key: bytes,
                       status: int = 404) -> None:
        """Tell the sender at once that it must register again (what HTTP says with a 404)."""
        self._reply(UdpReply(status, body.node_id, body.incarnation, body.seq), addr, key)

    def _confirm(self, body: HeartbeatBody, addr: Any, key: bytes) -> None:
        """Answer a datagram that asked, once it is applied (not when stale)."""
        if self._reply(UdpReply(200, body.node_id, body.incarnation, body.seq), addr, key):
            self.confirms += 1

    def _reply(self, reply: UdpReply, addr: Any, key: bytes) -> bool:
        """Only a datagram that passed the tag check is answered, and the answer is smaller
        than the heartbeat, so the port cannot amplify traffic towards a spoofed address."""
        try:
            self._sock.sendto(encode_udp_reply(reply, key), addr)
        except OSError:  # a full send buffer, a vanished route: the agent asks over HTTP
            return False
        self.replies += 1
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        self._loop.remove_reader(self._fd)
        self._sock.close()


async def start_udp_heartbeats(coord: Coordinator, listen: str | None = None,
                               batch_window: float = BATCH_WINDOW) -> UdpHeartbeats:
    """Bind ``listen`` (default ``[coordinator] heartbeat_udp``) and feed ``coord``; the caller
    closes the returned endpoint (``close()``) before stopping the coordinator."""
    cc = coord.config.coordinator
    host, port = split_host_port(listen or cc.heartbeat_udp, default_host="0.0.0.0")
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _grow_receive_buffer(sock)
        sock.bind(sockaddr)
        endpoint = UdpHeartbeats(coord, cc.agent_tokens, sock, batch_window)
    except BaseException:
        sock.close()
        raise
    if not cc.agent_tokens:
        log.warning("UDP heartbeats on %s without an agent token: datagrams are not "
                    "authenticated", listen or cc.heartbeat_udp)
    return endpoint


def kernel_drops(inode: int) -> int | None:
    """The kernel's drop count for the UDP socket with this inode (the last column of
    /proc/net/udp and udp6: datagrams it threw away, mostly for a full receive buffer), or
    None where that is not readable (not Linux, no /proc)."""
    wanted = str(inode)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    if len(fields) >= 13 and fields[9] == wanted:
                        return int(fields[-1])
        except (OSError, ValueError):
            continue
    return None


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Room for a batch window's worth of datagrams and a loop stall. The kernel caps
    SO_RCVBUF at net.core.rmem_max; SO_RCVBUFFORCE (root only) is not capped."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            return
        except OSError:
            continue
