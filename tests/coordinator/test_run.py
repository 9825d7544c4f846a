"""Issue 14 (7): a coordinator that listens beyond loopback without its tokens says so once at
start (``coordinator/run.py``'s ``serve``, run in-process on a temporary SQLite store)."""

from __future__ import annotations

import asyncio
import logging
import resource
from pathlib import Path
from typing import Any

import pytest

from nodewatch.config import load_config
from nodewatch.coordinator.run import DESCRIPTORS_CAP, raise_descriptor_limit, serve
from nodewatch.web import beyond_loopback
from tests.helpers import free_port


async def start_and_stop(tmp_path: Path, **overrides: Any) -> None:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             **overrides})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, stop, ready))
    await asyncio.wait_for(ready.wait(), timeout=20)
    stop.set()
    await asyncio.wait_for(task, timeout=20)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "beyond loopback" in r.getMessage()]


async def test_open_coordinator_beyond_loopback_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodewatch.coordinator"):
        await start_and_stop(tmp_path, **{"coordinator.listen": f"0.0.0.0:{free_port()}"})
    [message] = warnings(caplog)
    assert "without agent_token or admin_token" in message
    assert "register nodes" in message and "drain" in message


async def test_a_missing_admin_token_alone_is_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodewatch.coordinator"):
        await start_and_stop(tmp_path, **{"coordinator.listen": f"0.0.0.0:{free_port()}",
                                          "coordinator.agent_token": ["a", "b"]})
    [message] = warnings(caplog)
    assert "without admin_token" in message and "register" not in message


async def test_no_warning_on_loopback_or_with_both_tokens(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodewatch.coordinator"):
        await start_and_stop(tmp_path, **{"coordinator.listen": f"127.0.0.1:{free_port()}"})
        await start_and_stop(tmp_path, **{"coordinator.listen": f"0.0.0.0:{free_port()}",
                                          "coordinator.agent_token": "a",
                                          "coordinator.admin_token": ["x", "y"]})
    assert warnings(caplog) == []


def test_what_counts_as_beyond_loopback() -> None:
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "[fd00::2]", "node.example"):
        assert beyond_loopback(host), host
    for host in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"):
        assert not beyond_loopback(host), host


def test_the_descriptor_limit_is_raised_to_the_hard_one_and_a_short_one_is_named(
        caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        with caplog.at_level(logging.WARNING, logger="nodewatch.coordinator"):
            raised = raise_descriptor_limit(10)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == (hard if hard != resource.RLIM_INFINITY else DESCRIPTORS_CAP)
        assert not caplog.records  # ten nodes fit
        with caplog.at_level(logging.WARNING, logger="nodewatch.coordinator"):
            raise_descriptor_limit(int(raised) * 2)
        assert "descriptor limit" in caplog.text and "short of" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
