"""Issue 15 points 4 and 5 with real processes: the outlier guards and φ accrual suspicion.

A real coordinator and real agents on loopback; each agent's application pushes its
``error_rate`` with ``PUT /metrics/load`` (as ``test_gray.py`` does). Point 4: when a large part
of the group fails together (a shared dependency) nobody is ejected and ``outlier_hold`` says
why, ``outlier_hold_off`` once the errors are gone; ``max_ejection_fraction`` lets only one of
two lone failures out (``outlier_held`` names the cap); under ``dry_run`` an outlier is recorded
as a would-be ejection and stays schedulable. Point 5: with ``suspicion = "phi"`` a killed
agent pushing every 250 ms is suspected after the silence its own history makes improbable,
long before the fixed ``healthy_interval`` cap, while its steadily pushing peers never are.

Every wait is on a condition with a deadline; the "nobody is ejected" checks hold a condition
true for a bounded time, longer than the hysteresis that an ejection would need.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodewatch.cli.processes import LocalCluster, http_json
from tests.e2e.test_respond import addresses, profile, wait_all_healthy
from tests.helpers import free_port, wait_until

IDS = [f"web-{i}" for i in range(10)]
BASELINE = 0.002
FAILING = 0.4
# Agents push a heartbeat (carrying their load) every 500 ms: a PUT reaches the coordinator
# within about a second, well inside eject_after, so a group's reports arrive "together".
OUTLIERS = """
[outliers]
window = "{window}s"
eject_after = "{eject_after}s"
clear_after = "1s"
{extra}

[agent]
sample_interval = "1s"
heartbeat_interval = "500ms"
"""


def config(*, window: float = 2.0, eject_after: float = 2.0, extra: str = "",
           coordinator: str = "") -> str:
    text = profile().replace("[agent]\nsample_interval = \"1s\"\n", "")
    text += OUTLIERS.format(window=window, eject_after=eject_after, extra=extra)
    if coordinator:
        text += f"\n[coordinator]\n{coordinator}\n"
    return text


def start(c: LocalCluster, prefix: str, ids: list[str]) -> None:
    c.start_coordinator()
    for node_id, address in zip(ids, addresses(prefix, len(ids)), strict=True):
        c.start_agent(node_id, address)
    wait_all_healthy(c, len(ids))


def push_error_rate(c: LocalCluster, node_id: str, rate: float) -> None:
    status, body = http_json(f"http://{c.agents[node_id].address}/metrics/load", "PUT",
                             {"error_rate": rate})
    assert status == 200, body


def reported(c: LocalCluster, rates: dict[str, float]) -> bool:
    """The coordinator holds every listed node's error rate as its agent last pushed it."""
    nodes = {n["node_id"]: n for n in c.nodes()}
    return all(nodes.get(i, {}).get("load", {}).get("error_rate") == r for i, r in rates.items())


def events_of(c: LocalCluster, kind: str, node_id: str | None = None) -> list[dict[str, Any]]:
    return [e for e in c.events()
            if e["kind"] == kind and (node_id is None or e["node_id"] == node_id)]


