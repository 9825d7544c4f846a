"""Issue 13 (a): the four network cases, with real packets dropped by nftables.

One coordinator and four agents, each on its own host (namespace) on one bridge, the demo's
fast profile (1 s / 250 ms, fall 3, startup grace 2 s) and an exec action that appends a line
per cleanup to a file: an action that ran is a line there.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.cluster import FaultCluster, action_lines, config
from tests.faults.netns import Host, Network
from tests.faults.results import Recorder, repeats
from tests.helpers import wait_until

pytestmark = pytest.mark.faults

NODES = 4


@pytest.fixture
def cluster(net: Network, tmp_path: Path) -> Iterator[FaultCluster]:
    c = FaultCluster(net, tmp_path, config(tmp_path / "actions.log",
                                           coordinator=f'store = "sqlite:///{tmp_path}/s.db"'))
    coord = net.add_host("coord")
    c.start_coordinator(coord, cpu=0)
    for i in range(1, NODES + 1):
        c.start_agent(f"n{i}", net.add_host(f"n{i}"))
    wait_until(lambda: c.all_healthy(NODES), timeout=30, message=f"{NODES} healthy nodes")
    yield c


def unhealthy_events(events: list[dict[str, Any]], node_id: str | None = None
                     ) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "unhealthy"
            and (node_id is None or e["node_id"] == node_id)]


def hold(seconds: float, check: Any = None) -> None:
    """Let the fault last ``seconds`` (bounded), calling ``check`` now and then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check is not None:
            check()
        time.sleep(0.25)


def host(c: FaultCluster, name: str) -> Host:
    return c.net.hosts[name]


@pytest.mark.parametrize("run", repeats())
def test_node_cut_off_from_coordinator_only_stays_suspect(
    cluster: FaultCluster, recorder: Recorder, run: int
) -> None:
    fig = recorder.new("a1 node cut off from coordinator only", run)
    try:
        c = cluster
        c.net.cut(host(c, "coord"), host(c, "n2"))
        wait_until(lambda: c.node("n2").get("health_reason") == "reachable from peers"
                   or "reachable from peers" in str(c.node("n2").get("reasons", "")),
                   timeout=15, message="n2 suspect, reachable from peers")
        assert c.health("n2") == "suspect"
        hold(6)  # several detection windows: 1 s + 3 x 250 ms each
        events = c.events()
        fig.false_confirmations = len(unhealthy_events(events))
        fig.actions_twice = 0
        assert c.health("n2") == "suspect", c.node("n2")
        assert fig.false_confirmations == 0, unhealthy_events(events)
        assert action_lines(c.workdir / "actions.log") == []
        c.net.heal()
        wait_until(lambda: c.health("n2") == "healthy", timeout=15, message="n2 healthy again")
        fig.passed = True
    finally:
        recorder.write(fig)


@pytest.mark.parametrize("run", repeats())
def test_coordinator_cut_off_from_every_node_raises_guard_and_heals_quietly(
    cluster: FaultCluster, recorder: Recorder, run: int
) -> None:
    fig = recorder.new("a2 coordinator cut off from every node", run)
    try:
        c = cluster
        c.net.isolate(host(c, "coord"))  # the harness still reaches it over the bridge
        wait_until(lambda: any(e["kind"] == "guard_on" for e in c.events()), timeout=20,
                   message="guard_on")
        hold(5)
        fig.false_confirmations = len(unhealthy_events(c.events()))
        healed_after = c.last_event_id()
        c.net.heal()
        wait_until(lambda: c.all_healthy(NODES), timeout=20, message="all healthy after heal")
        hold(5)  # a review storm would come now, as the nodes answer again
        after = c.events(after=healed_after)
        fig.reviews = len([e for e in after if e["kind"] == "review"])
        fig.false_confirmations = len(unhealthy_events(c.events()))
        lines = action_lines(c.workdir / "actions.log")
        assert fig.false_confirmations == 0
        assert lines == []
        assert fig.reviews == 0, [e for e in after if e["kind"] == "review"]
        assert all(n["admin"] == "active" and n["schedulable"] for n in c.nodes()), c.nodes()
        fig.passed = True
    finally:
        recorder.write(fig)


@pytest.mark.parametrize("run", repeats())
def test_random_loss_confirms_nobody_but_a_real_kill(
    cluster: FaultCluster, recorder: Recorder, run: int
) -> None:
    fig = recorder.new("a3 10% loss on every link, then kill -9", run)
    try:
        c = cluster
        c.net.loss(10)
        hold(10)
        fig.false_confirmations = len(unhealthy_events(c.events()))
        assert fig.false_confirmations == 0, unhealthy_events(c.events())
        killed = time.time()
        c.agent("n3").signal(signal.SIGKILL)
        try:
            wait_until(lambda: unhealthy_events(c.events(), "n3"), timeout=15,
                       message="n3 confirmed unhealthy under loss")
        except AssertionError:
            fig.missed = 1
            raise
        [confirmed] = unhealthy_events(c.events(), "n3")
        fig.detections = [round(confirmed["ts"] - killed, 3)]
        fig.late = int(fig.detections[0] > 6.0)
        wait_until(lambda: len(action_lines(c.workdir / "actions.log")) >= 1, timeout=10,
                   message="one cleanup for n3")
        hold(2)
        lines = action_lines(c.workdir / "actions.log")
        fig.actions_twice = max(0, len(lines) - 1)
        fig.false_confirmations = len([e for e in unhealthy_events(c.events())
                                       if e["node_id"] != "n3"])
        assert fig.false_confirmations == 0
        assert [line.split()[:2] for line in lines] == [["n3", "unhealthy"]]
        fig.passed = True
    finally:
        recorder.write(fig)


@pytest.mark.parametrize("run", repeats())
def test_coordinator_starved_of_cpu_confirms_nobody(
    cluster: FaultCluster, recorder: Recorder, run: int, tmp_path: Path
) -> None:
    fig = recorder.new("a4 coordinator's core taken by CPU hogs", run)
    try:
        c = cluster
        coord = host(c, "coord")
        for i in range(3):  # the coordinator is pinned to core 0 as well
            coord.cpu_hog(0, tmp_path / f"hog{i}.log")
        hold(12)
        events = c.events()
        fig.false_confirmations = len(unhealthy_events(events))
        assert fig.false_confirmations == 0, unhealthy_events(events)
        assert action_lines(c.workdir / "actions.log") == []
        fig.passed = True
    finally:
        recorder.write(fig)
