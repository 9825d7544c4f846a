"""Action runs claimed in a real etcd (coordinator/runs.py): an action runs once across a
change of decider, with the runner (respond/runner.py) asking before each run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nodewatch.coordinator.runs import EtcdRuns, RunRecord, run_name
from nodewatch.detect.outcome import ActionRequest
from nodewatch.respond.actions import Action, ActionCall
from nodewatch.respond.runner import ActionRunner
from nodewatch.store.etcd import EtcdStore
from nodewatch.testing import EtcdCluster

HANG = 30.0  # catches a hang only

REQUEST = ActionRequest("unhealthy", "web-1", "10.0.0.1:7301", "0000000042-0001", "down")


@pytest.fixture
async def store(etcd: EtcdCluster) -> AsyncIterator[EtcdStore]:
    store = EtcdStore.from_url(etcd.url("/runs"), timeout=3.0)
    await store.open()
    yield store
    await store.close()


async def lead(store: EtcdStore, name: bytes) -> int:
    """Make ``name`` the leader: the election key on a new lease, and the store fenced by it."""
    key = store.key("election", "leader")
    current = await store.get_raw(key)
    if current is not None:
        await store.kv.delete(key)
    lease = await store.grant(30)
    assert await store.create_with_lease(key, name, lease)
    store.fence = lambda _node_id: (key, lease)
    return lease


def recording_action(ran: list[str], name: str = "exec[0]") -> Action:
    async def run(call: ActionCall) -> None:
        ran.append(call.request.event_id)

    async def close() -> None:
        return None

    return Action(name=name, on=frozenset({"unhealthy"}), timeout=2.0, retries=0, run=run,
                  describe=lambda call: {}, close=close)


async def run_once(runner: ActionRunner, settled: list[ActionRequest]) -> None:
    runner.submit(REQUEST, None)
    await asyncio.wait_for(runner.join(), HANG)
    await asyncio.sleep(0)  # a settle scheduled with call_soon


async def test_an_action_the_previous_leader_ran_is_settled_by_the_next_without_running(
        store: EtcdStore) -> None:
    await lead(store, b"a")
    ran_a: list[str] = []
    settled_a: list[ActionRequest] = []
    runner_a = ActionRunner([recording_action(ran_a)])
    runner_a.bind(lambda *a: None, dict, settled_a.append,
                  EtcdRuns(store, "a", lambda _n: True, 3.0))
    await run_once(runner_a, settled_a)
    assert ran_a == [REQUEST.event_id] and settled_a == [REQUEST]
    value, _ = await store.get_run(run_name(REQUEST, "exec[0]")) or (b"", 0)
    assert b'"ended"' in value and b'"ok"' in value

    # a's settle write never landed (cut off right after the run): b leads and finds the
    # action still due; it asks, hears that it ran, settles it and does not run it.
    await lead(store, b"b")
    ran_b: list[str] = []
    settled_b: list[ActionRequest] = []
    runs_b = EtcdRuns(store, "b", lambda _n: True, 3.0)
    runner_b = ActionRunner([recording_action(ran_b)])
    runner_b.bind(lambda *a: None, dict, settled_b.append, runs_b)
    await run_once(runner_b, settled_b)
    assert ran_b == [] and settled_b == [REQUEST] and runs_b.skipped == 1


async def test_a_deposed_leader_does_not_run_an_action_and_leaves_it_due(
        store: EtcdStore) -> None:
    await lead(store, b"a")
    deposed_fence = store.fence
    await lead(store, b"b")  # a's lease lost; b leads. a's late write landed (its action due)
    store.fence = deposed_fence  # a still writes under its old lease
    asked: list[str] = []

    def may_decide(node_id: str) -> bool:
        asked.append(node_id)
        return len(asked) < 3  # a is told it is a follower after two refused claims

    ran: list[str] = []
    settled: list[ActionRequest] = []
    runner = ActionRunner([recording_action(ran)])
    runner.bind(lambda *a: None, dict, settled.append, EtcdRuns(store, "a", may_decide, 3.0))
    await run_once(runner, settled)
    assert ran == [] and settled == []  # left due: the new leader runs it
    assert await store.get_run(run_name(REQUEST, "exec[0]")) is None


async def test_a_claim_whose_holder_never_said_it_ended_is_run_again_once_it_expired(
        store: EtcdStore) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    await lead(store, b"a")
    runs_a = EtcdRuns(store, "a", lambda _n: True, 3.0)
    assert await runs_a.claim(REQUEST, "exec[0]", duration=1.0) == "run"
    value, _ = await store.get_run(run_name(REQUEST, "exec[0]")) or (b"", 0)
    assert b'"by":"a"' in value and b'"running"' in value
    # a crashed mid-run. b, the next leader, waits until a's claim expires (etcd times its
    # lease), then runs it.
    await lead(store, b"b")
    runs_b = EtcdRuns(store, "b", lambda _n: True, 3.0, sleep=sleep)
    assert await asyncio.wait_for(runs_b.claim(REQUEST, "exec[0]", duration=60.0),
                                  HANG) == "run"
    assert slept, "it waited the claim out rather than run beside it"
    assert runs_b.reruns == 1
    value, _ = await store.get_run(run_name(REQUEST, "exec[0]")) or (b"", 0)
    assert b'"by":"b"' in value and b'"running"' in value
    # another action of the same request is a run of its own: claimed at once
    slept.clear()
    assert await runs_b.claim(REQUEST, "webhook[1]", duration=60.0) == "run"
    assert slept == []
    await runs_b.ended(REQUEST, "exec[0]", ok=False)
    assert await runs_a.claim(REQUEST, "exec[0]", duration=60.0) == "done"  # not a third run


async def test_a_run_record_round_trips_and_an_unreadable_one_counts_as_expired(
        store: EtcdStore) -> None:
    await lead(store, b"a")
    run = run_name(REQUEST, "exec[0]")
    await store.kv.put(store.key("runs", run), b"not json")
    runs = EtcdRuns(store, "a", lambda _n: True, 3.0)
    assert await asyncio.wait_for(runs.claim(REQUEST, "exec[0]", duration=1.0), HANG) == "run"
    assert runs.reruns == 1
    assert RunRecord("a", "ended", "ok").state == "ended"


async def test_a_claim_is_kept_before_a_retry_and_claimed_again_once_it_expired(
        store: EtcdStore) -> None:
    await lead(store, b"a")
    deciding = True
    runs = EtcdRuns(store, "a", lambda _n: deciding, 3.0)
    run = run_name(REQUEST, "exec[0]")
    assert await runs.claim(REQUEST, "exec[0]", duration=1.0) == "run"
    first, _ = await store.get_run(run) or (b"", 0)
    assert await runs.keep(REQUEST, "exec[0]", duration=1.0) == "run"  # refreshed
    # The wait for the retry outlasted the claim: etcd expired it; nobody else took it.
    for _ in range(int(HANG / 0.2)):
        if await store.get_run(run) is None:
            break
        await asyncio.sleep(0.2)
    assert await store.get_run(run) is None
    assert await runs.keep(REQUEST, "exec[0]", duration=30.0) == "run"
    again, _ = await store.get_run(run) or (b"", 0)
    assert again == first  # the same claim (record and nonce) again
    deciding = False
    assert await runs.keep(REQUEST, "exec[0]", duration=30.0) == "fenced"


async def test_a_claim_that_landed_unanswered_is_recognised_as_ours(store: EtcdStore) -> None:
    await lead(store, b"a")
    runs = EtcdRuns(store, "a", lambda _n: True, 3.0, sleep=_no_sleep)
    run = run_name(REQUEST, "exec[0]")
    record = runs._record()
    # The first try landed, its answer was lost (a timeout): the retry finds the record.
    verdict, _, _, _ = await store.claim_run(run, REQUEST.node_id, record, 60.0)
    assert verdict == "claimed"
    assert await asyncio.wait_for(runs._claim(run, REQUEST, "exec[0]", 60.0, record),
                                  HANG) == "run"
    assert runs.reruns == 0


async def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"waited {seconds}s on its own claim")
