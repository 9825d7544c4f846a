"""The coordinator edge: what it writes to the store, and when."""

from __future__ import annotations

import asyncio
import copy
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from nodewatch.config import load_config
from nodewatch.coordinator.service import Coordinator
from nodewatch.detect.cluster import MANY_UNKNOWN
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import (
    CallerObservation,
    CheckResult,
    Event,
    FailureClass,
    Health,
    NodeStatus,
    Registration,
    Report,
)
from nodewatch.store.open import open_store
from nodewatch.store.tiers import Rollups
from nodewatch.testing import FakeClock, FakeProbe
from tests.coordinator.support import RecordingActions


async def make(tmp_path: Path) -> Coordinator:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    coord.register(Registration("n1", "127.0.0.1:1", 1, 0, time.time()))
    await coord.persist()
    return coord


def push(coord: Coordinator, seq: int, samples: int) -> None:
    report = Report(incarnation=1, seq=seq, ts=time.time(), sample_interval=5.0,
                    samples=samples, system={"cpu_percent": float(seq)})
    coord.heartbeat(CheckResult("n1", True, time.time(), report=report, source="push"))


async def test_history_gets_one_point_per_agent_sample_not_per_heartbeat(tmp_path: Path) -> None:
    coord = await make(tmp_path)
    try:
        for seq, samples in ((1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)):
            push(coord, seq, samples)
        history = await coord.history("n1", 0)
        assert [s.seq for s in history] == [1, 4, 6]
    finally:
        await coord.stop()


async def test_a_routine_heartbeat_from_its_body_changes_what_the_full_path_changes(
        tmp_path: Path) -> None:
    """The UDP edge's path (``routine_heartbeat`` straight from the decoded body) against
    ``heartbeat(push_result(body))``: the same node, history points, dirty set and next poll;
    and it declines (changing nothing) whatever is not routine."""
    from nodewatch.api.udp import push_result
    from nodewatch.protocol import HeartbeatBody

    fast, full = await make(tmp_path / "fast"), await make(tmp_path / "full")
    full.cluster.nodes["n1"].registered_at = fast.cluster.nodes["n1"].registered_at
    try:
        script = [(1, 1, "ok", []), (2, 1, "ok", []), (3, 2, "ok", []), (3, 2, "ok", []),
                  (4, 2, "degraded", ["disk"]), (5, 3, "degraded", ["disk"]), (6, 3, "ok", [])]
        taken = []
        for seq, samples, status, reasons in script:
            at = time.time()
            body = HeartbeatBody(node_id="n1", incarnation=1, seq=seq, ts=at,
                                 status=NodeStatus(status), reasons=reasons,
                                 system={"cpu_percent": float(seq)}, load={"qps": 1.0},
                                 sample_interval=5.0, samples=samples)
            before = copy.deepcopy(fast.cluster.nodes["n1"])
            routine = fast.routine_heartbeat(fast.cluster.nodes["n1"], body, at)
            taken.append(routine)
            if not routine:
                assert fast.cluster.nodes["n1"] == before  # declined: nothing changed
                fast.heartbeat(push_result(body, at))
            full.heartbeat(push_result(body, at))
            assert fast.cluster.nodes["n1"] == full.cluster.nodes["n1"]
            assert fast.poller._nodes["n1"].deferred == full.poller._nodes["n1"].deferred
            assert fast.cluster.take_dirty() == full.cluster.take_dirty()
        # The first push makes the node healthy, a replay is stale, a new status is an event.
        assert taken == [False, True, True, False, False, True, False]
        assert fast.pushes == full.pushes
        assert [(h.seq, h.system, h.health) for h in fast._history.samples("n1", 0)] == \
            [(h.seq, h.system, h.health) for h in full._history.samples("n1", 0)]
    finally:
        await fast.stop()
        await full.stop()


async def test_routine_observations_wait_for_the_full_write_transitions_do_not(
        tmp_path: Path) -> None:
    coord = await make(tmp_path)
    try:
        push(coord, 1, 1)
        push(coord, 2, 2)  # with the register's poll: at least `rise` good checks
        await coord.persist()
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.health.value == "healthy" and stored.seq == 2
        push(coord, 3, 3)  # routine: a new seq, no transition
        await coord.persist()
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.seq == 2  # not written yet
        await coord.persist(routine=True)
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.seq == 3
        await coord.command("drain", "n1", "maintenance")  # a command: written at once
        push(coord, 4, 4)
        await coord.persist()
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.admin.value == "drained"
    finally:
        await coord.stop()


