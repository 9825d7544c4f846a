"""The public test helpers work as documented: an in-process cluster detects a stopped agent."""

from __future__ import annotations

from pathlib import Path

from nodewatch.testing import FakeClock, InProcessCluster


def test_fake_clock_only_moves_when_told() -> None:
    clock = FakeClock(100.0)
    assert clock() == 100.0
    assert clock.advance(2.5) == 102.5 and clock() == 102.5


async def test_in_process_cluster_sees_nodes_healthy_then_a_stopped_one_unhealthy(
        tmp_path: Path) -> None:
    async with InProcessCluster(tmp_path, nodes=3) as cluster:
        await cluster.wait_for(lambda: all(cluster.health(f"node-{i}") == "healthy"
                                           for i in range(1, 4)))
        await cluster.agents["node-2"].stop()
        await cluster.wait_for(lambda: cluster.health("node-2") == "unhealthy")
        assert cluster.health("node-1") == "healthy"
