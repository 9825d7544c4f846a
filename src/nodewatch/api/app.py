"""The coordinator's HTTP API: a thin edge that validates input and asks the coordinator.

Every error is ``{"error": "..."}`` with a 4xx that names the problem; a rejected request
changes nothing. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from nodewatch.api.admission import RegistrationBucket, retry_after_header
from nodewatch.api.fleet import (
    ROW_COLUMNS,
    FleetSummary,
    NodeViews,
    node_row,
    page,
    parse_revision,
)
from nodewatch.api.metrics import CoordinatorMetrics
from nodewatch.api.schemas import ApproveBody, DrainBody, ObservationsBody, convert
from nodewatch.api.sd import target_groups
from nodewatch.api.udp import UdpHeartbeats, push_result
from nodewatch.config import NODE_ID_RE
from nodewatch.coordinator.service import Coordinator, NotLeader, NotOwner
from nodewatch.detect.identity import IdentityRejected
from nodewatch.detect.outcome import Conflict, UnknownNode
from nodewatch.model import (
    CallerObservation,
    Event,
    Health,
    NodeState,
    Registration,
)
from nodewatch.protocol import (
    CREDENTIAL_HEADER,
    FORWARDED_HEADER,
    OWNER_HEADER,
    VERSION,
    HeartbeatBody,
    RegisterBody,
)
from nodewatch.store.base import StoreUnavailable
from nodewatch.web import (
    RAW_BODY,
    HTTPProblem,
    error_response,
    json_response,
    problem_middleware,
    read_json_object,
    token_ok,
)

__all__ = ["ADMISSION_KEY", "COORDINATOR_KEY", "FLEET_KEY", "FORWARD_SESSION_KEY",
           "HEARTBEAT_UDP_KEY", "MAX_WAIT", "METRICS_KEY", "NODE_FORMATS", "NODE_VIEWS_KEY",
           "SSE_KEEPALIVE", "STATIC_DIR", "build_app"]

ADMISSION_KEY: web.AppKey[RegistrationBucket] = web.AppKey("admission", RegistrationBucket)

COORDINATOR_KEY: web.AppKey[Coordinator] = web.AppKey("coordinator", Coordinator)
METRICS_KEY: web.AppKey[CoordinatorMetrics] = web.AppKey("metrics", CoordinatorMetrics)
HEARTBEAT_UDP_KEY: web.AppKey[str] = web.AppKey("heartbeat_udp", str)
NODE_VIEWS_KEY: web.AppKey[NodeViews] = web.AppKey("node_views", NodeViews)
FLEET_KEY: web.AppKey[FleetSummary] = web.AppKey("fleet", FleetSummary)
FORWARD_SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("forward",
                                                                    aiohttp.ClientSession)
log = logging.getLogger(__name__)
json_encoder = msgspec.json.Encoder()
_EVENT_ID_RE = re.compile(r"^\d{1,20}$")
MAX_WAIT = 60.0
SSE_KEEPALIVE = 15.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _not_leader_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A follower's refusal (the service's NotLeader) is a 503 naming the leader; a store
    that cannot write within store_timeout (StoreUnavailable) a 503 naming the store. With
    shared coordinators, a request about another coordinator's node (NotOwner) is forwarded
    to its owner, once."""
    try:
        response = await handler(request)
    except NotOwner as exc:
        if exc.owner and FORWARDED_HEADER not in request.headers:
            return await _forward(request, exc.owner)
        return error_response(503, str(exc))
    except (NotLeader, StoreUnavailable) as exc:
        return error_response(503, str(exc))
    coord = _coordinator(request)
    if coord.sharing is not None and request.path in ("/v1/register", "/v1/heartbeat"):
        response.headers[OWNER_HEADER] = coord.config.coordinator.url
    return response


FORWARD_BODY_CAP = 16 * 1024 * 1024
_FORWARDED_REQUEST = ("Authorization", "Content-Type", CREDENTIAL_HEADER)
_FORWARDED_ANSWER = ("Content-Type", "Retry-After", OWNER_HEADER)


