"""UDP heartbeats: a real Coordinator with its UDP endpoint on 127.0.0.1 and real sockets,
and real agents pushing over UDP (or falling back to HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api import udp as udp_module
from nodewatch.api.app import build_app
from nodewatch.api.udp import MAX_BATCH, UdpHeartbeats, start_udp_heartbeats
from nodewatch.collect import agent as agent_module
from nodewatch.collect import coordinator_client as client_module
from nodewatch.collect.agent import Agent
from nodewatch.collect.coordinator_client import UdpHeartbeatSender
from nodewatch.coordinator.health import (
    OVERLOAD_DROP_SHARE,
    STRETCH_WINDOW,
    ReceiveDrops,
    Signals,
    judge,
)
from nodewatch.coordinator.service import Coordinator
from nodewatch.detect.cluster import OVERLOAD_STRETCH
from nodewatch.protocol import (
    MAX_DATAGRAM,
    HeartbeatBody,
    UdpReply,
    decode_udp_reply,
    encode_heartbeat_datagram,
    encode_udp_reply,
    heartbeat_key,
)
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient
from tests.api.test_app import AGENT, beat, make_config, reg_body
from tests.helpers import async_wait_until, free_port

TOKEN = "agent-secret"
KEY = heartbeat_key(TOKEN)


# The key each node's datagrams are signed with once registered (its credential's), as an
# enrolled agent signs them; nodes not registered here sign with the agent token's KEY.
NODE_KEYS: dict[str, bytes] = {}


@dataclass
class Rig:
    client: CarryingClient
    coord: Coordinator
    udp: UdpHeartbeats
    probe: FakeProbe
    sock: socket.socket

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.udp.address)

    async def wait_counted(self, result: str, count: int = 1) -> None:
        await async_wait_until(lambda: asyncio.sleep(0, self.udp.counts[result] >= count),
                               within=5, message=f"{count} datagram(s) counted {result}")


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, **overrides: Any) -> AsyncIterator[Rig]:
    cfg = make_config(tmp_path, **{"coordinator.heartbeat_udp": "127.0.0.1:0", **overrides})
    probe = FakeProbe(time.time)  # type: ignore[arg-type]
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), probe=probe)
    await coord.start()
    udp = await start_udp_heartbeats(coord)
    client = TestClient(TestServer(build_app(coord, udp), host="127.0.0.1"))
    await client.start_server()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    NODE_KEYS.clear()
    try:
        yield Rig(CarryingClient(client), coord, udp, probe, sock)
    finally:
        sock.close()
        udp.close()
        await client.close()
        await coord.stop()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with _rig(tmp_path) as value:
        yield value


async def _register(rig: Rig, node_id: str = "web-1") -> dict[str, Any]:
    resp = await rig.client.post("/v1/register", json=reg_body(node_id), headers=AGENT)
    assert resp.status == 200
    answer: dict[str, Any] = await resp.json()
    NODE_KEYS[node_id] = rig.client.udp_key(node_id)
    return answer


def _signed(body: dict[str, Any] | bytes, key: bytes | None = None) -> bytes:
    if key is None:
        node_id = body.get("node_id") if isinstance(body, dict) else None
        key = NODE_KEYS.get(node_id, KEY) if isinstance(node_id, str) else KEY
    if isinstance(body, bytes):
        return body + hmac.digest(key, body, "sha256")
    return encode_heartbeat_datagram(body, key)


async def test_register_answer_offers_the_bound_udp_address(rig: Rig) -> None:
    answer = await _register(rig)
    assert answer["heartbeat_udp"] == f"127.0.0.1:{rig.udp.address[1]}"


async def test_signed_msgpack_and_json_datagrams_are_applied_like_http(rig: Rig) -> None:
    await _register(rig)
    rig.send(_signed(beat(seq=3, load={"qps": 7})))
    await rig.wait_counted("ok")
    node = rig.coord.cluster.nodes["web-1"]
    assert (node.seq, node.load["qps"]) == (3, 7)
    rig.send(_signed(msgspec.json.encode(beat(seq=4, status="degraded",
                                              reasons=["disk almost full"])),
                     NODE_KEYS["web-1"]))
    await rig.wait_counted("ok", 2)
    assert node.seq == 4 and node.node_status.value == "degraded"
    assert rig.coord.pushes == 2
    text = await (await rig.client.get("/metrics")).text()
    assert 'nodewatch_udp_heartbeats_total{result="ok"} 2.0' in text


@pytest.mark.parametrize(("make", "result"), [
    (lambda: encode_heartbeat_datagram(beat(seq=9), b""), "bad_tag"),  # no tag at all
    (lambda: _signed(beat(seq=9), heartbeat_key("wrong-token")), "bad_tag"),
    (lambda: _signed(beat(seq=9))[:-1] + b"\x00", "bad_tag"),  # tag altered
    (lambda: b"short", "bad_tag"),
    (lambda: _signed(b"\x93\x01\x02"), "malformed"),  # msgpack, but not a heartbeat
    (lambda: _signed(b"{not json"), "malformed"),
    (lambda: _signed(beat(seq=9, node_id="bad id!")), "malformed"),  # HeartbeatBody's pattern
    (lambda: _signed(beat(seq=-5)), "malformed"),
    (lambda: _signed(beat(seq=9, surprise=1)), "malformed"),  # unknown field
    (lambda: _signed(beat(seq=9, reasons=["x" * 1000] * 10)), "oversize"),
    (lambda: _signed(beat(seq=1)), "stale"),  # the stored seq is already 1
    (lambda: _signed(beat("ghost", seq=9)), "unknown"),
], ids=["untagged", "wrong-key", "altered", "short", "not-a-heartbeat", "bad-json", "bad-id",
        "negative-seq", "unknown-field", "oversize", "stale", "unknown-node"])
async def test_bad_datagrams_are_dropped_counted_and_change_nothing(
        rig: Rig, make: Callable[[], bytes], result: str) -> None:
    await _register(rig)
    rig.send(_signed(beat(seq=1)))
    await rig.wait_counted("ok")
    before = rig.coord.cluster.nodes["web-1"].to_json()
    datagram = make()
    assert (len(datagram) > MAX_DATAGRAM) is (result == "oversize")
    rig.send(datagram)
    await rig.wait_counted(result)
    assert rig.coord.cluster.nodes["web-1"].to_json() == before
    assert sum(rig.udp.counts.values()) == 2
    assert "ghost" not in rig.coord.cluster.nodes


async def test_a_dropped_datagram_is_never_logged_with_its_content(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    await _register(rig)
    rig.send(_signed(beat(seq=2, reasons=["secret-canary"]), heartbeat_key("wrong")))
    rig.send(_signed(b'{"secret-canary": 1}'))
    await rig.wait_counted("bad_tag")
    await rig.wait_counted("malformed")
    assert "secret-canary" not in caplog.text and TOKEN not in caplog.text


async def test_without_a_token_an_enrolled_node_signs_with_its_own_key(tmp_path: Path) -> None:
    # Without an agent token a node that is not enrolled sends untagged datagrams; once
    # enrolled (every registration is), only its own key's tag is accepted.
    async with _rig(tmp_path, **{"coordinator.agent_token": ""}) as rig:
        await rig.client.post("/v1/register", json=reg_body())
        rig.send(encode_heartbeat_datagram(beat(seq=4), b""))
        await rig.wait_counted("bad_tag")
        rig.send(encode_heartbeat_datagram(beat(seq=5), rig.client.udp_key("web-1")))
        await rig.wait_counted("ok")
        assert rig.coord.cluster.nodes["web-1"].seq == 5


async def test_udp_pushes_stand_in_for_polls(tmp_path: Path) -> None:
    # 1 s intervals against a push every 50 ms (and 100 ms UDP batch windows): a busy machine
    # would have to stall this loop for most of a second before a poll fell due.
    async with _rig(tmp_path, **{"detection.healthy_interval": "1s",
                                 "detection.unhealthy_interval": "1s"}) as rig:
        await _register(rig)
        await async_wait_until(lambda: asyncio.sleep(0, len(rig.probe.calls) >= 1),
                               message="the first poll")
        polls_before = len(rig.probe.calls)
        # A push every 50 ms for 1.5 s (one and a half intervals): no poll falls due meanwhile.
        for seq in range(1, 31):
            rig.send(_signed(beat(seq=seq)))
            await asyncio.sleep(0.05)
        await rig.wait_counted("ok", 30)
        assert len(rig.probe.calls) == polls_before
        await async_wait_until(lambda: asyncio.sleep(0, len(rig.probe.calls) > polls_before),
                               within=5, message="a poll once the pushes stopped")


# ---------------------------------------------------------------------- real agents


async def _agent(tmp_path: Path, rig: Rig, **kwargs: Any) -> Agent:
    agent = Agent(node_id=kwargs.pop("node_id", "node-a"), listen=f"127.0.0.1:{free_port()}",
                  coordinator=str(rig.client.make_url("")), state_dir=tmp_path / "agent",
                  agent_token=TOKEN, heartbeat_interval=0.05, run_sampler=False, **kwargs)
    await agent.start()
    return agent


async def test_agent_with_udp_transport_pushes_over_udp(tmp_path: Path, rig: Rig) -> None:
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await rig.wait_counted("ok", 5)
        node = rig.coord.cluster.nodes["node-a"]
        assert node.seq >= 5 and node.incarnation == agent.incarnation
        assert agent.heartbeats_sent["udp"] >= 5
        assert agent.heartbeats_sent["http"] == 0
    finally:
        await agent.stop()
    # The final heartbeat of a clean stop goes over HTTP (it must be acknowledged): applied.
    assert rig.coord.cluster.nodes["node-a"].seq == agent.seq


async def test_register_answer_says_the_udp_port_answers_confirms(rig: Rig) -> None:
    answer = await _register(rig)
    assert answer["udp_confirm"] is True


async def test_a_datagram_that_asks_is_answered_once_applied_and_a_replay_never(
        rig: Rig) -> None:
    await _register(rig)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        asking = _signed(beat(seq=5, confirm=True))
        sock.sendto(_signed(beat(seq=4)), rig.udp.address)  # does not ask: no answer
        sock.sendto(asking, rig.udp.address)
        data = await asyncio.to_thread(sock.recv, 2048)
        assert decode_udp_reply(data, NODE_KEYS["web-1"]) == UdpReply(200, "web-1", 1, 5)
        assert rig.coord.cluster.nodes["web-1"].seq == 5
        sock.sendto(asking, rig.udp.address)  # replayed: stale, and not answered
        await rig.wait_counted("stale")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(sock.recv, 2048)
    assert rig.udp.confirms == 1 and rig.udp.counts["ok"] == 2


async def test_a_confirm_that_is_not_a_bool_is_refused_and_changes_nothing(rig: Rig) -> None:
    await _register(rig)
    before = rig.coord.cluster.nodes["web-1"].seq
    resp = await rig.client.post("/v1/heartbeat", json=beat(seq=5, confirm="yes"),
                                 headers=AGENT)
    assert resp.status == 422 and "confirm" in (await resp.json())["error"]
    rig.send(_signed(beat(seq=6, confirm="yes")))
    await rig.wait_counted("malformed")
    assert rig.coord.cluster.nodes["web-1"].seq == before and rig.udp.replies == 0


async def test_an_answered_udp_agent_sends_no_http_heartbeat(
        tmp_path: Path, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "UDP_CONFIRM_INTERVAL", 0.1)  # every 2nd beat asks
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await async_wait_until(lambda: asyncio.sleep(0, rig.udp.confirms >= 5),
                               within=10, message="five datagrams answered")
        assert agent.heartbeats_sent["http"] == 0
    finally:
        await agent.stop()


async def test_an_unanswered_confirm_sends_the_next_heartbeat_over_http(
        tmp_path: Path, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "UDP_CONFIRM_INTERVAL", 0.1)  # every 2nd beat asks
    # Every answer is lost on the way back (a one-way UDP path): HTTP confirms instead.
    monkeypatch.setattr(UdpHeartbeats, "_confirm", lambda self, body, addr, key: None)
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await async_wait_until(lambda: asyncio.sleep(0, agent.heartbeats_sent["http"] >= 3),
                               within=10, message="three HTTP heartbeats")
        # Each unanswered ask is followed by one HTTP heartbeat, and UDP goes on between them.
        assert agent.heartbeats_sent["udp"] >= agent.heartbeats_sent["http"]
        assert rig.udp.counts["ok"] >= 3
    finally:
        await agent.stop()


async def test_a_coordinator_that_does_not_answer_gets_periodic_http_heartbeats(
        tmp_path: Path, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "UDP_HTTP_INTERVAL", 0.15)  # every 3rd beat over HTTP
    monkeypatch.setattr(UdpHeartbeats, "_confirm", lambda self, body, addr, key: None)
    loop = Agent._heartbeat_loop

    def older(self: Agent, client: Any, interval: float, phase: float, offer: str = "",
              udp_confirm: bool = False) -> Any:
        return loop(self, client, interval, phase, offer, False)  # as before udp_confirm

    monkeypatch.setattr(Agent, "_heartbeat_loop", older)
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await async_wait_until(lambda: asyncio.sleep(0, agent.heartbeats_sent["http"] >= 3),
                               within=10, message="three HTTP heartbeats")
        # No datagram asked (an older coordinator would refuse the field): two UDP per HTTP.
        assert rig.udp.counts["malformed"] == 0
        assert agent.heartbeats_sent["udp"] >= 2 * agent.heartbeats_sent["http"] - 2
    finally:
        await agent.stop()


async def test_agent_falls_back_to_http_when_udp_is_not_offered(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    client = TestClient(TestServer(build_app(coord), host="127.0.0.1"))
    await client.start_server()
    agent = Agent(node_id="node-b", listen=f"127.0.0.1:{free_port()}",
                  coordinator=str(client.make_url("")), state_dir=tmp_path / "agent",
                  agent_token=TOKEN, heartbeat_interval=0.05, heartbeat_transport="udp",
                  run_sampler=False)
    await agent.start()
    try:
        # Both ends counted them (the agent counts a heartbeat once it is answered).
        await async_wait_until(
            lambda: asyncio.sleep(0, coord.pushes >= 3 and agent.heartbeats_sent["http"] >= 3),
            message="three HTTP heartbeats")
        assert agent.registration is not None and agent.registration.heartbeat_udp == ""
        assert agent.heartbeats_sent["udp"] == 0 and agent.heartbeats_sent["http"] >= 3
    finally:
        await agent.stop()
        await client.close()
        await coord.stop()


async def test_udp_agent_hears_a_forgotten_node_through_its_unanswered_confirm(
        tmp_path: Path, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "UDP_CONFIRM_INTERVAL", 0.25)  # every 5th beat asks
    # Every "unknown" reply is lost on the way back (as UDP may): the datagram that asked is
    # not answered either, so the next heartbeat goes over HTTP and finds out.
    monkeypatch.setattr(UdpHeartbeats, "_reply_unknown", lambda self, *args, **kw: None)
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await rig.wait_counted("ok", 3)
        await rig.coord.command("remove", "node-a")
        assert "node-a" not in rig.coord.cluster.nodes
        # The unknown datagrams are dropped until the periodic HTTP beat learns it.
        await async_wait_until(lambda: asyncio.sleep(0, "node-a" in rig.coord.cluster.nodes),
                               within=5, message="the agent registering again")
        assert agent.heartbeats_sent["http"] >= 1
        ok = rig.udp.counts["ok"]
        await rig.wait_counted("ok", ok + 3)  # and UDP heartbeats are applied again
    finally:
        await agent.stop()


async def test_udp_agent_hears_a_forgotten_node_from_the_coordinators_reply(
        tmp_path: Path, rig: Rig) -> None:
    agent = await _agent(tmp_path, rig, heartbeat_transport="udp")
    try:
        await rig.wait_counted("ok", 3)
        http_before = agent.heartbeats_sent["http"]
        await rig.coord.command("remove", "node-a")
        # The default periodic HTTP beat is minutes away: only the UDP reply can bring it back.
        await async_wait_until(lambda: asyncio.sleep(0, "node-a" in rig.coord.cluster.nodes),
                               within=5, message="the agent registering again")
        assert rig.udp.replies >= 1
        assert agent.heartbeats_sent["http"] - http_before <= 2  # the one asking, maybe one more
        ok = rig.udp.counts["ok"]
        await rig.wait_counted("ok", ok + 3)
    finally:
        await agent.stop()


async def test_only_a_tagged_unknown_node_heartbeat_gets_a_tagged_reply(rig: Rig) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(_signed(beat("ghost", seq=7), heartbeat_key("wrong")), rig.udp.address)
        sock.sendto(_signed(b"\x93\x01\x02"), rig.udp.address)  # malformed
        sock.sendto(_signed(beat("ghost", seq=8)), rig.udp.address)
        data = await asyncio.to_thread(sock.recv, 2048)
    # The first reply is for seq 8: neither the forged nor the malformed datagram had one.
    reply = decode_udp_reply(data, KEY)
    assert reply == UdpReply(404, "ghost", 1, 8)
    assert decode_udp_reply(data, heartbeat_key("wrong")) is None
    assert rig.udp.counts["bad_tag"] == 1 and rig.udp.counts["unknown"] == 1
    assert rig.udp.replies == 1


def test_the_agent_acts_only_on_a_reply_for_itself() -> None:
    heard: list[bool] = []
    sender = UdpHeartbeatSender(TOKEN, "node-a", 3, on_unknown=lambda: heard.append(True))
    for forged in (encode_udp_reply(UdpReply(404, "node-a", 3, 5), heartbeat_key("wrong")),
                   encode_udp_reply(UdpReply(404, "node-b", 3, 5), KEY),
                   encode_udp_reply(UdpReply(404, "node-a", 2, 5), KEY),
                   encode_udp_reply(UdpReply(200, "node-a", 3, 5), KEY),
                   b"\x00" * 40, b""):
        sender.datagram_received(forged, ("127.0.0.1", 1))
    assert not heard and not sender.unknown_heard
    sender.datagram_received(encode_udp_reply(UdpReply(404, "node-a", 3, 5), KEY),
                             ("127.0.0.1", 1))
    assert heard == [True] and sender.unknown_heard


async def test_only_the_answer_to_the_datagram_that_asked_settles_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as coordinator:
        coordinator.bind(("127.0.0.1", 0))
        host, port = coordinator.getsockname()
        sender = await UdpHeartbeatSender.open(f"{host}:{port}", "http://127.0.0.1:1", TOKEN,
                                               "node-a", 3)
        try:
            body = msgspec.convert(beat("node-a", seq=9, incarnation=3), HeartbeatBody)
            assert sender.send(body, confirm=True) and sender.asking
            coordinator.settimeout(5)
            received.append(await asyncio.to_thread(coordinator.recv, 4096))
            for other in (UdpReply(200, "node-a", 3, 8),  # an answer to an older one
                          UdpReply(200, "node-b", 3, 9), UdpReply(200, "node-a", 2, 9)):
                sender.datagram_received(encode_udp_reply(other, KEY), (host, port))
            assert sender.asking and sender.confirmed == 0
            monkeypatch.setattr(client_module, "ANSWER_WITHIN", 0.0)
            assert sender.unanswered()
            sender.datagram_received(encode_udp_reply(UdpReply(200, "node-a", 3, 9), KEY),
                                     (host, port))
            assert not sender.asking and not sender.unanswered() and sender.confirmed == 1
            assert not sender.unknown_heard
        finally:
            sender.close()
    sent = msgspec.msgpack.decode(received[0][:-32], type=HeartbeatBody)
    assert sent.confirm is True and sent.seq == 9


async def test_a_burst_is_taken_in_batches_and_every_datagram_counted(rig: Rig) -> None:
    await _register(rig)
    # Bursts of 100 (well within even an unprivileged receive buffer), each sent before the
    # loop can read any of them: a wake-up must drain every one, across batch windows.
    for start in range(1, 2001, 100):
        for seq in range(start, start + 100):
            rig.send(_signed(beat(seq=seq)))
        await rig.wait_counted("ok", start + 99)
    assert rig.coord.cluster.nodes["web-1"].seq == 2000


async def test_a_full_batch_is_followed_at_once_not_a_window_later(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        await _register(rig)
        rig.udp.batch_window = 30.0  # far longer than the test may wait
        buffer = rig.udp._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if buffer < 4 * 1024 * 1024:
            pytest.skip(f"a {buffer}-byte receive buffer cannot hold the burst (not root?)")
        count = MAX_BATCH + 500
        for seq in range(1, count + 1):  # all queued before the loop reads any of them
            rig.send(_signed(beat(seq=seq)))
        # One wake-up takes a full batch; the rest follows on the next loop turn, not after
        # the 30 s window (which would cap the endpoint at MAX_BATCH per window).
        await rig.wait_counted("ok", count)
        assert rig.coord.cluster.nodes["web-1"].seq == count


async def test_closing_the_endpoint_releases_its_port(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        host, port = rig.udp.address
        rig.udp.close()
        rig.udp.close()  # twice is fine
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, port))  # free again


async def test_datagrams_the_kernel_drops_make_the_coordinator_degraded(
        tmp_path: Path) -> None:
    """A coordinator that cannot keep up loses heartbeats in the kernel, before _drain sees
    them: the kernel's own count tells, in /healthz and /metrics."""
    cfg = make_config(tmp_path, **{"coordinator.heartbeat_udp": "127.0.0.1:0"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # room for a few only
    listen.bind(("127.0.0.1", 0))
    listen.setblocking(False)
    udp = UdpHeartbeats(coord, TOKEN, listen)
    client = TestClient(TestServer(build_app(coord, udp), host="127.0.0.1"))
    await client.start_server()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert udp_module.kernel_drops(os.fstat(listen.fileno()).st_ino) == 0
        assert coord.health().status == "ok"
        datagram = _signed(beat(seq=1))
        for _ in range(500):  # the loop cannot read meanwhile: the buffer overflows
            sender.sendto(datagram, udp.address)
        await async_wait_until(lambda: asyncio.sleep(0, udp.drops > 0), within=10,
                               message="the kernel's drops read")
        health = coord.health()
        assert health.status == "degraded"
        assert any("UDP heartbeats dropped" in r for r in health.reasons)
        metrics = await (await client.get("/metrics")).text()
        assert f"nodewatch_udp_receive_drops_total {float(udp.drops)}" in metrics
        assert udp.drops + sum(udp.counts.values()) <= 500
        # Meanwhile a missed push says little about the node: deadlines are stretched.
        assert coord.cluster.push_stretch == OVERLOAD_STRETCH
        assert "nodewatch_push_deadline_stretch 2.0" in metrics
        assert any("push deadlines stretched 2x" in r for r in health.reasons)
    finally:
        sender.close()
        await client.close()
        udp.close()
        await coord.stop()


def test_drops_count_for_a_window_then_age_out() -> None:
    drops = ReceiveDrops(window=60.0)
    drops.note(0, 100.0)  # each reading: how many more since the last one
    drops.note(5, 110.0)
    drops.note(0, 120.0)
    drops.note(3, 150.0)
    assert drops.total == 8 and drops.recent(150.0) == 8
    assert drops.recent(171.0) == 3 and drops.recent(211.0) == 0 and drops.total == 8
    signals = Signals(now=0.0, udp_drops=3)
    health = judge(signals)
    assert health.status == "degraded" and "3 UDP heartbeats dropped in the last 60s" in \
        health.reasons[0]
    # Overload, which stretches deadlines: OVERLOAD_DROP_SHARE of what came, STRETCH_WINDOW.
    fresh = ReceiveDrops(window=60.0)
    assert not fresh.overloaded(0.0)
    fresh.note(3, 100.0, received=1000)  # a loop stall dropped a burst: not overload
    assert not fresh.overloaded(100.0) and fresh.recent(100.0) == 3
    fresh.note(60, 101.0, received=900)  # 63 of 1,963 came in 10 s: 3.2 %
    assert not fresh.overloaded(101.0)
    fresh.note(100, 102.0, received=900)  # 163 of 2,963: 5.5 %
    assert fresh.overloaded(102.0) and fresh.overloaded(100.0 + STRETCH_WINDOW)
    fresh.note(0, 112.5, received=1000)  # the drops are older than the window now
    assert not fresh.overloaded(112.5) and fresh.recent(112.5) == 163
    assert OVERLOAD_DROP_SHARE == 0.05


async def test_push_deadlines_stretch_while_heartbeats_are_dropped_and_recover(
        rig: Rig) -> None:
    await _register(rig)
    rig.send(_signed(beat(seq=1)))
    await rig.wait_counted("ok")
    node = rig.coord.cluster.nodes["web-1"]
    plain = rig.coord.cluster.push_deadline(node)
    now = rig.coord.clock()
    rig.coord.note_receive_drops(2, now, received=1000)  # a stall's burst: as before
    assert rig.coord.cluster.push_deadline(node) == plain
    rig.coord.note_receive_drops(300, now + 1, received=1000)  # overload
    assert rig.coord.cluster.push_deadline(node) == plain * OVERLOAD_STRETCH
    assert rig.coord.cluster.poll_deadline("web-1") == plain * OVERLOAD_STRETCH
    rig.coord.note_receive_drops(0, now + 1 + STRETCH_WINDOW / 2, received=1000)  # recent
    assert rig.coord.cluster.push_stretch == OVERLOAD_STRETCH
    rig.coord.note_receive_drops(0, now + 2 + STRETCH_WINDOW, received=1000)  # gone by
    assert rig.coord.cluster.push_deadline(node) == plain
    assert rig.coord.receive_drops.recent(now + 2 + STRETCH_WINDOW) == 302  # still degraded
