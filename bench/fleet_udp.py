"""A fleet on one coordinator host, fast push profile, real UDP datagrams (issue 17 point 3).

One run, every process on this machine:

1. ``floor``: a separate sender process signs and sends one heartbeat datagram per node per
   ``heartbeat_interval`` (3.5 s; ``HeartbeatBody`` as an agent sends it, msgpack, HMAC-SHA256
   tag, every node's heartbeats spread evenly over the interval) to a bare receiver process
   that reads them in batches as ``api/udp.py`` does, decodes the body into
   ``HeartbeatBody`` and checks the tag with the key of the node it names: its CPU per
   datagram is the floor any Python coordinator pays.
2. ``coordinator``: ``--coordinators`` K real ``nodewatch coordinator`` processes (uvloop,
   SQLite store in a temp dir, the fast push profile of deploy/coordinator-fast-push.toml,
   static nodes; with K > 1 each watches the share of the nodes ``detect/shares.py`` gives it)
   and a new sender that pushes each node's datagrams to its coordinator as agents do: one
   per ``UDP_CONFIRM_INTERVAL`` asks for an answer, and a node whose ask went unanswered sends
   its next heartbeat over HTTP (answers and HTTP heartbeats counted in the cost). Polls
   go to one nginx answering on every 127.x address. Over ``--window`` seconds: coordinator
   CPU (/proc/PID/stat, all threads) per heartbeat received, cores, RSS, the ratio to the floor.
3. ``kills``: the sender stops ``--kills`` random nodes at random moments over
   ``--kill-span`` seconds; each victim's poll address (an address of the sender's own that
   answers ``/health`` while it lives) then refuses connections, as a crashed host's would.
   Each death's confirmation time is read from the coordinators' events (``unhealthy``);
   any live node confirmed unhealthy is a false confirmation, and the first one's reason and
   failure classes are printed (what it stood on). What the start cost (polls and datagrams
   the kernel dropped before the window) is printed beside the settle time.

The sender eats CPU on the same 2 cores, so the machine's load is printed beside the figures.
Prints figures and ratios; asserts nothing. Every wait is bounded.

    .venv/bin/python bench/fleet_udp.py --nodes 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from coordinator_scale import raise_nofile, rss_mb

TOKEN = "bench-agent-token"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "coordinator-fast-push.toml"
SYSTEM = {"cpu_percent": 12.5, "mem_percent": 41.0, "load1": 0.42, "connections": 17.0}
# A default agent's built-in load gauges (collect/agent.py BUILTIN_LOAD): zero until the
# application sets them, so no outlier evidence; --app-load sends an application's figures.
LOAD = {"qps": 0.0, "pending_tasks": 0.0, "error_rate": 0.0}
APP_LOAD = {"qps": 42.0, "pending_tasks": 3.0, "error_rate": 0.002}
SAMPLE_INTERVAL = 5.0  # the agent's default: history gets a point per node per 5 s
HEALTH_BODY = (b'{"status":"ok","uptime":1.0,"version":"0.1.0","incarnation":1,"seq":0,'
               b'"ts":1.0,"reasons":[],"system":{},"load":{}}')


def host(i: int) -> str:
    """Node i's loopback address: 127.1.1.2 ... (100,000 nodes fit; never 127.0.0.1)."""
    return f"127.{1 + i // 62_500}.{1 + (i // 250) % 250}.{2 + i % 250}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----- the sender (a fleet of agents) ------------------------------------------------------


class Victim:
    """A node that will die: its poll address answers ``/health`` until it is killed."""

    def __init__(self, index: int, address: str) -> None:
        self.index, self.address = index, address
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.Transport] = set()

    async def serve(self) -> None:
        host_, port = self.address.rsplit(":", 1)
        self.server = await asyncio.start_server(self._client, host_, int(port))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        self.transports.add(transport)  # type: ignore[arg-type]
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(HEALTH_BODY), HEALTH_BODY))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.transports.discard(transport)  # type: ignore[arg-type]
            writer.close()

    def kill(self) -> None:
        """As a crashed host: new connections refused, kept-alive ones reset."""
        if self.server is not None:
            self.server.close()
        for transport in list(self.transports):
            transport.abort()