async def test_raw_samples_are_written_a_chunk_at_a_time_and_read_at_once(
        tmp_path: Path) -> None:
    """A node's samples gather for up to a minute (store/tiers.py SampleChunks), then go to
    the store as one row; a reader sees them meanwhile, and stop writes what is gathered."""
    # A second into one of n1's minutes (they turn at its own offset): samples 1-12 are that
    # minute's chunk, 13-24 the next, 25-29 still gathered at the end.
    offset = Rollups(60.0).offset("n1")
    clock = FakeClock(offset + 60.0 * math.floor(time.time() / 60.0) + 1.0)
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), clock=clock,
                        probe=FakeProbe(clock))  # type: ignore[arg-type]
    await coord.start()

    def sample(seq: int) -> None:
        report = Report(incarnation=1, seq=seq, ts=clock(), sample_interval=5.0,
                        samples=seq, system={"cpu_percent": float(seq)})
        coord.heartbeat(CheckResult("n1", True, clock(), report=report, source="push"))
        clock.advance(5.0)

    def chunk_rows() -> int:
        conn = sqlite3.connect(tmp_path / "state.db")
        try:
            return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])
        finally:
            conn.close()

    try:
        coord.register(Registration("n1", "127.0.0.1:1", 1, 0, clock()))
        sample(1)
        await coord.persist(routine=True)
        assert await coord.store.history("n1", 0) == []  # still gathered
        assert [s.seq for s in await coord.history("n1", 0)] == [1]  # but read
        for seq in range(2, 30):  # 28 samples 5 s apart: at least one whole minute
            sample(seq)
        await coord.persist(routine=True)
        assert [s.seq for s in await coord.store.history("n1", 0)] == list(range(1, 25))
        assert chunk_rows() == 2  # a row per minute, not per sample
        read = await coord.history("n1", 0)
        assert [s.seq for s in read] == list(range(1, 30))
        assert read[-1].system == {"cpu_percent": 29.0} and read[-1].health == "healthy"
    finally:
        await coord.stop()
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    try:  # stop wrote the chunk being gathered
        assert [s.seq for s in await store.history("n1", 0)] == list(range(1, 30))
    finally:
        await store.close()


async def test_stop_writes_routine_observations(tmp_path: Path) -> None:
    coord = await make(tmp_path)
    push(coord, 7, 1)
    await coord.stop()
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    try:
        stored = await store.get_node("n1")
        assert stored is not None and stored.seq == 7
    finally:
        await store.close()


async def test_actions_run_only_after_their_transition_is_stored(tmp_path: Path) -> None:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    sink = RecordingActions()
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), actions=sink,
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    try:
        coord.register(Registration("n1", "127.0.0.1:1", 1, 0, time.time()))
        await coord.command("drain", "n1", "maintenance")
        # A command returns once stored, and only then is its action handed on.
        assert sink.submitted == ["drained:n1"]
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.admin.value == "drained"
        # A leader that steps down drops decisions it had not stored yet.
        await coord.become_follower("someone-else")
        assert sink.submitted == ["drained:n1"]
    finally:
        await coord.stop()


async def test_peer_votes_scripted_on_the_fake_probe_hold_a_node_the_peers_reach(
        tmp_path: Path) -> None:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    probe = FakeProbe(time.time)
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), probe=probe)
    await coord.start()
    try:
        for i, node_id in enumerate(("n1", "n2", "n3"), 1):
            coord.register(Registration(node_id, f"127.0.0.1:{i}", 1, 0, time.time()))
        for seq in (1, 2, 3):
            for node_id in ("n1", "n2", "n3"):
                coord.heartbeat(CheckResult(node_id, True, time.time(), source="push",
                                            report=Report(1, seq, time.time())))
        assert all(n.health is Health.HEALTHY for n in coord.cluster.nodes.values())
        probe.set("n3", FailureClass.REFUSED)
        probe.set_peer_vote("n1", "127.0.0.1:3", True)
        probe.set_peer_vote("n2", "127.0.0.1:3", False)
        node = coord.cluster.nodes["n3"]
        async with asyncio.timeout(10):
            while node.health_reason != "reachable from peers":
                coord.on_result(CheckResult("n3", False, time.time(),
                                            failure=FailureClass.REFUSED, detail="refused"))
                await asyncio.sleep(0.01)
        assert node.health is Health.SUSPECT
        assert sorted(set(probe.peer_calls)) == [("n1", "127.0.0.1:3"), ("n2", "127.0.0.1:3")]
        held = [e for e in coord.recent if e.reason == "reachable from peers"]
        assert held and held[-1].evidence["reachable_from"] == ["n1"]
    finally:
        await coord.stop()


