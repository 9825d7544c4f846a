"""Domain types shared by the detection core, the stores, the poller and the API.

Plain slotted dataclasses and enums: the core never sees raw dicts or HTTP objects.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

__all__ = ["ActionDue", "Admin", "CallerObservation", "CheckResult", "DrainBy", "DrainState",
           "Event", "FailureClass", "Health", "HistorySample", "NodeState", "NodeStatus",
           "OutlierState", "PeerVote", "Registration", "Report", "ReportFields", "SampleChunk",
           "event_id", "event_number"]


class Health(StrEnum):
    """The coordinator's observation of a node."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"


class NodeStatus(StrEnum):
    """What the node says about itself."""

    OK = "ok"
    DEGRADED = "degraded"
    DRAINING = "draining"


class Admin(StrEnum):
    """What the operator wants."""

    ACTIVE = "active"
    DRAINED = "drained"
    REVIEW = "review"


class FailureClass(StrEnum):
    """Why a check failed; carried in every failure event's evidence."""

    TIMEOUT = "timeout"
    REFUSED = "refused"
    HTTP_STATUS = "http_status"
    BAD_BODY = "bad_body"
    LEASE_EXPIRED = "lease_expired"
    ERROR = "error"
    # The checker's own failure, no evidence about the node: it ran out of descriptors or
    # ports, or its loop read the check too late (a timeout that fired well past its budget).
    LOCAL = "local"


CheckSource = Literal["poll", "push", "lease"]
DrainBy = Literal["operator", "node"]  # who started a drain


@dataclass(frozen=True, slots=True)
class Report:
    """A node's self-report, from a polled ``/health`` body or a pushed heartbeat."""

    incarnation: int
    seq: int
    ts: float
    status: NodeStatus = NodeStatus.OK
    reasons: tuple[str, ...] = ()
    system: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    sample_interval: float = 0.0  # 0: the node does not say
    samples: int = -1  # samples taken this incarnation; -1: the node does not say


