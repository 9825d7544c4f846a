"""Request models and response views of the coordinator API: validated once at the edge, also
the OpenAPI source. The agent's request bodies are the protocol's (nodewatch.protocol)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from nodewatch.config import NODE_ID_PATTERN
from nodewatch.model import Admin, DrainBy, Health, NodeStatus
from nodewatch.protocol import HeartbeatBody, RegisterBody, ShortText
from nodewatch.web import HTTPProblem

__all__ = ["ApproveBody", "AttentionView", "CommandResponse", "CoordinatorHealth",
           "CoordinatorLine", "DrainBody", "DrainView", "ErrorResponse", "EventView",
           "EventsResponse", "FleetCounts", "ForwardedObservations", "HeartbeatBody",
           "HistoryResponse", "HistorySampleView", "IdentityView", "MemberView", "NodeRow",
           "NodeRowsResponse", "NodeView", "NodesResponse", "ObservationBody", "ObservationsBody",
           "ObservationsResponse", "OutlierView", "RegisterBody", "RegisterResponse",
           "RemoveResponse", "SharesView", "StoreHealthView", "SummaryResponse", "convert"]



class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DrainBody(_Body):
    reason: ShortText = ""


class ApproveBody(_Body):
    reason: Annotated[ShortText, Meta(description="why; kept in the approved event")] = ""
    address: Annotated[str, Meta(max_length=300, description=(
        "the address of the claim (or, without one, of the node) being approved: a newer "
        "claim from elsewhere makes the approval fail (409) instead of approving it"))] = ""


Count = Annotated[float, Meta(ge=0, le=1e12)]


class ObservationBody(_Body):
    """What one caller saw of one node over the batch's window."""

    node_id: Annotated[str, Meta(pattern=NODE_ID_PATTERN)]
    requests: Count
    errors: Annotated[float, Meta(ge=0, le=1e12, description="at most requests")]
    latency_p99_ms: Annotated[float, Meta(ge=0, le=3.6e6)] | None = None


class ObservationsBody(_Body):
    """``POST /v1/observations``: a batch from one source (a load balancer, a service, a
    peer), one window each. The batch size is capped by ``[coordinator] max_observations``."""

    observations: list[ObservationBody]
    window: Annotated[float, Meta(gt=0, le=3600, description="seconds the counts cover")] = 10.0
    source: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:@/-]{1,128}$", description=(
        "who observed (distinct sources count as observers); default: observer@ADDRESS"))] = ""


T = TypeVar("T")


def convert(data: object, model: type[T]) -> T:
    """Validate a decoded JSON object into ``model``; a mismatch is a 422 naming the field."""
    try:
        return msgspec.convert(data, model)
    except msgspec.ValidationError as exc:
        text, sep, where = str(exc).rpartition(" - at `")
        if not sep:
            raise HTTPProblem(422, str(exc)) from None
        field = where.rstrip("`").removeprefix("$").removeprefix(".") or "body"
        message = text[:1].lower() + text[1:]
        if message.startswith("object contains unknown field"):
            raise HTTPProblem(422, f"{message.replace('object contains ', '')} in {field}"
                              if field != "body" else message) from None
        raise HTTPProblem(422, f"{field}: {message}") from None


# ---------------------------------------------------------------------- response models
#
# The handlers build responses from ``NodeState.to_json()`` and friends; these structs
# describe those shapes for the OpenAPI document, and tests/api/test_openapi.py decodes real
# responses into them, so a drift between the two fails a test.

class _View(msgspec.Struct, kw_only=True):
    pass


class DrainView(_View):
    reason: str
    started: float
    deadline: float
    by: DrainBy
    complete: bool
    waiting_for: dict[str, float | None] | None = None


class IdentityView(_View):
    enrolled: Annotated[bool, Meta(description="the node holds a credential issued here")]
    credential_since: float | None = None
    pending_claim: Annotated[str | None, Meta(
        description="address of a registration refused for want of the node's credential "
                    "(a wiped state directory, or an impostor): approve re-enrols from it")] = None
    reenrol_from: Annotated[str | None, Meta(
        description="the address an operator approved a re-enrolment from")] = None
    revoked: bool = False


class OutlierView(_View):
    since: float
    until: Annotated[float, Meta(description="end of the back-off (base_ejection_time x n)")]
    reason: Annotated[str, Meta(description="the figures: the node's and its group's")]
    ejections: int
    dry_run: bool = False
    figures: dict[str, Any] = msgspec.field(default_factory=dict)


