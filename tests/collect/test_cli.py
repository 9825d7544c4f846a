"""``nodewatch agent`` as a real process: SIGTERM sends the final heartbeat, a restart takes
the next incarnation, kill -9 never leaves the seq behind, and bad config exits 2 in one line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.collect.coordinator_stub import RecordingCoordinator
from tests.helpers import async_wait_until, free_port

NODEWATCH = str(Path(sys.executable).with_name("nodewatch"))
pytestmark = pytest.mark.slow


class AgentProcess:
    def __init__(self, tmp_path: Path, coordinator: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [NODEWATCH, "agent", "--node-id", "proc-1", "--listen",
                     f"127.0.0.1:{self.port}", "--state-dir", str(tmp_path / "state"),
                     "--coordinator", coordinator, *extra]
        self.env = {**os.environ, **(env or {})}
        self.stderr_path = tmp_path / f"agent-{self.port}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> AgentProcess:
        stderr = self.stderr_path.open("wb")  # noqa: ASYNC230 - a local log file, once
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=self.env)
        finally:
            stderr.close()

        async def up() -> bool:
            try:
                async with http.get(f"{self.url}/health") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                assert self.process is not None and self.process.returncode is None, (
                    self.stderr_path.read_text())
                return False

        await async_wait_until(up, within=20, message="agent process serving /health")
        return self

    async def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), 15)


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(f"{url}/health") as response:
        body: dict[str, object] = await response.json()
        return body


async def test_sigterm_sends_final_heartbeat_and_restart_takes_the_next_incarnation(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    coordinator = await RecordingCoordinator(heartbeat_interval=30).start()
    try:
        agent = await AgentProcess(tmp_path, coordinator.url).start(http)
        await async_wait_until(lambda: asyncio.sleep(0, coordinator.registrations),
                               message="registration")
        first = coordinator.registrations[0]
        assert first["incarnation"] == 1 and first["node_id"] == "proc-1"
        assert (await health(http, agent.url))["incarnation"] == 1
        assert await agent.signal(signal.SIGTERM) == 0
        final = coordinator.heartbeats[-1]
        assert final["final"] is True and final["incarnation"] == 1

        again = await AgentProcess(tmp_path, coordinator.url).start(http)
        await async_wait_until(lambda: asyncio.sleep(0, len(coordinator.registrations) == 2),
                               message="second registration")
        second = coordinator.registrations[1]
        assert second["incarnation"] == 2
        assert second["last_seq"] == final["seq"] and second["last_ts"] == final["ts"]
        body = await health(http, again.url)
        assert body["incarnation"] == 2 and isinstance(body["seq"], int)
        assert body["seq"] > final["seq"]
        assert await again.signal(signal.SIGINT) == 0
    finally:
        await coordinator.stop()


async def test_kill_9_restart_never_reports_a_seq_behind_what_was_exposed(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    coordinator = await RecordingCoordinator().start()
    try:
        agent = await AgentProcess(tmp_path, coordinator.url).start(http)
        exposed = 0
        for status in ("degraded", "ok", "draining", "ok"):
            async with http.put(f"{agent.url}/health", json={"status": status}) as response:
                exposed = max(exposed, int((await response.json())["seq"]))
        assert await agent.signal(signal.SIGKILL) == -signal.SIGKILL
        assert coordinator.heartbeats == []  # no clean stop, no final heartbeat

        again = await AgentProcess(tmp_path, coordinator.url).start(http)
        await async_wait_until(lambda: asyncio.sleep(0, len(coordinator.registrations) == 2),
                               message="registration after the crash")
        after = coordinator.registrations[1]
        assert after["incarnation"] == 2 and after["last_seq"] >= exposed
        assert after["last_ts"] > 0
        assert await again.signal(signal.SIGTERM) == 0
    finally:
        await coordinator.stop()


async def test_token_from_the_environment_is_sent_and_never_logged(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    coordinator = await RecordingCoordinator().start()
    token = "tok-never-in-logs-7f3a"
    try:
        agent = await AgentProcess(tmp_path, coordinator.url,
                                   env={"NODEWATCH_AGENT_TOKEN": token,
                                        "NODEWATCH_LOG_LEVEL": "DEBUG"}).start(http)
        await async_wait_until(lambda: asyncio.sleep(0, coordinator.registrations),
                               message="registration")
        assert coordinator.auth[0] == f"Bearer {token}"
        async with http.put(f"{agent.url}/health", json={"status": "ok"},
                            headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        assert await agent.signal(signal.SIGTERM) == 0
        assert token not in agent.stderr_path.read_text()
    finally:
        await coordinator.stop()


@pytest.mark.parametrize(("toml", "key", "expected"), [
    ('[agent]\nsample_interval = "30s"\n', "agent.sample_interval", "between 1s and 15s"),
    ("[agent]\nsample_interval = 5\n", "agent.sample_interval", "duration"),
    ('[agent]\nlisten = "nowhere"\n', "agent.listen", ""),
    ('[agent]\ncolour = "red"\n', "agent.colour", "unknown key"),
    ('[[agent.rules]]\nmetric = "cpu_percent"\n', "agent.rules[0]", "above"),
])
async def test_bad_config_is_one_line_naming_file_and_key_with_exit_2(
        tmp_path: Path, toml: str, key: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    process = await asyncio.create_subprocess_exec(
        NODEWATCH, "agent", "--node-id", "x", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    text = err.decode()
    assert process.returncode == 2
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert str(path) in text and key in text and expected in text


async def test_bad_flag_value_is_also_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        NODEWATCH, "agent", "--node-id", "bad id!", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert err.decode().strip().endswith(
        "agent.node_id: expected 1-128 characters of [A-Za-z0-9._-]")
