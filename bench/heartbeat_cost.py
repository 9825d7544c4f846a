"""Coordinator CPU per poll, per HTTP heartbeat and per UDP heartbeat, in one run.

A real coordinator process (``nodewatch coordinator``: uvloop, SQLite store in a temp dir,
agent token, ``heartbeat_udp``) watches N static nodes served by one nginx on N loopback
addresses (see coordinator_scale.py) with the fast push profile (``healthy_interval`` 1.5 s).
Three phases, each measured over ``--window`` seconds from the coordinator's own CPU time
(/proc/PID/stat, all its threads):

1. ``poll``: nobody pushes; the coordinator polls every node every 1.5 s: CPU per poll;
2. ``udp``: a separate sender process pushes a signed msgpack heartbeat per node per second
   over UDP: accepted pushes defer the polls, so what remains is the pushes' cost;
3. ``http``: the same over ``POST /v1/heartbeat`` (keep-alive aiohttp client, bearer token).

Polls still made during a push phase are taken off at the per-poll cost of phase 1.

Then the fast detection profile itself (``push-udp-3.5s-f2`` of detection_quality.py, or
``--profile``), on a second coordinator configured as that profile says (``healthy_interval``
4 s, ``unhealthy_interval`` 500 ms, ``fall`` 2): every node pushes a UDP heartbeat every
3.5 s and, as an agent does, one datagram per ``UDP_CONFIRM_INTERVAL`` asks for an answer
(``confirm``), which the coordinator sends back (an agent sends HTTP only when one is lost,
which on loopback it is not; the sender counts the answers). Its figure is the
whole coordinator's CPU, idle work and store writes included, divided by the thousands of nodes
watched: no subtraction, no per-heartbeat model. The issue's goal is <= 2 % of a core per 1,000.

Senders spread each node's heartbeats evenly in 1 ms steps, as independent agents would (not
in bursts, which would flatter the receive path). Prints figures; nothing is asserted. Every
loop is bounded in time.

    .venv/bin/python bench/heartbeat_cost.py --nodes 1000,5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from coordinator_scale import addresses, raise_nofile, start_nginx, stop_nginx
from detection_quality import FAST_PROFILE, PROFILES

from nodewatch.protocol import HeartbeatBody
from nodewatch.testing import free_port

TOKEN = "bench-agent-token"
INTERVAL = 1.5  # healthy_interval of the phases that measure one heartbeat's cost
HEARTBEAT = 1.0  # seconds between two heartbeats of one node in those phases
_TICK = 0.001  # the finest step; a sender sleeps until its next heartbeat is due


def payload(node: str, seq: int) -> HeartbeatBody:
    """What an agent's heartbeat carries (nodewatch.protocol.heartbeat_body)."""
    return HeartbeatBody(
        node_id=node, incarnation=1, seq=seq, ts=time.time(), reasons=[],
        system={"cpu_percent": 12.5, "mem_percent": 41.0, "load1": 0.42, "connections": 17.0},
        load={"qps": 42.0, "pending_tasks": 3.0, "error_rate": 0.002},
        # An agent samples every 5 s by default and a heartbeat carries the count, so history
        # gets a point per node per 5 s, not one per heartbeat.
        sample_interval=5.0, samples=int(time.time() / 5.0))


def paced(n: int, seconds: float, every: float) -> Any:
    """Yield lists of node indexes so that each node comes up once per ``every``, evenly."""
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            return
        due = int(elapsed / every * n)
        if due > sent:
            yield [i % n for i in range(sent, due)]
            sent = due
        time.sleep(max(_TICK, (sent + 1) * every / n - (time.monotonic() - start)))


def udp_sender(args: argparse.Namespace) -> None:
    """``--confirm-every`` K > 0: a node's every K-th datagram asks for an answer, as an
    agent's does (phases spread over the nodes); the answers are read and counted."""
    from nodewatch.protocol import encode_heartbeat_datagram, heartbeat_key

    key = heartbeat_key(TOKEN)
    host, port = args.target.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    every = args.confirm_every
    rounds = [i % every for i in range(args.nodes)] if every > 0 else []
    sent = answers = 0
    for batch in paced(args.nodes, args.seconds, args.every):
        seq = int(time.time() * 100)  # grows across phases and processes
        for i in batch:
            body = payload(f"n{i}", seq)
            if every > 0:
                rounds[i] += 1
                if rounds[i] % every == 0:
                    body.confirm = True
            try:
                sock.send(encode_heartbeat_datagram(body, key))
                sent += 1
            except OSError:
                pass
        while True:
            try:
                sock.recv(2048)
                answers += 1
            except OSError:  # none waiting (or an ICMP error)
                break
    print(json.dumps({"sent": sent, "answers": answers}), flush=True)