async def _forward(request: web.Request, owner: str) -> web.StreamResponse:
    """Send the request on to the node's owner and answer with its answer (bounded by
    ``store_timeout``). With client certificates the node's certificate cannot travel, so
    the client is redirected (307) instead. The original client's address goes along
    (FORWARDED_HEADER), trusted only from a member coordinator's host."""
    coord = _coordinator(request)
    target = owner.rstrip("/") + request.path_qs
    if coord.config.coordinator.tls_client_ca:
        redirect = web.Response(status=307, headers={"Location": target, OWNER_HEADER: owner})
        return redirect
    if request.secure and not target.startswith("https://"):
        # The agent's credential and token came over TLS: never on to a plain http owner.
        return error_response(503, f"the node's coordinator is {owner}, not https: not "
                                   "forwarded (set its advertise_url to an https:// URL)")
    headers = {k: request.headers[k] for k in _FORWARDED_REQUEST if k in request.headers}
    headers[FORWARDED_HEADER] = _source(request)
    body = request.get(RAW_BODY)
    if body is None:
        body = await request.read()
    timeout = aiohttp.ClientTimeout(total=float(coord.config.coordinator.store_timeout))
    try:
        async with request.app[FORWARD_SESSION_KEY].request(
                request.method, target, data=body, headers=headers, timeout=timeout,
                allow_redirects=False) as answer:
            chunks: list[bytes] = []
            size = 0
            async for chunk in answer.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > FORWARD_BODY_CAP:
                    return error_response(502, f"the answer of the node's coordinator {owner} "
                                               f"is over {FORWARD_BODY_CAP} bytes")
                chunks.append(chunk)
            out = web.Response(status=answer.status, body=b"".join(chunks))
            for key in _FORWARDED_ANSWER:
                if key in answer.headers:
                    out.headers[key] = answer.headers[key]
            out.headers.setdefault(OWNER_HEADER, owner)
            return out
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return error_response(503, f"the node's coordinator {owner} did not answer "
                                   f"({type(exc).__name__}); retry")


def _source(request: web.Request) -> str:
    """The client's address: the remote end, or what a member coordinator forwarding the
    request says it was."""
    remote = request.remote or ""
    forwarded = request.headers.get(FORWARDED_HEADER, "")
    coord = _coordinator(request)
    if forwarded and coord.sharing is not None and remote in coord.member_hosts():
        return forwarded
    return remote


async def _forward_session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession()
    app[FORWARD_SESSION_KEY] = session
    yield
    await session.close()


def _coordinator(request: web.Request) -> Coordinator:
    return request.app[COORDINATOR_KEY]


def _require(request: web.Request, tokens: tuple[str, ...], what: str) -> None:
    if not token_ok(request, tokens):
        raise HTTPProblem(401, f"missing or wrong bearer token ({what} token required)")


def _node_id(request: web.Request) -> str:
    node_id = request.match_info["node_id"]
    if not NODE_ID_RE.match(node_id):
        raise HTTPProblem(400, "node id must be 1-128 characters of [A-Za-z0-9._-]")
    return node_id


def _node(coord: Coordinator, node_id: str) -> NodeState:
    node = coord.cluster.node(node_id)
    if node is None:
        raise HTTPProblem(404, f"unknown node {node_id!r}")
    return node