class NodeView(_View):
    node_id: str
    address: str
    health: Health
    node_status: NodeStatus
    admin: Admin
    schedulable: bool
    incarnation: int
    seq: int
    last_seen: float
    since: float
    consecutive_failures: int
    system: dict[str, float]
    load: dict[str, float]
    labels: dict[str, str]
    reasons: list[str]
    version: str = ""
    drain: DrainView | None = None
    outlier: Annotated[OutlierView | None, Meta(
        description="set while the node is ejected as an outlier (gray failure): healthy, "
                    "but not schedulable")] = None
    identity: IdentityView | None = None
    load_score: Annotated[float | None, Meta(description="lower takes work first")] = None


class ForwardedObservations(_View):
    owner: Annotated[str, Meta(description="the coordinator that judges these nodes")]
    sent: int
    accepted: int
    unknown: list[str]
    error: Annotated[str, Meta(description="why the owner did not take them")] = ""


class ObservationsResponse(_View):
    accepted: int
    unknown: Annotated[list[str], Meta(description="node ids not known here (ignored)")]
    source: str
    forwarded: Annotated[list[ForwardedObservations], Meta(description=(
        "shared coordinators: the observations of other coordinators' nodes, sent on to "
        "them (their answers are counted in accepted and unknown)"))] = msgspec.field(
        default_factory=list)


class NodesResponse(_View):
    nodes: list[NodeView]
    revision: Annotated[str, Meta(description=(
        "where this answer stands in the coordinator's changes: pass it as changed_since to "
        "get only what changed after (when paging, keep the first page's)"))] = ""
    next_cursor: Annotated[str | None, Meta(description=(
        "the cursor of the next page (node_id order), null on the last one"))] = None
    removed: Annotated[list[str], Meta(description=(
        "with changed_since: the ids removed since that revision"))] = msgspec.field(
        default_factory=list)
    reset: Annotated[bool, Meta(description=(
        "with changed_since: the revision is unknown here (another coordinator or a restart, "
        "or too old): this is the whole list, replace what you hold"))] = False


# GET /v1/nodes?format=rows: one array per node, in the order of NodeRowsResponse.columns
# (api/fleet.py ROW_COLUMNS): the table of a fleet without each node's full view.
NodeRow = tuple[
    str,  # node_id
    str,  # address
    Health,
    NodeStatus,
    Admin,
    bool,  # schedulable
    float | None,  # cpu_percent
    float | None,  # mem_percent
    float | None,  # load1
    float | None,  # qps
    float | None,  # error_rate
    float,  # last_seen
    dict[str, str],  # labels
    list[str],  # reasons
    list[str],  # attention: why to look at it (unhealthy, suspect, outlier, review, ...)
]


class NodeRowsResponse(_View):
    columns: Annotated[list[str], Meta(description=(
        "the name of each place in a row: node_id, address, health, node_status, admin, "
        "schedulable, cpu_percent, mem_percent, load1, qps, error_rate, last_seen, labels, "
        "reasons, attention"))]
    rows: list[NodeRow]
    revision: Annotated[str, Meta(description="as in NodesResponse")] = ""
    next_cursor: Annotated[str | None, Meta(description="as in NodesResponse")] = None
    removed: Annotated[list[str], Meta(description="as in NodesResponse")] = msgspec.field(
        default_factory=list)
    reset: Annotated[bool, Meta(description="as in NodesResponse")] = False


class AttentionView(_View):
    node_id: str
    why: Annotated[list[str], Meta(description=(
        "unhealthy, suspect, outlier, review, drain waiting"))]
    health: Health
    node_status: NodeStatus
    admin: Admin
    since: float
    reasons: list[str]


class FleetCounts(_View):
    ts: Annotated[float, Meta(description="UNIX time of the sample")]
    total: int
    schedulable: int
    attention: Annotated[int, Meta(description="nodes that need attention")]
    health: dict[str, int]
    node_status: dict[str, int]
    admin: dict[str, int]


class CoordinatorLine(_View):
    """The coordinator as the dashboard's header shows it: /healthz's judgement and flags,
    without its poller statistics and store details."""

    status: Literal["ok", "degraded", "failing"]
    reasons: list[str]
    role: Literal["leader", "follower"]
    uptime: float
    loop_lag: float
    guard: bool
    in_grace: bool
    dry_run: bool


