"""Several coordinators on one etcd: real coordinator and agent processes, a real etcd.

The agents run in etcd lease mode (no ``--coordinator``): the leader learns of them from their
liveness keys and of a killed agent from its expired lease (polling is slow here, 30 s, so the
lease is what notices). Killing the leader hands over to the follower within one leader TTL,
and no cleanup action runs twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from nodewatch.store.open import open_store
from nodewatch.testing import EtcdCluster
from tests.e2e.support import action_lines, healthz
from tests.helpers import free_port, wait_until

LEADER_TTL = 2.0
CONFIG = """
[coordinator]
leader_ttl = "2s"

[detection]
healthy_interval = "30s"
unhealthy_interval = "200ms"
timeout = "300ms"
connect_timeout = "200ms"
fall = 3
rise = 2
startup_grace = "1s"

[guard]
min_nodes = 10
indirect_probes = 0

[budget]
max_fraction = 1.0

[agent]
sample_interval = "1s"
lease_ttl = "2s"

[[actions]]
type = "exec"
on = ["unhealthy"]
command = ["sh", "-c", "echo {{node_id}} {{event}} >> {actions}"]
"""

pytestmark = pytest.mark.slow


def health_of(c: LocalCluster, node_id: str) -> str:
    node = c.node(node_id)
    return str(node["health"]) if node else "?"


def stored_actions_due(url: str, node_id: str) -> list[Any]:
    """What the store holds as decided but not yet run for one node."""

    async def read() -> list[Any]:
        store = open_store(url)
        await store.open()
        try:
            node = await store.get_node(node_id)
            return [] if node is None else list(node.actions_due)
        finally:
            await store.close()

    return asyncio.run(read())


def test_follower_takes_over_within_one_lease_and_repeats_no_action(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    url = etcd.url("/ha-test")
    actions = tmp_path / "actions.log"
    config = CONFIG.format(actions=actions)
    one = LocalCluster(workdir=tmp_path / "c1", coordinator_listen=f"127.0.0.1:{free_port()}",
                       config_text=config)
    two = LocalCluster(workdir=tmp_path / "c2", coordinator_listen=f"127.0.0.1:{free_port()}",
                       config_text=config)
    with one, two:
        one.start_coordinator("--store", url)
        wait_until(lambda: healthz(one).get("role") == "leader", timeout=10,
                   message="first coordinator leads")
        two.start_coordinator("--store", url)
        wait_until(lambda: healthz(two).get("role") == "follower"
                   and healthz(two).get("leader") == one.coordinator_listen, timeout=10,
                   message="second coordinator follows the first")
        for i in (1, 2, 3):
            host = f"127.0.3.{i}"
            one.start_agent(f"web-{i}", f"{host}:{free_port(host)}", "--store", url,
                            coordinator=False)
        for c in (one, two):  # the follower sees the leader's view through the store
            wait_until(lambda c=c: len(c.nodes()) == 3
                       and all(n["health"] == "healthy" for n in c.nodes()),
                       timeout=20, message=f"three healthy nodes on {c.coordinator_listen}")

        # Followers serve reads but refuse what only the leader may do.
        status, body = http_json(f"{two.url}/v1/nodes/web-1/drain", "POST", {"reason": "x"})
        assert status == 503 and one.coordinator_listen in body["error"]

        # A killed agent's lease expires; the leader suspects it from that, then confirms
        # by polling, and runs the cleanup once.
        one.agents["web-2"].signal(signal.SIGKILL)
        wait_until(lambda: health_of(two, "web-2") == "unhealthy", timeout=15,
                   message="web-2 unhealthy, as seen by the follower")
        [suspect] = [e for e in one.events() if e["node_id"] == "web-2"
                     and e["kind"] == "suspect" and e["from"] == "healthy"]
        assert [c["class"] for c in suspect["evidence"]["checks"]] == ["lease_expired"]
        assert suspect["evidence"]["checks"][0]["source"] == "lease"
        wait_until(lambda: action_lines(actions) == ["web-2 unhealthy"], timeout=10,
                   message="one cleanup action for web-2")
        # Actions run at least once: a leader killed after the action ran but before it stored
        # that it did would have its successor run it again. Wait until the settle is stored;
        # from then on no action may repeat.
        wait_until(lambda: stored_actions_due(url, "web-2") == [], timeout=10,
                   message="web-2's action settled in the store")

        # The leader dies: the follower takes over within one lease TTL.
        assert one.coordinator is not None
        one.coordinator.signal(signal.SIGKILL)
        killed = time.monotonic()
        # How fast is bench material; here the bound only catches a follower that never
        # takes over (ten times the expected one TTL).
        wait_until(lambda: healthz(two).get("role") == "leader", timeout=10 * LEADER_TTL,
                   interval=0.05, message="the follower takes over")
        print(f"takeover took {time.monotonic() - killed:.1f}s (leader_ttl {LEADER_TTL:g}s)")

        # After its grace the new leader carries on: a second failure is confirmed and
        # cleaned up, the first is not cleaned up again.
        one.agents["web-3"].signal(signal.SIGKILL)
        wait_until(lambda: "web-3 unhealthy" in action_lines(actions), timeout=15,
                   message="the new leader cleans up web-3")
        assert health_of(two, "web-2") == "unhealthy"
        assert health_of(two, "web-1") == "healthy"
        assert sorted(action_lines(actions)) == ["web-2 unhealthy", "web-3 unhealthy"]
        unhealthy = [e for e in two.events() if e["kind"] == "unhealthy"]
        assert sorted(e["node_id"] for e in unhealthy) == ["web-2", "web-3"]
        ids = [e["id"] for e in two.events()]
        assert ids == sorted(set(ids)), "event ids repeated across the leader change"
