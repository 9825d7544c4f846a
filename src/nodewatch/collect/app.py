"""The agent's HTTP API on aiohttp: every route answers from in-memory state (the latest
sample); only ``/probe`` does network I/O. Mutations are limited to loopback or the token, and
so is ``/probe`` whenever the agent has a token (else it would scan the node's network)."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from nodewatch.collect.checks import split_target
from nodewatch.collect.metrics import CONTENT_TYPE_LATEST
from nodewatch.config import AgentConfig
from nodewatch.model import NodeStatus
from nodewatch.protocol import ProbeReply
from nodewatch.web import (
    JSON,
    HTTPProblem,
    json_response,
    problem_middleware,
    read_json_object,
    token_ok,
)


class AgentSurface(Protocol):
    """What the HTTP edge needs of the agent: its cached state and its few verbs (the agent
    builds this app, so the app names this narrow protocol instead of importing the agent)."""

    @property
    def config(self) -> AgentConfig: ...
    @property
    def status(self) -> NodeStatus: ...
    @property
    def load(self) -> dict[str, float]: ...
    @property
    def system(self) -> dict[str, float]: ...
    def health_bytes(self) -> bytes: ...
    def metrics_bytes(self) -> bytes: ...
    def set_load(self, values: Mapping[str, float | None] | None = None,
                 **more: float | None) -> None: ...
    async def set_status(self, status: NodeStatus | str, reason: str = "") -> None: ...
    async def probe(self, target: str, *, limits: tuple[float, float] | None = None
                    ) -> ProbeReply: ...

__all__ = ["AgentSurface", "build_app", "is_loopback", "mutation_allowed", "parse_status_update",
           "probe_allowed"]

_STATUS_WORDS = ", ".join(repr(s.value) for s in NodeStatus)
_MAX_REASON = 512


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def mutation_allowed(remote: str | None, authorization: str | None, token: str,
                     token_matches: bool) -> tuple[bool, int, str]:
    """Loopback callers, or any caller with the agent token; a wrong token is refused even
    from loopback, so a misconfigured client learns about it."""
    if authorization:
        if not token:
            return (True, 0, "") if is_loopback(remote) else (
                False, 403, "no agent token is configured; mutations only from loopback")
        if not token_matches:
            return False, 401, "invalid agent token"
        return True, 0, ""
    if is_loopback(remote):
        return True, 0, ""
    if token:
        return False, 401, "missing agent token (Authorization: Bearer ...)"
    return False, 403, "mutations are accepted only from loopback or with the agent token"


def probe_allowed(remote: str | None, authorization: str | None, token: str,
                  token_matches: bool) -> tuple[bool, int, str]:
    """``GET /probe`` is open while the agent has no token (the coordinator has none to send
    either; the agent warns at start when it listens beyond loopback so); with a token it is
    guarded like a mutation: loopback, or the token."""
    if not token:
        return True, 0, ""
    return mutation_allowed(remote, authorization, token, token_matches)


_Rule = Callable[[str | None, str | None, str, bool], tuple[bool, int, str]]


def _check(request: web.Request, token: str, rule: _Rule) -> None:
    authorization = request.headers.get("Authorization")
    matches = bool(token) and bool(authorization) and token_ok(request, token)
    allowed, status, message = rule(request.remote, authorization, token, matches)
    if not allowed:
        raise HTTPProblem(status, message)


def _check_mutation(request: web.Request, token: str) -> None:
    _check(request, token, mutation_allowed)


def parse_status_update(data: dict[str, Any]) -> tuple[NodeStatus, str]:
    """Validate ``{"status": ..., "reason": ...}``; ``HTTPProblem`` names what is wrong."""
    unknown = sorted(set(data) - {"status", "reason"})
    if unknown:
        raise HTTPProblem(422, f"unknown field {unknown[0]!r}; expected 'status' and 'reason'")
    status = data.get("status")
    if not isinstance(status, str):
        raise HTTPProblem(422, f"'status' is required: one of {_STATUS_WORDS}")
    try:
        value = NodeStatus(status)
    except ValueError:
        raise HTTPProblem(422, f"unknown status {status!r}; expected one of {_STATUS_WORDS}"
                          ) from None
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise HTTPProblem(422, "'reason' must be a string")
    if len(reason) > _MAX_REASON:
        raise HTTPProblem(422, f"'reason' is longer than {_MAX_REASON} characters")
    return value, reason


_LOAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def parse_load_update(data: dict[str, Any]) -> dict[str, float | None]:
    """Every value must be a finite number (or null to drop a custom key)."""
    update: dict[str, float | None] = {}
    for key, value in data.items():
        if not _LOAD_NAME.match(key):
            raise HTTPProblem(422, f"load name {key[:80]!r} must match [A-Za-z_][A-Za-z0-9_]*"
                                   " (at most 64 characters)")
        if value is None:
            update[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HTTPProblem(422, f"load value {key!r} must be a number, got "
                                   f"{type(value).__name__}")
        if not math.isfinite(value):
            raise HTTPProblem(422, f"load value {key!r} must be finite")
        update[key] = value
    return update


def build_app(agent: AgentSurface) -> web.Application:
    """Routes over one agent; handlers read its cached state and never sample."""
    token = agent.config.agent_token
    max_body = agent.config.max_body
    health_headers = {"Content-Type": JSON}
    metrics_headers = {"Content-Type": CONTENT_TYPE_LATEST}

    async def get_health(request: web.Request) -> web.Response:
        body = agent.health_bytes()
        status = 200
        if request.query_string and request.query.get("strict") in ("1", "true", "yes"):
            if agent.status is not NodeStatus.OK:
                status = 503
        return web.Response(body=body, status=status, headers=health_headers)

    async def put_health(request: web.Request) -> web.Response:
        _check_mutation(request, token)
        data = await read_json_object(request, max_body)
        status, reason = parse_status_update(data)
        await agent.set_status(status, reason)
        return web.Response(body=agent.health_bytes(), headers=health_headers)

    async def post_health(request: web.Request) -> web.Response:
        # The seed's form: POST /health?status=degraded[&reason=...]; a JSON body also works.
        _check_mutation(request, token)
        if "status" in request.query:
            data: dict[str, Any] = {"status": request.query["status"]}
            if "reason" in request.query:
                data["reason"] = request.query["reason"]
        else:
            data = await read_json_object(request, max_body)
        status, reason = parse_status_update(data)
        await agent.set_status(status, reason)
        return web.Response(body=agent.health_bytes(), headers=health_headers)

    async def get_load(request: web.Request) -> web.Response:
        return json_response(agent.load)

    async def put_load(request: web.Request) -> web.Response:
        _check_mutation(request, token)
        data = await read_json_object(request, max_body)
        update = parse_load_update(data)
        try:
            agent.set_load(update)
        except ValueError as exc:
            raise HTTPProblem(422, str(exc)) from None
        return json_response(agent.load)

    async def get_system(request: web.Request) -> web.Response:
        return json_response(agent.system)

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=agent.metrics_bytes(), headers=metrics_headers)

    def _seconds(request: web.Request, name: str, ceiling: float) -> float:
        raw = request.query.get(name)
        if raw is None:
            return float(ceiling)
        try:
            value = float(raw)
        except ValueError:
            raise HTTPProblem(400, f"{name} must be seconds as a number, got {raw[:40]!r}") \
                from None
        if not 0 < value < 3600:
            raise HTTPProblem(400, f"{name} must be between 0 and 3600 seconds, got {raw[:40]!r}")
        return min(value, float(ceiling))

    async def get_probe(request: web.Request) -> web.Response:
        _check(request, token, probe_allowed)
        target = request.query.get("target", "")
        if not target:
            raise HTTPProblem(400, "missing ?target=HOST:PORT")
        try:
            host, port = split_target(target)
        except ValueError as exc:
            raise HTTPProblem(400, f"bad probe target: {exc}") from None
        if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", host):
            raise HTTPProblem(400, f"bad probe target: host {host[:80]!r} is not a host name "
                                   "or IP address")
        # The coordinator passes its own timeouts so that a peer judges exactly like it does;
        # the agent's configured ones are the ceiling (a caller cannot make it wait longer).
        timeout = _seconds(request, "timeout", agent.config.probe_timeout)
        connect = _seconds(request, "connect_timeout", agent.config.probe_connect_timeout)
        return json_response(await agent.probe(target, limits=(timeout, min(connect, timeout))))

    app = web.Application(middlewares=[problem_middleware], client_max_size=max_body)
    app.router.add_get("/health", get_health, allow_head=False)
    app.router.add_put("/health", put_health)
    app.router.add_post("/health", post_health)
    app.router.add_get("/metrics/load", get_load)
    app.router.add_put("/metrics/load", put_load)
    app.router.add_get("/metrics/system", get_system)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/probe", get_probe)
    return app