class SummaryResponse(_View):
    revision: str
    total: int
    schedulable: int
    attention: int
    health: Annotated[dict[str, int], Meta(description="every health value, zeros included")]
    node_status: dict[str, int]
    admin: dict[str, int]
    labels: Annotated[dict[str, dict[str, dict[str, int]]], Meta(description=(
        "label key -> value -> counts by health and total (the 64 most populous values)"))]
    attention_nodes: Annotated[list[AttentionView], Meta(description=(
        "the nodes that need attention, worst first (at most 200; attention is the total)"))]
    history_interval: Annotated[float, Meta(description="seconds between history samples")]
    history: Annotated[list[FleetCounts], Meta(description=(
        "the counts over the last hour, oldest first (after history_since when given)"))]
    coordinator: Annotated[CoordinatorLine | None, Meta(description=(
        "the coordinator answering: its /healthz status and flags (so that a dashboard need "
        "not ask /healthz, whose poller statistics cost more, every few seconds)"))] = None


class RegisterResponse(_View):
    decision: Literal["new", "rejoin", "review"]
    node: NodeView
    heartbeat_interval: float = 0.0
    heartbeat_phase: float = 0.0
    heartbeat_udp: Annotated[str, Meta(description="HOST:PORT for UDP heartbeats")] = ""
    udp_confirm: Annotated[bool, Meta(description=(
        "the UDP port answers a heartbeat with confirm set (status 200 once applied), so "
        "agents confirm their UDP path without an HTTP heartbeat"))] = False
    credential: Annotated[str, Meta(
        description="a node credential, when issued (enrolment, approved re-enrolment, "
                    "rotation): the agent keeps it and sends it in X-Nodewatch-Node-Credential"
    )] = ""
    owner: Annotated[str, Meta(description=(
        "shared coordinators: the URL of the one that watches this node (heartbeats go there; "
        "every answer about the node also names it in X-Nodewatch-Owner)"))] = ""


class EventView(_View):
    id: Annotated[str, Meta(description="opaque; sorts in order")]
    ts: float
    node_id: str
    kind: str
    from_: str = msgspec.field(default="", name="from")
    to: str = ""
    reason: str = ""
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)


class EventsResponse(_View):
    events: list[EventView]
    last_id: str | None


class HistorySampleView(_View):
    ts: float
    seq: int
    health: str
    system: dict[str, float]
    load: dict[str, float]
    span: float = 0.0  # a rollup of this many seconds before ts; absent for a raw sample
    peak: dict[str, float] = {}  # a rollup's maximum of each figure (load.NAME for load)


class HistoryResponse(_View):
    node_id: str
    samples: list[HistorySampleView]


class CommandResponse(_View):
    node: NodeView
    events: list[EventView]


class RemoveResponse(_View):
    removed: str
    events: list[EventView]


class StoreHealthView(_View):
    available: bool
    since: Annotated[float | None, Meta(description="UNIX time the store became unavailable")]
    unavailable_for: float
    cause: str
    queued_events: int
    dropped_events: int
    writes_failed: int


class MemberView(_View):
    name: str
    url: str
    shares: int


class SharesView(_View):
    name: Annotated[str, Meta(description="this coordinator's member name (its listen address)")]
    total: int
    held: Annotated[int, Meta(description="shares it holds: it decides for their nodes")]
    wanted: Annotated[int, Meta(description="shares the assignment gives it")]
    members: list[MemberView]


class CoordinatorHealth(_View):
    status: Annotated[Literal["ok", "degraded", "failing"],
                      Meta(description="degraded: doing its job, with reasons; failing: it "
                                       "cannot (answered with 503)")]
    reasons: Annotated[list[str], Meta(description="one per condition, with since when")]
    role: Annotated[Literal["leader", "follower", "leader (unconfirmed)", "shared"],
                    Meta(description="shared: one of several active coordinators (see shares)")]
    leader: str
    version: str
    uptime: float
    loop_lag: float
    guard: bool
    in_grace: bool
    dry_run: bool
    nodes: dict[str, int]
    store: Annotated[StoreHealthView | None,
                     Meta(description="null while the store's health is not tracked")] = None
    shares: Annotated[SharesView | None, Meta(description=(
        "coordination = \"shares\": what this coordinator holds and how the members split "
        "the fleet"))] = None


class ErrorResponse(_View):
    error: Annotated[str, Meta(description="what is wrong, for a human")]
