"""Issue 14 (5, 6): token lists (old and new during a rotation) and admission control of
registrations (429 + Retry-After past a bounded rate; agents back off and all enrol)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api.admission import MAX_RETRY_AFTER, RegistrationBucket, retry_after_header
from nodewatch.api.app import ADMISSION_KEY, build_app
from nodewatch.collect.coordinator_client import CoordinatorClient, retry_after_seconds
from nodewatch.config import Config, ConfigError, load_config, to_dict
from nodewatch.coordinator.service import Coordinator
from nodewatch.protocol import RegisterBody
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient
from tests.api.test_app import beat, reg_body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def config(tmp_path: Path, **overrides: Any) -> Config:
    base: dict[str, Any] = {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                            "detection.startup_grace": "0"}
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[TestClient[Any, Any], Coordinator]] = []

    async def start(**overrides: Any) -> tuple[TestClient[Any, Any], Coordinator]:
        cfg = config(tmp_path, **overrides)
        coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                            probe=FakeProbe(time.time))  # type: ignore[arg-type]
        await coord.start()
        raw = TestClient(TestServer(build_app(coord)))
        await raw.start_server()
        made.append((raw, coord))
        return CarryingClient(raw), coord

    yield start
    for client, coord in made:
        await client.close()
        await coord.stop()


# ---------------------------------------------------------------------- the bucket


def test_the_bucket_admits_the_burst_then_the_rate() -> None:
    bucket = RegistrationBucket(rate=10, burst=3)
    assert [bucket.admit(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [bucket.admit(100.0) for _ in range(5)]
    assert all(w > 0 for w in waits)
    # Each refused caller is given a later slot than the one before: they come back spread.
    assert waits == sorted(waits) and waits[-1] - waits[0] == pytest.approx(0.4)
    assert bucket.admit(100.1) == 0.0  # one token a tenth of a second later
    assert bucket.admitted == 4 and bucket.refused == 5


def test_the_bucket_refills_to_the_burst_and_bounds_every_wait() -> None:
    bucket = RegistrationBucket(rate=1, burst=2)
    bucket.admit(0.0)
    bucket.admit(0.0)
    waits = [bucket.admit(0.0) for _ in range(500)]
    assert max(waits) <= MAX_RETRY_AFTER
    assert [bucket.admit(1000.0) for _ in range(2)] == [0.0, 0.0]  # full again, not more
    assert bucket.admit(1000.0) > 0
    assert bucket.admit(999.0) > 0  # a clock step back does not mint tokens
    with pytest.raises(ValueError):
        RegistrationBucket(rate=0, burst=1)


def test_retry_after_is_whole_seconds_both_ways() -> None:
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) == 1.0 and retry_after_seconds("soon") == 1.0
    assert retry_after_seconds("nan") == 1.0 and retry_after_seconds("-4") == 1.0
    assert retry_after_seconds("1e9") == 120.0


# ---------------------------------------------------------------------- 429 + Retry-After


async def test_registrations_past_the_rate_get_429_with_retry_after_and_change_nothing(
        serve: Any) -> None:
    client, coord = await serve(**{"coordinator.max_registrations_per_second": 2,
                                   "coordinator.registration_burst": 3})
    for i in range(3):
        resp = await client.post("/v1/register", json=reg_body(f"n-{i}"))
        assert resp.status == 200
    resp = await client.post("/v1/register", json=reg_body("n-late"))
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert "too many registrations" in (await resp.json())["error"]
    assert "n-late" not in coord.cluster.nodes
    # Heartbeats are not admission-controlled: an enrolled node keeps pushing.
    resp = await client.post("/v1/heartbeat", json=beat("n-0"))
    assert resp.status == 204
    assert client.app[ADMISSION_KEY].refused == 1


async def test_agents_sent_away_back_off_and_all_enrol(serve: Any) -> None:
    client, coord = await serve(**{"coordinator.max_registrations_per_second": 40,
                                   "coordinator.registration_burst": 10,
                                   "coordinator.agent_token": "tok"})
    url = str(client.make_url("")).rstrip("/")
    count = 60
    async with aiohttp.ClientSession() as http:
        agents = [CoordinatorClient(url, "tok", lambda: http) for _ in range(count)]

        def body(i: int) -> RegisterBody:
            return RegisterBody(node_id=f"storm-{i}", address=f"127.0.0.1:{10000 + i}",
                                incarnation=1)

        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(
            agent.register_until_done(lambda i=i: body(i))  # type: ignore[misc]
            for i, agent in enumerate(agents))), timeout=30)
        took = time.monotonic() - started
    assert {a.decision for a in answers} == {"new"}
    assert all(f"storm-{i}" in coord.cluster.nodes for i in range(count))
    bucket = client.app[ADMISSION_KEY]
    assert bucket.refused >= count - 10 - 5  # most had to wait: the limit was in force
    assert took >= (count - 10) / 40 * 0.8  # no faster than the rate allows
    assert coord.loop_lag < coord.config.coordinator.max_loop_lag


# ---------------------------------------------------------------------- token lists


async def test_a_token_list_accepts_old_and_new_and_refuses_others(serve: Any) -> None:
    client, coord = await serve(**{"coordinator.agent_token": ["agent-old", "agent-new"],
                                   "coordinator.admin_token": ["admin-old", "admin-new"]})
    for token in ("agent-old", "agent-new"):
        resp = await client.post("/v1/register", json=reg_body(f"via-{token}"),
                                 headers=bearer(token))
        assert resp.status == 200, token
    resp = await client.post("/v1/heartbeat", json=beat("via-agent-old"),
                             headers=bearer("agent-new"))
    assert resp.status == 204
    for token in ("agent-other", "admin-new", "", "agent-old,agent-new", "agent-ol"):
        resp = await client.post("/v1/register", json=reg_body("intruder"),
                                 headers=bearer(token))
        assert resp.status == 401, token
        resp = await client.post("/v1/heartbeat", json=beat("via-agent-old", seq=9),
                                 headers=bearer(token))
        assert resp.status == 401, token
    assert "intruder" not in coord.cluster.nodes
    assert coord.cluster.nodes["via-agent-old"].seq == 1
    for token in ("admin-old", "admin-new"):
        resp = await client.post("/v1/nodes/via-agent-old/drain", headers=bearer(token))
        assert resp.status == 200, token
        resp = await client.post("/v1/nodes/via-agent-old/undrain", headers=bearer(token))
        assert resp.status == 200, token
    for token in ("agent-old", "admin-other"):
        resp = await client.post("/v1/nodes/via-agent-old/drain", headers=bearer(token))
        assert resp.status == 401, token
    resp = await client.post("/v1/nodes/via-agent-old/drain")
    assert resp.status == 401


def test_token_lists_are_validated_and_masked(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"coordinator.agent_token": ["a", "b"],
                              "coordinator.admin_token": "x"})
    assert cfg.coordinator.agent_tokens == ("a", "b")
    assert cfg.coordinator.admin_tokens == ("x",)
    assert config(tmp_path).coordinator.agent_tokens == ()
    assert config(tmp_path, **{"coordinator.admin_token": []}).coordinator.admin_tokens == ()
    shown = to_dict(cfg)["coordinator"]
    assert shown["agent_token"] == ["***", "***"] and shown["admin_token"] == "***"
    assert "a" not in str(shown["agent_token"])
    for bad, words in ((["a", ""], "non-empty"), (["a", "a"], "once"), ([" a"], "spaces"),
                       ([1], "str"), ({"a": 1}, "str")):
        with pytest.raises(ConfigError, match="coordinator.agent_token") as err:
            config(tmp_path, **{"coordinator.agent_token": bad})
        assert words in str(err.value), (bad, err.value)
    # The agent's own token stays one string.
    with pytest.raises(ConfigError, match="agent.agent_token"):
        config(tmp_path, **{"agent.agent_token": ["a", "b"]})
