"""The agent's lifecycle: registration and heartbeats against a recording coordinator,
identity across restarts, custom checks, and never blocking its own API."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from nodewatch.collect.agent import SEQ_BLOCK
from nodewatch.collect.identity import StateFile
from nodewatch.collect.sampler import HostSampler
from nodewatch.config import AgentCheckConfig, AgentConfig, Duration
from nodewatch.model import NodeStatus
from nodewatch.testing import FakeClock
from tests.collect.conftest import AgentFactory
from tests.collect.coordinator_stub import RecordingCoordinator
from tests.helpers import async_wait_until, free_port, loopback_connections


async def test_registers_on_start_with_identity_and_token(
        make_agent: AgentFactory, tmp_path: Path) -> None:
    coordinator = await RecordingCoordinator().start()
    try:
        agent = await make_agent(coordinator=coordinator.url, agent_token="tok-1",
                                 advertise="10.1.2.3:7301", labels={"zone": "a"})
        await asyncio.wait_for(agent.registered.wait(), 5)
        (payload,) = coordinator.registrations
        assert payload == {"node_id": "node-a", "address": "10.1.2.3:7301", "incarnation": 1,
                           "last_seq": 0, "last_ts": 0.0, "version": agent.version,
                           "labels": {"zone": "a"}, "heartbeat_interval": 0.0}
        assert coordinator.auth == ["Bearer tok-1"]
        assert coordinator.heartbeats == []  # interval 0 on both sides: pull only
    finally:
        await coordinator.stop()


async def test_labels_from_the_agent_config_are_registered(
        make_agent: AgentFactory) -> None:
    coordinator = await RecordingCoordinator().start()
    try:
        config = AgentConfig(node_id="node-a", labels={"zone": "b", "role": "web"})
        agent = await make_agent(config=config, coordinator=coordinator.url,
                                 labels={"role": "db"})  # given in code: on top of the file's
        await asyncio.wait_for(agent.registered.wait(), 5)
        assert coordinator.registrations[0]["labels"] == {"zone": "b", "role": "db"}
    finally:
        await coordinator.stop()


async def test_address_defaults_to_the_listen_address(make_agent: AgentFactory) -> None:
    coordinator = await RecordingCoordinator().start()
    try:
        agent = await make_agent(coordinator=coordinator.url)
        await asyncio.wait_for(agent.registered.wait(), 5)
        assert coordinator.registrations[0]["address"] == agent.listen_address
    finally:
        await coordinator.stop()


async def test_heartbeats_follow_the_answer_and_carry_increasing_seqs(
        make_agent: AgentFactory) -> None:
    coordinator = await RecordingCoordinator(heartbeat_interval=0.05).start()
    try:
        agent = await make_agent(coordinator=coordinator.url)
        await async_wait_until(lambda: asyncio.sleep(0, len(coordinator.heartbeats) >= 3),
                               message="three heartbeats")
        beats = coordinator.heartbeats[:3]
        assert set(beats[0]) == {"node_id", "incarnation", "seq", "ts", "status", "reasons",
                                 "system", "load", "sample_interval", "samples"}
        seqs = [beat["seq"] for beat in beats]
        assert seqs == sorted(set(seqs)) and all(b["incarnation"] == 1 for b in beats)
        await agent.set_status("degraded", "slow disk")
        await async_wait_until(
            lambda: asyncio.sleep(0, coordinator.heartbeats[-1]["status"] == "degraded"),
            message="a heartbeat with the new status")
        assert coordinator.heartbeats[-1]["reasons"] == ["slow disk"]
    finally:
        await coordinator.stop()


async def test_unknown_node_heartbeat_registers_again(make_agent: AgentFactory) -> None:
    coordinator = await RecordingCoordinator(heartbeat_interval=0.05).start()
    coordinator.forget_next_heartbeat = True
    try:
        await make_agent(coordinator=coordinator.url)
        await async_wait_until(lambda: asyncio.sleep(0, len(coordinator.registrations) == 2),
                               message="a second registration")
    finally:
        await coordinator.stop()


async def test_registration_retries_while_the_coordinator_is_down_without_blocking_the_api(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    port = free_port()
    agent = await make_agent(coordinator=f"http://127.0.0.1:{port}")
    for _ in range(3):
        async with http.get(f"{agent.url}/health") as response:
            assert response.status == 200
    assert not agent.registered.is_set()
    coordinator = await RecordingCoordinator(port=port).start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert coordinator.registrations[0]["node_id"] == "node-a"
    finally:
        await coordinator.stop()


async def test_clean_stop_sends_a_final_heartbeat_and_restart_reports_it(
        make_agent: AgentFactory, tmp_path: Path) -> None:
    coordinator = await RecordingCoordinator(heartbeat_interval=30).start()
    try:
        agent = await make_agent(coordinator=coordinator.url, heartbeat_interval=30.0)
        await asyncio.wait_for(agent.registered.wait(), 5)
        await agent.set_status("draining", "bye")
        await agent.stop()
        final = coordinator.heartbeats[-1]
        assert final["final"] is True and final["seq"] == agent.seq
        assert final["status"] == "draining"
        again = await make_agent(coordinator=coordinator.url)
        await asyncio.wait_for(again.registered.wait(), 5)
        second = coordinator.registrations[-1]
        assert second["incarnation"] == 2
        assert second["last_seq"] == final["seq"] and second["last_ts"] == final["ts"]
        assert again.seq > final["seq"]
    finally:
        await coordinator.stop()


async def test_stop_never_hangs_when_the_coordinator_is_gone(make_agent: AgentFactory) -> None:
    coordinator = await RecordingCoordinator(heartbeat_interval=30).start()
    agent = await make_agent(coordinator=coordinator.url, heartbeat_interval=30.0)
    await asyncio.wait_for(agent.registered.wait(), 5)
    await coordinator.stop()
    await asyncio.wait_for(agent.stop(), 5)


async def test_incarnation_increments_on_every_start(make_agent: AgentFactory,
                                                     tmp_path: Path) -> None:
    seen = []
    for _ in range(3):
        agent = await make_agent()
        seen.append(agent.incarnation)
        await agent.stop()
    assert seen == [1, 2, 3]
    state = StateFile(tmp_path / "state", "node-a").load()
    assert state is not None and state.clean and state.incarnation == 3


async def test_seq_is_never_behind_after_a_crash(make_agent: AgentFactory,
                                                 tmp_path: Path) -> None:
    agent = await make_agent()
    for i in range(5):
        await agent.set_status("degraded" if i % 2 == 0 else "ok", "flap")
    exposed = agent.seq
    # A crash: nothing more is written; the file is what a restart finds.
    state = StateFile(tmp_path / "state", "node-a").load()
    assert state is not None and not state.clean and state.reserved >= exposed
    # Simulate the crash in-process: drop the sockets, write nothing more (test_cli.py does it
    # for real with kill -9).
    agent._stopped, agent._running = True, False
    await agent._close_io()
    again = await make_agent()
    assert again.incarnation == 2
    assert again.last_seq_before_start >= exposed
    assert again.seq > exposed


async def test_seq_reservation_is_persisted_before_a_seq_past_it_is_exposed(
        make_agent: AgentFactory, tmp_path: Path) -> None:
    agent = await make_agent()
    state_file = StateFile(tmp_path / "state", "node-a")
    for i in range(SEQ_BLOCK + 5):
        await agent.set_status("degraded" if i % 2 == 0 else "ok")
        if i % 250 == 0 or i > SEQ_BLOCK:
            state = state_file.load()
            assert state is not None and state.reserved >= agent.seq


async def test_last_ts_is_persisted_with_every_sample(make_agent: AgentFactory, tmp_path: Path,
                                                      clock: FakeClock) -> None:
    agent = await make_agent()
    state_file = StateFile(tmp_path / "state", "node-a")
    for _ in range(3):
        clock.advance(5)
        await agent.sample_now()
        state = state_file.load()
        assert state is not None and state.last_ts == agent.health()["ts"] == clock()


async def test_failing_custom_checks_degrade_with_a_reason_each(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    closed = free_port()
    config = AgentConfig(checks=[
        AgentCheckConfig(type="tcp", target=f"127.0.0.1:{closed}", name="db",
                         interval=Duration(0.05), timeout=Duration(1.0)),
        AgentCheckConfig(type="command", target=[sys.executable, "-c", "raise SystemExit(3)"],
                         name="script", interval=Duration(0.05), timeout=Duration(5.0)),
        AgentCheckConfig(type="command", target=[sys.executable, "-c", "pass"], name="fine",
                         interval=Duration(0.05), timeout=Duration(5.0)),
    ])
    agent = await make_agent(config=config)
    await async_wait_until(lambda: asyncio.sleep(0, len(agent.reasons) == 2),
                           message="both failing checks reported")
    assert agent.status is NodeStatus.DEGRADED
    assert any(r.startswith("check db failed: cannot connect") for r in agent.reasons)
    assert "check script failed: exit status 3" in agent.reasons


async def test_http_check_clears_when_the_service_comes_back(
        make_agent: AgentFactory) -> None:
    coordinator = RecordingCoordinator()  # any HTTP server on a known port will do
    url = f"{coordinator.url}/v1/register"
    config = AgentConfig(checks=[AgentCheckConfig(type="http", target=url, name="web",
                                                  interval=Duration(0.05),
                                                  timeout=Duration(1.0))])
    agent = await make_agent(config=config)
    await async_wait_until(lambda: asyncio.sleep(0, agent.status is NodeStatus.DEGRADED),
                           message="http check failing")
    await coordinator.start()
    try:
        # GET on a POST-only route answers 405: still failing, with the status as the reason.
        await async_wait_until(
            lambda: asyncio.sleep(0, agent.reasons == ["check web failed: HTTP 405"]),
            message="HTTP status reason")
    finally:
        await coordinator.stop()


async def test_command_check_timeout_kills_the_command(make_agent: AgentFactory) -> None:
    config = AgentConfig(checks=[AgentCheckConfig(
        type="command", target=[sys.executable, "-c", "import time; time.sleep(30)"],
        name="slow", interval=Duration(10.0), timeout=Duration(0.3))])
    agent = await make_agent(config=config)
    await async_wait_until(lambda: asyncio.sleep(0, bool(agent.reasons)), within=10,
                           message="timeout reason")
    assert agent.reasons == ["check slow failed: timed out after 0.3s"]


async def test_a_crashed_background_task_is_logged(make_agent: AgentFactory,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    agent = await make_agent()

    async def broken() -> None:
        raise RuntimeError("sampler exploded")

    with caplog.at_level("ERROR", logger="nodewatch.agent"):
        agent._spawn(broken(), "broken")
        await asyncio.sleep(0)  # let it run and fail
        await asyncio.sleep(0)
    assert any("nodewatch-agent-broken" in r.getMessage() and "sampler exploded" in r.getMessage()
               for r in caplog.records)


async def test_health_shows_new_connections_within_a_few_samples(
        make_agent: AgentFactory, http: aiohttp.ClientSession) -> None:
    # The real sampler on the host's /proc, sampling every second, with a budget no table walk
    # fits in (issue 11: the count lagged by tens of seconds while the walk waited for it).
    agent = await make_agent(sampler=HostSampler(connections_budget=1e-12), clock=time.time,
                             run_sampler=True, sample_interval=1.0)

    async def connections() -> int:
        async with http.get(f"{agent.url}/health") as response:
            return int((await response.json())["system"]["connections"])

    count = 20
    baseline = await connections()
    with loopback_connections(count):
        # Both ends count (2N); other processes may close some of theirs meanwhile.
        async def risen() -> bool:
            return await connections() >= baseline + count

        await async_wait_until(risen, within=30, interval=0.1,
                               message=f"{count} new connections in /health")


async def test_an_unwritable_state_dir_shows_a_reason_and_clears(make_agent: AgentFactory,
                                                                 tmp_path: Path,
                                                                 http: aiohttp.ClientSession,
                                                                 clock: FakeClock) -> None:
    agent = await make_agent()
    url = agent.url
    # Root ignores chmod: make the state file's path a non-empty directory instead, so the
    # atomic rename over it fails the way a read-only or full disk would.
    path = tmp_path / "state" / "node-a.state.json"
    path.unlink()
    (path / "blocker").mkdir(parents=True)
    clock.advance(5)
    await agent.sample_now()
    seq = agent.seq
    doc = await (await http.get(f"{url}/health")).json()
    assert doc["status"] == "ok"  # the node's service is fine; only its memory is at risk
    assert len(doc["reasons"]) == 1
    assert doc["reasons"][0].startswith(f"state dir {tmp_path / 'state'} cannot be written: ")
    metrics = await (await http.get(f"{url}/metrics")).text()
    assert "nodewatch_agent_state_writable 0.0" in metrics
    for _ in range(3):  # reports go on while the writes fail
        await agent.sample_now()
    assert agent.seq == seq + 3
    (path / "blocker").rmdir()
    path.rmdir()
    await agent.sample_now()
    doc = await (await http.get(f"{url}/health")).json()
    assert (doc["status"], doc["reasons"]) == ("ok", [])
    assert "nodewatch_agent_state_writable 1.0" in await (await http.get(f"{url}/metrics")).text()
    state = StateFile(tmp_path / "state", "node-a").load()
    assert state is not None and state.seq == agent.seq


async def test_an_unwritable_state_dir_at_start_refuses_to_start(make_agent: AgentFactory,
                                                                 tmp_path: Path) -> None:
    # A new incarnation that is not durable would be taken again by the next start.
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(OSError):
        await make_agent(state_dir=tmp_path / "not-a-dir" / "state")


async def test_with_several_coordinators_the_agent_fails_over_and_follows_its_owner(
        make_agent: AgentFactory) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nobody listens: the first URL fails
    front = await RecordingCoordinator(heartbeat_interval=0.05).start()
    owner = await RecordingCoordinator(heartbeat_interval=0.05).start()
    front.owner = owner.url  # the front names another coordinator as the node's owner
    try:
        agent = await make_agent(coordinator=f"{down},{front.url},{owner.url}")
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert [r["node_id"] for r in front.registrations] == ["node-a"]
        await async_wait_until(lambda: asyncio.sleep(0, len(owner.heartbeats) >= 2),
                               message="heartbeats go to the owner")
        assert front.heartbeats == []
        # The owner says another coordinator (one the agent was not given) owns it now:
        # ignored, the node's credential goes only where the operator said.
        owner.owner = "http://203.0.113.9:7300"
        seen = len(owner.heartbeats)
        await async_wait_until(lambda: asyncio.sleep(0, len(owner.heartbeats) >= seen + 2),
                               message="heartbeats stay with the configured owner")
        # It names the front: the agent registers there and heartbeats follow.
        owner.owner = front.url
        front.owner = ""
        await async_wait_until(lambda: asyncio.sleep(0, len(front.heartbeats) >= 2),
                               message="heartbeats move to the new owner")
        assert len(front.registrations) == 2
    finally:
        await front.stop()
        await owner.stop()


def test_coordinator_urls_come_as_a_list_or_comma_separated() -> None:
    from nodewatch.config import coordinator_urls

    assert coordinator_urls("http://a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    assert coordinator_urls(["http://a:1", "https://b:2"]) == ["http://a:1", "https://b:2"]
    assert coordinator_urls("") == []


async def test_a_redirect_to_the_owner_is_followed_only_to_a_configured_coordinator(
        make_agent: AgentFactory) -> None:
    front = await RecordingCoordinator(heartbeat_interval=0.05).start()
    owner = await RecordingCoordinator(heartbeat_interval=0.05).start()
    front.owner, front.redirect = owner.url, True  # what a shared coordinator does with mTLS
    try:
        agent = await make_agent(coordinator=f"{front.url},{owner.url}")
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert front.registrations == [] and len(owner.registrations) == 1
        await async_wait_until(lambda: asyncio.sleep(0, len(owner.heartbeats) >= 2),
                               message="heartbeats go to the owner")
    finally:
        await front.stop()
        await owner.stop()
