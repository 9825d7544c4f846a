"""End to end respond: a real coordinator and real agents (LocalCluster) with real haproxy,
nginx and a webhook receiver; drains, recovery and review, guard, budget and dead_after.

Every wait is on a condition with a deadline; the detection profile is fast (checks every
500 ms while healthy, 200-400 ms while failing) so the whole module takes well under 90 s.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nodewatch.cli.processes import LocalCluster, Proc, http_json
from tests.helpers import free_port, wait_until
from tests.relay import Relay
from tests.respond.servers import Haproxy, Nginx, WebhookReceiver, running, wait_states

ALL_KINDS = ["unhealthy", "recovered", "dead", "drained", "undrained", "approved", "removed",
             "drain_deadline"]


def profile(*, unhealthy_interval: str = "200ms", extra: str = "", actions: str = "") -> str:
    return f"""
[detection]
healthy_interval = "500ms"
unhealthy_interval = "{unhealthy_interval}"
timeout = "300ms"
connect_timeout = "200ms"
fall = 3
rise = 2
startup_grace = "0"
{extra}

[agent]
sample_interval = "1s"
{actions}
"""


def addresses(prefix: str, count: int) -> list[str]:
    out = []
    for i in range(1, count + 1):
        host = f"{prefix}.{i}"
        out.append(f"{host}:{free_port(host)}")
    return out


def toml_list(items: Iterable[str]) -> str:
    return json.dumps(list(items))


def node(c: LocalCluster, node_id: str) -> dict[str, Any]:
    return c.node(node_id) or {}


def events_of(c: LocalCluster, node_id: str, kind: str, after: str | None = None
              ) -> list[dict[str, Any]]:
    return [e for e in c.events(after) if e["node_id"] == node_id and e["kind"] == kind]


def last_event_id(c: LocalCluster) -> str | None:
    events = c.events()
    return events[-1]["id"] if events else None


def wait_health(c: LocalCluster, node_id: str, health: str, timeout: float = 10.0) -> None:
    wait_until(lambda: node(c, node_id).get("health") == health, timeout=timeout,
               message=f"{node_id} {health} (now {node(c, node_id).get('health')})")


def wait_all_healthy(c: LocalCluster, count: int, timeout: float = 20.0) -> None:
    wait_until(lambda: len(c.nodes()) == count
               and all(n["health"] == "healthy" for n in c.nodes()),
               timeout=timeout, message=f"{count} healthy nodes")


def command(c: LocalCluster, name: str, node_id: str, reason: str = "",
            **extra: str) -> None:
    status, body = http_json(f"{c.url}/v1/nodes/{node_id}/{name}", "POST",
                             {"reason": reason, **extra})
    assert status == 200, body


def reached_nodes(nginx: Nginx, tries: int = 9) -> set[str]:
    """Which agents answer ``/health`` through nginx over fresh connections."""
    seen = set()
    for _ in range(tries):
        status, body = nginx.get("/health")
        if status == 200:
            seen.add(json.loads(body)["node_id"])
    return seen


def no_action_failed(c: LocalCluster) -> None:
    failed = [e for e in c.events() if e["kind"] == "action_failed"]
    assert not failed, failed


# ---------------------------------------------------------------------- load balancers, drains


def test_load_balancers_follow_failure_drain_and_recovery(tmp_path: Path) -> None:
    ids = ["web-1", "web-2", "web-3"]
    addrs = dict(zip(ids, addresses("127.0.9", 3), strict=True))
    lb = Haproxy(tmp_path / "haproxy", addrs).start()
    nginx = Nginx(tmp_path / "nginx")
    with running(lb, nginx):
        nginx.start("".join(f"server {a};\n" for a in addrs.values()))
        actions = f"""
[budget]
drain_deadline = "4s"

[[actions]]
type = "haproxy"
on = {toml_list(ALL_KINDS)}
socket = "{lb.socket}"
backend = "be"
timeout = "2s"

