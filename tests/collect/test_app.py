"""The agent's HTTP API against a real running agent on loopback: every endpoint, every bad
input (a 4xx naming the problem, and nothing changes), and who may mutate."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nodewatch.collect.agent import Agent
from nodewatch.collect.app import mutation_allowed
from nodewatch.config import AgentConfig, Duration
from tests.collect.conftest import AgentFactory, FakeSampler
from tests.helpers import free_port

HEALTH_FIELDS = {"status", "node_id", "uptime", "version", "incarnation", "seq", "ts", "reasons",
                 "system", "load"}


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def send(http: aiohttp.ClientSession, method: str, url: str, *, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.request(method, url, data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_health_has_every_field_and_comes_from_the_latest_sample(
        make_agent: AgentFactory, http: aiohttp.ClientSession, sampler: FakeSampler) -> None:
    agent = await make_agent()
    calls = sampler.calls
    for _ in range(5):
        status, body = await get_json(http, f"{agent.url}/health")
        assert status == 200
    assert sampler.calls == calls  # serving never samples
    assert set(body) == HEALTH_FIELDS | {"sample_interval", "samples"}  # SPEC's + extensions
    assert body["status"] == "ok" and body["node_id"] == "node-a"
    assert body["incarnation"] == 1 and body["seq"] == agent.seq
    assert set(body["system"]) == {"cpu_percent", "mem_percent", "load1", "connections"}
    assert body["system"]["connections"] == 7
    assert {"qps", "pending_tasks", "error_rate"} <= set(body["load"])
    async with http.get(f"{agent.url}/health") as response:
        assert response.content_type == "application/json"


async def test_strict_health_is_503_with_the_same_body_when_not_ok(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    assert (await get_json(http, f"{agent.url}/health?strict=1"))[0] == 200
    await agent.set_status("degraded", "testing")
    status, body = await get_json(http, f"{agent.url}/health?strict=1")
    assert status == 503 and body == agent.health() and body["reasons"] == ["testing"]
    assert (await get_json(http, f"{agent.url}/health"))[0] == 200


async def test_put_health_sets_and_clears_the_manual_status(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    seq = agent.seq
    status, body = await send(http, "PUT", f"{agent.url}/health",
                              body=b'{"status":"draining","reason":"deploy"}')
    assert status == 200 and body["status"] == "draining" and body["reasons"] == ["deploy"]
    assert body["seq"] == seq + 1
    status, body = await send(http, "PUT", f"{agent.url}/health", body=b'{"status":"ok"}')
    assert status == 200 and body["status"] == "ok" and body["reasons"] == []
    assert body["seq"] == seq + 2


async def test_seed_post_health_with_query_status(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    status, body = await send(http, "POST", f"{agent.url}/health?status=degraded&reason=disk")
    assert status == 200 and body["status"] == "degraded" and body["reasons"] == ["disk"]
    status, body = await send(http, "POST", f"{agent.url}/health?status=ok")
    assert body["status"] == "ok"


async def test_load_put_merges_numbers_and_get_reads_them(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    status, body = await send(http, "PUT", f"{agent.url}/metrics/load",
                              body=b'{"qps":42,"pending_tasks":3,"queue_depth":7.5}')
    assert status == 200
    status, body = await send(http, "PUT", f"{agent.url}/metrics/load",
                              body=b'{"error_rate":0.002}')
    assert body == {"qps": 42, "pending_tasks": 3, "error_rate": 0.002, "queue_depth": 7.5}
    assert (await get_json(http, f"{agent.url}/metrics/load"))[1] == body
    assert (await get_json(http, f"{agent.url}/health"))[1]["load"] == body
    status, body = await send(http, "PUT", f"{agent.url}/metrics/load",
                              body=b'{"queue_depth":null}')
    assert "queue_depth" not in body


async def test_system_endpoint_is_the_system_block(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    status, body = await get_json(http, f"{agent.url}/metrics/system")
    assert status == 200 and body == agent.health()["system"]


async def test_prometheus_metrics_are_rendered_once_per_change(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    agent.set_load(qps=12)
    async with http.get(f"{agent.url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert 'nodewatch_load{name="qps"} 12.0' in text
    assert 'nodewatch_agent_status{status="ok"} 1.0' in text
    assert "nodewatch_system_connections 7.0" in text
    assert agent.metrics_bytes() is agent.metrics_bytes()  # cached until something changes
    first = agent.metrics_bytes()
    agent.set_load(qps=13)
    assert agent.metrics_bytes() is not first


async def test_probe_reports_a_reachable_peer(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    peer = await make_agent(node_id="node-b")
    await peer.set_status("degraded", "busy")
    target = peer.listen_address
    status, body = await get_json(http, f"{agent.url}/probe?target={target}")
    assert status == 200
    assert body == {"target": target, "reachable": True, "latency": body["latency"],
                    "failure": None, "detail": "", "status": "degraded"}


async def test_probe_classifies_an_unreachable_peer(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent()
    status, body = await get_json(http, f"{agent.url}/probe?target=127.0.0.1:{free_port()}")
    assert status == 200
    assert body["reachable"] is False and body["failure"] == "refused" and body["status"] is None


async def test_probe_uses_the_configured_timeouts(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        agent = await make_agent(config=AgentConfig(probe_timeout=Duration(0.2)))
        status, body = await get_json(http, f"{agent.url}/probe?target=127.0.0.1:{port}")
        assert body["reachable"] is False and body["failure"] == "timeout"
        assert body["latency"] < 2.0
        # The coordinator passes its own (shorter) timeout; a longer one is clamped.
        status, body = await get_json(
            http, f"{agent.url}/probe?target=127.0.0.1:{port}&timeout=0.05&connect_timeout=0.05")
        assert status == 200 and body["failure"] == "timeout" and body["latency"] < 0.2
        status, body = await get_json(
            http, f"{agent.url}/probe?target=127.0.0.1:{port}&timeout=600")
        assert status == 200 and body["latency"] < 2.0
    finally:
        never.set()
        await runner.cleanup()


BAD_INPUTS = [
    ("PUT", "/metrics/load", b'{"qps":"fast"}', 422, "qps"),
    ("PUT", "/metrics/load", b'{"qps":1,"errors":true}', 422, "errors"),
    ("PUT", "/metrics/load", b'{"bad name":1}', 422, "bad name"),
    ("PUT", "/metrics/load", b"{not json", 400, "malformed JSON"),
    ("PUT", "/metrics/load", b"[1,2]", 400, "JSON object"),
    ("PUT", "/metrics/load", b"", 400, "empty"),
    ("PUT", "/health", b'{"status":"sleepy"}', 422, "sleepy"),
    ("PUT", "/health", b'{"reason":"x"}', 422, "status"),
    ("PUT", "/health", b'{"status":"ok","color":"red"}', 422, "color"),
    ("PUT", "/health", b'{"status":"degraded","reason":5}', 422, "reason"),
    ("PUT", "/health", b'"degraded"', 400, "JSON object"),
    ("PUT", "/health", b"{{", 400, "malformed JSON"),
    ("POST", "/health?status=asleep", None, 422, "asleep"),
    ("GET", "/probe", None, 400, "target"),
    ("GET", "/probe?target=nohost", None, 400, "HOST:PORT"),
    ("GET", "/probe?target=127.0.0.1:99999", None, 400, "port"),
    ("GET", "/probe?target=a/b:80", None, 400, "host"),
    ("GET", "/probe?target=127.0.0.1:80&timeout=soon", None, 400, "timeout"),
    ("GET", "/probe?target=127.0.0.1:80&timeout=-1", None, 400, "timeout"),
]


@pytest.mark.parametrize(("method", "path", "body", "code", "named"), BAD_INPUTS)
async def test_bad_input_is_a_4xx_naming_the_problem_and_changes_nothing(
        make_agent: AgentFactory, http: aiohttp.ClientSession, method: str, path: str,
        body: bytes | None, code: int, named: str) -> None:
    agent = await make_agent()
    agent.set_load(qps=5)
    before = agent.health()
    status, answer = await send(http, method, f"{agent.url}{path}", body=body)
    assert status == code
    assert set(answer) == {"error"} and named in answer["error"]
    assert agent.health() == before


@pytest.mark.parametrize("chunked", [False, True])
async def test_bodies_over_the_cap_get_413_and_change_nothing(
        make_agent: AgentFactory, http: aiohttp.ClientSession, chunked: bool) -> None:
    agent = await make_agent()
    before = agent.health()
    big = b'{"qps":1,"pad":"' + b"x" * (agent.config.max_body + 10) + b'"}'

    async def chunks() -> Any:
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    for path in ("/metrics/load", "/health"):
        async with http.put(f"{agent.url}{path}", data=chunks() if chunked else big) as response:
            assert response.status == 413
            assert "limit" in (await response.json())["error"]
    assert agent.health() == before


async def test_token_is_checked_when_given(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    agent = await make_agent(agent_token="s3cret")
    before = agent.health()
    status, answer = await send(http, "PUT", f"{agent.url}/health", body=b'{"status":"draining"}',
                                headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "token" in answer["error"]
    assert agent.health() == before
    status, answer = await send(http, "PUT", f"{agent.url}/health", body=b'{"status":"draining"}',
                                headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and answer["status"] == "draining"


def test_mutations_need_loopback_or_the_token() -> None:
    assert mutation_allowed("127.0.0.1", None, "", False)[0]
    assert mutation_allowed("127.0.0.9", None, "tok", False)[0]
    assert mutation_allowed("::1", None, "", False)[0]
    assert mutation_allowed("::ffff:127.0.0.1", None, "", False)[0]
    assert mutation_allowed("10.0.0.5", None, "", False)[1] == 403
    assert mutation_allowed("10.0.0.5", None, "tok", False)[1] == 401
    assert mutation_allowed("10.0.0.5", "Bearer x", "tok", False)[1] == 401
    assert mutation_allowed("10.0.0.5", "Bearer tok", "tok", True)[0]
    assert mutation_allowed(None, None, "", False)[1] == 403


async def test_embedded_set_load_rejects_non_numbers_without_changing_anything(
        make_agent: AgentFactory) -> None:
    agent = await make_agent()
    agent.set_load(qps=10)
    before = agent.load
    with pytest.raises(ValueError, match="pending_tasks"):
        agent.set_load(qps=11, pending_tasks="many")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        agent.set_load(qps=float("nan"))
    assert agent.load == before


async def test_embedding_with_async_with_in_the_applications_loop(
        tmp_path: Any, http: aiohttp.ClientSession, sampler: FakeSampler) -> None:
    from nodewatch import Agent as PublicAgent

    assert PublicAgent is Agent
    async with PublicAgent(node_id="app-1", listen=f"127.0.0.1:{free_port()}",
                           state_dir=tmp_path, sampler=sampler) as agent:
        agent.set_load(qps=120.5, pending_tasks=4, error_rate=0.01)
        status, body = await get_json(http, f"{agent.url}/health")
        assert body["load"] == {"qps": 120.5, "pending_tasks": 4, "error_rate": 0.01}
    assert (tmp_path / "app-1.state.json").exists()
