"""Issue 14 (8): node identity with real processes, each on its own host (network namespace).

A coordinator (agent and admin tokens, UDP heartbeats) and two agents pushing over UDP; an
impostor agent and a client each on a host of their own, so every request they make comes
from an address of their own, never loopback. The client runs small Python scripts inside its
namespace (``ip netns exec``): forged HTTP and UDP heartbeats, calls to an agent's ``/probe``
and ``PUT /health``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nodewatch.collect.identity import PersistedState
from tests.faults.cluster import AGENT_PORT, COORD_PORT, FaultCluster, config
from tests.faults.netns import Host, Network
from tests.helpers import wait_until

pytestmark = pytest.mark.faults

TOKEN = "fault-agent-token-not-for-logs"
UDP_PORT = 7302


@pytest.fixture
def cluster(net: Network, tmp_path: Path) -> Iterator[FaultCluster]:
    c = FaultCluster(net, tmp_path, config(
        tmp_path / "actions.log",
        coordinator=(f'store = "sqlite:///{tmp_path}/s.db"\nagent_token = "{TOKEN}"\n'
                     f'heartbeat_udp = "0.0.0.0:{UDP_PORT}"'),
        agent=f'agent_token = "{TOKEN}"\nheartbeat_transport = "udp"\n'
              'heartbeat_interval = "500ms"'))
    c.start_coordinator(net.add_host("coord"))
    for name in ("n1", "n2"):
        c.start_agent(name, net.add_host(name))
    wait_until(lambda: c.all_healthy(2), timeout=30, message="2 healthy nodes")
    yield c


def run_in(host: Host, script: str, **values: Any) -> Any:
    """Run ``script`` with Python inside ``host``'s namespace; it prints one JSON document."""
    code = f"import json\nVALUES = json.loads({json.dumps(values)!r})\n" + textwrap.dedent(script)
    done = subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# Runs inside a namespace: HTTP requests with urllib, returning (status, body) pairs.
_HTTP = """
import json, urllib.error, urllib.request
def call(url, method="GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
            return [resp.status, json.loads(raw) if raw else None]
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return [exc.code, json.loads(raw)]
        except ValueError:
            return [exc.code, raw.decode(errors="replace")]
"""

# Forged heartbeats for VALUES["node"], with the agent token only: HTTP without a credential,
# HTTP with a guessed one, and UDP datagrams tagged with the token's key (what a node with the
# shared token can make), repeated for VALUES["seconds"].
_FORGE = _HTTP + """
import socket, time
from nodewatch.protocol import HeartbeatBody, encode_heartbeat_datagram, heartbeat_key
node, coord, udp_port, token = VALUES["node"], VALUES["coord"], VALUES["udp"], VALUES["token"]
auth = {"Authorization": f"Bearer {token}"}
statuses, datagrams = set(), 0
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.monotonic() + VALUES["seconds"]
seq = 10**9
while True:
    seq += 1
    beat = {"node_id": node, "incarnation": 99, "seq": seq, "ts": time.time(), "status": "ok",
            "load": {"qps": 1.0, "pending_tasks": 0.0}}
    for headers in (auth, {**auth, "X-Nodewatch-Node-Credential": "guessed"}):
        statuses.add(call(f"http://{coord}:{VALUES['coord_port']}/v1/heartbeat", "POST", beat,
                          headers)[0])
    body = HeartbeatBody(node_id=node, incarnation=99, seq=seq + 1, ts=time.time(), status="ok")
    sock.sendto(encode_heartbeat_datagram(body, heartbeat_key(token)), (coord, udp_port))
    datagrams += 1
    if time.monotonic() > deadline:
        break
    time.sleep(0.1)
print(json.dumps({"statuses": sorted(statuses), "datagrams": datagrams}))
"""


def forge(c: FaultCluster, client: Host, node: str, seconds: float) -> dict[str, Any]:
    coord = c.coordinators["coordinator"][0]
    result: dict[str, Any] = run_in(client, _FORGE, node=node, coord=coord.ip, udp=UDP_PORT,
                                    token=TOKEN, seconds=seconds, coord_port=COORD_PORT)
    return result