MAX_ANSWERS = 10_000  # answers read per socket per push-loop turn (a bound, rarely reached)


async def sender(args: argparse.Namespace) -> None:
    import aiohttp
    import msgspec

    from nodewatch.collect.agent import UDP_CONFIRM_INTERVAL
    from nodewatch.collect.coordinator_client import ANSWER_WITHIN
    from nodewatch.protocol import (
        HeartbeatBody,
        decode_udp_reply,
        encode_heartbeat_datagram,
        heartbeat_key,
    )

    n, every = args.nodes, args.every
    key = heartbeat_key(TOKEN)
    load = APP_LOAD if args.app_load else LOAD
    targets = [t.rsplit(":", 1) for t in args.udp.split(",")]
    socks = []
    for h, p in targets:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.connect((h, int(p)))
        sock.setblocking(False)
        socks.append(sock)
    owner: list[int] = args.owner_list if len(socks) > 1 else [0] * n
    http = args.http.split(",") if args.http else []
    victims = {int(k): Victim(int(k), a) for k, a in args.victim_ports.items()}
    for victim in victims.values():
        await victim.serve()
    dead: set[int] = set()
    kills: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def kill_one(victim: Victim) -> None:
        dead.add(victim.index)
        victim.kill()
        kills[f"n{victim.index}"] = time.time()

    def start_kills() -> None:
        for victim in victims.values():
            loop.call_later(random.uniform(0.0, args.kill_span), kill_one, victim)

    loop.add_signal_handler(signal.SIGUSR1, start_kills)
    sent = errors = 0
    http_status: dict[int, int] = {}
    encoder = msgspec.json.Encoder()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def body(i: int, now: float) -> HeartbeatBody:
        return HeartbeatBody(node_id=f"n{i}", incarnation=1, seq=int(now * 1000), ts=now,
                             system=SYSTEM, load=load, sample_interval=SAMPLE_INTERVAL,
                             samples=int(now / SAMPLE_INTERVAL))

    confirm_every = max(1, math.ceil(UDP_CONFIRM_INTERVAL * args.http_scale / every))
    asked: dict[int, tuple[int, float]] = {}  # node -> (seq, when) of its unanswered ask
    answers = 0
    pending: set[asyncio.Task[None]] = set()
    session: aiohttp.ClientSession | None = None

    def read_answers(sock: socket.socket) -> None:
        """The coordinator's answers to the datagrams that asked, as an agent reads them
        (polled from the push loop: under uvloop a reader callback stops for good at the
        first ICMP error, which a coordinator not bound yet causes)."""
        nonlocal answers
        for _ in range(MAX_ANSWERS):
            try:
                reply = decode_udp_reply(sock.recv(2048), key)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error queued on the socket: read on
                continue
            if reply is not None and reply.status == 200:
                index = int(reply.node_id[1:])
                if asked.get(index, (None,))[0] == reply.seq:
                    del asked[index]
                    answers += 1

    async def post(i: int, now: float) -> None:
        """The agent's HTTP heartbeat after an unanswered ask."""
        if session is None:
            return
        url = f"http://{http[owner[i]]}/v1/heartbeat"
        try:
            async with session.post(url, data=encoder.encode(body(i, now)),
                                    headers=headers) as response:
                await response.read()
                http_status[response.status] = http_status.get(response.status, 0) + 1
        except (aiohttp.ClientError, OSError, TimeoutError):
            http_status[0] = http_status.get(0, 0) + 1

    async def pushes() -> None:
        """Every node's datagram once per ``every``, spread evenly; one in ``confirm_every``
        asks for an answer, and when none came the node's next heartbeat goes over HTTP, as
        an agent does (collect/agent.py); the first round starts the asks spread too."""
        nonlocal sent, errors
        start = time.monotonic()
        done = 0
        while not stop.is_set():
            due = int((time.monotonic() - start) / every * n)
            now = time.time()
            clock = time.monotonic()
            for k in range(done, due):
                i = k % n
                if i in dead:
                    continue
                question = asked.get(i)
                if question is not None and clock - question[1] >= ANSWER_WITHIN:
                    del asked[i]
                    if http and len(pending) < 256:
                        task = loop.create_task(post(i, now))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                        continue
                beat = body(i, now)
                if http and question is None and (k // n + i) % confirm_every == 0:
                    beat.confirm = True
                    asked[i] = (beat.seq, clock)
                try:
                    socks[owner[i]].send(encode_heartbeat_datagram(beat, key))
                    sent += 1
                except OSError:
                    errors += 1
            done = max(done, due)
            if http:
                for sock in socks:
                    read_answers(sock)
            await asyncio.sleep(0.002)

    if http:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                        timeout=aiohttp.ClientTimeout(total=5))
    tasks = [loop.create_task(pushes())]
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*pending, return_exceptions=True)
    if session is not None:
        await session.close()
    print(json.dumps({"sent": sent, "errors": errors, "http": http_status, "kills": kills,
                      "answers": answers, "cpu": self_cpu()}), flush=True)


