"""The agent's current report: one place that derives status and reasons, and caches the
encoded ``/health`` body so that serving it costs no work beyond the HTTP response."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec

from nodewatch.model import NodeStatus

__all__ = ["HealthDoc", "MAX_DATAGRAM", "TAG_SIZE", "UdpReply", "VERSION", "decode_udp_reply",
           "derive_status", "encode_health", "encode_heartbeat_datagram", "encode_udp_reply",
           "heartbeat_key", "heartbeat_payload", "split_host_port", "tagged", "untagged"]


# The release both ends speak and report (``/health`` "version"); the package's __version__.
VERSION = "0.1.0"

class HealthDoc(msgspec.Struct, kw_only=True):
    """The ``GET /health`` body, field order as in SPEC.md."""

    status: NodeStatus
    node_id: str
    uptime: float
    version: str
    incarnation: int
    seq: int
    ts: float
    reasons: list[str]
    system: dict[str, float]
    load: dict[str, float]
    # Extensions: how often the agent samples and how many samples it took this incarnation,
    # so a coordinator can tell "kept running while unreachable" from "was frozen".
    sample_interval: float = 0.0
    samples: int = 0


_encoder = msgspec.json.Encoder()


def encode_health(doc: HealthDoc) -> bytes:
    return _encoder.encode(doc)


def derive_status(manual: NodeStatus | None, manual_reason: str, rule_reasons: list[str],
                  check_reasons: list[str]) -> tuple[NodeStatus, list[str]]:
    """Draining (manual) wins over degraded (manual, rule or check), which wins over ok."""
    reasons: list[str] = []
    if manual is not None:
        reasons.append(manual_reason or f"set {manual.value} by operator")
    reasons.extend(rule_reasons)
    reasons.extend(check_reasons)
    if manual is NodeStatus.DRAINING:
        return NodeStatus.DRAINING, reasons
    if reasons:
        return NodeStatus.DEGRADED, reasons
    return NodeStatus.OK, reasons


def heartbeat_payload(doc: HealthDoc) -> dict[str, Any]:
    return {
        "node_id": doc.node_id,
        "incarnation": doc.incarnation,
        "seq": doc.seq,
        "ts": doc.ts,
        "status": doc.status.value,
        "reasons": doc.reasons,
        "system": doc.system,
        "load": doc.load,
        "sample_interval": doc.sample_interval,
        "samples": doc.samples,
    }


# ---------------------------------------------------------------------- UDP heartbeats
#
# One datagram = the heartbeat payload as msgpack (the coordinator also reads JSON), then, when
# an agent token is configured, a 32-byte HMAC-SHA256 tag over those bytes. api/udp.py reads it.

MAX_DATAGRAM = 8 * 1024
TAG_SIZE = 32
_CONTEXT = b"nodewatch udp heartbeat v1"
_msgpack_encoder = msgspec.msgpack.Encoder()


def heartbeat_key(token: str) -> bytes:
    """The HMAC key for a token, bound to this use (a tag is valid nowhere else); empty when no
    token is configured (datagrams then carry no tag)."""
    if not token:
        return b""
    return hmac.new(token.encode(), _CONTEXT, hashlib.sha256).digest()


def tagged(body: bytes, key: bytes) -> bytes:
    """``body`` followed by its HMAC-SHA256 tag; untouched when no key is configured."""
    return body + hmac.digest(key, body, "sha256") if key else body


def untagged(data: bytes, key: bytes) -> bytes | memoryview | None:
    """The body of a tagged datagram, or None when its tag is missing or wrong (constant
    time); ``data`` itself when no key is configured."""
    if not key:
        return data
    if len(data) <= TAG_SIZE:
        return None
    body = memoryview(data)[:-TAG_SIZE]
    if not hmac.compare_digest(hmac.digest(key, body, "sha256"), data[-TAG_SIZE:]):
        return None
    return body


def encode_heartbeat_datagram(payload: Any, key: bytes) -> bytes:
    """A heartbeat payload (dict or struct) as one datagram, tagged when ``key`` is set."""
    return tagged(_msgpack_encoder.encode(payload), key)


class UdpReply(msgspec.Struct, array_like=True):
    """The coordinator's only answer over UDP: "I do not know this node" (status 404), so that
    an agent pushing over UDP hears it at once instead of at its next periodic HTTP heartbeat.
    Tagged like a heartbeat; ``seq`` echoes the heartbeat it answers, so an old reply replayed
    to the agent later is recognised and ignored."""

    status: int
    node_id: str
    incarnation: int
    seq: int


_reply_decoder = msgspec.msgpack.Decoder(UdpReply)


def encode_udp_reply(reply: UdpReply, key: bytes) -> bytes:
    return tagged(_msgpack_encoder.encode(reply), key)


def decode_udp_reply(data: bytes, key: bytes) -> UdpReply | None:
    """The reply in ``data``, or None when it is not one (bad tag, not msgpack, wrong shape)."""
    body = untagged(data, key)
    if body is None:
        return None
    try:
        return _reply_decoder.decode(body)
    except msgspec.DecodeError:
        return None


def split_host_port(text: str, *, default_host: str = "") -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` into its parts, the one parser of every address nodewatch
    reads (listen, advertise, probe targets, UDP offers); an empty host becomes
    ``default_host`` where one is given, and ``ValueError`` says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") or default_host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT with a port of 0-65535, got {text!r}")
    return host, int(port_text)
