"""Agent footprint, side by side on loopback: our agent (``nodewatch agent`` at default
sampling), Debian's prometheus-node-exporter, and a minimal aiohttp app (the floor for any
Python agent). Prints RSS, idle CPU, requests/s and CPU per request, and the ratios against
the goals. Then the connection count at scale: --sockets loopback connections held open, how
long until an agent sampling every second shows them in /health, and the CPU of one count by
/proc/net/snmp against one walk of /proc/net/tcp{,6}, in the same run. A script that prints
figures; nothing here is asserted by the test suite.

    .venv/bin/python bench/agent_footprint.py [--idle 60] [--duration 10] [--connections 16]
        [--sockets 10000] [--sockets-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodewatch.collect.proc import count_curr_estab_tables, read_curr_estab
from nodewatch.testing import free_port

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

MINIMAL_APP = r"""
import sys
from aiohttp import web
BODY = b'{"status":"ok","node_id":"minimal","seq":1}'
async def root(request):
    return web.Response(body=BODY, content_type="application/json")
app = web.Application()
app.router.add_get("/", root)
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

# The server ends of the socket row, in their own process: with both ends here, 10,000
# connections would need 20,000 descriptors. Accepts until stdin closes, then closes them all.
SOCKET_HOLDER = r"""
import resource, socket, sys, threading
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
held = []
def accept():
    while True:
        try:
            held.append(listener.accept()[0])
        except OSError:
            return
threading.Thread(target=accept, daemon=True).start()
sys.stdin.read()
listener.close()
for sock in held:
    sock.close()
"""


@dataclass
class Target:
    name: str
    argv: list[str]
    port: int
    paths: list[str]
    process: subprocess.Popen[bytes] | None = None
    rss_idle: float = 0.0
    rss_loaded: float = 0.0
    idle_cpu: float = 0.0
    load: dict[str, tuple[float, float]] = field(default_factory=dict)  # path: (rps, cpu/req)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 1e6