def holds_for(seconds: float, condition: Callable[[], bool], message: str) -> None:
    """The condition stays true for ``seconds`` (checked every 100 ms), else fail at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), message
        time.sleep(0.1)


def all_schedulable(c: LocalCluster, ids: list[str]) -> bool:
    nodes = {n["node_id"]: n for n in c.nodes()}
    return all(nodes.get(i, {}).get("schedulable") is True for i in ids)


def test_a_shared_dependency_failing_holds_every_ejection_until_the_errors_go(
        tmp_path: Path) -> None:
    eject_after = 3.0  # more than the ~1 s the four agents' reports take to arrive
    window = 2.0
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=config(window=window, eject_after=eject_after)) as c:
        start(c, "127.0.31", IDS)
        for node_id in IDS:
            push_error_rate(c, node_id, BASELINE)
        wait_until(lambda: reported(c, dict.fromkeys(IDS, BASELINE)), timeout=10.0,
                   message="every agent's baseline at the coordinator")

        # Four of ten (40 %, at least group_rise_fraction 30 %) fail at once: the median
        # stays at the baseline, so each of them is an outlier, but together they are a
        # shared dependency, not four bad nodes.
        failing = IDS[:4]
        for node_id in failing:
            push_error_rate(c, node_id, FAILING)
        wait_until(lambda: events_of(c, "outlier_hold"), timeout=10.0,
                   message="an outlier_hold event")
        [hold] = events_of(c, "outlier_hold")
        assert hold["node_id"] == ""
        # From the tick on which at least three (30 % of ten) of them were in.
        assert re.search(r"\b[34] of 10 nodes' errors rose together", hold["reason"]), \
            hold["reason"]
        assert "shared dependency" in hold["reason"] and "nobody is taken out" in hold["reason"]
        assert hold["evidence"]["group"] == "fleet" and hold["evidence"]["outliers"] in (3, 4)
        assert hold["evidence"]["group_median"] == BASELINE
        wait_until(lambda: reported(c, dict.fromkeys(failing, FAILING)), timeout=5.0,
                   message="all four failures at the coordinator")

        # Longer than eject_after with room to spare: an ejection would have happened by now.
        holds_for(eject_after + 2.0,
                  lambda: all_schedulable(c, IDS) and not events_of(c, "outlier"),
                  "a node was ejected while its group's errors rose together")
        assert not events_of(c, "outlier_hold_off")
        assert not events_of(c, "outlier_held")  # the hold stops the timers: nobody waits

        for node_id in failing:  # the dependency recovered
            push_error_rate(c, node_id, BASELINE)
        wait_until(lambda: events_of(c, "outlier_hold_off"), timeout=10.0 + window,
                   message="an outlier_hold_off event")
        [off] = events_of(c, "outlier_hold_off")
        assert off["node_id"] == "" and off["id"] > hold["id"]
        assert "below group_rise_fraction" in off["reason"], off["reason"]
        assert off["evidence"]["outliers"] < 0.3 * len(IDS)
        assert all_schedulable(c, IDS) and not events_of(c, "outlier")


def test_max_ejection_fraction_lets_one_of_two_lone_failures_out(tmp_path: Path) -> None:
    # Ten nodes, max_ejection_fraction 0.1: one may be out. Two failing (20 %) are below
    # group_rise_fraction (30 %), so they are judged one by one.
    extra = "max_ejection_fraction = 0.1\ngroup_rise_fraction = 0.3"
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=config(extra=extra)) as c:
        start(c, "127.0.32", IDS)
        # The baseline first: two failures among a group only partly reported could be 30 %.
        for node_id in IDS:
            push_error_rate(c, node_id, BASELINE)
        wait_until(lambda: reported(c, dict.fromkeys(IDS, BASELINE)), timeout=10.0,
                   message="every agent's baseline at the coordinator")
        failing = {"web-2": 0.5, "web-7": FAILING}
        for node_id, rate in failing.items():
            push_error_rate(c, node_id, rate)

        wait_until(lambda: events_of(c, "outlier") and events_of(c, "outlier_held"),
                   timeout=15.0, message="one outlier ejected and one held")
        [ejected] = events_of(c, "outlier")
        [held] = events_of(c, "outlier_held")
        assert {ejected["node_id"], held["node_id"]} == set(failing)
        assert "max_ejection_fraction (1 of 10 nodes in fleet already out)" in held["reason"], \
            held["reason"]
        assert f"group median {BASELINE * 100:g} %" in held["reason"]
        assert not events_of(c, "outlier_hold")
        out, waiting = ejected["node_id"], held["node_id"]
        node = c.node(out) or {}
        assert node["health"] == "healthy" and node["schedulable"] is False
        assert node["outlier"]["dry_run"] is False

        # The held one keeps failing and keeps serving while the other is out (its back-off
        # is 30 s): the cap is the only thing keeping it in, and nothing else moves.
        holds_for(3.0, lambda: (c.node(waiting) or {}).get("schedulable") is True
                  and (c.node(out) or {}).get("schedulable") is False
                  and len(events_of(c, "outlier")) == 1,
                  f"{waiting} ejected past the cap, or {out} back")
        assert all_schedulable(c, [i for i in IDS if i != out])
        assert len(events_of(c, "outlier_held")) == 1  # said once, not once a tick


def test_dry_run_records_a_would_be_ejection_and_leaves_the_node_schedulable(
        tmp_path: Path) -> None:
    ids = IDS[:6]  # min_nodes is 5
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=config(coordinator="dry_run = true")) as c:
        start(c, "127.0.33", ids)
        for node_id in ids:
            push_error_rate(c, node_id, FAILING if node_id == "web-3" else BASELINE)

        wait_until(lambda: events_of(c, "outlier", "web-3"), timeout=15.0,
                   message="a (dry run) outlier event for web-3")
        [event] = events_of(c, "outlier")
        assert event["reason"].startswith("dry run: would eject: errors 40 % vs group median "
                                          "0.2 %"), event["reason"]
        assert event["evidence"]["dry_run"] is True
        node = c.node("web-3") or {}
        assert node["outlier"]["dry_run"] is True and node["outlier"]["ejections"] == 1
        assert node["health"] == "healthy" and node["schedulable"] is True
        holds_for(2.0, lambda: all_schedulable(c, ids) and len(events_of(c, "outlier")) == 1,
                  "a dry run took a node out")


# ---------------------------------------------------------------------------- point 5: φ

HEARTBEAT = 0.25
HEALTHY_INTERVAL = 10.0  # the cap: the fixed deadline would poll a silent node this late
PHI_PAUSE = 1.5
PHI_MIN_SAMPLES = 8
PHI = f"""
[detection]
suspicion = "phi"
healthy_interval = "{HEALTHY_INTERVAL}s"
unhealthy_interval = "300ms"
timeout = "1s"
connect_timeout = "500ms"
fall = 3
rise = 2
startup_grace = "0"
phi_min_samples = {PHI_MIN_SAMPLES}
phi_pause = "{PHI_PAUSE}s"

