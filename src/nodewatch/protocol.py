"""Every agent<->coordinator wire shape, defined once: the ``/health`` document (as the agent
writes it and as the coordinator reads it), the register and heartbeat bodies, the ``/probe``
reply, the etcd agent lease, and the UDP datagram with its tag and reply."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from nodewatch.config import NODE_ID_PATTERN
from nodewatch.model import NodeStatus, Report

__all__ = ["AgentLease", "CREDENTIAL_HEADER", "FORWARDED_HEADER", "HealthBody", "HealthDoc",
           "HeartbeatBody", "MAX_DATAGRAM", "OWNER_HEADER", "ProbeReply", "RegisterAnswer",
           "RegisterBody", "TAG_SIZE", "UdpReply", "VERSION", "credential_hash",
           "decode_health_body", "decode_probe_reply", "decode_udp_reply", "derive_status",
           "encode_health", "encode_heartbeat_datagram", "encode_udp_reply", "heartbeat_body",
           "heartbeat_key", "lease_proof", "lease_proven", "new_credential", "node_heartbeat_key",
           "parse_health_body", "peek_node_id", "split_host_port", "tagged", "untagged"]


# The release both ends speak and report (``/health`` "version"); the package's __version__.
VERSION = "0.1.0"

NonNegative = Annotated[int, Meta(ge=0)]


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


class HealthBody(msgspec.Struct, kw_only=True):
    """The part of an agent's ``/health`` body the coordinator relies on; extra keys ignored."""

    incarnation: NonNegative
    seq: NonNegative
    ts: float
    node_id: str = ""
    status: NodeStatus = NodeStatus.OK
    reasons: tuple[str, ...] = ()
    system: dict[str, float] = msgspec.field(default_factory=dict)
    load: dict[str, float] = msgspec.field(default_factory=dict)
    sample_interval: float = 0.0
    samples: int = -1

    def report(self) -> Report:
        return Report(self.incarnation, self.seq, self.ts, self.status, self.reasons,
                      self.system, self.load, self.sample_interval, self.samples)


_health_decoder = msgspec.json.Decoder(HealthBody)


def decode_health_body(body: bytes) -> HealthBody:
    """Decode and validate a ``/health`` body; ``ValueError`` says what is wrong with it."""
    try:
        parsed = _health_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValueError(f"not a valid health body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed health JSON: {exc}") from None
    if not math.isfinite(parsed.ts):
        raise ValueError("not a valid health body: ts is not a finite number")
    return parsed


def parse_health_body(body: bytes) -> Report:
    """Parse a ``/health`` body into a :class:`Report`; ``ValueError`` with a message if bad."""
    return decode_health_body(body).report()


# ---------------------------------------------------------------------- register, heartbeat
#
# The coordinator validates these once at its edge (api/app.py, api/udp.py) and publishes them
# in its OpenAPI document, whose schemas are generated from these structs: no docstrings here,
# they would become schema descriptions. Field order is the order on the wire.