def metric(c: FaultCluster, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{c.url()}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def rejected(c: FaultCluster, node_id: str, after: str | None = None) -> list[dict[str, Any]]:
    return [e for e in c.events(after=after)
            if e["kind"] == "identity_rejected" and e["node_id"] == node_id]


def stored_credential(c: FaultCluster, node_id: str) -> str:
    path = c.workdir / "agents" / node_id / f"{node_id}.state.json"
    return msgspec.json.decode(path.read_bytes(), type=PersistedState).credential


def test_an_impostor_with_the_agent_token_changes_nothing(cluster: FaultCluster) -> None:
    c = cluster
    n1 = c.net.hosts["n1"]
    before = c.node("n1")
    assert before["address"] == f"{n1.ip}:{AGENT_PORT}" and before["identity"]["enrolled"]
    imp = c.net.add_host("impostor")
    argv = [c.python, "-m", "nodewatch", "agent", "--node-id", "n1", "--listen",
            f"{imp.ip}:{AGENT_PORT}", "--state-dir", str(c.workdir / "impostor"),
            "--config", str(c.config_path()), "--coordinator", c.url()]
    impostor = imp.spawn("impostor", argv, c.workdir / "agent-impostor.log")
    wait_until(lambda: rejected(c, "n1"), timeout=20, message="the impostor's claim refused")
    [event] = rejected(c, "n1")
    assert event["evidence"]["claimant"] == imp.ip
    assert event["evidence"]["claimed_address"] == f"{imp.ip}:{AGENT_PORT}"
    assert event["evidence"]["stored_address"] == before["address"]
    # Several heartbeat intervals later: the real node is as it was, and still pushing.
    seq = c.node("n1")["seq"]
    wait_until(lambda: c.node("n1").get("seq", 0) > seq + 5, timeout=20,
               message="the real n1 still heartbeating")
    node = c.node("n1")
    assert node["address"] == before["address"] and node["incarnation"] == before["incarnation"]
    assert node["health"] == "healthy" and node["schedulable"] and node["admin"] == "active"
    assert node["identity"]["pending_claim"] == f"{imp.ip}:{AGENT_PORT}"
    assert impostor.alive() and "refused registration: HTTP 403" in impostor.log()
    assert TOKEN not in impostor.log() and TOKEN not in c.coordinator().log()


def test_forged_heartbeats_are_refused_and_cannot_keep_a_dead_node_alive(
        cluster: FaultCluster) -> None:
    c = cluster
    client = c.net.add_host("client")
    seq_before = c.node("n1")["seq"]
    result = forge(c, client, "n1", seconds=1.0)
    assert result["statuses"] == [403], result
    wait_until(lambda: metric(c, 'nodewatch_udp_heartbeats_total{result="bad_tag"}')
               >= result["datagrams"], timeout=10, message="the forged datagrams counted bad_tag")
    node = c.node("n1")
    assert node["incarnation"] == 1 and node["seq"] < 10**9 and node["seq"] >= seq_before
    assert rejected(c, "n1") and metric(c, "nodewatch_identity_rejections_total") >= 3
    # The real n1 stops; forged heartbeats go on for it, over HTTP and UDP: still detected.
    n1 = c.agent("n1")
    n1.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        while c.health("n1") != "unhealthy" and time.monotonic() - started < 30:
            forge(c, client, "n1", seconds=1.0)
        assert c.health("n1") == "unhealthy", c.node("n1")
    finally:
        n1.signal(signal.SIGCONT)
    wait_until(lambda: c.health("n1") == "healthy", timeout=30, message="n1 healthy again")


def test_wiped_state_re_enrols_by_approve_and_the_old_credential_is_refused(
        cluster: FaultCluster) -> None:
    c = cluster
    n1 = c.net.hosts["n1"]
    address = f"{n1.ip}:{AGENT_PORT}"
    old = stored_credential(c, "n1")
    mark = c.last_event_id()
    assert c.agent("n1").stop() == 0
    shutil.rmtree(c.workdir / "agents" / "n1")
    c.restart_agent("n1")
    wait_until(lambda: rejected(c, "n1", mark), timeout=20, message="the wiped node refused")
    assert rejected(c, "n1", mark)[0]["evidence"]["claimed_address"] == address
    assert c.node("n1")["identity"]["pending_claim"] == address
    status, body = c.command("/v1/nodes/n1/approve", {"address": address})
    assert status == 200, body
    assert body["node"]["identity"]["reenrol_from"] == address

    def re_enrolled() -> bool:
        return any(e["kind"] == "registered" and "re-enrolled" in e["reason"]
                   for e in c.events(after=mark) if e["node_id"] == "n1")

    wait_until(re_enrolled, timeout=30, message="n1 re-enrolled (the agent retries in 10 s)")
    wait_until(lambda: c.node("n1").get("schedulable") is True, timeout=20,
               message="n1 schedulable with its new credential")
    new = stored_credential(c, "n1")
    assert new and new != old
    seq = c.node("n1")["seq"]
    wait_until(lambda: c.node("n1").get("seq", 0) > seq + 3, timeout=20,
               message="n1 heartbeating with its new credential")
    client = c.net.add_host("client")
    statuses = run_in(client, _HTTP + """
beat = {"node_id": "n1", "incarnation": 5, "seq": 10**9, "ts": 0.0, "status": "ok"}
headers = {"Authorization": "Bearer " + VALUES["token"]}
print(json.dumps([call(VALUES["url"] + "/v1/heartbeat", "POST", beat,
                       {**headers, "X-Nodewatch-Node-Credential": secret})[0]
                  for secret in (VALUES["old"], VALUES["new"])]))
""", url=c.url(), token=TOKEN, old=old, new=new)
    assert statuses[0] == 403  # the old credential is refused
    assert statuses[1] in (204, 409)  # the new one is taken (409: stale, not a 403)
    for log in c.workdir.glob("*.log"):  # secrets are never logged, on either side
        text = log.read_text(errors="replace")
        assert old not in text and new not in text and TOKEN not in text, log


def test_probe_and_mutations_from_another_host_need_the_token(cluster: FaultCluster) -> None:
    c = cluster
    client = c.net.add_host("client")
    n1, n2 = c.net.hosts["n1"], c.net.hosts["n2"]
    calls = run_in(client, _HTTP + """
agent, peer, closed = VALUES["agent"], VALUES["peer"], VALUES["closed"]
auth = {"Authorization": "Bearer " + VALUES["token"]}
wrong = {"Authorization": "Bearer wrong"}
out = {
    "probe": call(f"{agent}/probe?target={peer}"),
    "probe_wrong": call(f"{agent}/probe?target={peer}", headers=wrong),
    "probe_token": call(f"{agent}/probe?target={peer}", headers=auth),
    "probe_closed": call(f"{agent}/probe?target={closed}", headers=auth),
    "put": call(f"{agent}/health", "PUT", {"status": "draining", "reason": "x"}),
    "put_token": call(f"{agent}/health", "PUT", {"status": "ok", "reason": ""}, auth),
}
print(json.dumps(out))
""", agent=f"http://{n1.ip}:{AGENT_PORT}", peer=f"{n2.ip}:{AGENT_PORT}",
        closed=f"{n2.ip}:{AGENT_PORT + 50}", token=TOKEN)
    assert calls["probe"][0] == 401 and "agent token" in calls["probe"][1]["error"]
    assert calls["probe_wrong"][0] == 401
    assert calls["probe_token"][0] == 200 and calls["probe_token"][1]["reachable"] is True
    closed = calls["probe_closed"][1]
    assert calls["probe_closed"][0] == 200 and closed["reachable"] is False
    assert closed["failure"] == "refused" and not closed.get("detail")
    assert calls["put"][0] == 401 and calls["put_token"][0] in (200, 204)
    assert c.node("n1")["node_status"] == "ok"  # the refused PUT changed nothing
    # The coordinator's own peer probes carry the token: cut off from n2, it still hears
    # from n1 that n2 is alive (suspect, reachable from peers, not unhealthy).
    coord = c.coordinators["coordinator"][0]
    c.net.cut(coord, n2)
    wait_until(lambda: "reachable from peers" in str(c.node("n2").get("reasons", "")),
               timeout=20, message="n2 suspect, reachable from peers")
    assert c.health("n2") == "suspect"
    c.net.heal()
    wait_until(lambda: c.health("n2") == "healthy", timeout=20, message="n2 healthy again")
