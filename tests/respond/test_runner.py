"""ActionRunner: timeouts, bounded retries with backoff, action_failed, dry_run, ordering,
and a submit that never blocks whatever the actions do."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from nodewatch.config import ActionConfig, Config
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Event, NodeState
from nodewatch.respond.actions import Action, ActionCall, ActionError
from nodewatch.respond.runner import ActionRunner
from tests.respond.servers import WebhookReceiver, verify_signature

Emitted = list[tuple[str, str, str, dict[str, Any]]]


async def _nothing() -> None:
    return None


def scripted(run: Callable[[ActionCall], Awaitable[None]], *, on: tuple[str, ...] = ("unhealthy",),
             timeout: float = 1.0, retries: int = 0, name: str = "fake[0]") -> Action:
    return Action(name=name, on=frozenset(on), timeout=timeout, retries=retries, run=run,
                  describe=lambda call: {"type": "fake", "node": call.request.node_id},
                  close=_nothing)


def runner_with(*actions: Action, dry_run: bool = False, max_pending: int = 10_000,
                backoff: float = 0.05) -> tuple[ActionRunner, Emitted]:
    emitted: Emitted = []
    runner = ActionRunner(actions, dry_run=dry_run, max_pending=max_pending, backoff=backoff,
                          rng=random.Random(1))
    nodes = {"web-1": NodeState("web-1", "127.0.0.1:1"), "web-2": NodeState("web-2", "127.0.0.1:2")}
    runner.bind(lambda kind, node_id, reason, evidence:
                emitted.append((kind, node_id, reason, evidence)), lambda: nodes)
    return runner, emitted


def request(kind: str = "unhealthy", node_id: str = "web-1", n: int = 1) -> ActionRequest:
    return ActionRequest(kind, node_id, "127.0.0.1:1", f"{n:016d}", "3 consecutive failed checks")


def event(kind: str = "unhealthy", node_id: str = "web-1", n: int = 1) -> Event:
    return Event(id=f"{n:016d}", ts=1.0, node_id=node_id, kind=kind)


async def settle(runner: ActionRunner) -> None:
    async with asyncio.timeout(10):
        await runner.join()
    await asyncio.sleep(0)  # events are emitted with call_soon


async def test_failing_action_is_retried_with_growing_backoff_then_action_failed() -> None:
    attempts: list[float] = []

    async def fail(call: ActionCall) -> None:
        attempts.append(time.monotonic())
        raise ActionError("connection refused")

    runner, emitted = runner_with(scripted(fail, retries=3), backoff=0.05)
    runner.submit(request(), event())
    await settle(runner)
    assert len(attempts) == 4, "1 attempt + 3 retries, no more"
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    # Backoff 0.05 * 2^k with jitter in [0.5, 1]: each gap at least half its nominal value.
    for k, gap in enumerate(gaps):
        assert gap >= 0.05 * 2**k * 0.5 - 0.005
    assert gaps[2] > gaps[0]
    [(kind, node_id, reason, evidence)] = emitted
    assert kind == "action_failed" and node_id == "web-1"
    assert "after 4 attempts" in reason and "connection refused" in reason
    assert evidence["attempts"] == 4 and evidence["for_event"] == f"{1:016d}"
    assert evidence["on"] == "unhealthy"
    assert runner.failed == 1


async def test_action_that_succeeds_on_a_retry_emits_nothing() -> None:
    calls = 0

    async def flaky(call: ActionCall) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ActionError("HTTP 503")

    runner, emitted = runner_with(scripted(flaky, retries=5))
    runner.submit(request(), event())
    await settle(runner)
    assert calls == 3 and emitted == [] and runner.succeeded == 1


async def test_slow_action_times_out_each_attempt() -> None:
    started = 0

    async def hang(call: ActionCall) -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(30)

    runner, emitted = runner_with(scripted(hang, timeout=0.1, retries=1))
    t0 = time.monotonic()
    runner.submit(request(), event())
    await settle(runner)
    assert started == 2
    assert time.monotonic() - t0 < 20.0  # a hang bound: the attempts, not the 30 s sleeps
    [(kind, _, reason, evidence)] = emitted
    assert kind == "action_failed" and "timed out after 0.1s" in reason
    assert evidence["error"] == "timed out after 0.1s"


async def test_dry_run_records_what_would_run_and_runs_nothing() -> None:
    ran = []

    async def run(call: ActionCall) -> None:
        ran.append(call)

    runner, emitted = runner_with(scripted(run), scripted(run, name="fake[1]"), dry_run=True)
    runner.submit(request(), event())
    await settle(runner)
    assert ran == [] and runner.pending == 0
    [(kind, node_id, _, evidence)] = emitted
    assert kind == "action_dry_run" and node_id == "web-1"
    assert evidence["dry_run"] is True
    assert [w["action"] for w in evidence["would_run"]] == ["fake[0]", "fake[1]"]


async def test_dry_run_from_config_never_touches_the_webhook() -> None:
    receiver = WebhookReceiver().start()
    try:
        config = Config(actions=[ActionConfig(type="webhook", url=receiver.url)])
        config.coordinator.dry_run = True
        runner = ActionRunner.from_config(config)
        emitted: Emitted = []
        runner.bind(lambda *args: emitted.append(args), lambda: {})
        runner.submit(request(), event())
        await settle(runner)
        await runner.aclose()
        assert receiver.received == []
        assert emitted[0][0] == "action_dry_run"
        assert emitted[0][3]["would_run"][0]["type"] == "webhook"
    finally:
        receiver.stop()


async def test_submit_never_blocks_and_refuses_beyond_the_bound() -> None:
    release = asyncio.Event()

    async def stuck(call: ActionCall) -> None:
        await release.wait()

    runner, emitted = runner_with(scripted(stuck, timeout=60), max_pending=100)
    t0 = time.perf_counter()
    for i in range(1000):
        runner.submit(request(node_id=f"n{i}", n=i), event(n=i))
    elapsed = time.perf_counter() - t0
    # submit() is synchronous and the actions never finish: a blocking submit would hang here,
    # so the bound only has to tell "returned" from "waited on an action" (hang bound).
    assert elapsed < 10.0, f"submit blocked the caller for {elapsed:.3f}s"
    assert runner.pending == 100
    await asyncio.sleep(0)
    refused = [e for e in emitted if e[0] == "action_failed"]
    assert len(refused) == 900 and refused[0][3]["error"] == "queue full"
    release.set()
    await settle(runner)
    assert runner.succeeded == 100


async def test_jobs_for_one_node_run_in_order_other_nodes_run_meanwhile() -> None:
    log: list[tuple[str, str, str]] = []

    async def run(call: ActionCall) -> None:
        req = call.request
        log.append(("start", req.kind, req.node_id))
        if req.kind == "unhealthy" and req.node_id == "web-1":
            await asyncio.sleep(0.2)
        log.append(("end", req.kind, req.node_id))

    runner, _ = runner_with(scripted(run, on=("unhealthy", "recovered")))
    runner.submit(request("unhealthy", "web-1", 1), event(n=1))
    runner.submit(request("recovered", "web-1", 2), event("recovered", n=2))
    runner.submit(request("unhealthy", "web-2", 3), event(node_id="web-2", n=3))
    await settle(runner)
    web1 = [entry for entry in log if entry[2] == "web-1"]
    assert web1 == [("start", "unhealthy", "web-1"), ("end", "unhealthy", "web-1"),
                    ("start", "recovered", "web-1"), ("end", "recovered", "web-1")]
    # web-2 did not wait behind web-1's slow action.
    assert log.index(("end", "unhealthy", "web-2")) < log.index(("end", "unhealthy", "web-1"))


async def test_kinds_without_a_configured_action_do_nothing() -> None:
    async def run(call: ActionCall) -> None:
        raise AssertionError("must not run")

    runner, emitted = runner_with(scripted(run, on=("dead",)))
    runner.submit(request("unhealthy"), event())
    await settle(runner)
    assert emitted == [] and runner.pending == 0


async def test_action_bug_is_reported_not_raised() -> None:
    async def buggy(call: ActionCall) -> None:
        raise KeyError("oops")

    runner, emitted = runner_with(scripted(buggy))
    runner.submit(request(), event())
    await settle(runner)
    assert emitted[0][0] == "action_failed" and "KeyError" in emitted[0][2]


async def test_action_sees_the_node_as_it_was_when_requested() -> None:
    seen: list[NodeState | None] = []

    async def run(call: ActionCall) -> None:
        seen.append(call.node)

    runner, _ = runner_with(scripted(run))
    runner.submit(request(), event())
    await settle(runner)
    assert seen[0] is not None and seen[0].node_id == "web-1"


async def test_aclose_cancels_stuck_jobs() -> None:
    async def stuck(call: ActionCall) -> None:
        await asyncio.sleep(60)

    runner, _ = runner_with(scripted(stuck, timeout=120))
    runner.close_grace = 0.1
    runner.submit(request(), event())
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await runner.aclose()
    assert runner.pending == 0


async def test_webhook_retries_reach_the_receiver_signed_each_time() -> None:
    receiver = WebhookReceiver(fail_first=2).start()
    try:
        config = Config(actions=[ActionConfig(type="webhook", url=receiver.url, retries=3,
                                              secret="k")])
        runner = ActionRunner.from_config(config)
        runner.backoff = 0.02
        emitted: Emitted = []
        runner.bind(lambda *args: emitted.append(args), lambda: {})
        runner.submit(request(), event())
        await settle(runner)
        await runner.aclose()
        assert len(receiver.received) == 3
        assert all(verify_signature("k", item) for item in receiver.received)
        assert emitted == []
    finally:
        receiver.stop()


@pytest.mark.parametrize("kind", ["unhealthy", "dead", "recovered"])
def test_default_on_kinds(kind: str) -> None:
    runner = ActionRunner.from_config(
        Config(actions=[ActionConfig(type="exec", command=["true"])]))
    assert kind in runner.actions[0].on


async def test_a_request_is_settled_once_every_action_for_it_ran_or_gave_up() -> None:
    async def run(call: ActionCall) -> None:
        return None

    async def fail(call: ActionCall) -> None:
        raise ActionError("refused")

    settled: list[ActionRequest] = []
    runner, _ = runner_with(scripted(run), scripted(fail, name="fake[1]"))
    runner.bind(lambda *args: None, lambda: {}, settled.append)
    runner.submit(request(), event())
    runner.submit(request("recovered", n=2), event("recovered", n=2))  # no action for it
    await settle(runner)
    assert sorted((r.kind, r.event_id) for r in settled) == [("recovered", f"{2:016d}"),
                                                             ("unhealthy", f"{1:016d}")]


async def test_a_job_stopped_by_shutdown_is_not_settled() -> None:
    async def hang(call: ActionCall) -> None:
        await asyncio.sleep(60)

    settled: list[ActionRequest] = []
    runner, _ = runner_with(scripted(hang, timeout=120))
    runner.bind(lambda *args: None, lambda: {}, settled.append)
    runner.close_grace = 0.05
    runner.submit(request(), event())
    await asyncio.sleep(0)
    await runner.aclose()
    await asyncio.sleep(0)
    assert settled == []  # it stays due: the next coordinator runs it