[agent]
sample_interval = "1s"
heartbeat_interval = "{HEARTBEAT}s"
"""


def test_phi_confirms_a_killed_pushing_agent_long_before_the_fixed_cap(tmp_path: Path) -> None:
    ids = [f"phi-{i}" for i in range(1, 5)]
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=PHI) as c:
        start(c, "127.0.34", ids)
        # The histories fill: every node has pushed well over phi_min_samples heartbeats
        # (each heartbeat carries a newer seq; samples between them add a few more).
        first = {n["node_id"]: n["seq"] for n in c.nodes()}
        wait_until(lambda: all(n["seq"] >= first[n["node_id"]] + 2 * PHI_MIN_SAMPLES
                               for n in c.nodes()),
                   timeout=20.0, message="phi histories filled")

        victim = "phi-2"
        killed = time.time()
        c.agents[victim].signal(signal.SIGKILL)
        wait_until(lambda: (c.node(victim) or {}).get("health") == "unhealthy", timeout=15.0,
                   message=f"{victim} confirmed unhealthy")
        last_seen = (c.node(victim) or {})["last_seen"]
        [suspect] = [e for e in events_of(c, "suspect", victim) if e["from"] == "healthy"]
        [unhealthy] = events_of(c, "unhealthy", victim)
        assert {ch["class"] for ch in unhealthy["evidence"]["checks"]} == {"refused"}
        # φ polled after the silence its steady history made improbable: at least phi_pause
        # past the last push (the deadline is mean + phi_pause + z x std), and long before
        # the cap: the fixed deadline would not have polled it until healthy_interval after
        # its last push, about healthy_interval after the kill.
        silence = suspect["ts"] - last_seen
        assert PHI_PAUSE - 0.05 <= silence < HEALTHY_INTERVAL / 2, silence
        assert suspect["ts"] - killed < HEALTHY_INTERVAL / 2, suspect["ts"] - killed
        assert unhealthy["ts"] - killed < HEALTHY_INTERVAL - HEARTBEAT, unhealthy["ts"] - killed

        # The peers pushing steadily were never suspected, and stay healthy a while longer.
        others = [i for i in ids if i != victim]
        holds_for(2.0, lambda: all((c.node(i) or {}).get("health") == "healthy"
                                   for i in others), "a steady pusher left healthy")
        assert not [e for e in c.events() if e["kind"] == "suspect" and e["node_id"] in others]