NodeId = Annotated[str, Meta(pattern=NODE_ID_PATTERN, description="[A-Za-z0-9._-]{1,128}")]
Address = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9.\[\]:_-]{1,253}:\d{1,5}$", description="HOST:PORT of the agent"),
]
Counter = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, Meta(ge=-1, le=2**63 - 1)]
Timestamp = Annotated[float, Meta(ge=0, le=1e11)]
Metric = Annotated[float, Meta(ge=-1e15, le=1e15)]
ShortText = Annotated[str, Meta(max_length=1024)]
Label = Annotated[str, Meta(max_length=256)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RegisterBody(_Body):
    node_id: NodeId
    address: Address
    incarnation: Counter
    last_seq: Seq = -1
    last_ts: Timestamp = 0.0
    version: Annotated[str, Meta(max_length=64)] = ""
    labels: Annotated[dict[Label, Label], Meta(max_length=64)] = msgspec.field(
        default_factory=dict
    )
    heartbeat_interval: Annotated[float, Meta(ge=0, le=3600)] = 0.0


class HeartbeatBody(_Body):
    node_id: NodeId
    incarnation: Counter
    seq: Counter
    ts: Timestamp
    status: NodeStatus = NodeStatus.OK
    reasons: Annotated[list[ShortText], Meta(max_length=64)] = msgspec.field(default_factory=list)
    system: Annotated[dict[Label, Metric], Meta(max_length=64)] = msgspec.field(
        default_factory=dict
    )
    load: Annotated[dict[Label, Metric], Meta(max_length=256)] = msgspec.field(
        default_factory=dict
    )
    sample_interval: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    samples: Annotated[int, Meta(ge=-1, le=2**63 - 1)] = -1
    # Present only on the last heartbeat of a clean stop, so routine heartbeats stay the size
    # they were; absent means false (the schema's default), and UNSET is falsy.
    final: Annotated[bool, Meta(extra_json_schema={"default": False})] | UnsetType = UNSET
    # Over UDP: present on the one datagram in ``UDP_CONFIRM_INTERVAL`` that asks the
    # coordinator to answer once it is applied (``UdpReply`` status 200), so the agent learns
    # that its datagrams arrive without an HTTP heartbeat. Ignored over HTTP, which answers.
    confirm: Annotated[bool, Meta(extra_json_schema={"default": False})] | UnsetType = UNSET


class RegisterAnswer(msgspec.Struct, kw_only=True):
    """What the agent reads of the coordinator's register reply (``RegisterResponse`` in the
    coordinator's OpenAPI document): lenient, so that an older or newer coordinator's reply
    still registers."""

    decision: str = "new"
    node: dict[str, Any] = msgspec.field(default_factory=dict)
    heartbeat_interval: float = 0.0
    heartbeat_phase: float = 0.0
    heartbeat_udp: str = ""  # HOST:PORT when the coordinator takes UDP heartbeats
    # True when it answers a datagram that asks (``HeartbeatBody.confirm``); an older one
    # does not, and its agents confirm over HTTP instead (``UDP_HTTP_INTERVAL``).
    udp_confirm: bool = False
    # The node credential, present when the coordinator issues one (enrolment, an approved
    # re-enrolment, a rotation): the agent stores it and proves it from then on.
    credential: str = ""
    # With shared coordinators: the API URL of the one that watches this node (heartbeats go
    # there); "" from a single coordinator.
    owner: str = ""


# ---------------------------------------------------------------------- shared coordinators
#
# Any coordinator takes a request about any node; one about a node of another coordinator's
# share is forwarded there (FORWARDED_HEADER marks it, so it is never forwarded twice), and
# every answer about a node names its owner (OWNER_HEADER) so that agents go there directly.

OWNER_HEADER = "X-Nodewatch-Owner"
FORWARDED_HEADER = "X-Nodewatch-Forwarded-For"


# ---------------------------------------------------------------------- node credentials
#
# Issued by the coordinator at enrolment (``RegisterAnswer.credential``), kept by the agent in
# its state file, and proven on every later register and heartbeat in this header (HTTP) or as
# the key of the datagram's tag (UDP). The coordinator stores only ``credential_hash`` and the
# derived ``node_heartbeat_key``, never the secret.

CREDENTIAL_HEADER = "X-Nodewatch-Node-Credential"
_UDP_CONTEXT = b"udp"


def new_credential() -> str:
    """A fresh node credential: 32 random bytes, URL-safe text."""
    return secrets.token_urlsafe(32)


def credential_hash(secret: str) -> str:
    """What the coordinator stores of a credential (and compares, in constant time): its
    SHA-256, hex. Empty for no credential."""
    return hashlib.sha256(secret.encode()).hexdigest() if secret else ""


def node_heartbeat_key(secret: str) -> bytes:
    """A node's UDP tag key, HMAC-SHA256(secret, "udp"): both ends derive it, the coordinator
    stores it (it must verify tags) instead of the secret, which stays on the node."""
    return hmac.new(secret.encode(), _UDP_CONTEXT, hashlib.sha256).digest() if secret else b""


def heartbeat_body(doc: HealthDoc, *, final: bool = False) -> HeartbeatBody:
    """The heartbeat that carries ``doc`` (``final`` on a clean stop)."""
    return HeartbeatBody(
        node_id=doc.node_id, incarnation=doc.incarnation, seq=doc.seq, ts=doc.ts,
        status=doc.status, reasons=doc.reasons, system=doc.system, load=doc.load,
        sample_interval=doc.sample_interval, samples=doc.samples,
        final=True if final else UNSET,
    )


# ---------------------------------------------------------------------- etcd lease, /probe


class AgentLease(msgspec.Struct):
    """What an agent in etcd lease mode publishes under ``P/agents/<node_id>``: its
    registration (the coordinators' leader registers it from this; ``heartbeat_interval`` is
    carried but not used there)."""

    node_id: str
    address: str
    incarnation: int
    last_seq: int = 0
    last_ts: float = 0.0
    version: str = ""
    labels: dict[str, str] = {}
    heartbeat_interval: float = 0.0
    # HMAC-SHA256 (hex) of the announcement without it, keyed with the node's
    # ``node_heartbeat_key``: anyone who can write to etcd could publish a node's key, so once
    # a node holds a credential, only an announcement it signed is taken (``lease_proof``).
    proof: str = ""


def lease_proof(lease: AgentLease, key: bytes) -> str:
    """The ``proof`` of ``lease`` under ``key`` ('' without a key: a node not enrolled)."""
    if not key:
        return ""
    body = msgspec.json.encode(msgspec.structs.replace(lease, proof=""))
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def lease_proven(lease: AgentLease, key: bytes) -> bool:
    """Whether ``lease`` carries a valid proof under ``key`` (constant time)."""
    return bool(key and lease.proof) and hmac.compare_digest(lease_proof(lease, key),
                                                              lease.proof)


class ProbeReply(msgspec.Struct, kw_only=True):
    """The agent's ``GET /probe`` answer: its own check of ``target``'s ``/health``. Only
    ``reachable`` is required of a peer's answer."""

    target: str = ""
    reachable: bool
    latency: float = 0.0
    failure: str | None = None  # a FailureClass value: the class of failure, never its text
    detail: str = ""  # empty from current agents (no text from the target); older ones sent it
    status: str | None = None  # the target's own NodeStatus, when it answered a health body


_probe_decoder = msgspec.json.Decoder(ProbeReply)


def decode_probe_reply(body: bytes) -> ProbeReply | None:
    """A peer's ``/probe`` answer, or None when it is not one."""
    try:
        return _probe_decoder.decode(body)
    except msgspec.DecodeError:  # also ValidationError
        return None


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


def peek_node_id(data: bytes) -> str | None:
    """The ``node_id`` of a datagram's payload before its tag is checked (which needs the
    node's key): None when it has none. The tag is checked before anything is applied."""
    body = memoryview(data)[:-TAG_SIZE] if len(data) > TAG_SIZE else memoryview(data)
    try:
        if data[:1] == b"{":
            node = _peek_json.decode(body)
        else:
            node = _peek_msgpack.decode(body)
    except msgspec.DecodeError:
        # A datagram without a tag (no token configured) parses whole.
        try:
            node = (_peek_json if data[:1] == b"{" else _peek_msgpack).decode(data)
        except msgspec.DecodeError:
            return None
    return node.node_id if isinstance(node.node_id, str) else None


class _NodeIdOnly(msgspec.Struct):
    node_id: str = ""


_peek_json = msgspec.json.Decoder(_NodeIdOnly)
_peek_msgpack = msgspec.msgpack.Decoder(_NodeIdOnly)


def encode_heartbeat_datagram(payload: Any, key: bytes) -> bytes:
    """A heartbeat payload (dict or struct) as one datagram, tagged when ``key`` is set."""
    return tagged(_msgpack_encoder.encode(payload), key)


class UdpReply(msgspec.Struct, array_like=True):
    """The coordinator's answer over UDP. Status 404, "I do not know this node" (421: another
    coordinator watches it), so that an agent pushing over UDP hears it at once instead of at
    its next HTTP heartbeat; 200, "applied", only to a datagram that asked (``confirm``).
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