[[actions]]
type = "nginx"
on = {toml_list(ALL_KINDS)}
file = "{nginx.upstream_file}"
reload = {toml_list(nginx.reload_argv)}
timeout = "5s"
"""
        with LocalCluster(workdir=tmp_path / "cluster",
                          coordinator_listen=f"127.0.0.1:{free_port()}",
                          config_text=profile(actions=actions)) as c:
            c.start_coordinator()
            for node_id, address in addrs.items():
                c.start_agent(node_id, address)
            wait_all_healthy(c, 3)
            assert lb.states() == {i: "READY" for i in ids}

            # Confirmed unhealthy (hung process) -> MAINT; recovered -> READY.
            hung = c.agents["web-2"]
            hung.signal(signal.SIGSTOP)
            try:
                wait_states(lb, {"web-2": "MAINT", "web-1": "READY", "web-3": "READY"})
                wait_until(lambda: f"{addrs['web-2']} down;" in nginx.upstream_file.read_text(),
                           timeout=10, message="web-2 down in the nginx upstream")
            finally:
                hung.signal(signal.SIGCONT)
            wait_states(lb, {"web-2": "READY"})
            wait_until(lambda: reached_nodes(nginx) == set(ids), timeout=10,
                       message="all three through nginx again")

            # Operator drain with pending tasks: out at once, waits visibly, completes at 0.
            web1 = c.agents["web-1"].address
            assert http_json(f"http://{web1}/metrics/load", "PUT", {"pending_tasks": 3})[0] < 300
            wait_until(lambda: node(c, "web-1").get("load", {}).get("pending_tasks") == 3,
                       timeout=10, message="coordinator sees 3 pending tasks")
            command(c, "drain", "web-1", "kernel upgrade")
            drained = node(c, "web-1")
            assert drained["admin"] == "drained" and drained["schedulable"] is False
            assert drained["drain"]["waiting_for"] == {"pending_tasks": 3}
            assert drained["drain"]["complete"] is False
            wait_states(lb, {"web-1": "DRAIN"})
            http_json(f"http://{web1}/metrics/load", "PUT", {"pending_tasks": 0})
            wait_until(lambda: events_of(c, "web-1", "drain_complete"), timeout=10,
                       message="drain_complete at 0 pending tasks")
            assert node(c, "web-1")["drain"]["complete"] is True
            assert not events_of(c, "web-1", "drain_deadline")
            wait_until(lambda: reached_nodes(nginx) == {"web-2", "web-3"}, timeout=10,
                       message="drained web-1 gets no requests through nginx")
            command(c, "undrain", "web-1")
            wait_states(lb, {"web-1": "READY"})
            wait_until(lambda: reached_nodes(nginx) == set(ids), timeout=10,
                       message="undrained web-1 back in nginx")
            assert node(c, "web-1")["schedulable"] is True

            # The node asks to drain itself, with tasks that never finish: DRAIN, then the
            # deadline escalates to MAINT; its "ok" puts it back.
            web3 = c.agents["web-3"].address
            http_json(f"http://{web3}/metrics/load", "PUT", {"pending_tasks": 5})
            http_json(f"http://{web3}/health", "PUT",
                      {"status": "draining", "reason": "rolling restart"})
            wait_states(lb, {"web-3": "DRAIN"})
            waiting = node(c, "web-3")
            assert waiting["drain"]["by"] == "node" and waiting["schedulable"] is False
            assert waiting["drain"]["waiting_for"] == {"pending_tasks": 5}
            wait_until(lambda: events_of(c, "web-3", "drain_deadline"), timeout=10,
                       message="drain_deadline for web-3")
            wait_states(lb, {"web-3": "MAINT"})
            http_json(f"http://{web3}/health", "PUT", {"status": "ok"})
            wait_states(lb, {"web-3": "READY"})
            wait_until(lambda: reached_nodes(nginx) == set(ids), timeout=10,
                       message="web-3 back in nginx")
            no_action_failed(c)


# ---------------------------------------------------------------------- recovery and review


def restart(c: LocalCluster, proc: Proc, *, crash: bool = False, wipe: bool = False,
            extra: tuple[str, ...] = (), coordinator: bool = True) -> Proc:
    if crash:
        proc.signal(signal.SIGKILL)
        assert proc.popen is not None
        proc.popen.wait(5)
    else:
        assert proc.stop() == 0, proc.log()[-2000:]
    if wipe:
        shutil.rmtree(c.workdir / "agents" / proc.name)
    return c.start_agent(proc.name, proc.address, *extra, coordinator=coordinator)


def decision(c: LocalCluster, node_id: str, after: str | None) -> dict[str, Any]:
    """The registration decision event after ``after``: kind registered (rejoin) or review."""
    def found() -> dict[str, Any] | None:
        for e in c.events(after):
            if e["node_id"] == node_id and e["kind"] in ("registered", "review"):
                return e
        return None

    event = wait_until(found, timeout=30, message=f"{node_id} registering again")
    assert isinstance(event, dict)
    return event


def test_recovery_rejoin_review_approve_and_flapping(tmp_path: Path) -> None:
    extra = """