async def http_sender(args: argparse.Namespace) -> None:
    import aiohttp
    import msgspec

    encoder = msgspec.json.Encoder()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"http://{args.target}/v1/heartbeat"
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def post(i: int, seq: int) -> None:
            try:
                async with session.post(url, data=encoder.encode(payload(f"n{i}", seq)),
                                        headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                statuses[0] = statuses.get(0, 0) + 1

        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        start = loop.time()
        sent = 0
        while loop.time() - start < args.seconds:
            due = int((loop.time() - start) / args.every * args.nodes)
            seq = int(time.time() * 100)
            for k in range(sent, due):
                task = loop.create_task(post(k % args.nodes, seq))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent = max(sent, due)
            await asyncio.sleep(max(_TICK, (sent + 1) * args.every / args.nodes
                                    - (loop.time() - start)))
        await asyncio.gather(*pending)
    print(json.dumps({"sent": sent, "statuses": statuses}), flush=True)


# ----- the parent --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {"nodewatch_checks_total": "checks", "nodewatch_heartbeats_total": "pushes",
              'nodewatch_udp_heartbeats_total{result="ok"}': "udp_ok",
              'nodewatch_nodes{health="healthy"}': "healthy"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def start_coordinator(n: int, tmp: Path, healthy: float = INTERVAL, unhealthy: float = 0.5,
                      fall: int = 3, down: float = 0.0
                      ) -> tuple[subprocess.Popen[bytes], str, str]:
    http, udp = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    nodes = "\n".join(f'[[nodes]]\nid = "n{i}"\naddress = "{a}"\n'
                      for i, a in enumerate(addresses(n)))
    config = tmp / "coordinator.toml"
    config.write_text(f"""
[coordinator]
store = "sqlite:///{tmp}/state.db"
agent_token = "{TOKEN}"
heartbeat_udp = "{udp}"

[detection]
healthy_interval = "{healthy * 1000:.0f}ms"
unhealthy_interval = "{unhealthy * 1000:.0f}ms"
down_interval = "{down * 1000:.0f}ms"
fall = {fall}
timeout = "1s"
connect_timeout = "500ms"
startup_grace = "1s"
concurrency = 512

{nodes}
""")
    proc = subprocess.Popen([sys.executable, "-m", "nodewatch", "coordinator", "--listen", http,
                             "--config", str(config), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "coordinator.log").open("wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("coordinator exited:\n" + (tmp / "coordinator.log").read_text())
        try:
            scrape(f"http://{http}")
            return proc, http, udp
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("coordinator not up within 60 s")


def measure(pid: int, url: str, window: float) -> dict[str, float]:
    before, cpu0, t0 = scrape(url), cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    after, cpu1, t1 = scrape(url), cpu_seconds(pid), time.monotonic()
    out = {k: after[k] - before[k] for k in ("checks", "pushes", "udp_ok")}
    out.update(cpu=cpu1 - cpu0, wall=t1 - t0, healthy=after["healthy"])
    return out


def sender(kind: str, n: int, target: str, seconds: float,
           every: float = HEARTBEAT, confirm_every: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--role", f"{kind}-sender", "--nodes",
                             str(n), "--target", target, "--seconds", str(seconds),
                             "--every", str(every), "--confirm-every", str(confirm_every)],
                            stdout=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_profile(n: int, args: argparse.Namespace, profile: Any) -> dict[str, Any]:
    """A push profile as deployed: UDP heartbeats, one answered per UDP_CONFIRM_INTERVAL."""
    from nodewatch.collect.agent import UDP_CONFIRM_INTERVAL

    tmp = Path(tempfile.mkdtemp(prefix="nw-hbprofile-"))
    policy = profile.policy
    proc, http, udp = start_coordinator(n, tmp, policy.healthy_interval,
                                        policy.unhealthy_interval, policy.fall,
                                        policy.down_interval)
    url = f"http://{http}"
    seconds = args.warmup + args.window + 1.0
    try:
        time.sleep(args.warmup)  # every node polled once and healthy
        confirm_every = max(1, math.ceil(UDP_CONFIRM_INTERVAL / profile.heartbeat_interval))
        child = sender("udp", n, udp, seconds + args.warmup, profile.heartbeat_interval,
                       confirm_every)
        time.sleep(args.warmup)  # pushes have deferred every poll
        out = measure(proc.pid, url, args.window)
        out.update(json.loads(child.communicate(timeout=seconds + args.warmup + 60)[0]))
        out["confirm"] = UDP_CONFIRM_INTERVAL
        return out
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="nw-hbcost-"))
    proc, http, udp = start_coordinator(n, tmp)
    url = f"http://{http}"
    try:
        time.sleep(args.warmup)  # every node polled (and healthy) a few times
        poll = measure(proc.pid, url, args.window)
        phases: dict[str, Any] = {"poll": poll}
        for kind, target in (("udp", udp), ("http", http)):
            child = sender(kind, n, target, args.warmup + args.window + 1.0)
            time.sleep(args.warmup)  # pushes have deferred every poll
            phases[kind] = measure(proc.pid, url, args.window)
            out, _ = child.communicate(timeout=args.window + args.warmup + 60)
            phases[kind]["sender"] = json.loads(out.strip().splitlines()[-1])
        return phases
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1000,5000")
    parser.add_argument("--window", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2, help="profile runs per size")
    parser.add_argument("--profile", default=FAST_PROFILE,
                        help="a UDP profile of detection_quality.py to measure as deployed")
    parser.add_argument("--role", choices=["udp-sender", "http-sender"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--every", type=float, default=HEARTBEAT, help=argparse.SUPPRESS)
    parser.add_argument("--confirm-every", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip-unit", action="store_true",
                        help="only the profile run, not the per-poll / per-heartbeat phases")
    args = parser.parse_args()
    if args.role == "udp-sender":
        args.nodes = int(args.nodes)
        udp_sender(args)
        return
    if args.role == "http-sender":
        import uvloop

        raise_nofile()
        args.nodes = int(args.nodes)
        uvloop.run(http_sender(args))
        return
    sizes = [int(x) for x in args.nodes.split(",")]
    raise_nofile()
    nginx, prefix = start_nginx(max(sizes), 1)
    print(f"real coordinator process, healthy_interval {INTERVAL:g}s, one heartbeat per node "
          f"per {HEARTBEAT:g}s, window {args.window:g}s; {os.cpu_count()} cores", flush=True)
    print(f"{'nodes':>6} {'phase':>5} {'pushes/s':>9} {'polls/s':>8} {'core%':>6} "
          f"{'us/poll':>8} {'us/push':>8} {'core%/1k nodes @1/s':>20}", flush=True)
    try:
        for n in sizes:
            if args.skip_unit:
                continue
            phases = run_size(n, args)
            poll = phases["poll"]
            per_poll = poll["cpu"] / max(poll["checks"], 1)
            print(f"{n:>6} {'poll':>5} {0:>9.0f} {poll['checks'] / poll['wall']:>8.0f} "
                  f"{poll['cpu'] / poll['wall'] * 100:>5.1f}% {per_poll * 1e6:>8.1f} "
                  f"{'-':>8} {per_poll * 1000 / INTERVAL * 100:>19.2f}%  (polled every "
                  f"{INTERVAL:g}s; {poll['healthy']:.0f} healthy)", flush=True)
            for kind in ("udp", "http"):
                p = phases[kind]
                pushes = p["udp_ok"] if kind == "udp" else p["pushes"] - p["udp_ok"]
                per_push = (p["cpu"] - p["checks"] * per_poll) / max(pushes, 1)
                print(f"{n:>6} {kind:>5} {pushes / p['wall']:>9.0f} "
                      f"{p['checks'] / p['wall']:>8.1f} {p['cpu'] / p['wall'] * 100:>5.1f}% "
                      f"{'-':>8} {per_push * 1e6:>8.1f} {per_push * 1000 / HEARTBEAT * 100:>19.2f}%"
                      f"  (sender: {json.dumps(p['sender'])})", flush=True)
        profile = next(p for p in PROFILES if p.name == args.profile)
        print(f"profile {profile.name}: {profile.note}; whole coordinator CPU (goal <= 2 % of "
              "a core per 1,000 nodes)", flush=True)
        print(f"{'nodes':>6} {'udp/s':>7} {'http/s':>7} {'polls/s':>8} {'core%':>6} "
              f"{'core%/1k nodes':>15} {'us/heartbeat':>13}", flush=True)
        for n in sizes:
            for _ in range(args.repeat):
                p = run_profile(n, args, profile)
                http = (p["pushes"] - p["udp_ok"]) / p["wall"]
                core = p["cpu"] / p["wall"] * 100
                print(f"{n:>6} {p['udp_ok'] / p['wall']:>7.0f} {http:>7.1f} "
                      f"{p['checks'] / p['wall']:>8.1f} {core:>5.2f}% {core / (n / 1000):>14.2f}% "
                      f"{p['cpu'] / max(p['pushes'], 1) * 1e6:>13.1f}  ({p['healthy']:.0f} "
                      f"healthy; one datagram per {p['confirm']:g}s asks, {p['answers']} answered)",
                      flush=True)
    finally:
        stop_nginx(nginx, prefix)


if __name__ == "__main__":
    main()