# ----- the floor ---------------------------------------------------------------------------


def floor(args: argparse.Namespace) -> None:
    """Read, decode, check the tag: nothing else, batched like api/udp.py (the same
    receive buffer, at most MAX_BATCH a wake-up, resting BATCH_WINDOW after a short one)."""
    import msgspec

    from nodewatch.api.udp import BATCH_WINDOW, MAX_BATCH, _grow_receive_buffer
    from nodewatch.protocol import TAG_SIZE, HeartbeatBody, heartbeat_key, untagged

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _grow_receive_buffer(sock)  # the coordinator's receive buffer, the same size
    sock.bind(("127.0.0.1", int(args.udp.rsplit(":", 1)[1])))
    sock.setblocking(False)
    keys = {f"n{i}": heartbeat_key(TOKEN) for i in range(args.nodes)}
    decoder = msgspec.msgpack.Decoder(HeartbeatBody)
    count = bad = 0
    marks: list[tuple[float, float, int]] = []
    start = time.monotonic()
    for at in (args.warmup, args.warmup + args.window):
        while time.monotonic() - start < at:
            handled = 0
            while handled < MAX_BATCH:
                try:
                    data = sock.recv(8193)
                except BlockingIOError:
                    break
                handled += 1
                # One decode, then the tag under the named node's key: what api/udp.py
                # does for a tagged msgpack datagram, without anything after it.
                body = decoder.decode(memoryview(data)[:-TAG_SIZE])
                if untagged(data, keys.get(body.node_id, b"")) is None:
                    bad += 1
                    continue
                count += 1
            if handled < MAX_BATCH:  # a full batch: more is waiting, as api/udp.py's _rest
                time.sleep(BATCH_WINDOW)
        marks.append((time.monotonic(), self_cpu(), count))
    (t0, c0, n0), (t1, c1, n1) = marks
    print(json.dumps({"datagrams": n1 - n0, "cpu": c1 - c0, "wall": t1 - t0, "bad": bad,
                      "us": (c1 - c0) / max(n1 - n0, 1) * 1e6}), flush=True)


# ----- the parent --------------------------------------------------------------------------


