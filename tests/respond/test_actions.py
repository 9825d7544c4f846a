"""Each action type against the real thing: an aiohttp webhook receiver, a real command, a
Debian haproxy over its admin socket, a Debian nginx reloaded with a rewritten upstream."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewatch.config import ActionConfig, Duration
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Admin, Health, NodeState, NodeStatus
from nodewatch.respond.actions import (
    ActionCall,
    ActionError,
    build_action,
    lb_state,
    nginx_upstream,
)
from tests.helpers import wait_until
from tests.respond.servers import (
    Haproxy,
    NamedBackend,
    Nginx,
    WebhookReceiver,
    reached,
    verify_signature,
)


def node(node_id: str, address: str = "127.0.0.1:1", *, health: Health = Health.HEALTHY,
         admin: Admin = Admin.ACTIVE, cleaned_up: bool = False,
         status: NodeStatus = NodeStatus.OK) -> NodeState:
    return NodeState(node_id=node_id, address=address, health=health, admin=admin,
                     cleaned_up=cleaned_up, node_status=status)


def call(kind: str, state: NodeState | None, node_id: str = "", *,
         nodes: dict[str, NodeState] | None = None, reason: str = "why") -> ActionCall:
    nid = state.node_id if state else node_id
    address = state.address if state else "127.0.0.1:1"
    view = nodes or {}
    return ActionCall(ActionRequest(kind, nid, address, "0000000000000007", reason),
                      {"id": "0000000000000007", "kind": kind, "node_id": nid}, state,
                      lambda: view)


# ---------------------------------------------------------------------- load balancer state


def test_lb_state_follows_the_node_not_only_the_event() -> None:
    assert lb_state("unhealthy", node("a", health=Health.UNHEALTHY, cleaned_up=True)) == "maint"
    assert lb_state("recovered", node("a")) == "ready"
    # Recovered while in review: stays out until approved.
    assert lb_state("recovered", node("a", admin=Admin.REVIEW)) == "maint"
    assert lb_state("drained", node("a", admin=Admin.DRAINED)) == "drain"
    assert lb_state("drained", node("a", status=NodeStatus.DRAINING)) == "drain"
    # Degraded: alive but should get no new work, so drained softly, back on status_ok.
    assert lb_state("degraded", node("a", status=NodeStatus.DEGRADED)) == "drain"
    assert lb_state("status_ok", node("a")) == "ready"
    assert lb_state("drain_deadline", node("a", admin=Admin.DRAINED)) == "maint"
    assert lb_state("dead", node("a", health=Health.DEAD, cleaned_up=True)) is None
    assert lb_state("removed", None) is None
    # Held by the budget or the guard: no cleanup ran, so the node stays in.
    assert lb_state("", node("a", health=Health.UNHEALTHY)) == "ready"
    assert lb_state("", node("a", health=Health.SUSPECT)) == "ready"


def test_nginx_upstream_marks_out_of_service_down_and_leaves_dead_out() -> None:
    text = nginx_upstream({
        "a": node("a", "127.0.0.1:1"),
        "b": node("b", "127.0.0.1:2", health=Health.UNHEALTHY, cleaned_up=True),
        "c": node("c", "127.0.0.1:3", health=Health.DEAD, cleaned_up=True),
    })
    assert "server 127.0.0.1:1;" in text
    assert "server 127.0.0.1:2 down;" in text
    assert "127.0.0.1:3" not in text
    assert "server 127.0.0.1:9 down;" in nginx_upstream({})


# ---------------------------------------------------------------------- webhook


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


async def test_webhook_posts_event_and_node_signed_with_the_secret(
    receiver: WebhookReceiver,
) -> None:
    action = build_action(ActionConfig(type="webhook", url=receiver.url, secret="s3cret"))
    try:
        state = node("web-1", health=Health.UNHEALTHY, cleaned_up=True)
        await action.run(call("unhealthy", state))
    finally:
        await action.close()
    [item] = receiver.received
    assert verify_signature("s3cret", item)
    assert not verify_signature("other", item)
    body = item.json()
    assert body["action"] == "unhealthy" and body["node_id"] == "web-1"
    assert body["event"]["id"] == "0000000000000007"
    assert body["node"]["health"] == "unhealthy"
    assert item.headers["X-Nodewatch-Event"] == "unhealthy"


async def test_webhook_failure_names_no_secret_and_no_credentials(
    receiver: WebhookReceiver,
) -> None:
    receiver.fail_first = 1
    url = receiver.url.replace("http://", "http://user:pw@") + "?token=tok123"
    action = build_action(ActionConfig(type="webhook", url=url, secret="s3cret"))
    try:
        with pytest.raises(ActionError) as info:
            await action.run(call("unhealthy", node("web-1")))
        described = str(action.describe(call("unhealthy", node("web-1"))))
    finally:
        await action.close()
    message = str(info.value)
    assert "HTTP 500" in message
    for secret in ("s3cret", "pw", "tok123"):
        assert secret not in message and secret not in described


async def test_webhook_unreachable_is_an_action_error() -> None:
    action = build_action(ActionConfig(type="webhook", url="http://127.0.0.1:9/hook"))
    try:
        with pytest.raises(ActionError):
            await action.run(call("unhealthy", node("web-1")))
    finally:
        await action.close()


# ---------------------------------------------------------------------- exec


async def test_exec_substitutes_placeholders_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = "import sys; open(sys.argv[1], 'w').write('|'.join(sys.argv[2:]))"
    action = build_action(ActionConfig(
        type="exec",
        command=[sys.executable, "-c", script, str(out), "{node_id}", "{address}", "{event}",
                 "{reason}", "id={node_id}"]))
    await action.run(call("unhealthy", node("web-1", "127.0.2.1:7301"),
                          reason="x; touch /tmp/pwned $(id)"))
    assert out.read_text() == ("web-1|127.0.2.1:7301|unhealthy|x; touch /tmp/pwned $(id)|"
                               "id=web-1")


async def test_exec_nonzero_exit_is_an_error_with_its_stderr() -> None:
    action = build_action(ActionConfig(
        type="exec", command=[sys.executable, "-c", "import sys; sys.exit('no route')"]))
    with pytest.raises(ActionError, match="exited with 1: no route"):
        await action.run(call("unhealthy", node("web-1")))


async def test_exec_missing_program_is_an_error() -> None:
    action = build_action(ActionConfig(type="exec", command=["/nonexistent/program"]))
    with pytest.raises(ActionError, match="cannot start"):
        await action.run(call("unhealthy", node("web-1")))


async def test_exec_cancelled_by_timeout_kills_the_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
              "time.sleep(30)")
    action = build_action(ActionConfig(type="exec",
                                       command=[sys.executable, "-c", script, str(pid_file)]))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await action.run(call("unhealthy", node("web-1")))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---------------------------------------------------------------------- haproxy


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Haproxy]:
    lb = Haproxy(tmp_path / "haproxy", {f"web-{i}": f"127.0.7.{i}:8080" for i in (1, 2, 3)})
    lb.start()
    yield lb
    lb.stop()


async def test_haproxy_sets_maint_drain_ready_over_the_admin_socket(haproxy: Haproxy) -> None:
    action = build_action(ActionConfig(type="haproxy", socket=str(haproxy.socket),
                                       backend="be"))
    assert haproxy.states() == {"web-1": "READY", "web-2": "READY", "web-3": "READY"}
    await action.run(call("unhealthy", node("web-2", health=Health.UNHEALTHY, cleaned_up=True)))
    await action.run(call("drained", node("web-3", admin=Admin.DRAINED)))
    assert haproxy.states() == {"web-1": "READY", "web-2": "MAINT", "web-3": "DRAIN"}
    await action.run(call("recovered", node("web-2")))
    await action.run(call("undrained", node("web-3")))
    assert haproxy.states() == {"web-1": "READY", "web-2": "READY", "web-3": "READY"}
    await action.run(call("dead", node("web-1", health=Health.DEAD, cleaned_up=True)))
    await action.run(call("removed", None, "web-3"))
    assert haproxy.states() == {"web-1": "MAINT", "web-2": "READY", "web-3": "MAINT"}


async def test_haproxy_unknown_server_and_missing_socket_are_errors(
    haproxy: Haproxy, tmp_path: Path,
) -> None:
    action = build_action(ActionConfig(type="haproxy", socket=str(haproxy.socket),
                                       backend="be"))
    with pytest.raises(ActionError, match="No such server"):
        await action.run(call("unhealthy", node("nope", health=Health.UNHEALTHY,
                                                cleaned_up=True)))
    missing = build_action(ActionConfig(type="haproxy", socket=str(tmp_path / "no.sock"),
                                        backend="be"))
    with pytest.raises(ActionError, match="haproxy socket"):
        await missing.run(call("unhealthy", node("web-1")))


# ---------------------------------------------------------------------- nginx


async def test_nginx_rewrites_upstream_and_reload_routes_only_to_in_service(
    tmp_path: Path,
) -> None:
    backends = [NamedBackend(f"web-{i}", f"127.0.8.{i}") for i in (1, 2, 3)]
    nodes = {b.name: node(b.name, b.address) for b in backends}
    server = Nginx(tmp_path / "nginx")
    try:
        server.start(nginx_upstream(nodes))
        wait_until(lambda: reached(server) == {"web-1", "web-2", "web-3"}, timeout=10,
                   message="all three backends through nginx")
        action = build_action(ActionConfig(type="nginx", file=str(server.upstream_file),
                                           reload=server.reload_argv,
                                           timeout=Duration(10.0)))
        nodes["web-2"] = node("web-2", backends[1].address, health=Health.UNHEALTHY,
                              cleaned_up=True)
        await action.run(call("unhealthy", nodes["web-2"], nodes=nodes))
        assert f"server {backends[1].address} down;" in server.upstream_file.read_text()
        await asyncio.to_thread(wait_until, lambda: reached(server) == {"web-1", "web-3"},
                                timeout=10, message="web-2 out of nginx")
        nodes["web-2"] = node("web-2", backends[1].address)
        nodes["web-3"] = node("web-3", backends[2].address, health=Health.DEAD,
                              cleaned_up=True)
        await action.run(call("dead", nodes["web-3"], nodes=nodes))
        assert backends[2].address not in server.upstream_file.read_text()
        await asyncio.to_thread(wait_until, lambda: reached(server) == {"web-1", "web-2"},
                                timeout=10, message="web-2 back, web-3 gone")
        assert not list(server.upstream_file.parent.glob(".upstream.conf.*")), "tmp file left"
    finally:
        server.stop()
        for b in backends:
            b.stop()


async def test_nginx_failed_reload_is_an_error(tmp_path: Path) -> None:
    upstream = tmp_path / "upstream.conf"
    action = build_action(ActionConfig(
        type="nginx", file=str(upstream),
        reload=[sys.executable, "-c", "import sys; sys.exit('nginx: [emerg] bad')"]))
    with pytest.raises(ActionError, match="emerg"):
        await action.run(call("unhealthy", node("a"), nodes={"a": node("a")}))
    assert "server 127.0.0.1:1;" in upstream.read_text()
