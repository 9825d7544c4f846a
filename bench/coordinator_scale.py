"""Coordinator at scale: the real Coordinator polling 1,000-10,000 nginx health endpoints.

One Debian nginx (temp prefix, one worker, more when the descriptor limit needs it) listens on
N loopback addresses 127.0.x.y:PORT and answers ``/health`` with a per-address body (a ``map``
on ``$server_addr`` gives each address its node id, which the coordinator verifies). Then,
against the same servers and in one run:

1. ``coordinator``: the real ``Coordinator`` (uvloop, SQLite store in a temp dir, static nodes)
   at ``healthy_interval`` = ``--interval``, in a fresh child process per N so that CPU and RSS
   are its own: achieved checks/s against the configured rate, CPU per 1,000 checks, RSS, p99
   lateness of checks against their due time. With ``--poller-processes K`` (K > 1) the checks
   run in K probe worker processes: CPU and RSS are then the coordinator's plus its workers',
   and ``main us`` is the coordinator process's own share per check;
2. ``bare``: a bare aiohttp loop (``--concurrency`` coroutines GET + read + msgspec decode,
   round-robin, saturated): the floor any Python coordinator pays per check;
3. ``wrk``: the machine's ceiling against one nginx address;
4. ``handoff`` (with ``--poller-processes`` > 1): the bare loop through the process probe,
   for the coordinator process's CPU per hand-off next to the workers' CPU per check;
5. ``push``: coordinator CPU per pushed heartbeat (``POST /v1/heartbeat`` driven by wrk) next to
   its CPU per poll, for the detection-quality cost model.

Prints figures and ratios; nothing is asserted. Every load loop is bounded in time.

    .venv/bin/python bench/coordinator_scale.py --nodes 1000,5000,10000 --interval 5s
    .venv/bin/python bench/coordinator_scale.py --nodes 10000 --interval 2s --poller-processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PORT = 18_471
BODY = ('{"status":"ok","node_id":"$nw_node","uptime":1.0,"version":"0.1.0","incarnation":1,'
        '"seq":1,"ts":1764000000.0,"reasons":[],"system":{"cpu_percent":10.0,'
        '"mem_percent":20.0,"load1":0.1,"connections":3},'
        '"load":{"qps":1,"pending_tasks":0,"error_rate":0.0}}')


def loopback(i: int) -> str:
    """The i-th bench host: 127.0.1.2 ... 127.0.1.251, 127.0.2.2 ... (never 127.0.0.1)."""
    return f"127.0.{1 + i // 250}.{2 + i % 250}"


def addresses(n: int) -> list[str]:
    return [f"{loopback(i)}:{PORT}" for i in range(n)]


def raise_nofile(want: int = 65_536) -> int:
    """10,000 kept-alive connections need 10,000 descriptors, and nginx (which inherits the
    limit) needs them plus one per listening address: at 10,000 nodes a 20,000 limit left the
    last 7 nodes unanswered. Root may raise the hard limit too; others get the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((want, max(want, hard)), (max(soft, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return limits[0]
        except (ValueError, OSError):
            continue
    return soft


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int | str = "self") -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of another (live) process, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(coord: Any) -> list[int]:
    return [pid for pid in getattr(coord.probe, "pids", []) if pid is not None]


# ----- nginx --------------------------------------------------------------------------------


def nginx_workers_for(n: int, wanted: int) -> int:
    """Each nginx worker holds all n listening sockets plus its share of the n kept-alive
    connections, within this process's descriptor limit (which nginx inherits; raising it
    needs a privilege a container may lack). Too few and the last nodes are never answered."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    spare = limit - n - 256
    if spare <= 0:
        raise SystemExit(f"{n} listening addresses do not fit in {limit} descriptors")
    return max(wanted, -(-n // spare))


def start_nginx(n: int, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    """nginx on n loopback addresses with at least ``workers`` workers (more when the
    descriptor limit asks for it: ``nginx_workers_for``)."""
    workers = nginx_workers_for(n, workers)
    prefix = Path(tempfile.mkdtemp(prefix="nw-nginx-"))
    (prefix / "logs").mkdir()
    lines = [f"    {loopback(i)} n{i};" for i in range(n)]
    listens = [f"        listen {loopback(i)}:{PORT} backlog=1024;" for i in range(n)]
    conf = f"""
worker_processes {workers};
worker_rlimit_nofile 200000;
error_log {prefix}/logs/error.log error;
pid {prefix}/nginx.pid;
daemon off;
events {{ worker_connections 60000; multi_accept on; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    map_hash_max_size 262144;
    map_hash_bucket_size 128;
    map $server_addr $nw_node {{
        default unknown;
{chr(10).join(lines)}
    }}
    server {{
{chr(10).join(listens)}
        default_type application/json;
        location /health {{ return 200 '{BODY}'; }}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(["/usr/sbin/nginx", "-p", str(prefix), "-c",
                             str(prefix / "nginx.conf")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nginx failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection((loopback(n - 1), PORT), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.1)
            continue
        # Up, and ours: an older nginx still draining on the same port would answer the
        # connect while this one failed to bind, and every check would then be refused.
        pid_file = prefix / "nginx.pid"
        if pid_file.exists() and pid_file.read_text().strip() == str(proc.pid):
            return proc, prefix
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("nginx did not start within 30 s")


def stop_nginx(nginx: subprocess.Popen[bytes], prefix: Path) -> None:
    """Graceful quit (it waits for nothing: the benches are done with it), then its files."""
    nginx.send_signal(signal.SIGQUIT)
    try:
        nginx.wait(timeout=10)
    except subprocess.TimeoutExpired:
        nginx.kill()
    shutil.rmtree(prefix, ignore_errors=True)


# ----- phases (each in its own child process) ----------------------------------------------


def make_config(n: int, interval: float, tmp: str, listen: str = "127.0.0.1:0",
                poller_processes: int = 0) -> Any:
    from nodewatch.config import NodeConfig, format_duration, load_config

    cfg = load_config(None, {
        "coordinator.poller_processes": poller_processes,
        "detection.healthy_interval": format_duration(interval),
        "detection.unhealthy_interval": format_duration(min(5.0, interval)),
        "detection.startup_grace": "1s",
        "coordinator.store": f"sqlite:///{tmp}/state.db",
        "coordinator.listen": listen,
    })
    cfg.nodes = [NodeConfig(id=f"n{i}", address=a) for i, a in enumerate(addresses(n))]
    return cfg


async def coordinator_phase(args: argparse.Namespace) -> dict[str, Any]:
    from nodewatch.coordinator.service import Coordinator
    from nodewatch.store.open import open_store

    tmp = tempfile.mkdtemp(prefix="nw-coord-")
    cfg = make_config(args.nodes, args.interval, tmp, poller_processes=args.poller_processes)
    coord = Coordinator(cfg, open_store(cfg.coordinator.store))
    await coord.start()
    try:
        from nodewatch.coordinator.run import tune_gc

        tune_gc()  # what the coordinator process does after loading its state
    except ImportError:
        pass
    try:
        # Warm-up: every node checked at least twice (connections open, nodes healthy).
        await asyncio.sleep(args.warmup)
        scheduler = coord.poller._scheduler
        scheduler.lateness.reset()
        pids = worker_pids(coord)
        restarts0 = getattr(coord.probe, "restarts", 0)
        workers0 = sum(process_cpu(pid) for pid in pids)
        checks0, cpu0, t0 = coord.checks, cpu_time(), time.perf_counter()
        await asyncio.sleep(args.window)
        checks, cpu, wall = coord.checks - checks0, cpu_time() - cpu0, time.perf_counter() - t0
        workers_cpu = sum(process_cpu(pid) for pid in pids) - workers0
        stats = coord.poller.stats()
        counts = coord.cluster.counts()
        return {"phase": "coordinator", "nodes": args.nodes, "rate": args.nodes / args.interval,
                "checks": checks, "wall": wall, "cpu": cpu + workers_cpu, "main_cpu": cpu,
                "rss_mb": rss_mb() + sum(rss_mb(pid) for pid in pids),
                "processes": len(pids) or 1, "checks_lost": stats["checks_lost"],
                "restarts": getattr(coord.probe, "restarts", 0) - restarts0,
                "lateness_p50": stats["lateness_p50"], "lateness_p99": stats["lateness_p99"],
                "lateness_max": stats["lateness_max"], "healthy": counts["healthy"],
                "failures": stats["failures"]}
    finally:
        await coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def bare_phase(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import msgspec
    from yarl import URL

    from nodewatch.protocol import HealthBody

    decoder = msgspec.json.Decoder(HealthBody)
    urls = [URL(f"http://{a}/health", encoded=True) for a in addresses(args.nodes)]
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=0,
                                     keepalive_timeout=300)
    done = failures = 0
    stop_at = 0.0
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        position = 0

        async def worker() -> None:
            nonlocal done, failures, position
            timeout = aiohttp.ClientTimeout(total=3.0)
            while time.perf_counter() < stop_at:
                url = urls[position % len(urls)]
                position += 1
                try:
                    async with session.get(url, timeout=timeout) as response:
                        decoder.decode(await response.read())
                    done += 1
                except Exception:
                    failures += 1

        stop_at = time.perf_counter() + args.warmup + args.window
        tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        done0, cpu0, t0 = done, cpu_time(), time.perf_counter()
        await asyncio.sleep(args.window)
        checks, cpu, wall = done - done0, cpu_time() - cpu0, time.perf_counter() - t0
        await asyncio.gather(*tasks)
    return {"phase": "bare", "nodes": args.nodes, "checks": checks, "wall": wall, "cpu": cpu,
            "rss_mb": rss_mb(), "failures": failures}


async def handoff_phase(args: argparse.Namespace) -> dict[str, Any]:
    """The bare loop through ``ProcessProbe.check``: what one hand-off costs the coordinator
    process, without the core, next to what the workers pay for the HTTP check itself."""
    from nodewatch.coordinator.probe_pool import ProcessProbe

    targets = addresses(args.nodes)
    probe = ProcessProbe(processes=args.poller_processes, timeout=3.0, connect_timeout=1.0,
                         max_bytes=65536, concurrency=args.concurrency, keepalive_timeout=300)
    await probe.open()
    pids = [pid for pid in probe.pids if pid is not None]
    done = failures = position = 0
    stop_at = time.perf_counter() + args.warmup + args.window

    async def worker() -> None:
        nonlocal done, failures, position
        while time.perf_counter() < stop_at:
            i = position % len(targets)
            position += 1
            result = await probe.check(f"n{i}", targets[i])
            done += 1
            failures += not result.ok

    try:
        tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        workers0 = sum(process_cpu(pid) for pid in pids)
        done0, cpu0, t0 = done, cpu_time(), time.perf_counter()
        await asyncio.sleep(args.window)
        checks, cpu, wall = done - done0, cpu_time() - cpu0, time.perf_counter() - t0
        workers_cpu = sum(process_cpu(pid) for pid in pids) - workers0
        await asyncio.gather(*tasks)
    finally:
        await probe.aclose()
    return {"phase": "handoff", "nodes": args.nodes, "checks": checks, "wall": wall,
            "cpu": cpu, "workers_cpu": workers_cpu, "failures": failures}


HEARTBEAT_LUA = """
counter = 0
request = function()
  counter = counter + 1
  local body = string.format(
    '{"node_id":"n%d","incarnation":1,"seq":%d,"ts":%d.0,"status":"ok",' ..
    '"system":{"cpu_percent":10.0,"mem_percent":20.0},"load":{"qps":1,"pending_tasks":0}}',
    counter % NODES, counter + 10, os.time())
  return wrk.format("POST", "/v1/heartbeat", {["Content-Type"] = "application/json"}, body)
end
"""


async def push_phase(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per heartbeat: the same polling coordinator, with and without wrk pushing."""
    from aiohttp import web

    from nodewatch.api.app import build_app
    from nodewatch.coordinator.service import Coordinator
    from nodewatch.store.open import open_store

    tmp = tempfile.mkdtemp(prefix="nw-push-")
    cfg = make_config(args.nodes, args.interval, tmp)
    coord = Coordinator(cfg, open_store(cfg.coordinator.store))
    await coord.start()
    runner = web.AppRunner(build_app(coord), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", PORT + 1)
    await site.start()
    script = Path(tmp) / "hb.lua"
    script.write_text(HEARTBEAT_LUA.replace("NODES", str(args.nodes)))
    try:
        await asyncio.sleep(args.warmup)
        checks0, cpu0, t0 = coord.checks, cpu_time(), time.perf_counter()
        await asyncio.sleep(args.window)
        polls, poll_cpu = coord.checks - checks0, cpu_time() - cpu0
        poll_wall = time.perf_counter() - t0
        checks0, cpu0, t0 = coord.checks, cpu_time(), time.perf_counter()
        wrk = await asyncio.create_subprocess_exec(
            "/usr/bin/wrk", "-t1", f"-c{args.push_connections}", f"-d{args.window:g}s",
            "-s", str(script), f"http://127.0.0.1:{PORT + 1}/", stdout=subprocess.PIPE)
        out, _ = await wrk.communicate()
        cpu, wall = cpu_time() - cpu0, time.perf_counter() - t0
        polls2 = coord.checks - checks0
        text = out.decode()
        match = re.search(r"(\d+) requests in", text)
        pushed = int(match.group(1)) if match else 0
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        # The polls' share of the CPU, at the rate measured without pushes, comes off.
        per_poll = poll_cpu / max(polls, 1)
        push_cpu = cpu - polls2 * per_poll
        return {"phase": "push", "nodes": args.nodes, "heartbeats": pushed, "wall": wall,
                "heartbeats_per_s": pushed / wall, "cpu_per_heartbeat_us":
                push_cpu / max(pushed, 1) * 1e6, "cpu_per_poll_us": per_poll * 1e6,
                "poll_wall": poll_wall, "non_2xx": int(non2xx.group(1)) if non2xx else 0}
    finally:
        await runner.cleanup()
        await coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run_phase(args: argparse.Namespace) -> None:
    import uvloop

    raise_nofile()
    phase = {"coordinator": coordinator_phase, "bare": bare_phase, "push": push_phase,
             "handoff": handoff_phase}
    result = uvloop.run(phase[args.phase](args))
    print(json.dumps(result), flush=True)


def child(phase: str, nodes: int, args: argparse.Namespace, interval: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--nodes", str(nodes),
           "--interval", str(interval), "--window", str(args.window), "--warmup",
           str(args.warmup if phase != "coordinator" else max(args.warmup, 2.5 * interval)),
           "--concurrency", str(args.concurrency),
           "--push-connections", str(args.push_connections),
           "--poller-processes", str(args.poller_processes)]
    limit = args.window + args.warmup + 5 * interval + 120
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} phase failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_wrk(seconds: float) -> float:
    out = subprocess.run(["/usr/bin/wrk", "-t2", "-c256", f"-d{seconds:g}s",
                          f"http://{loopback(0)}:{PORT}/health"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def parse_seconds(text: str) -> float:
    from nodewatch.config import parse_duration

    return float(parse_duration(text)) if text[-1].isalpha() else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1000,5000,10000")
    parser.add_argument("--interval", default="5s", help="healthy_interval, e.g. 5s or 2s")
    parser.add_argument("--window", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--push-connections", type=int, default=64)
    parser.add_argument("--push-nodes", type=int, default=1000)
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--poller-processes", type=int, default=0,
                        help="[coordinator] poller_processes (0 or 1: checks in-process)")
    parser.add_argument("--phase", choices=["coordinator", "bare", "push", "handoff"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.interval = parse_seconds(str(args.interval))
    if args.phase:
        args.nodes = int(args.nodes)
        run_phase(args)
        return
    sizes = [int(x) for x in args.nodes.split(",")]
    limit = raise_nofile()
    if limit < max(sizes) + 1000:
        print(f"warning: RLIMIT_NOFILE is {limit}; {max(sizes)} nodes need more", flush=True)
    nginx, prefix = start_nginx(max(sizes), args.nginx_workers)
    try:
        workers = nginx_workers_for(max(sizes), args.nginx_workers)
        print(f"nginx on {max(sizes)} loopback addresses (:{PORT}, {workers} "
              f"worker(s)); healthy_interval {args.interval:g}s; window {args.window:g}s; "
              f"poller_processes {args.poller_processes}; "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
        header = (f"{'nodes':>6} {'procs':>5} {'rate':>6} {'achieved':>9} {'us/check':>9} "
                  f"{'main us':>8} "
                  f"{'ms/1k checks':>12} {'lateness p99':>12} {'RSS MB':>7} {'bare/s':>7} "
                  f"{'bare us':>8} {'CPU ratio':>9} {'core%/1k nodes':>14}")
        print(header, flush=True)
        for n in sizes:
            c = child("coordinator", n, args, args.interval)
            b = child("bare", n, args, args.interval)
            per_check = c["cpu"] / max(c["checks"], 1) * 1e6
            bare_per_check = b["cpu"] / max(b["checks"], 1) * 1e6
            achieved = c["checks"] / c["wall"]
            core_share = per_check * 1e-6 * (1000 / args.interval) * 100
            main_per_check = c["main_cpu"] / max(c["checks"], 1) * 1e6
            print(f"{n:>6} {c['processes']:>5} {c['rate']:>6.0f} {achieved:>9.0f} "
                  f"{per_check:>9.1f} {main_per_check:>8.1f} "
                  f"{per_check:>12.1f} {c['lateness_p99'] * 1000:>10.0f}ms "
                  f"{c['rss_mb']:>7.0f} {b['checks'] / b['wall']:>7.0f} {bare_per_check:>8.1f} "
                  f"{per_check / bare_per_check:>8.2f}x {core_share:>13.2f}%", flush=True)
            extra = {k: c[k] for k in ("healthy", "failures", "lateness_p50", "lateness_max",
                                       "checks_lost", "restarts")}
            print(f"       detail: {json.dumps(extra)}; bare failures {b['failures']}",
                  flush=True)
        if args.poller_processes > 1:
            h = child("handoff", max(sizes), args, args.interval)
            print(f"handoff {args.poller_processes} workers, bare loop through ProcessProbe: "
                  f"{h['checks'] / h['wall']:.0f} checks/s, coordinator process "
                  f"{h['cpu'] / max(h['checks'], 1) * 1e6:.1f} us per check (the hand-off "
                  f"alone), workers {h['workers_cpu'] / max(h['checks'], 1) * 1e6:.1f} us per "
                  f"check; failures {h['failures']}", flush=True)
        push = child("push", args.push_nodes, args, max(args.interval, 5.0))
        print(f"push   {push['nodes']} nodes: {push['heartbeats_per_s']:.0f} heartbeats/s "
              f"(wrk, {args.push_connections} conns, non-2xx {push['non_2xx']}): "
              f"{push['cpu_per_heartbeat_us']:.1f} us coordinator CPU per heartbeat vs "
              f"{push['cpu_per_poll_us']:.1f} us per poll at low rate", flush=True)
        ceiling = run_wrk(min(args.window, 10.0))
        print(f"wrk    ceiling against one nginx address: {ceiling:,.0f} requests/s", flush=True)
    finally:
        stop_nginx(nginx, prefix)


if __name__ == "__main__":
    main()