class SettlingActions(RecordingActions):
    """A sink that reports back like the ActionRunner: settles what it ran, if told to."""

    def __init__(self, settle: bool) -> None:
        super().__init__()
        self.settle = settle
        self._settled: Any = None

    def bind(self, emit: Any, nodes: Any, settled: Any) -> None:
        self._settled = settled

    def submit(self, request: ActionRequest, event: Event | None) -> None:
        super().submit(request, event)
        if self.settle:
            self._settled(request)


async def _coordinator(tmp_path: Path, sink: RecordingActions) -> Coordinator:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), actions=sink,
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    return coord


async def test_a_stored_action_that_never_ran_runs_after_a_restart_and_only_then(
        tmp_path: Path) -> None:
    # The first coordinator stores the drain and its action, then dies before the action
    # settles (its sink never reports back).
    first = await _coordinator(tmp_path, SettlingActions(settle=False))
    first.register(Registration("n1", "127.0.0.1:1", 1, 0, time.time()))
    await first.command("drain", "n1", "maintenance")
    stored = await first.store.get_node("n1")
    assert stored is not None and [d.kind for d in stored.actions_due] == ["drained"]
    await first.store.close()  # a crash: no stop(), nothing more written

    # The next one runs it once, settles it, and stores that.
    sink = SettlingActions(settle=True)
    second = await _coordinator(tmp_path, sink)
    try:
        assert sink.submitted == ["drained:n1"]
        await second.persist()
        stored = await second.store.get_node("n1")
        assert stored is not None and stored.actions_due == []
    finally:
        await second.stop()

    # Settled and stored: a third start runs nothing again.
    third_sink = SettlingActions(settle=True)
    third = await _coordinator(tmp_path, third_sink)
    try:
        assert third_sink.submitted == []
    finally:
        await third.stop()


class StubObserver:
    """A caller observer that posts one count per beat and records when it runs."""

    def __init__(self) -> None:
        self.running = 0
        self.unknown: list[list[str]] = []
        self.heard_back = asyncio.Event()

    async def run(self, observe: Any) -> None:
        self.running += 1
        try:
            while True:
                self.unknown.append(observe("stub", [CallerObservation("n1", 10, 0),
                                                     CallerObservation("ghost", 10, 0)]))
                if self.unknown[-1] == ["ghost"]:
                    self.heard_back.set()
                await asyncio.sleep(0.01)
        finally:
            self.running -= 1


async def test_caller_observers_run_only_while_this_coordinator_leads(tmp_path: Path) -> None:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0"})
    stub = StubObserver()
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), observers=[stub],
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    try:
        coord.register(Registration("n1", "127.0.0.1:1", 1, 0, time.time()))
        async with asyncio.timeout(5):
            await stub.heard_back.wait()
        assert stub.running == 1
        figures = coord.cluster.outliers.figures("n1", time.time())
        assert figures is not None and "stub" in figures.sources
        await coord.become_follower("someone-else")
        assert stub.running == 0  # a follower does not observe
    finally:
        await coord.stop()
    assert stub.running == 0