class ReportFields(Protocol):
    """What the core reads of a self-report: a ``Report``, or a pushed heartbeat's decoded
    body as it came (the UDP edge's routine path does not build a ``Report`` per datagram)."""

    @property
    def incarnation(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> float: ...
    @property
    def status(self) -> NodeStatus: ...
    @property
    def reasons(self) -> Sequence[str]: ...
    @property
    def system(self) -> dict[str, float]: ...
    @property
    def load(self) -> dict[str, float]: ...
    @property
    def sample_interval(self) -> float: ...
    @property
    def samples(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One observation of one node: a poll, a pushed heartbeat, or a lease expiry."""

    node_id: str
    ok: bool
    at: float
    latency: float = 0.0
    failure: FailureClass | None = None
    detail: str = ""
    report: Report | None = None
    source: CheckSource = "poll"


@dataclass(frozen=True, slots=True)
class PeerVote:
    """What one peer agent saw when asked to probe a suspect node (``GET /probe``)."""

    peer_id: str
    reachable: bool | None  # None: the coordinator could not reach the peer to ask it
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated ``POST /v1/register`` body."""

    node_id: str
    address: str
    incarnation: int
    last_seq: int
    last_ts: float
    version: str = ""
    labels: dict[str, str] = field(default_factory=dict)


RegisterDecision = Literal["new", "rejoin", "review"]


@dataclass(frozen=True, slots=True)
class CallerObservation:
    """What one caller (a load balancer, a service, a peer) saw of one node over ``window``
    seconds: evidence for the outlier rule (``detect/outliers.py``), never a check."""

    node_id: str
    requests: float
    errors: float
    latency_p99_ms: float | None = None
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class Event:
    """A transition or notable happening; ids are opaque strings that sort in order."""

    id: str
    ts: float
    node_id: str
    kind: str
    from_: str = ""
    to: str = ""
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "node_id": self.node_id,
            "kind": self.kind,
            "from": self.from_,
            "to": self.to,
            "reason": self.reason,
            "evidence": self.evidence,
        }


def event_id(number: int) -> str:
    """Opaque, sortable event id: zero-padded so string order is numeric order."""
    return f"{number:016d}"


def event_number(eid: str) -> int:
    return int(eid)


@dataclass(slots=True)
class DrainState:
    """An ongoing soft offline: what it waits for and when it gives up waiting."""

    reason: str
    started: float
    deadline: float
    by: DrainBy = "operator"
    complete: bool = False


@dataclass(slots=True)
class ActionDue:
    """An action decided and stored but not yet settled (run, or given up with
    ``action_failed``): a coordinator that dies before it settles runs it after its restart,
    so an action runs at least once (docs: README, "When the store or the host fails")."""

    kind: str
    event_id: str
    reason: str = ""


@dataclass(slots=True)
class OutlierState:
    """An ejection: the node is alive but fails its callers far more than its group, so it
    takes no new work until ``until`` and until its figures are back in line."""

    since: float
    until: float
    reason: str
    ejections: int  # this one included: the back-off is base_ejection_time x ejections
    dry_run: bool = False  # dry_run: recorded and shown, but the node stays schedulable
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NodeState:
    """Everything the coordinator knows about one node; the unit the stores persist."""

    node_id: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    health: Health = Health.UNKNOWN
    node_status: NodeStatus = NodeStatus.OK
    admin: Admin = Admin.ACTIVE
    incarnation: int = 0
    seq: int = 0
    last_ts: float = 0.0  # the node's own clock, from its last report
    last_seen: float = 0.0  # coordinator clock of the last successful observation
    since: float = 0.0  # coordinator clock of the last health change
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    system: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    health_reason: str = ""
    version: str = ""
    registered_at: float = 0.0
    rejoins: list[float] = field(default_factory=list)
    drain: DrainState | None = None
    cleaned_up: bool = False  # cleanup actions ran for the current outage
    actions_due: list[ActionDue] = field(default_factory=list)
    # The node's identity (never in to_json, never logged): the SHA-256 of its credential and
    # the UDP tag key derived from it (hex), when issued, and the previous pair during a
    # rotation (accepted until the node proves the new one). Empty: none issued yet.
    credential_hash: str = ""
    udp_key: str = ""
    credential_at: float = 0.0
    previous_hash: str = ""
    previous_udp_key: str = ""
    # Re-enrolment: the address of the last claim refused for want of the credential, the
    # address an operator approved to re-enrol from, and whether the credential was revoked.
    claim_address: str = ""
    reenrol_address: str = ""
    # Where those came from (the source IP of the refused claim, and of the claim approved):
    # a re-enrolment must come from the same source, not only name the same address.
    claim_from: str = ""
    reenrol_from: str = ""
    revoked: bool = False
    # Gray failures (detect/outliers.py): the current ejection, if any; how many ejections the
    # back-off counts, and when the last one ended (the count decays while the node behaves).
    outlier: OutlierState | None = None
    ejections: int = 0
    outlier_cleared_at: float = 0.0
    revision: int = 0  # store revision, for compare-and-swap; not part of the node's story

    @property
    def schedulable(self) -> bool:
        return (
            self.health is Health.HEALTHY
            and self.node_status is NodeStatus.OK
            and self.admin is Admin.ACTIVE
            and (self.outlier is None or self.outlier.dry_run)
        )

    def to_json(self) -> dict[str, Any]:
        """The public shape of ``GET /v1/nodes`` entries."""
        return {
            "node_id": self.node_id,
            "address": self.address,
            "health": self.health.value,
            "node_status": self.node_status.value,
            "admin": self.admin.value,
            "schedulable": self.schedulable,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "last_seen": self.last_seen,
            "since": self.since,
            "consecutive_failures": self.consecutive_failures,
            "system": self.system,
            "load": self.load,
            "labels": self.labels,
            "reasons": list(self.reasons) + ([self.health_reason] if self.health_reason else [])
            + ([f"outlier: {self.outlier.reason}"] if self.outlier is not None else []),
            "version": self.version,
            # What an operator needs of the node's identity: never the hashes or keys.
            "identity": {
                "enrolled": bool(self.credential_hash),
                "credential_since": self.credential_at or None,
                "pending_claim": self.claim_address or None,
                "reenrol_from": self.reenrol_address or None,
                "revoked": self.revoked,
            },
            "outlier": None
            if self.outlier is None
            else {
                "since": self.outlier.since,
                "until": self.outlier.until,
                "reason": self.outlier.reason,
                "ejections": self.outlier.ejections,
                "dry_run": self.outlier.dry_run,
                "figures": self.outlier.evidence,
            },
            "drain": None
            if self.drain is None
            else {
                "reason": self.drain.reason,
                "started": self.drain.started,
                "deadline": self.drain.deadline,
                "by": self.drain.by,
                "complete": self.drain.complete,
                "waiting_for": None
                if self.drain.complete
                else {"pending_tasks": self.load.get("pending_tasks")},
            },
        }


@dataclass(frozen=True, slots=True)
class HistorySample:
    """One point of a node's last hour: a sample as the agent took it (``span`` 0), or a
    rollup of the ``span`` seconds before ``ts`` (store/tiers.py): the mean of each figure in
    ``system`` and ``load``, their maximum in ``peak`` (``load.NAME`` for load figures), the
    worst health seen, the last seq."""

    node_id: str
    ts: float
    seq: int
    health: str
    system: dict[str, float]
    load: dict[str, float]
    span: float = 0.0
    peak: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": self.ts,
            "seq": self.seq,
            "health": self.health,
            "system": self.system,
            "load": self.load,
        }
        if self.span:
            out["span"] = self.span
            out["peak"] = self.peak
        return out


# A sample's health as one byte in a chunk: the order is the rollup's "worse ranks higher".
HEALTH_CODES = ("healthy", "unknown", "suspect", "unhealthy", "dead")


@dataclass(frozen=True, slots=True)
class SampleChunk:
    """Up to a minute of one node's raw samples, column-wise (store/tiers.py ``SampleChunks``):
    what a pushing fleet's history is written as, one store row per chunk instead of one per
    sample. ``values`` holds each sample's figures row after row, ``system`` names first, then
    ``load``; ``health`` one ``HEALTH_CODES`` index per sample. Equal figure names throughout:
    a new figure starts a new chunk."""

    node_id: str
    system: tuple[str, ...]
    load: tuple[str, ...]
    ts: array[float]
    seq: array[int]
    health: bytes
    values: array[float]

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def last_ts(self) -> float:
        return max(self.ts)

    @property
    def last_seq(self) -> int:
        return self.seq[self.ts.index(self.last_ts)]

    def samples(self) -> list[HistorySample]:
        """The chunk as the samples it was gathered from, in the order they came."""
        width, n_system = len(self.system) + len(self.load), len(self.system)
        out: list[HistorySample] = []
        for i, (ts, seq) in enumerate(zip(self.ts, self.seq, strict=True)):
            row = self.values[i * width:(i + 1) * width]
            out.append(HistorySample(
                self.node_id, ts, seq, HEALTH_CODES[self.health[i]],
                dict(zip(self.system, row[:n_system], strict=True)),
                dict(zip(self.load, row[n_system:], strict=True))))
        return out
