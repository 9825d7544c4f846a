"""The OpenAPI document: built from the handlers' models, covers every route, and a
hypothesis fuzzer driven by it finds no 5xx on any endpoint of a live coordinator."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodewatch.api import schemas
from nodewatch.api.app import build_app
from nodewatch.api.openapi import OPERATIONS, REF, openapi_document
from nodewatch.config import load_config
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.helpers import free_port

ADMIN = "fuzz-admin"
AGENT = "fuzz-agent"
KNOWN_NODES = ("web-1", "web-2")


@dataclass
class LiveServer:
    url: str
    loop: asyncio.AbstractEventLoop
    coord: Coordinator


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real Coordinator + HTTP app on its own loop thread; a fake probe keeps every node
    reachable, so fuzzed addresses are never dialled."""
    tmp: Path = tmp_path_factory.mktemp("openapi")
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp}/state.db",
                             "coordinator.admin_token": ADMIN,
                             "coordinator.agent_token": AGENT,
                             "detection.startup_grace": "0"})
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                            probe=FakeProbe(time.time))  # type: ignore[arg-type]
        await coord.start()
        runner = web.AppRunner(build_app(coord), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        holder["coord"] = coord
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await coord.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "coordinator did not start"
    server = LiveServer(f"http://127.0.0.1:{port}", loop, holder["coord"])
    for node_id in KNOWN_NODES:
        status, _ = call(server, "POST", "/v1/register", json.dumps({
            "node_id": node_id, "address": "127.0.0.1:7301", "incarnation": 1}).encode(),
            token=AGENT)
        assert status == 200
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def call(server: LiveServer, method: str, path: str, body: bytes | None = None,
         token: str = "", timeout: float = 5.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(server.url + path, data=body, method=method.upper(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return resp.status, resp.read1(64)  # an endless stream: the head is enough
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------- the document


def test_document_is_served_and_lists_every_api_route(live: LiveServer) -> None:
    status, raw = call(live, "GET", "/v1/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.1")
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    app = build_app(live.coord)
    served = {(r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
              for r in app.router.routes() if r.method != "HEAD"}
    served -= {("get", "/"), ("get", "/metrics")}
    served = {(m, p) for m, p in served if not p.startswith("/static")}
    assert served == documented


def test_request_bodies_are_the_models_the_handlers_validate_with() -> None:
    doc = openapi_document()
    for model in (schemas.RegisterBody, schemas.HeartbeatBody, schemas.DrainBody):
        (_,), components = msgspec.json.schema_components([model], ref_template=REF)
        assert doc["components"]["schemas"][model.__name__] == components[model.__name__]
    register = doc["paths"]["/v1/register"]["post"]["requestBody"]
    assert register["content"]["application/json"]["schema"]["$ref"].endswith("RegisterBody")


def _fields(model: type[msgspec.Struct]) -> set[str]:
    info = msgspec.inspect.type_info(model)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.encode_name for f in info.fields}


def test_real_responses_have_exactly_the_documented_fields(live: LiveServer) -> None:
    call(live, "POST", "/v1/heartbeat", json.dumps({
        "node_id": "web-1", "incarnation": 1, "seq": 5, "ts": time.time(),
        "system": {"cpu_percent": 5.0}, "load": {"qps": 3}}).encode(), token=AGENT)
    _, raw = call(live, "GET", "/v1/nodes")
    nodes = msgspec.json.decode(raw, type=schemas.NodesResponse)
    assert {n.node_id for n in nodes.nodes} >= set(KNOWN_NODES)
    assert set(json.loads(raw)["nodes"][0]) == _fields(schemas.NodeView)
    _, raw = call(live, "GET", "/v1/nodes?format=rows")
    rows = msgspec.json.decode(raw, type=schemas.NodeRowsResponse)
    assert {r[0] for r in rows.rows} >= set(KNOWN_NODES)
    assert set(json.loads(raw)) == _fields(schemas.NodeRowsResponse) - {"removed", "reset"}
    assert len(rows.rows[0]) == len(rows.columns)
    summary = msgspec.json.decode(call(live, "GET", "/v1/summary")[1],
                                  type=schemas.SummaryResponse)
    assert summary.coordinator is not None and summary.coordinator.role == "leader"
    status, raw = call(live, "POST", "/v1/nodes/web-2/drain", b'{"reason": "doc"}', token=ADMIN)
    assert status == 200
    result = msgspec.json.decode(raw, type=schemas.CommandResponse)
    assert result.node.admin == "drained"
    assert set(json.loads(raw)["events"][0]) == _fields(schemas.EventView)
    assert set(json.loads(raw)["node"]["drain"]) == _fields(schemas.DrainView)
    call(live, "POST", "/v1/nodes/web-2/undrain", token=ADMIN)
    msgspec.json.decode(call(live, "GET", "/v1/events")[1], type=schemas.EventsResponse)
    msgspec.json.decode(call(live, "GET", "/v1/nodes/web-1/history")[1],
                        type=schemas.HistoryResponse)
    msgspec.json.decode(call(live, "GET", "/healthz")[1], type=schemas.CoordinatorHealth)
    msgspec.json.decode(call(live, "GET", "/v1/nodes/ghost")[1], type=schemas.ErrorResponse)


# ---------------------------------------------------------------------- the fuzzer

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Valid instances of the JSON Schema subset msgspec emits (enough to get past the
    validator and exercise the handlers behind it)."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(components[schema["$ref"].rsplit("/", 1)[1]],
                                               components))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties")
        if props:
            return st.fixed_dictionaries(
                {k: from_schema(v, components) for k, v in props.items() if k in required},
                optional={k: from_schema(v, components) for k, v in props.items()
                          if k not in required})
        values = from_schema(extra, components) if isinstance(extra, dict) else JSON_VALUES
        return st.dictionaries(st.text(max_size=12), values, max_size=4)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


def body_strategy(op: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A valid body, a valid body with one field broken, any JSON, or raw bytes."""
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    junk: st.SearchStrategy[Any] = st.one_of(
        st.none(), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64), st.just(b"{"), st.just(b"x" * 70_000))
    if content is None:
        return junk
    valid = from_schema(content["schema"], components)

    def break_one(pair: tuple[dict[str, Any], Any]) -> Any:
        body, value = pair
        if isinstance(body, dict) and body:
            body = dict(body)
            body[sorted(body)[0]] = value
        return body

    return st.one_of(
        valid.map(lambda v: json.dumps(v).encode()),
        st.tuples(valid, JSON_VALUES).map(break_one).map(lambda v: json.dumps(v).encode()),
        junk,
    )


def query_value(name: str, schema: dict[str, Any],
                components: dict[str, Any]) -> st.SearchStrategy[str]:
    if name == "wait":  # capped to keep the run short; the server allows up to 60 s
        return st.sampled_from(["0", "0.05", "-1", "61", "nan", "1e400", "x", ""])
    valid = from_schema(schema, components).map(
        lambda v: v if isinstance(v, str) else json.dumps(v))
    return st.one_of(valid, st.text(max_size=12))


def path_value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*KNOWN_NODES, "ghost"]),
                     st.from_regex(schema["pattern"], fullmatch=True), st.text(max_size=20))


def request_strategy(path: str, method: str, op: dict[str, Any],
                     components: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any, str]]:
    query_params = [p for p in op.get("parameters", []) if p["in"] == "query"]
    path_params = [p for p in op.get("parameters", []) if p["in"] == "path"]

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, Any, str]:
        url = path
        for param in path_params:
            value = draw(path_value(param["schema"]))
            url = url.replace("{" + param["name"] + "}", urllib.parse.quote(value, safe="")
                              or "x")
        query = [(p["name"], draw(query_value(p["name"], p["schema"], components)))
                 for p in query_params if draw(st.booleans())]
        if query:
            url += "?" + urllib.parse.urlencode(query)
        body = draw(body_strategy(op, components)) if method in ("post", "put") else None
        token = draw(st.sampled_from([ADMIN, AGENT, "", "wrong"]))
        return url, body, token

    return build()


FUZZED = [(op.method, op.path) for op in OPERATIONS]


@pytest.mark.parametrize(("method", "path"), FUZZED, ids=[f"{m} {p}" for m, p in FUZZED])
def test_fuzzed_requests_never_get_a_5xx(live: LiveServer, method: str, path: str) -> None:
    doc = openapi_document()
    components = doc["components"]["schemas"]
    op = doc["paths"][path][method]
    documented = {int(s) for s in op["responses"]}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request_strategy(path, method, op, components))
    def check(request: tuple[str, Any, str]) -> None:
        url, body, token = request
        status, raw = call(live, method, url, body, token)
        assert status < 500, f"{method.upper()} {url} -> {status}: {raw[:300]!r}"
        if status >= 400:
            error = json.loads(raw)
            assert isinstance(error, dict) and isinstance(error.get("error"), str), raw[:200]
            assert status in documented or status in (405, 413), \
                f"{method.upper()} {url} -> undocumented {status}: {error['error']}"

    check()


def test_fuzzer_reaches_past_validation() -> None:
    """The schema-driven strategy makes bodies the server accepts (not only 4xx noise)."""
    doc = openapi_document()
    components = doc["components"]["schemas"]
    register = from_schema({"$ref": "#/components/schemas/RegisterBody"}, components)

    @settings(max_examples=30, deadline=None, database=None)
    @given(register)
    def valid(body: dict[str, Any]) -> None:
        msgspec.convert(body, schemas.RegisterBody)
        assert re.match(r"^[A-Za-z0-9._-]{1,128}$", body["node_id"])

    valid()