async def test_a_routine_only_node_is_rewritten_once_its_refresh_is_due_a_change_at_once(
        tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0",
                             "coordinator.refresh_interval": "60s"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), clock=clock,
                        probe=FakeProbe(clock))  # type: ignore[arg-type]
    await coord.start()

    def beat(seq: int, reasons: tuple[str, ...] = ()) -> None:
        report = Report(incarnation=1, seq=seq, ts=clock(), sample_interval=5.0, samples=seq,
                        reasons=reasons, system={"cpu_percent": float(seq)})
        coord.heartbeat(CheckResult("n1", True, clock(), report=report, source="push"))

    async def stored_seq() -> int:
        await coord.persist()
        stored = await coord.store.get_node("n1")
        assert stored is not None
        return stored.seq

    try:
        coord.register(Registration("n1", "127.0.0.1:1", 1, 0, clock()))
        beat(1)
        beat(2)
        assert await stored_seq() == 2  # the transition to healthy: written at once
        written_at = clock()
        for seq in range(3, 15):  # routine heartbeats for 59 s: nothing written
            clock.advance(59.0 / 12)
            beat(seq)
            assert await stored_seq() == 2
        refreshed_at = None
        for seq in range(15, 100):
            clock.advance(1.0)
            beat(seq)
            if await stored_seq() == seq:
                refreshed_at = clock()
                break
        assert refreshed_at is not None
        assert written_at + 60.0 <= refreshed_at < written_at + 121.0
        clock.advance(1.0)
        beat(200, reasons=("disk almost full",))  # the agent's reasons: a change, no event
        assert await stored_seq() == 200
        clock.advance(1.0)
        beat(201)
        assert await stored_seq() == 201  # the reasons cleared: a change again
        clock.advance(1.0)
        beat(202)
        assert await stored_seq() == 201  # routine again
        await coord.command("drain", "n1", "maintenance")  # a transition: at once
        stored = await coord.store.get_node("n1")
        assert stored is not None and stored.admin.value == "drained" and stored.seq == 202
    finally:
        await coord.stop()


async def test_history_is_stored_as_raw_samples_and_rollups(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "detection.startup_grace": "0",
                             "detection.history_full_resolution": "0s",
                             "detection.history_rollup": "60s"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), clock=clock,
                        probe=FakeProbe(clock))  # type: ignore[arg-type]
    await coord.start()
    try:
        coord.register(Registration("n1", "127.0.0.1:1", 1, 0, clock()))
        for seq in range(1, 40):  # 39 samples 5 s apart: at least two whole minutes
            report = Report(incarnation=1, seq=seq, ts=clock(), sample_interval=5.0,
                            samples=seq, system={"cpu_percent": float(seq)})
            coord.heartbeat(CheckResult("n1", True, clock(), report=report, source="push"))
            clock.advance(5.0)
        await coord.persist(history=True)
        points = await coord.store.history("n1", 0)
        assert len(points) >= 2 and all(p.span == 60.0 for p in points)  # no raw samples
        assert all(p.peak["cpu_percent"] >= p.system["cpu_percent"] for p in points)
    finally:
        await coord.stop()
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    try:  # stop wrote the rollup being gathered too: every sample is in one
        points = await store.history("n1", 0)
        assert points[-1].seq == 39
    finally:
        await store.close()


async def first_dues(tmp_path: Path, name: str, count: int, udp: str) -> list[float]:
    """When each of ``count`` static nodes is first checked after a start (seconds)."""
    nodes = "".join(f'[[nodes]]\nid = "n{i}"\naddress = "127.0.0.1:{7000 + i}"\n'
                    for i in range(count))
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[coordinator]\nstore = "sqlite:///{tmp_path}/{name}.db"\n'
                    f'heartbeat_udp = "{udp}"\n[detection]\nhealthy_interval = "4s"\n'
                    f'unhealthy_interval = "500ms"\n{nodes}')
    cfg = load_config(path)
    clock = FakeClock(1000.0)
    coord = Coordinator(cfg, open_store(cfg.coordinator.store), clock=clock,
                        probe=FakeProbe(clock))  # type: ignore[arg-type]
    await coord.start()
    try:
        scheduler = coord.poller._scheduler
        return sorted(d - 1000.0 for i in range(count)
                      if (d := scheduler.due_of(f"n{i}")) is not None)
    finally:
        await coord.stop()


async def test_with_udp_heartbeats_a_started_fleet_is_first_polled_within_healthy_interval(
        tmp_path: Path) -> None:
    # A big pushing fleet's first heartbeats come within a push interval: its first polls wait
    # that long (spread), or a start beside 100,000 nodes would poll them all at once. Without
    # UDP heartbeats, or with a few nodes, they are polled within unhealthy_interval as before.
    count = MANY_UNKNOWN + 200
    polled = await first_dues(tmp_path, "polled", count, "")
    pushing = await first_dues(tmp_path, "pushing", count, "127.0.0.1:0")
    few = await first_dues(tmp_path, "few", 50, "127.0.0.1:0")
    assert len(polled) == len(pushing) == count and len(few) == 50
    assert max(polled) <= 0.5 * 1.1 and max(few) <= 0.5 * 1.1
    assert max(pushing) <= 4.0 and pushing[count // 2] > 1.0  # spread over healthy_interval