[guard]
min_nodes = 100

[review]
max_rejoins = 1
"""
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=profile(extra=extra)) as c:
        c.start_coordinator()
        a_addr, b_addr, c_addr = addresses("127.0.10", 3)
        c.start_agent("rec-a", a_addr)
        c.start_agent("rec-b", b_addr)
        # rec-c is reached only through relays in both directions, which the test can cut.
        relay_in = Relay(("127.0.11.1", free_port("127.0.11.1")),
                         ("127.0.10.3", int(c_addr.rsplit(":", 1)[1]))).start()
        coord_port = int(c.coordinator_listen.rsplit(":", 1)[1])
        relay_out = Relay(("127.0.11.2", free_port("127.0.11.2")),
                          ("127.0.0.1", coord_port)).start()
        relayed = ("--advertise", relay_in.address, "--coordinator",
                   f"http://{relay_out.address}")
        with running(relay_in, relay_out):
            c.start_agent("rec-c", c_addr, *relayed, coordinator=False)
            wait_all_healthy(c, 3)
            assert node(c, "rec-c")["address"] == relay_in.address

            # A crash and restart rejoins.
            mark = last_event_id(c)
            restart(c, c.agents["rec-a"], crash=True)
            event = decision(c, "rec-a", mark)
            assert event["kind"] == "registered" and event["evidence"]["decision"] == "rejoin"
            wait_health(c, "rec-a", "healthy")

            # A clean restart rejoins.
            mark = last_event_id(c)
            restart(c, c.agents["rec-b"])
            event = decision(c, "rec-b", mark)
            assert event["kind"] == "registered" and event["evidence"]["decision"] == "rejoin"
            wait_health(c, "rec-b", "healthy")

            # One more restart within the hour is past max_rejoins = 1: flapping -> review.
            mark = last_event_id(c)
            restart(c, c.agents["rec-b"])
            event = decision(c, "rec-b", mark)
            assert event["kind"] == "review" and "flapping" in event["reason"]
            wait_health(c, "rec-b", "healthy")
            assert node(c, "rec-b")["admin"] == "review"
            assert node(c, "rec-b")["schedulable"] is False
            command(c, "approve", "rec-b")
            wait_until(lambda: node(c, "rec-b").get("schedulable") is True, timeout=10,
                       message="rec-b schedulable after approve")

            # A restart with a wiped state directory lost its credential: it cannot prove it
            # is rec-a, so its claim is refused and held for an operator (the node as stored
            # is left alone: an impostor's claim looks the same); approve re-enrols it.
            mark = last_event_id(c)
            restart(c, c.agents["rec-a"], wipe=True)
            wait_until(lambda: events_of(c, "rec-a", "identity_rejected", mark), timeout=10,
                       message="the wiped node's claim refused")
            [refused] = events_of(c, "rec-a", "identity_rejected", mark)
            assert refused["evidence"]["claimed_address"] == a_addr
            assert refused["evidence"]["stored_address"] == a_addr
            assert node(c, "rec-a")["identity"]["pending_claim"] == a_addr
            assert node(c, "rec-a")["admin"] == "active"
            command(c, "approve", "rec-a", address=a_addr)
            event = decision(c, "rec-a", mark)  # the agent retries within 10 s
            assert event["kind"] == "registered" and event["evidence"]["decision"] == "rejoin"
            assert "re-enrolled" in event["reason"]
            wait_until(lambda: node(c, "rec-a").get("schedulable") is True, timeout=10,
                       message="rec-a schedulable after approve")
            assert node(c, "rec-a")["identity"] == {
                "enrolled": True, "credential_since": node(c, "rec-a")["identity"][
                    "credential_since"], "pending_claim": None, "reenrol_from": None,
                "revoked": False}

            # A partition: the node keeps running while the coordinator cannot reach it (nor
            # it the coordinator); it is confirmed unhealthy, and when it registers again it
            # goes to review, because it ran unobserved while thought down.
            relay_in.cut()
            relay_out.cut()
            cut_at = time.time()
            wait_health(c, "rec-c", "unhealthy")
            window = 0.5 + 3 * 0.2  # healthy_interval + fall * unhealthy_interval
            wait_until(lambda: time.time() - cut_at > window + 1.5, timeout=10,
                       message="the node ran unobserved for longer than the window")
            assert c.agents["rec-c"].alive()
            mark = last_event_id(c)
            c.agents["rec-c"].stop()  # its final heartbeat cannot get through the cut relay
            relay_in.restore()
            relay_out.restore()
            c.start_agent("rec-c", c_addr, *relayed, coordinator=False)
            event = decision(c, "rec-c", mark)
            assert event["kind"] == "review", event
            assert "unobserved" in event["reason"]
            wait_health(c, "rec-c", "healthy")
            assert node(c, "rec-c")["admin"] == "review"
            assert node(c, "rec-c")["schedulable"] is False
            command(c, "approve", "rec-c")
            wait_until(lambda: node(c, "rec-c").get("schedulable") is True, timeout=10,
                       message="rec-c schedulable after approve")
            assert events_of(c, "rec-c", "approved")

            # The same partition, but the agent never restarts: when the relays heal, its
            # polled reports show it kept sampling the whole time it was thought down, so it
            # returns in review instead of taking work again on its own.
            mark = last_event_id(c)
            relay_in.cut()
            relay_out.cut()
            wait_health(c, "rec-c", "unhealthy")
            samples_at_cut = node(c, "rec-c")["seq"]
            wait_until(lambda: http_json(f"http://{c_addr}/health")[1]["seq"]
                       > samples_at_cut + 3, timeout=15,
                       message="the agent kept sampling through the partition")
            relay_in.restore()
            relay_out.restore()
            wait_health(c, "rec-c", "healthy")
            [review] = [e for e in c.events(mark) if e["node_id"] == "rec-c"
                        and e["kind"] == "review"]
            assert "partition" in review["reason"], review
            assert node(c, "rec-c")["admin"] == "review"
            assert node(c, "rec-c")["schedulable"] is False


# ---------------------------------------------------------------------- guard and budget


def test_guard_holds_cleanup_for_mass_failure_and_budget_holds_the_second(
    tmp_path: Path,
) -> None:
    receiver = WebhookReceiver().start()
    actions = f"""