def wait_serving(port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                if sock.recv(12).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing serves 127.0.0.1:{port}{path} after {timeout}s")


def ensure_node_exporter() -> None:
    if Path(NODE_EXPORTER).exists():
        return
    print("installing prometheus-node-exporter with apt-get ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "prometheus-node-exporter"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                   stdout=subprocess.DEVNULL)


def health_connections(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
        return int(json.load(response)["system"]["connections"])


def cpu_per_read(read: Callable[[], object], repeat: int) -> float:
    """Thread CPU seconds of one call, the mean over ``repeat`` calls."""
    started = time.thread_time()
    for _ in range(repeat):
        read()
    return (time.thread_time() - started) / repeat


def socket_row(nodewatch: str, sockets: int, open_limit: float, hold: float,
               show_limit: float = 60.0) -> None:
    """Open ``sockets`` loopback connections, time /health catching up, price both counts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = sockets + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    sockets = min(sockets, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256)
    port = free_port()
    state_dir = tempfile.mkdtemp(prefix="nodewatch-bench-sockets-")
    agent = subprocess.Popen(
        [nodewatch, "agent", "--node-id", "bench-sockets", "--listen", f"127.0.0.1:{port}",
         "--state-dir", state_dir, "--sample-interval", "1s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "NODEWATCH_LOG_LEVEL": "WARNING"})
    holder = subprocess.Popen([sys.executable, "-c", SOCKET_HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        wait_serving(port, "/health")
        assert holder.stdout is not None
        target = ("127.0.0.1", int(holder.stdout.readline()))
        baseline = health_connections(port)
        print(f"opening {sockets} loopback connections ...", flush=True)
        started = time.monotonic()
        deadline = started + open_limit
        while len(clients) < sockets and time.monotonic() < deadline:
            clients.append(socket.create_connection(target, timeout=5))
        opened = time.monotonic()
        # Both ends are in this network namespace; other processes open and close a few
        # sockets meanwhile (the baseline itself may hold some), hence the slack.
        expected = baseline + 2 * len(clients) - max(2 * len(clients) // 100, 16)
        shown = None
        while time.monotonic() < opened + show_limit:
            if health_connections(port) >= expected:
                shown = time.monotonic() - opened
                break
            time.sleep(0.05)
        # Idle CPU with the sockets held: the agent samples them every second.
        cpu_before = cpu_seconds(agent.pid)
        time.sleep(hold)
        agent_cpu = (cpu_seconds(agent.pid) - cpu_before) / hold
        counter = read_curr_estab()
        snmp_cpu = cpu_per_read(read_curr_estab, 200)
        tables_cpu = cpu_per_read(count_curr_estab_tables, 5)
        tables = count_curr_estab_tables()
    finally:
        for sock in clients:
            sock.close()
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(30)
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        shutil.rmtree(state_dir, ignore_errors=True)
    print()
    print(f"{'sockets':>8}{'open s':>8}{'/health shows them after':>26}{'idle CPU %':>12}"
          f"{'snmp ms':>9}{'tables ms':>11}{'tables/snmp':>13}")
    shows = f"{shown:.2f}s (sample 1s)" if shown is not None else f"not in {show_limit:g}s"
    print(f"{len(clients):>8}{opened - started:>8.2f}{shows:>26}{100 * agent_cpu:>12.3f}"
          f"{snmp_cpu * 1e3:>9.3f}{tables_cpu * 1e3:>11.2f}"
          f"{tables_cpu / max(snmp_cpu, 1e-9):>12.0f}x")
    print(f"  idle CPU over {hold:g}s held (resolution {100.0 / TICK / hold:.3f}%); "
          f"snmp and tables ms: CPU of one read in this process")
    print(f"  counts while held: /health >= {expected} expected; CurrEstab {counter}, "
          f"tables {tables}; the old budgeted walk at {tables_cpu * 1e3:.1f} ms would be "
          f"due every {tables_cpu / 0.0002:.0f}s")


def run_wrk(url: str, duration: int, connections: int) -> tuple[float, int]:
    """Requests/s and total requests from one bounded wrk run."""
    out = subprocess.run([WRK, "-t1", f"-c{connections}", f"-d{duration}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"  warning: {non2xx.group(1)} non-2xx answers from {url}")
    return rps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=60.0, help="idle period in seconds")
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds per endpoint")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--sockets", type=int, default=10_000,
                        help="loopback connections held open for the connection-count row")
    parser.add_argument("--open-limit", type=float, default=60.0,
                        help="seconds allowed for opening them")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds the agent's idle CPU is measured with them open")
    parser.add_argument("--sockets-only", action="store_true",
                        help="only the connection-count row (no node_exporter, no wrk)")
    args = parser.parse_args()
    nodewatch = str(Path(sys.executable).with_name("nodewatch"))
    if args.sockets_only:
        socket_row(nodewatch, args.sockets, args.open_limit, args.hold)
        return
    ensure_node_exporter()
    if not Path(WRK).exists():
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    state_dir = tempfile.mkdtemp(prefix="nodewatch-bench-")
    ours_port, ne_port, min_port = free_port(), free_port(), free_port()
    targets = [
        Target("nodewatch agent", [nodewatch, "agent", "--node-id", "bench", "--listen",
                                   f"127.0.0.1:{ours_port}", "--state-dir", state_dir],
               ours_port, ["/health", "/metrics"]),
        Target("node_exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}"],
               ne_port, ["/metrics"]),
        Target("minimal aiohttp", [sys.executable, "-c", MINIMAL_APP, str(min_port)],
               min_port, ["/"]),
    ]
    env = {**os.environ, "NODEWATCH_LOG_LEVEL": "WARNING"}
    try:
        for target in targets:
            target.process = subprocess.Popen(target.argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, env=env)
        for target in targets:
            wait_serving(target.port, target.paths[0])
        time.sleep(2.0)  # let start-up work (imports, first samples) settle
        print(f"idle period: {args.idle:g}s, all three side by side ...", flush=True)
        before = {t.name: cpu_seconds(t.process.pid) for t in targets if t.process}
        time.sleep(args.idle)
        for target in targets:
            assert target.process is not None
            target.idle_cpu = cpu_seconds(target.process.pid) - before[target.name]
            target.rss_idle = rss_mb(target.process.pid)
        for target in targets:
            assert target.process is not None
            for path in target.paths:
                print(f"wrk {target.name} {path} ...", flush=True)
                start_cpu = cpu_seconds(target.process.pid)
                rps, total = run_wrk(f"http://127.0.0.1:{target.port}{path}", args.duration,
                                     args.connections)
                used = cpu_seconds(target.process.pid) - start_cpu
                target.load[path] = (rps, used / max(total, 1))
            target.rss_loaded = rss_mb(target.process.pid)
    finally:
        for target in targets:
            if target.process is not None:
                target.process.terminate()
                try:
                    target.process.wait(10)
                except subprocess.TimeoutExpired:
                    target.process.kill()
        shutil.rmtree(state_dir, ignore_errors=True)

    print()
    print(f"{'process':<18}{'RSS idle MB':>12}{'RSS load MB':>12}{'idle CPU %':>11}  "
          f"{'path':<10}{'req/s':>10}{'CPU/req us':>12}")
    for target in targets:
        idle_pct = 100.0 * target.idle_cpu / args.idle
        for i, (path, (rps, per_req)) in enumerate(target.load.items()):
            head = (f"{target.name:<18}{target.rss_idle:>12.1f}{target.rss_loaded:>12.1f}"
                    f"{idle_pct:>11.3f}" if i == 0 else " " * 53)
            print(f"{head}  {path:<10}{rps:>10.0f}{per_req * 1e6:>12.1f}")
    ours, exporter, minimal = targets
    idle_pct = 100.0 * ours.idle_cpu / args.idle
    rss_ratio = ours.rss_loaded / exporter.rss_loaded
    health_ratio = ours.load["/health"][0] / minimal.load["/"][0]
    scrape_ratio = exporter.load["/metrics"][1] / max(ours.load["/metrics"][1], 1e-9)
    print()
    print("goals (ratios from this run):")
    for ok, text in (
        (idle_pct <= 0.1, f"idle CPU {idle_pct:.3f}% of one core (goal <= 0.1%; resolution "
                          f"{100.0 / TICK / args.idle:.3f}%)"),
        (rss_ratio <= 2.0, f"RSS after load {rss_ratio:.2f}x node_exporter's (goal <= 2x)"),
        (health_ratio >= 0.8,
         f"/health {health_ratio:.2f}x the minimal app's requests/s (goal >= 0.8x)"),
        (scrape_ratio >= 10.0,
         f"/metrics {scrape_ratio:.1f}x cheaper per scrape than node_exporter (goal >= 10x)"),
    ):
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    socket_row(nodewatch, args.sockets, args.open_limit, args.hold)


if __name__ == "__main__":
    main()