def _float_param(request: web.Request, name: str, default: float, low: float,
                 high: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise HTTPProblem(400, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise HTTPProblem(400, f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise HTTPProblem(400, f"{name} must be true or false, got {raw!r}")


def load_score(node: NodeState) -> float:
    """One number to order nodes by how busy they are (lower takes work first)."""
    cpu = node.system.get("cpu_percent", 0.0) / 100.0
    mem = node.system.get("mem_percent", 0.0) / 100.0
    pending = node.load.get("pending_tasks", 0.0)
    return round(max(cpu, mem) + pending / 1000.0, 6)


# ---------------------------------------------------------------------- agent-facing


def _udp_offer(udp: UdpHeartbeats) -> str:
    """HOST:PORT for register answers, as bound: a wildcard host tells agents to use their
    coordinator URL's host."""
    host, port = udp.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _certificate_names(request: web.Request) -> set[str] | None:
    """The names (CN and DNS/URI SANs) of the client certificate, None when none was
    presented (or the connection is not TLS)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"}
    names.update(value for key, value in cert.get("subjectAltName", ())
                 if key in ("DNS", "URI"))
    return names


def _check_certificate(request: web.Request, coord: Coordinator, node_id: str) -> None:
    """With client certificates (``[coordinator] tls_client_ca``), the certificate must name
    the node it speaks for (CN or a SAN equal to the node id)."""
    if not coord.config.coordinator.tls_client_ca:
        return
    names = _certificate_names(request)
    if names is not None and node_id not in names:
        coord.reject(node_id, via=request.path, claimant=_source(request),
                     reason="client certificate names another node")
        raise HTTPProblem(403, f"the client certificate does not name node {node_id!r}")


def _credential(request: web.Request) -> str:
    return request.headers.get(CREDENTIAL_HEADER, "")


async def register(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    _require(request, coord.config.coordinator.agent_tokens, "agent")
    wait = request.app[ADMISSION_KEY].admit(time.monotonic())
    if wait:
        # Past [coordinator] max_registrations_per_second: nothing is read or changed.
        response = error_response(429, "too many registrations; retry after "
                                       f"{wait:.2f}s (Retry-After)")
        response.headers["Retry-After"] = retry_after_header(wait)
        return response
    body = convert(await read_json_object(request, coord.config.coordinator.max_body),
                   RegisterBody)
    _check_certificate(request, coord, body.node_id)
    try:
        decision, node, credential = await coord.enrol(Registration(
            node_id=body.node_id, address=body.address, incarnation=body.incarnation,
            last_seq=body.last_seq, last_ts=body.last_ts, version=body.version,
            labels=dict(body.labels)), _credential(request), _source(request))
    except IdentityRejected as exc:
        raise HTTPProblem(403, str(exc)) from None
    # The agent's own interval wins; the coordinator's [agent] setting is the fallback.
    interval = body.heartbeat_interval or float(coord.config.agent.heartbeat_interval)
    answer: dict[str, Any] = {
        "decision": decision,
        "node": node.to_json(),
        "heartbeat_interval": interval,
        "heartbeat_phase": coord.heartbeat_phase(node.node_id, interval),
    }
    udp = request.app[HEARTBEAT_UDP_KEY]
    if udp:
        answer["heartbeat_udp"] = udp  # agents with heartbeat_transport = "udp" push there
        answer["udp_confirm"] = True  # and ask it, not HTTP, whether their datagrams arrive
    if credential:
        answer["credential"] = credential  # only here, once: stored hashed, never logged
    if coord.sharing is not None:
        answer["owner"] = coord.config.coordinator.url  # heartbeats come here directly
    return json_response(answer)


async def heartbeat(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    _require(request, coord.config.coordinator.agent_tokens, "agent")
    body = convert(await read_json_object(request, coord.config.coordinator.max_body),
                   HeartbeatBody)
    if body.node_id not in coord.cluster.nodes:
        raise HTTPProblem(404, f"unknown node {body.node_id!r}: register first")
    _check_certificate(request, coord, body.node_id)
    try:
        coord.check_identity(body.node_id, _credential(request), via="heartbeat",
                             claimant=_source(request))
    except IdentityRejected as exc:
        raise HTTPProblem(403, str(exc)) from None
    try:
        outcome = coord.heartbeat(push_result(body, coord.clock()))
    except UnknownNode:
        raise HTTPProblem(404, f"unknown node {body.node_id!r}: register first") from None
    if outcome.stale:
        node = coord.cluster.nodes[body.node_id]
        raise HTTPProblem(409, f"stale report: ({body.incarnation}, {body.seq}) is not newer "
                               f"than the stored ({node.incarnation}, {node.seq})")
    if body.final:
        await coord.persist()
    return web.Response(status=204)


async def observations(request: web.Request) -> web.Response:
    """Callers' evidence of gray failures: validated whole (a bad item refuses the batch and
    changes nothing), unknown node ids reported back rather than refused."""
    coord = _coordinator(request)
    cc = coord.config.coordinator
    _require(request, cc.observer_tokens, "observer")
    body = convert(await read_json_object(request, cc.observations_max_body), ObservationsBody)
    if len(body.observations) > cc.max_observations:
        raise HTTPProblem(413, f"{len(body.observations)} observations in one batch; the limit "
                               f"is {cc.max_observations} ([coordinator] max_observations)")
    for i, item in enumerate(body.observations):
        if item.errors > item.requests:
            raise HTTPProblem(422, f"observations[{i}].errors: {item.errors:g} errors is more "
                                   f"than its {item.requests:g} requests")
    source = body.source or f"observer@{_source(request) or 'unknown'}"
    here = body.observations
    elsewhere: dict[str, list[Any]] = {}
    if coord.sharing is not None and FORWARDED_HEADER not in request.headers:
        # Shared coordinators: each node's evidence goes to the coordinator that judges it.
        here = []
        for item in body.observations:
            owner = "" if item.node_id not in coord.cluster.nodes or coord.owns(item.node_id) \
                else coord.owner_url(item.node_id)
            if owner:
                elsewhere.setdefault(owner, []).append(item)
            else:
                here.append(item)
    unknown = coord.observe_callers(source, [
        CallerObservation(o.node_id, o.requests, o.errors, o.latency_p99_ms, body.window)
        for o in here])
    missing = set(unknown)
    accepted = sum(1 for o in here if o.node_id not in missing)
    answer: dict[str, Any] = {"accepted": accepted, "unknown": unknown, "source": source}
    if elsewhere:
        answer["forwarded"] = await _forward_observations(request, source, body.window,
                                                          elsewhere)
        answer["accepted"] += sum(f["accepted"] for f in answer["forwarded"])
        answer["unknown"] = sorted({*unknown, *(i for f in answer["forwarded"]
                                               for i in f["unknown"])})
    return json_response(answer)


async def _forward_observations(request: web.Request, source: str, window: float,
                                batches: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Send each owner its nodes' observations (concurrently, each bounded by
    ``store_timeout``); what each answered, or why it did not (its items then count as not
    accepted: the observer's next window brings fresh counts anyway)."""
    coord = _coordinator(request)
    timeout = aiohttp.ClientTimeout(total=float(coord.config.coordinator.store_timeout))
    headers = {k: request.headers[k] for k in ("Authorization",) if k in request.headers}
    headers[FORWARDED_HEADER] = _source(request)
    session = request.app[FORWARD_SESSION_KEY]

    async def one(owner: str, items: list[Any]) -> dict[str, Any]:
        body = {"source": source, "window": window,
                "observations": msgspec.to_builtins(items)}
        result: dict[str, Any] = {"owner": owner, "sent": len(items), "accepted": 0,
                                  "unknown": []}
        try:
            async with session.post(f"{owner}/v1/observations", json=body, headers=headers,
                                    timeout=timeout) as answer:
                data = await answer.json(content_type=None)
                if answer.status == 200 and isinstance(data, dict):
                    result["accepted"] = int(data.get("accepted", 0))
                    result["unknown"] = [str(i) for i in data.get("unknown", [])]
                else:
                    result["error"] = f"HTTP {answer.status}"
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            result["error"] = type(exc).__name__
        return result

    return list(await asyncio.gather(*(one(o, i) for o, i in sorted(batches.items()))))


# ---------------------------------------------------------------------- reads


def _select_nodes(request: web.Request,
                  among: list[NodeState] | None = None) -> list[NodeState]:
    """The nodes (of ``among``, default all) that ``?schedulable=``, ``?health=`` and
    ``?label=`` select (all without)."""
    coord = _coordinator(request)
    nodes = list(coord.cluster.nodes.values()) if among is None else among
    schedulable = _bool_param(request, "schedulable")
    if schedulable is not None:
        nodes = [n for n in nodes if n.schedulable is schedulable]
    health = request.query.get("health")
    if health is not None:
        wanted = set(health.split(","))
        unknown = wanted - {h.value for h in Health}
        if unknown:
            raise HTTPProblem(400, f"unknown health {sorted(unknown)}; expected any of "
                                   f"{', '.join(h.value for h in Health)}")
        nodes = [n for n in nodes if n.health.value in wanted]
    for label in request.query.getall("label", []):
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise HTTPProblem(400, f"label filter must be key=value, got {label!r}")
        nodes = [n for n in nodes if n.labels.get(key) == value]
    return nodes


NODE_FORMATS = ("views", "rows")


async def list_nodes(request: web.Request) -> web.Response:
    """Nodes in id order (or by load), paged by ``limit`` and ``cursor``; with
    ``changed_since`` only those changed since that revision, and the ids removed since; with
    ``format=rows`` each node as the table's compact row (``api/fleet.py`` ``node_row``)."""
    coord = _coordinator(request)
    views = request.app[NODE_VIEWS_KEY]
    sort = request.query.get("sort", "node_id")
    if sort not in ("node_id", "load"):
        raise HTTPProblem(400, f"sort must be load or node_id, got {sort!r}")
    shape = request.query.get("format", "views")
    if shape not in NODE_FORMATS:
        raise HTTPProblem(400, f"format must be views or rows, got {shape!r}")
    limit = None
    if request.query.get("limit"):
        wanted = _float_param(request, "limit", 0, 1, 100_000)
        if not wanted.is_integer():
            raise HTTPProblem(400, f"limit must be a whole number, got {wanted:g}")
        limit = int(wanted)
    cursor = request.query.get("cursor") or None
    if cursor is not None and sort != "node_id":
        raise HTTPProblem(400, "cursor pages in node_id order: it cannot go with sort=load")
    if cursor is not None and not NODE_ID_RE.match(cursor):
        raise HTTPProblem(400, f"cursor must be a node id (a next_cursor), got {cursor!r}")
    revision = coord.cluster.revisions
    body: dict[str, Any] = {"revision": f"{revision.epoch}-{revision.revision}"}
    nodes_by_id = coord.cluster.nodes
    raw_since = request.query.get("changed_since")
    ids = views.ordered_ids()
    if raw_since is not None:
        since = parse_revision(raw_since)
        if since is None:
            raise HTTPProblem(400, "changed_since must be a revision as returned in revision, "
                                   f"got {raw_since!r}")
        changes = views.changes(since)
        body["reset"] = changes is None
        if changes is not None:
            ids, body["removed"] = changes
        else:
            body["removed"] = []
    filtered = any(name in request.query for name in ("schedulable", "health", "label"))
    if sort == "load":
        selected = _select_nodes(request, [nodes_by_id[i] for i in ids])
        selected.sort(key=lambda n: (load_score(n), n.node_id))
        chosen, body["next_cursor"] = [n.node_id for n in selected][:limit], None
    elif filtered:
        selected = _select_nodes(request, [nodes_by_id[i] for i in ids])
        chosen, body["next_cursor"] = page([n.node_id for n in selected], cursor, limit)
    else:  # a page of the id order as it is: no walk over the fleet for one page
        chosen, body["next_cursor"] = page(ids, cursor, limit)
    parts = views.encoded([nodes_by_id[i] for i in chosen], shape)
    tail = json_encoder.encode(body)
    # The node views are encoded once per change of their node (api/fleet.py): join them.
    if shape == "rows":
        data = (b'{"columns":' + _ROW_COLUMNS_JSON + b',"rows":[' + b",".join(parts) + b"],"
                + tail[1:])
    else:
        data = b'{"nodes":[' + b",".join(parts) + b"]," + tail[1:]
    return web.Response(body=data, content_type="application/json")


_ROW_COLUMNS_JSON = json_encoder.encode(list(ROW_COLUMNS))


async def fleet_summary(request: web.Request) -> web.Response:
    """Counts now and over the last hour, label groups, the nodes that need attention."""
    since = request.query.get("history_since")
    history_since = None if since is None else _float_param(request, "history_since", 0, 0,
                                                             1e11)
    body = request.app[FLEET_KEY].answer(history_since)
    body["coordinator"] = _coordinator_line(_coordinator(request))
    return json_response(body)


def _coordinator_line(coord: Coordinator) -> dict[str, Any]:
    """A ``CoordinatorLine``: what ``/healthz`` says, less the poller's statistics (they sort
    every retained lateness sample: tens of ms of the loop at fleet size)."""
    health = coord.health()
    now = coord.clock()
    return {"status": health.status, "reasons": health.reasons, "role": coord.role,
            "uptime": round(now - coord.started_at, 3), "loop_lag": round(coord.loop_lag, 4),
            "guard": coord.cluster.guard_on,
            "in_grace": now < coord.cluster.started_at + coord.policy.startup_grace,
            "dry_run": coord.policy.dry_run}


async def prometheus_sd(request: web.Request) -> web.Response:
    """Prometheus ``http_sd``: one target group per (selected) node (``api/sd.py``)."""
    return json_response(target_groups(_select_nodes(request)))


def _node_view(node: NodeState) -> dict[str, Any]:
    """A ``NodeView``: the node's public shape with its load score."""
    item = node.to_json()
    item["load_score"] = load_score(node)
    return item


async def get_node(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    node = _node(coord, _node_id(request))
    return json_response(_node_view(node))


async def node_history(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    node = _node(coord, _node_id(request))
    now = coord.clock()
    since = _float_param(request, "since", now - coord.config.detection.history_ttl, 0, 1e11)
    samples = await coord.history(node.node_id, since)
    return json_response({"node_id": node.node_id, "samples": [s.to_json() for s in samples]})


def _after_param(request: web.Request) -> str | None:
    after = request.query.get("after") or request.headers.get("Last-Event-ID") or None
    if after is not None and not _EVENT_ID_RE.match(after):
        raise HTTPProblem(400, f"after must be an event id as returned in last_id, got {after!r}")
    return after.zfill(16) if after is not None else None


async def list_events(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    after = _after_param(request)
    wait = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT)
    limit = int(_float_param(request, "limit", 1000, 1, 10_000))
    node_id = request.query.get("node_id")
    if node_id is not None and not NODE_ID_RE.match(node_id):
        raise HTTPProblem(400, "node_id must be 1-128 characters of [A-Za-z0-9._-]")
    if _bool_param(request, "newest"):
        # The newest retained in memory (the coordinator keeps the last RECENT_EVENTS).
        events: list[Event] = []
        for event in reversed(coord.recent):
            if len(events) >= limit or (after is not None and event.id <= after):
                break
            if node_id is None or event.node_id == node_id:
                events.append(event)
        events.reverse()
        last_id = coord.last_event_id() or after
        return json_response({"events": [e.to_json() for e in events], "last_id": last_id})
    events = await coord.wait_for_events(after, wait, limit)
    last_id = events[-1].id if events else (after or coord.last_event_id())
    if node_id is not None:
        events = [e for e in events if e.node_id == node_id]  # last_id: how far it read
    return json_response({"events": [e.to_json() for e in events], "last_id": last_id})


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every event as it happens, resumable with Last-Event-ID."""
    coord = _coordinator(request)
    after = _after_param(request)
    if after is None and "after" not in request.query:
        after = coord.last_event_id()  # a fresh stream starts at "now"
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    encoder = msgspec.json.Encoder()
    await response.write(b": nodewatch event stream\nretry: 2000\n\n")
    try:
        while True:
            events = await coord.wait_for_events(after, SSE_KEEPALIVE, 500)
            if not events:
                await response.write(b": keep-alive\n\n")
                continue
            chunk = bytearray()
            for event in events:
                chunk += f"id: {event.id}\nevent: {event.kind}\ndata: ".encode()
                chunk += encoder.encode(event.to_json()) + b"\n\n"
            await response.write(bytes(chunk))
            after = events[-1].id
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


# ---------------------------------------------------------------------- operator commands


def _command(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        coord = _coordinator(request)
        _require(request, coord.config.coordinator.admin_tokens, "admin")
        node_id = _node_id(request)
        reason = address = ""
        if name in ("drain", "approve") and request.can_read_body:
            raw = await request.content.read(coord.config.coordinator.max_body + 1)
            if len(raw) > coord.config.coordinator.max_body:
                raise HTTPProblem(413, "request body exceeds the limit of "
                                       f"{coord.config.coordinator.max_body} bytes")
            if raw.strip():
                try:
                    data = msgspec.json.decode(raw)
                except msgspec.DecodeError as exc:
                    raise HTTPProblem(400, f"malformed JSON: {exc}") from None
                if name == "drain":
                    reason = convert(data, DrainBody).reason
                else:
                    approve = convert(data, ApproveBody)
                    reason, address = approve.reason, approve.address
        _node(coord, node_id)
        try:
            outcome = await coord.command(name, node_id, reason, address=address)
        except UnknownNode:
            raise HTTPProblem(404, f"unknown node {node_id!r}") from None
        except Conflict as exc:
            raise HTTPProblem(409, str(exc)) from None
        if name == "remove":
            return json_response({"removed": node_id,
                                  "events": [e.to_json() for e in outcome.events]})
        node = coord.cluster.nodes[node_id]
        return json_response({"node": node.to_json(),
                              "events": [e.to_json() for e in outcome.events]})

    handler.__name__ = f"{name}_node"
    return handler


# ---------------------------------------------------------------------- the coordinator itself


async def healthz(request: web.Request) -> web.Response:
    coord = _coordinator(request)
    body: dict[str, Any] = coord.status()
    body["version"] = VERSION
    # Failing: a load balancer or systemd should stop sending here (same body, to say why).
    return json_response(body, status=503 if body["status"] == "failing" else 200)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[METRICS_KEY].render()
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})


# ---------------------------------------------------------------------- documents and dashboard

STATIC_DIR = Path(__file__).parent / "static"


async def openapi_json(request: web.Request) -> web.Response:
    from nodewatch.api.openapi import openapi_document

    return json_response(openapi_document())


_ASSET_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _asset(name: str) -> Handler:
    """A dashboard asset served from memory: read and gzipped once, never through the default
    executor (which the store's threads may keep busy at fleet size). A browser holding the
    same version (its ETag) gets a 304; one that accepts gzip gets the compressed bytes (about
    a quarter), so the coordinator writes less for the page."""
    path = STATIC_DIR / name
    body = path.read_bytes()
    compressed = gzip.compress(body, compresslevel=9, mtime=0)
    etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
    content_type = _ASSET_TYPES[path.suffix]
    headers = {"Cache-Control": "no-cache", "ETag": etag, "Vary": "Accept-Encoding"}

    async def handler(request: web.Request) -> web.Response:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=compressed, content_type=content_type, charset="utf-8",
                                headers={**headers, "Content-Encoding": "gzip"})
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers=headers)

    handler.__name__ = f"asset_{path.stem}"
    return handler


async def _fleet_history(app: web.Application) -> AsyncIterator[None]:
    """The hour of fleet counts behind ``GET /v1/summary``: one sample per interval."""
    fleet, coord = app[FLEET_KEY], app[COORDINATOR_KEY]

    async def sampler() -> None:
        # Kept current every second, so that no request (and no burst of changes) makes one
        # long catch-up on the loop; one sample into the hour every interval.
        due = 0.0
        while True:
            try:
                now = coord.clock()
                if now >= due:
                    fleet.sample(now)
                    due = now + fleet.interval
                else:
                    fleet.refresh()
            except Exception:
                log.exception("fleet summary failed; trying again in 1s")
            await asyncio.sleep(1.0)

    task = asyncio.get_running_loop().create_task(sampler(), name="nodewatch-fleet-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(coord: Coordinator, udp: UdpHeartbeats | None = None) -> web.Application:
    """The aiohttp application; the caller owns the coordinator's start and stop (and the UDP
    heartbeat endpoint's, whose address register answers then offer)."""
    app = web.Application(middlewares=[problem_middleware, _not_leader_middleware],
                          client_max_size=coord.config.coordinator.max_body)
    app[COORDINATOR_KEY] = coord
    app[METRICS_KEY] = CoordinatorMetrics(coord, None if udp is None else udp.counts)
    app[HEARTBEAT_UDP_KEY] = "" if udp is None else _udp_offer(udp)
    cc = coord.config.coordinator
    app[ADMISSION_KEY] = RegistrationBucket(cc.max_registrations_per_second,
                                            cc.registration_burst)
    app[NODE_VIEWS_KEY] = NodeViews(lambda: coord.cluster,
                                    {"views": _node_view, "rows": node_row},
                                    json_encoder.encode)
    app[FLEET_KEY] = FleetSummary(lambda: coord.cluster)
    app.cleanup_ctx.append(_fleet_history)
    app.cleanup_ctx.append(_forward_session)
    r = app.router
    r.add_post("/v1/register", register)
    r.add_post("/v1/heartbeat", heartbeat)
    r.add_post("/v1/observations", observations)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/nodes/{node_id}", get_node)
    r.add_get("/v1/nodes/{node_id}/history", node_history)
    for name in ("drain", "undrain", "approve", "revoke"):
        r.add_post(f"/v1/nodes/{{node_id}}/{name}", _command(name))
    r.add_delete("/v1/nodes/{node_id}", _command("remove"))
    r.add_get("/v1/sd/prometheus", prometheus_sd)
    r.add_get("/v1/summary", fleet_summary)
    r.add_get("/v1/events", list_events)
    r.add_get("/v1/events/stream", event_stream)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/openapi.json", openapi_json)
    r.add_get("/", _asset("index.html"))  # the single-page dashboard, no network needed
    for name in ("dashboard.js", "dashboard.css"):
        r.add_get(f"/static/{name}", _asset(name))
    r.add_static("/static/", STATIC_DIR, append_version=False)
    return app