[budget]
max_fraction = 0.2

[[actions]]
type = "webhook"
on = ["unhealthy", "recovered", "dead"]
url = "{receiver.url}"
retries = 0
"""
    ids = [f"g-{i}" for i in range(1, 7)]
    with running(receiver), LocalCluster(
        workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
        config_text=profile(unhealthy_interval="400ms", actions=actions),
    ) as c:
        c.start_coordinator()
        for node_id, address in zip(ids, addresses("127.0.12", 6), strict=True):
            c.start_agent(node_id, address)
        wait_all_healthy(c, 6)

        # Half of the nodes hang at once: the coordinator suspects itself, not them.
        stopped = ids[:3]
        for node_id in stopped:
            c.agents[node_id].signal(signal.SIGSTOP)
        try:
            wait_until(lambda: [e for e in c.events() if e["kind"] == "guard_on"], timeout=10,
                       message="guard_on")
            for node_id in stopped:
                wait_until(lambda n=node_id: any(  # type: ignore[misc]
                    e["reason"].startswith("held: guard")
                    for e in events_of(c, n, "suspect")),
                    timeout=10, message=f"{node_id} held by the guard")
            assert {node(c, n)["health"] for n in stopped} == {"suspect"}
            assert not [e for e in c.events() if e["kind"] == "unhealthy"]
            assert receiver.received == [], "a cleanup action ran while the guard was on"
        finally:
            for node_id in stopped:
                c.agents[node_id].signal(signal.SIGCONT)
        wait_until(lambda: [e for e in c.events() if e["kind"] == "guard_off"], timeout=10,
                   message="guard_off")
        wait_all_healthy(c, 6)
        assert receiver.received == []

        # Budget: at most 0.2 of 6 nodes (1) out at once. The first failure is cleaned up,
        # the second is held ("held: budget") until the first one returns.
        first, second = "g-4", "g-5"
        c.agents[first].signal(signal.SIGSTOP)
        try:
            wait_health(c, first, "unhealthy")
            wait_until(lambda: ("unhealthy", first) in receiver.kinds(), timeout=10,
                       message="webhook for the first unhealthy node")
            c.agents[second].signal(signal.SIGSTOP)
            wait_health(c, second, "unhealthy")
            held = wait_until(lambda: [e for e in events_of(c, second, "held")
                                       if e["reason"].startswith("held: budget")],
                              timeout=10, message="held: budget")
            assert held
            assert ("unhealthy", second) not in receiver.kinds()
        finally:
            c.agents[first].signal(signal.SIGCONT)
        try:
            wait_until(lambda: ("recovered", first) in receiver.kinds(), timeout=10,
                       message="first node recovered")
            # The budget frees up: the held cleanup runs now.
            wait_until(lambda: ("unhealthy", second) in receiver.kinds(), timeout=10,
                       message="held cleanup released")
            assert events_of(c, second, "cleanup")
        finally:
            c.agents[second].signal(signal.SIGCONT)
        wait_until(lambda: ("recovered", second) in receiver.kinds(), timeout=10,
                   message="second node recovered")
        no_action_failed(c)


# ---------------------------------------------------------------------- dead_after


def test_dead_node_is_out_of_haproxy_for_good_and_its_history_expires(tmp_path: Path) -> None:
    ids = ["d-1", "d-2"]
    addrs = dict(zip(ids, addresses("127.0.13", 2), strict=True))
    lb = Haproxy(tmp_path / "haproxy", addrs).start()
    extra = """dead_after = "2s"
