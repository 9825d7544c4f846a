"""The coordinator's OpenAPI 3.1 document, built from the msgspec models the handlers use.

Request bodies come from the same structs that :func:`nodewatch.api.schemas.convert`
validates with, so the document cannot promise what the server refuses; the fuzz test in
tests/api/test_openapi.py drives every operation listed here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from nodewatch.api import schemas as s
from nodewatch.api.sd import TargetGroup
from nodewatch.config import NODE_ID_PATTERN
from nodewatch.protocol import VERSION

__all__ = ["OPERATIONS", "Operation", "REF", "openapi_document"]

REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Operation:
    """One method + path, with its inputs and documented answers (status -> model)."""

    method: str
    path: str
    summary: str
    # status -> model; a tuple of models: one of them (as the query asks, e.g. ?format=)
    responses: dict[int, type | tuple[type, ...] | None]
    body: type | None = None
    body_required: bool = True
    query: tuple[dict[str, Any], ...] = ()
    auth: str = ""  # "agent" or "admin" when a token may be required
    content_type: str = "application/json"


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_NODE_ERRORS: dict[int, type | None] = {400: s.ErrorResponse, 404: s.ErrorResponse}
_COMMAND_ERRORS: dict[int, type | None] = {**_NODE_ERRORS, 401: s.ErrorResponse,
                                           409: s.ErrorResponse}
_BODY_ERRORS: dict[int, type | None] = {400: s.ErrorResponse, 401: s.ErrorResponse,
                                        413: s.ErrorResponse, 422: s.ErrorResponse}
_AFTER = _query("after", {"type": "string", "pattern": r"^\d{1,20}$"},
                "an event id as returned in last_id; also read from Last-Event-ID")

_NODE_FILTERS = (
    _query("schedulable", {"type": "string", "enum": ["true", "false"]},
           "only nodes that may (not) take new work"),
    _query("health", {"type": "string"}, "comma-separated health values, e.g. suspect,unhealthy"),
    _query("label", {"type": "string"}, "key=value; repeatable"),
)

OPERATIONS: tuple[Operation, ...] = (
    Operation("post", "/v1/register", "An agent announces itself (new, rejoin or review).",
              {200: s.RegisterResponse, **_BODY_ERRORS, 403: s.ErrorResponse,
               429: s.ErrorResponse},
              body=s.RegisterBody, auth="agent"),
    Operation("post", "/v1/heartbeat", "An agent pushes a report; stale reports change nothing.",
              {204: None, **_BODY_ERRORS, 403: s.ErrorResponse, 404: s.ErrorResponse,
               409: s.ErrorResponse},
              body=s.HeartbeatBody, auth="agent"),
    Operation("post", "/v1/observations",
              "Callers' counts of requests, errors and latency per node (gray failures).",
              {200: s.ObservationsResponse, **_BODY_ERRORS, 503: s.ErrorResponse},
              body=s.ObservationsBody, auth="observer"),
    Operation("get", "/v1/nodes", "Every node, filtered and sorted, paged, or only changes.",
              {200: (s.NodesResponse, s.NodeRowsResponse), 400: s.ErrorResponse},
              query=(*_NODE_FILTERS,
                     _query("sort", {"type": "string", "enum": ["node_id", "load"]},
                            "load orders by load_score, least loaded first"),
                     _query("limit", {"type": "integer", "minimum": 1, "maximum": 100000},
                            "at most this many nodes; next_cursor names the next page"),
                     _query("cursor", {"type": "string", "pattern": NODE_ID_PATTERN},
                            "a next_cursor: the nodes after it in node_id order"),
                     _query("changed_since", {"type": "string",
                                              "pattern": r"^[0-9a-f]{1,16}-\d{1,20}$"},
                            "a revision: only nodes changed since, plus removed ids"),
                     _query("format", {"type": "string", "enum": ["views", "rows"]},
                            "views (default): each node's full view in nodes; rows: each "
                            "node as a compact array in rows, named by columns (the "
                            "dashboard's table; GET /v1/nodes/{node_id} has the rest)"))),
    Operation("get", "/v1/summary",
              "The fleet: counts by health, status and admin now and over the last hour, "
              "counts per label value, the nodes that need attention.",
              {200: s.SummaryResponse, 400: s.ErrorResponse},
              query=(_query("history_since", {"type": "number", "minimum": 0,
                                              "maximum": 1e11},
                            "only history samples after this UNIX time"),)),
    Operation("get", "/v1/sd/prometheus",
              "Prometheus http_sd: one target group per node, the agent's metrics address.",
              {200: list[TargetGroup], 400: s.ErrorResponse}, query=_NODE_FILTERS),
    Operation("get", "/v1/nodes/{node_id}", "One node.", {200: s.NodeView, **_NODE_ERRORS}),
    Operation("get", "/v1/nodes/{node_id}/history", "A node's samples (history_ttl, 1 h).",
              {200: s.HistoryResponse, **_NODE_ERRORS},
              query=(_query("since", {"type": "number", "minimum": 0, "maximum": 1e11},
                            "UNIX time; default now - history_ttl"),)),
    Operation("post", "/v1/nodes/{node_id}/drain", "Soft offline: no new work.",
              {200: s.CommandResponse, **_COMMAND_ERRORS, 413: s.ErrorResponse,
               422: s.ErrorResponse}, body=s.DrainBody, body_required=False, auth="admin"),
    Operation("post", "/v1/nodes/{node_id}/undrain", "Return a drained node to service.",
              {200: s.CommandResponse, **_COMMAND_ERRORS}, auth="admin"),
    Operation("post", "/v1/nodes/{node_id}/approve",
              "Return a node held for review, or re-enrol its pending claim.",
              {200: s.CommandResponse, **_COMMAND_ERRORS, 413: s.ErrorResponse,
               422: s.ErrorResponse}, body=s.ApproveBody, body_required=False, auth="admin"),
    Operation("post", "/v1/nodes/{node_id}/revoke",
              "Revoke a node's credential: it re-enrols into review.",
              {200: s.CommandResponse, **_COMMAND_ERRORS}, auth="admin"),
    Operation("delete", "/v1/nodes/{node_id}", "Forget a node.",
              {200: s.RemoveResponse, **_COMMAND_ERRORS}, auth="admin"),
    Operation("get", "/v1/events", "Events after an id (long poll with wait).",
              {200: s.EventsResponse, 400: s.ErrorResponse},
              query=(_AFTER,
                     _query("wait", {"type": "number", "minimum": 0, "maximum": 60},
                            "seconds to wait for a first event"),
                     _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000},
                            "at most this many events"),
                     _query("node_id", {"type": "string", "pattern": NODE_ID_PATTERN},
                            "only this node's events (of those read: last_id says how far)"),
                     _query("newest", {"type": "string", "enum": ["true", "false"]},
                            "the newest limit events after `after` among the last 10,000 "
                            "the coordinator keeps in memory, oldest first; no wait"))),
    Operation("get", "/v1/events/stream", "Server-Sent Events, one per event, resumable.",
              {200: None, 400: s.ErrorResponse}, query=(_AFTER,),
              content_type="text/event-stream"),
    Operation("get", "/healthz", "The coordinator itself.", {200: s.CoordinatorHealth,
                                                              503: s.CoordinatorHealth}),
    Operation("get", "/v1/openapi.json", "This document.", {200: None}),
)

_REASONS = {200: "OK", 204: "No Content", 400: "Bad request", 401: "Missing or wrong token",
            403: "The node's credential (or certificate) is required",
            404: "Unknown node", 409: "Conflict or stale report", 413: "Body too large",
            422: "Invalid field",
            429: "Past max_registrations_per_second: retry after Retry-After seconds",
            503: "Unavailable or failing (the body says why)"}


def _models() -> list[type]:
    found: list[type] = []
    for op in OPERATIONS:
        for answer in (op.body, *op.responses.values()):
            for model in answer if isinstance(answer, tuple) else (answer,):
                if model is not None and model not in found:
                    found.append(model)
    return found


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once per process (the models do not change at run time)."""
    models = _models()
    refs, components = msgspec.json.schema_components(models, ref_template=REF)
    ref_of = dict(zip(models, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {"summary": op.summary,
                                 "operationId": f"{op.method}_{op.path}",
                                 "responses": {}}
        params = list(op.query)
        if "{node_id}" in op.path:
            params.insert(0, {"name": "node_id", "in": "path", "required": True,
                              "schema": {"type": "string", "pattern": NODE_ID_PATTERN}})
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": op.body_required, "content": {
                "application/json": {"schema": ref_of[op.body]}}}
        if op.auth:
            entry["security"] = [{f"{op.auth}Token": []}, {}]
        for status, model in op.responses.items():
            answer: dict[str, Any] = {"description": _REASONS.get(status, "")}
            if isinstance(model, tuple):
                answer["content"] = {"application/json": {"schema": {
                    "anyOf": [ref_of[m] for m in model]}}}
            elif model is not None:
                answer["content"] = {"application/json": {"schema": ref_of[model]}}
            elif status == 200:
                answer["content"] = {op.content_type: {"schema": {}}}
            entry["responses"][str(status)] = answer
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "nodewatch coordinator", "version": VERSION,
                 "description": "Node liveness, load and schedulability. Errors are "
                                "{\"error\": \"message\"} with a 4xx."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "agentToken": {"type": "http", "scheme": "bearer",
                               "description": "[coordinator] agent_token, when set"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "[coordinator] admin_token, when set"},
                "observerToken": {"type": "http", "scheme": "bearer",
                                  "description": "[coordinator] observer_token (or the admin "
                                                 "token), when set"},
            },
        },
    }