def start_nginx(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """One nginx on 0.0.0.0:``port``: every 127.x address answers /health for a live node."""
    (tmp / "logs").mkdir()
    body = HEALTH_BODY.decode()
    (tmp / "nginx.conf").write_text(f"""
worker_processes 1;
error_log {tmp}/logs/error.log error;
pid {tmp}/nginx.pid;
daemon off;
events {{ worker_connections 60000; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    client_body_temp_path {tmp}/tmp; proxy_temp_path {tmp}/tmp; fastcgi_temp_path {tmp}/tmp;
    uwsgi_temp_path {tmp}/tmp; scgi_temp_path {tmp}/tmp;
    server {{
        listen {port} backlog=4096;
        location /health {{ default_type application/json; return 200 '{body}'; }}
        location / {{ return 404; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.1.1.2", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("nginx did not start")


def role(name: str, args: argparse.Namespace, **extra: Any) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--role", name, "--nodes", str(args.nodes),
            "--every", str(args.every), "--warmup", str(args.warmup),
            "--window", str(args.window), "--kill-span", str(args.kill_span),
            "--http-scale", str(args.http_scale)] + (["--app-load"] if args.app_load else [])
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return dict(json.loads(out.strip().splitlines()[-1]))


def run_floor(args: argparse.Namespace, free_port: Any) -> dict[str, Any]:
    udp = f"127.0.0.1:{free_port()}"
    receiver = role("floor", args, udp=udp)
    time.sleep(0.5)
    busy0 = machine_busy()
    send = role("sender", args, udp=udp)
    try:
        out, _ = receiver.communicate(timeout=args.warmup + args.window + 60)
    except BaseException:
        send.kill()
        receiver.kill()
        raise
    busy1 = machine_busy()
    result = dict(json.loads(out.strip().splitlines()[-1]))
    result["sender"] = finish(send, 30)
    result["machine"] = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * os.cpu_count()
    return result


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        text = response.read().decode()
    wanted = {"nodewatch_checks_total": "checks", "nodewatch_heartbeats_total": "pushes",
              'nodewatch_udp_heartbeats_total{result="ok"}': "udp_ok",
              'nodewatch_udp_heartbeats_total{result="stale"}': "udp_stale",
              "nodewatch_udp_receive_drops_total": "udp_drops",
              'nodewatch_nodes{health="healthy"}': "healthy"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def summary(url: str) -> dict[str, Any]:
    """The fleet summary (kept current by the coordinator every second: cheap to read)."""
    with urllib.request.urlopen(f"{url}/v1/summary", timeout=60) as response:
        return dict(json.loads(response.read()))


def final_healthy(urls: list[str]) -> float:
    try:
        return float(sum(summary(url)["health"]["healthy"] for url in urls))
    except OSError:
        return float("nan")


def last_event(url: str) -> int | None:
    """The newest event's id, from the coordinator's memory (not a walk through the store)."""
    with urllib.request.urlopen(f"{url}/v1/events?newest=true&limit=1", timeout=60) as response:
        last = json.loads(response.read())["last_id"]
    return None if last is None else int(last)


def events(url: str, after: int | None) -> tuple[list[dict[str, Any]], int | None]:
    got: list[dict[str, Any]] = []
    while True:
        query = f"?limit=10000{'' if after is None else f'&after={after}'}"
        with urllib.request.urlopen(f"{url}/v1/events{query}", timeout=60) as response:
            page = json.loads(response.read())
        got += page["events"]
        if not page["events"] or page["last_id"] == after:
            return got, page["last_id"]
        after = page["last_id"]


def coordinator_config(args: argparse.Namespace, tmp: Path, nodes: list[tuple[int, str]],
                       http: str, udp: str) -> Path:
    """deploy/coordinator-fast-push.toml's detection as deployed; the bench's own store,
    addresses, token and nodes."""
    detection = tomllib.loads(DEPLOY.read_text())["detection"]
    lines = [f'{k} = {json.dumps(v)}' for k, v in detection.items()]
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "coordinator.toml"
    config.write_text(
        f'[coordinator]\nlisten = "{http}"\nstore = "sqlite:///{tmp}/state.db"\n'
        f'agent_token = "{TOKEN}"\nheartbeat_udp = "{udp}"\n'
        # The first write of 100,000 new nodes takes longer than the default 3 s on SQLite
        # here, and a leader whose first write fails exits: room for the start only.
        f'store_timeout = "{args.store_timeout:g}s"\nmax_queued_events = {2 * args.nodes}\n'
        '\n[detection]\n'
        + "\n".join(lines) + "\n\n"
        + "".join(f'[[nodes]]\nid = "n{i}"\naddress = "{a}"\n' for i, a in nodes))
    return config


def run_fleet(args: argparse.Namespace, free_port: Any) -> dict[str, Any]:
    from nodewatch.detect.shares import Assignment

    k = args.coordinators
    rng = random.Random(args.seed)
    victims = rng.sample(range(args.nodes), min(args.kills, args.nodes))
    # Each victim on an address of its own (one port for all): a port picked free on
    # 127.0.0.1 could meanwhile be taken by one of the coordinator's own connections.
    victim_port = free_port()
    ports = {i: f"127.254.{1 + k // 250}.{2 + k % 250}:{victim_port}"
             for k, i in enumerate(victims)}
    members = [f"c{j}" for j in range(k)]
    assignment = Assignment.of(members)
    owner = [members.index(assignment.owner(f"n{i}")) if k > 1 else 0
             for i in range(args.nodes)]
    tmp = Path(tempfile.mkdtemp(prefix="nw-fleet-"))
    (tmp / "victims.json").write_text(json.dumps({str(i): p for i, p in ports.items()}))
    (tmp / "owners.json").write_text(json.dumps(owner))
    procs: list[subprocess.Popen[bytes]] = []
    send: subprocess.Popen[str] | None = None
    https, udps = [], []
    try:
        for j in range(k):
            http, udp = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            nodes = [(i, ports[i] if i in ports else f"{host(i)}:{args.nginx_port}")
                     for i in range(args.nodes) if owner[i] == j]
            config = coordinator_config(args, tmp / f"c{j}", nodes, http, udp)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "nodewatch", "coordinator", "--config", str(config),
                 "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=(tmp / f"c{j}.log").open("wb")))
            https.append(http)
            udps.append(udp)
        urls = [f"http://{h}" for h in https]
        # The fleet pushes from the start, as running agents do when a coordinator starts:
        # a coordinator that had to poll 100,000 unknown nodes every unhealthy_interval
        # before any push arrived would measure its own start, not the steady state.
        send = role("sender", args, udp=",".join(udps), http=",".join(https),
                    victims=tmp / "victims.json", owners=tmp / "owners.json")
        deadline = time.monotonic() + 120
        up: set[int] = set()
        while len(up) < k:
            for j, (proc, url) in enumerate(zip(procs, urls, strict=True)):
                if proc.poll() is not None:
                    raise SystemExit(f"coordinator {j} exited ({proc.returncode}):\n"
                                     + (tmp / f"c{j}.log").read_text()[-3000:])
                if j in up:
                    continue
                try:
                    scrape(url)
                    up.add(j)
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("coordinator not up within 120 s") from None
            time.sleep(0.5)
        started = time.monotonic()
        healthy = 0.0
        while time.monotonic() - started < args.settle_max:
            for j, proc in enumerate(procs):
                if proc.poll() is not None:
                    raise SystemExit(f"coordinator {j} exited ({proc.returncode}):\n"
                                     + (tmp / f"c{j}.log").read_text()[-3000:])
            try:
                healthy = sum(summary(url)["health"]["healthy"] for url in urls)
            except OSError:  # busy starting up: 100,000 first events are written
                continue
            if healthy >= args.nodes:
                break
            time.sleep(2.0)
        settle = time.monotonic() - started
        time.sleep(args.warmup)  # startup polls and first events written
        api_ok = True
        try:
            before_events = [last_event(url) for url in urls]
            # /metrics counts every node (Cluster.counts): at 100,000 nodes a scrape is CPU of
            # its own, so the counters are read just outside the CPU window and scaled to it.
            before = [scrape(url) for url in urls]
        except OSError:  # an API that does not answer within 60 s is a result of its own
            api_ok, before_events, before = False, [None] * k, []
        s0 = time.monotonic()
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        busy0, t0 = machine_busy(), time.monotonic()
        time.sleep(args.window)
        busy1, t1 = machine_busy(), time.monotonic()
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        s1 = time.monotonic()
        rss = [rss_mb(p.pid) for p in procs]
        wall = t1 - t0
        try:
            after = [scrape(url) for url in urls] if api_ok else []
        except OSError:
            api_ok, after = False, []
        scale = wall / max(s1 - s0, 1e-9)
        if api_ok:
            sums = {key: scale * sum(a[key] - b[key] for a, b in zip(after, before, strict=True))
                    for key in ("checks", "pushes", "udp_ok", "udp_stale", "udp_drops")}
        else:  # what the sender paced, not what the coordinator counted
            sums = {"checks": 0.0, "pushes": args.nodes / args.every * wall,
                    "udp_ok": args.nodes / args.every * wall, "udp_stale": 0.0,
                    "udp_drops": 0.0}
        cpu = sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True))
        send.send_signal(signal.SIGUSR1)  # the kills begin
        time.sleep(args.kill_span + args.confirm_wait)
        try:
            seen = [events(url, after_id)[0] if api_ok else [] for url, after_id in
                    zip(urls, before_events, strict=True)]
        except OSError:
            api_ok, seen = False, []
        sender_out = finish(send, 60)
        send = None
        kills: dict[str, float] = sender_out["kills"]
        confirmed: dict[str, float] = {}
        false: list[str] = []
        why: dict[str, Any] = {}
        suspects = 0
        for event in (e for page in seen for e in page):
            node = event.get("node_id") or ""
            if event["kind"] == "suspect" and node not in kills:
                suspects += 1
            if event["kind"] not in ("unhealthy", "dead"):
                continue
            if node in kills and event["ts"] >= kills[node]:
                confirmed.setdefault(node, event["ts"] - kills[node])
            elif node not in kills:
                false.append(node)
                if len(false) == 1:  # what the first false confirmation stood on
                    checks = event.get("evidence", {}).get("checks", [])
                    why = {"reason": event.get("reason", ""),
                           "classes": [c.get("class") for c in checks],
                           "details": sorted({c.get("detail", "") for c in checks})[:3]}
        times = sorted(confirmed.values())
        # Polls and kernel drops from the start to the window: what the start itself cost.
        start_polls = sum(b["checks"] for b in before) if api_ok else float("nan")
        start_drops = sum(b["udp_drops"] for b in before) if api_ok else float("nan")
        return {"settle": settle, "healthy": healthy, "wall": wall, "cpu": cpu, **sums,
                "false_why": why, "start_polls": start_polls, "start_drops": start_drops,
                "rss": rss, "machine": (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
                * os.cpu_count(), "times": times, "kills": len(kills), "false": false,
                "false_suspects": suspects, "sender": sender_out,
                "final_healthy": final_healthy(urls), "api_ok": api_ok}
    finally:
        if send is not None:
            send.kill()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--coordinators", type=int, default=1)
    parser.add_argument("--window", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--kill-span", type=float, default=7.0,
                        help="seconds over which the kills fall (two heartbeat cycles)")
    parser.add_argument("--confirm-wait", type=float, default=10.0)
    parser.add_argument("--settle-max", type=float, default=180.0,
                        help="at most this long for every node to be healthy")
    parser.add_argument("--every", type=float, default=0.0,
                        help="heartbeat interval (default: the fast push profile's)")
    parser.add_argument("--http-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--app-load", action="store_true",
                        help="agents report an application's qps and error rate (outlier "
                             "evidence for every node) instead of a default agent's zeros")
    parser.add_argument("--store-timeout", type=float, default=60.0)
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores)")
    parser.add_argument("--role", choices=["sender", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--udp", help=argparse.SUPPRESS)
    parser.add_argument("--http", default="", help=argparse.SUPPRESS)
    parser.add_argument("--victims", default="", help=argparse.SUPPRESS)
    parser.add_argument("--owners", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.every:
        from detection_quality import FAST_PROFILE, PROFILES

        args.every = next(p for p in PROFILES if p.name == FAST_PROFILE).heartbeat_interval
    if args.role == "sender":
        import uvloop

        raise_nofile()
        args.owner_list = json.loads(Path(args.owners).read_text()) if args.owners else []
        args.victim_ports = json.loads(Path(args.victims).read_text()) if args.victims else {}
        uvloop.run(sender(args))
        return
    if args.role == "floor":
        floor(args)
        return
    from nodewatch.testing import free_port

    raise_nofile(200_000)
    rate = args.nodes / args.every
    from nodewatch.collect.agent import UDP_CONFIRM_INTERVAL

    print(f"{args.nodes} nodes, one UDP heartbeat each per {args.every:g}s ({rate:.0f}/s), "
          f"one a node per {UDP_CONFIRM_INTERVAL:g}s answered (HTTP when not); "
          f"{args.coordinators} coordinator(s); {os.cpu_count()} cores; window {args.window:g}s",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="nw-fleet-nginx-"))
    args.nginx_port = free_port()  # other benches on this machine use fixed ports
    nginx = start_nginx(tmp, args.nginx_port)
    try:
        fl: dict[str, Any] | None = None
        if not args.skip_floor:
            fl = run_floor(args, free_port)
            print(f"floor: {fl['us']:.1f} us/datagram, {fl['datagrams'] / fl['wall']:.0f} "
                  f"datagrams/s, {fl['cpu'] / fl['wall']:.3f} cores; sender "
                  f"{fl['sender']['sent']} sent; machine busy {fl['machine']:.2f} of "
                  f"{os.cpu_count()} cores", flush=True)
        r = run_fleet(args, free_port)
        heartbeats = r["pushes"]
        us = r["cpu"] / max(heartbeats, 1) * 1e6
        ratio = f"{us / fl['us']:.2f}x floor" if fl else "no floor"
        print(f"coordinator: {us:.1f} us/heartbeat ({ratio}); "
              f"{r['udp_ok'] / r['wall']:.0f} udp ok/s, {r['udp_stale'] / r['wall']:.1f} stale/s,"
              f" {r['udp_drops'] / r['wall']:.1f} dropped in the kernel/s,"
              f" {(heartbeats - r['udp_ok'] - r['udp_stale']) / r['wall']:.1f} http/s, "
              f"{r['checks'] / r['wall']:.1f} polls/s; {r['cpu'] / r['wall']:.3f} cores in "
              f"total; RSS {'+'.join(f'{m:.0f}' for m in r['rss'])} MB; machine busy "
              f"{r['machine']:.2f} of {os.cpu_count()} cores; settled in {r['settle']:.0f}s "
              f"({r['healthy']:.0f} healthy; {r['start_polls']:.0f} polls and "
              f"{r['start_drops']:.0f} kernel drops before the window)", flush=True)
        if not r["api_ok"]:
            print("the coordinator's HTTP API did not answer within 60 s: heartbeats are the "
                  "sender's paced rate, detection times unread", flush=True)
        times = r["times"]
        print(f"kills: {r['kills']} nodes, {len(times)} confirmed; detection p50 "
              f"{pct(times, 50):.2f}s p99 {pct(times, 99):.2f}s max "
              f"{max(times) if times else float('nan'):.2f}s; false confirmations "
              f"{len(r['false'])} {r['false'][:5]} "
              f"{json.dumps(r['false_why']) if r['false'] else ''}; "
              f"false suspects {r['false_suspects']}; "
              f"healthy at the end {r['final_healthy']:.0f} of {args.nodes - r['kills']}; "
              f"sender {json.dumps({k: v for k, v in r['sender'].items() if k != 'kills'})}",
              flush=True)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