history_ttl = "2s"
"""
    actions = f"""
[[actions]]
type = "haproxy"
on = ["unhealthy", "recovered", "dead"]
socket = "{lb.socket}"
backend = "be"
"""
    with running(lb), LocalCluster(
        workdir=tmp_path / "cluster", coordinator_listen=f"127.0.0.1:{free_port()}",
        config_text=profile(extra=extra, actions=actions),
    ) as c:
        c.start_coordinator()
        for node_id, address in addrs.items():
            c.start_agent(node_id, address)
        wait_all_healthy(c, 2)
        url = f"{c.url}/v1/nodes/d-2/history?since=0"
        wait_until(lambda: http_json(url)[1]["samples"], timeout=10, message="some history")

        killed_at = time.time()
        c.agents["d-2"].signal(signal.SIGKILL)
        wait_health(c, "d-2", "unhealthy")
        wait_states(lb, {"d-2": "MAINT"})
        wait_health(c, "d-2", "dead", timeout=10)
        [dead] = events_of(c, "d-2", "dead")
        assert "dead_after" in dead["reason"]
        assert node(c, "d-2")["schedulable"] is False
        # Its history expires with the store's retention; the living node keeps a fresh one.
        wait_until(lambda: http_json(url)[1]["samples"] == [], timeout=10,
                   message="d-2 history pruned")
        live_url = f"{c.url}/v1/nodes/d-1/history?since=0"
        wait_until(lambda: any(s["ts"] > killed_at for s in http_json(live_url)[1]["samples"]),
                   timeout=10, message="d-1 history goes on after d-2 died")
        # Still out: nothing put it back, and it is no longer checked.
        assert lb.states() == {"d-1": "READY", "d-2": "MAINT"}
        assert node(c, "d-2")["health"] == "dead"
        no_action_failed(c)
