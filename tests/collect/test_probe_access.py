"""Issue 14 (4, 7): the agent's ``/probe`` and its mutations from an address that is not
loopback need the agent token; the probe answers the class of a failure but no text from the
target; the coordinator's peer probes send the token; an agent listening beyond loopback
without a token warns at start.

The non-loopback caller is this machine on one of its own non-loopback addresses (the agent
sees that address as the peer), so the test needs no network namespace; without such an
address it is skipped.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from nodewatch.collect.app import probe_allowed
from nodewatch.coordinator.probes import HttpPeerProbe
from nodewatch.model import PeerVote
from tests.collect.conftest import AgentFactory
from tests.helpers import free_port

TOKEN = {"Authorization": "Bearer s3cret"}


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(address.address)
            if not ip.is_loopback and not ip.is_link_local:
                return str(ip)
    return None


@pytest.fixture
def outside() -> str:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


async def call(http: aiohttp.ClientSession, method: str, url: str,
               headers: dict[str, str] | None = None, body: bytes | None = None
               ) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, data=body) as response:
        return response.status, await response.json(content_type=None)


async def test_probe_and_mutations_from_beyond_loopback_need_the_token(
        make_agent: AgentFactory, http: aiohttp.ClientSession, outside: str) -> None:
    port = free_port()
    agent = await make_agent(agent_token="s3cret", listen=f"0.0.0.0:{port}")
    peer = await make_agent(node_id="node-b")
    far = f"http://{outside}:{port}"
    probe = f"/probe?target={peer.listen_address}"

    status, answer = await call(http, "GET", far + probe)
    assert status == 401 and "token" in answer["error"]
    status, answer = await call(http, "GET", far + probe,
                                headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, answer = await call(http, "GET", far + probe, headers=TOKEN)
    assert status == 200 and answer["reachable"] is True

    before = agent.health()
    status, _ = await call(http, "PUT", far + "/health", body=b'{"status":"draining"}')
    assert status == 401 and agent.health() == before
    status, _ = await call(http, "PUT", far + "/metrics/load", body=b'{"qps": 1}')
    assert status == 401 and agent.health() == before
    status, answer = await call(http, "PUT", far + "/health", headers=TOKEN,
                                body=b'{"status":"draining"}')
    assert status == 200 and answer["status"] == "draining"

    # From loopback, as for the mutations, no token is needed (a wrong one is still refused).
    near = f"http://127.0.0.1:{port}"
    status, answer = await call(http, "GET", near + probe)
    assert status == 200 and answer["reachable"] is True
    status, _ = await call(http, "GET", near + probe, headers={"Authorization": "Bearer no"})
    assert status == 401


async def test_an_agent_without_a_token_beyond_loopback_warns_and_refuses_mutations(
        make_agent: AgentFactory, http: aiohttp.ClientSession, outside: str,
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="nodewatch.agent"):
        await make_agent(listen=f"0.0.0.0:{port}")
    warnings = [r for r in caplog.records if "beyond loopback" in r.getMessage()]
    assert len(warnings) == 1
    assert "without an agent token" in warnings[0].getMessage()
    assert "agent_token" in warnings[0].getMessage()
    status, answer = await call(http, "PUT", f"http://{outside}:{port}/health",
                                body=b'{"status":"draining"}')
    assert status == 403
    # Without a token there is nothing to require: /probe stays open (the warning says so).
    status, answer = await call(http, "GET", f"http://{outside}:{port}/probe"
                                f"?target=127.0.0.1:{free_port()}")
    assert status == 200 and answer["failure"] == "refused"


async def test_no_warning_on_loopback_or_with_a_token(
        make_agent: AgentFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodewatch.agent"):
        await make_agent()
        await make_agent(node_id="node-b", listen=f"0.0.0.0:{free_port()}",
                         agent_token="s3cret")
    assert not [r for r in caplog.records if "beyond loopback" in r.getMessage()]


def test_probe_rule() -> None:
    assert probe_allowed("10.0.0.5", None, "", False)[0]  # no token: open
    assert probe_allowed("127.0.0.1", None, "tok", False)[0]
    assert probe_allowed("10.0.0.5", None, "tok", False)[1] == 401
    assert probe_allowed("10.0.0.5", "Bearer x", "tok", False)[1] == 401
    assert probe_allowed("10.0.0.5", "Bearer tok", "tok", True)[0]


async def test_the_probe_answer_carries_the_class_but_no_text_from_the_target(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=404, text="secret banner of the service on this port")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(status=200, text="SSH-2.0-OpenSSH_9.2 secret banner")

    app = web.Application()
    app.router.add_get("/health", teapot)
    other = web.Application()
    other.router.add_get("/health", garbage)
    runners = [web.AppRunner(a, access_log=None) for a in (app, other)]
    ports = [free_port(), free_port()]
    for runner, port in zip(runners, ports, strict=True):
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        agent = await make_agent()
        answers = {}
        for name, target in (("status", f"127.0.0.1:{ports[0]}"),
                             ("body", f"127.0.0.1:{ports[1]}"),
                             ("refused", f"127.0.0.1:{free_port()}")):
            status, answers[name] = await call(http, "GET",
                                               f"{agent.url}/probe?target={target}")
            assert status == 200
        assert answers["status"]["failure"] == "http_status"
        assert answers["body"]["failure"] == "bad_body"
        assert answers["refused"]["failure"] == "refused"
        for answer in answers.values():
            assert answer["reachable"] is False and answer["detail"] == ""
            # The target echoes the address asked (its port may read "...404..."): not text
            # from the target; everything else must carry none.
            told = str({key: value for key, value in answer.items() if key != "target"})
            assert "secret" not in told and "404" not in told
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_peer_probes_send_the_agent_token_and_try_each_listed_one(
        make_agent: AgentFactory) -> None:
    agent = await make_agent(agent_token="new", listen=f"0.0.0.0:{free_port()}")
    peer = await make_agent(node_id="node-b")
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    at = f"{address}:{agent.listen_address.rsplit(':', 1)[1]}"
    for tokens, vote in (((), None), (("old",), None),
                         (("old", "new"), PeerVote("a", True, "")),
                         (("new",), PeerVote("a", True, ""))):
        peers = HttpPeerProbe(timeout=1.0, connect_timeout=0.5, tokens=tokens)
        await peers.open()
        try:
            assert await peers.peer_check("a", at, peer.listen_address) == vote, tokens
            if len(tokens) == 2:  # the token that worked is tried first from then on
                assert peers._headers[0] == {"Authorization": "Bearer new"}
        finally:
            await peers.aclose()
