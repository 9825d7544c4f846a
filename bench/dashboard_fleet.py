"""The dashboard at fleet size: a real coordinator watching 10,000 nodes, the page in headless
Chromium, against the goals of issue 16.

The nodes are cheap: one Debian nginx listens on N loopback addresses (as in
``coordinator_scale.py``) and answers each one's ``/health`` with its own node id, CPU, memory,
load1 and error rate (``map`` on ``$server_addr``); every 97th address answers 503, so the fleet
has unhealthy nodes, and the coordinator's static ``[[nodes]]`` carry ``zone`` and ``rack``
labels. Then, in one run:

1. the coordinator's loop lag (``/healthz`` ``loop_lag``, the max of its last 10 beats)
   sampled for ``--window`` seconds without the page: the floor;
2. the page opened: the first useful view (fleet counts, attention list and the first table
   rows drawn: ``window.nodewatch.timings.firstView``, from navigation start) and all rows;
3. filters applied (a search, a health filter, a label filter, a sort, clear): from the input
   to the next painted frame;
4. script round trips in the open page (``execute_script("return 1")``) while it follows
   changes, and the bytes the page reads per second from the API;
5. the loop lag again for ``--window`` seconds with the page open.

Prints figures beside the goals (first view <= 2 s, a filter <= 200 ms, round trip <= 100 ms,
loop lag with the page <= 20 ms above without); nothing is asserted.

    .venv/bin/python bench/dashboard_fleet.py --nodes 10000
    .venv/bin/python bench/dashboard_fleet.py --nodes 300 --window 5 --keep   # look at it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordinator_scale import loopback, nginx_workers_for

ROOT = Path(__file__).resolve().parents[1]
PORT = 18_472
ZONES = 8
RACKS = 40
BODY = ('{"status":"ok","node_id":"$nw_node","uptime":1.0,"version":"0.1.0","incarnation":1,'
        '"seq":1,"ts":1764000000.0,"reasons":[],"system":{"cpu_percent":$nw_cpu,'
        '"mem_percent":$nw_mem,"load1":$nw_load,"connections":3},'
        '"load":{"qps":$nw_qps,"pending_tasks":0,"error_rate":$nw_err}}')
GOALS = {"first_view_s": 2.0, "filter_ms": 200.0, "round_trip_ms": 100.0, "lag_added_ms": 20.0}


def node_id(i: int) -> str:
    return f"node-{i:05d}"


def labels(i: int) -> dict[str, str]:
    return {"zone": f"z{i % ZONES}", "rack": f"r{i % RACKS:02d}"}


def failing(i: int) -> bool:
    return i % 97 == 5


def figures(i: int) -> tuple[float, float, float, float, float]:
    """CPU, memory, load1, qps, error rate of node i: spread, with a hot zone and a few
    erroring nodes, so the heatmap has something to show."""
    cpu = (i * 37) % 70 + (25 if i % ZONES == 3 else 0)
    mem = 30 + (i * 53) % 55
    return (float(min(99, cpu)), float(mem), round(cpu / 25, 2), float(20 + i % 180),
            0.04 if i % 61 == 7 else round((i % 13) / 2000, 4))


# ----- the fleet: nginx on N addresses, a coordinator with N static nodes ------------------


def start_fleet_nginx(n: int, port: int = PORT) -> tuple[subprocess.Popen[bytes], Path]:
    prefix = Path(tempfile.mkdtemp(prefix="nw-dash-nginx-"))
    (prefix / "logs").mkdir()
    maps: dict[str, list[str]] = {k: [] for k in ("node", "cpu", "mem", "load", "qps", "err",
                                                   "bad")}
    for i in range(n):
        host = loopback(i)
        cpu, mem, load, qps, err = figures(i)
        maps["node"].append(f"    {host} {node_id(i)};")
        for key, value in (("cpu", cpu), ("mem", mem), ("load", load), ("qps", qps),
                           ("err", err)):
            maps[key].append(f"    {host} {value};")
        if failing(i):
            maps["bad"].append(f"    {host} 1;")
    blocks = "\n".join(
        f"    map $server_addr $nw_{key} {{\n        default {'0' if key != 'node' else 'x'};\n"
        + "\n".join(lines) + "\n    }" for key, lines in maps.items())
    listens = "\n".join(f"        listen {loopback(i)}:{port} backlog=1024;" for i in range(n))
    conf = f"""
worker_processes {nginx_workers_for(n, 1)};
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
{blocks}
    server {{
{listens}
        default_type application/json;
        location /health {{
            if ($nw_bad) {{ return 503; }}
            return 200 '{BODY}';
        }}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nginx failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection((loopback(n - 1), port), timeout=0.5):
                pass
            pid_file = prefix / "nginx.pid"
            if pid_file.exists() and pid_file.read_text().strip() == str(proc.pid):
                return proc, prefix
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("nginx did not start within 30 s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def fleet_config(n: int, port: int, workdir: Path, interval: str, admin_token: str = "",
                 unhealthy_interval: str = "5s") -> Path:
    lines = ["[coordinator]", f'store = "sqlite:///{workdir}/state.db"']
    if admin_token:
        lines.append(f'admin_token = "{admin_token}"')
    lines += ["", "[detection]", f'healthy_interval = "{interval}"',
              f'unhealthy_interval = "{unhealthy_interval}"',
              'startup_grace = "1s"', ""]
    for i in range(n):
        zone_rack = ", ".join(f'{k} = "{v}"' for k, v in labels(i).items())
        lines += ["[[nodes]]", f'id = "{node_id(i)}"', f'address = "{loopback(i)}:{port}"',
                  f"labels = {{ {zone_rack} }}", ""]
    path = workdir / "coordinator.toml"
    path.write_text("\n".join(lines))
    return path


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def fleet(n: int, workdir: Path, interval: str = "30s", admin_token: str = "",
          port: int = PORT, coordinator_cpus: set[int] | None = None,
          unhealthy_interval: str = "5s") -> Iterator[tuple[str, int]]:
    """nginx answering for n nodes and a coordinator watching them; yields its URL and pid
    once every node was checked once."""
    nginx, prefix = start_fleet_nginx(n, port)
    coordinator = None
    try:
        config = fleet_config(n, port, workdir, interval, admin_token, unhealthy_interval)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen = f"127.0.0.1:{s.getsockname()[1]}"
        log = (workdir / "coordinator.log").open("ab")
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "nodewatch", "coordinator", "--listen", listen, "--config",
             str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=None if coordinator_cpus is None
            else lambda: os.sched_setaffinity(0, coordinator_cpus))
        url = f"http://{listen}"
        deadline = time.monotonic() + 60 + n / 100
        while True:
            if coordinator.poll() is not None:
                raise SystemExit((workdir / "coordinator.log").read_text()[-3000:])
            try:
                summary = get_json(f"{url}/v1/summary")
                if summary["total"] == n and summary["health"]["unknown"] == 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the coordinator did not check all {n} nodes in time")
            time.sleep(0.25)
        yield url, coordinator.pid
    finally:
        if coordinator is not None:
            stop_process(coordinator)
        stop_process(nginx, signal.SIGQUIT)
        shutil.rmtree(prefix, ignore_errors=True)


# ----- the browser --------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="nodewatch-chromium-") as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_script_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


# Set a control's value, fire its event, and answer the time until the next painted frame.
APPLY = """
const [selector, value, kind, done] = arguments;
const t0 = performance.now();
const control = document.querySelector(selector);
if (kind === 'click') control.click();
else { control.value = value; control.dispatchEvent(new Event(kind, {bubbles: true})); }
const sync = performance.now() - t0;
requestAnimationFrame(() => setTimeout(() => done({
  ms: performance.now() - t0, sync, shown: window.nodewatch.state.visible.length}), 0));
"""

FILTERS = (
    ("search", "#search", "node-004", "input"),
    ("search words", "#search", "z3 r1", "input"),
    ("health", "#filter-health", "unhealthy", "change"),
    ("label", "#filter-label", "zone=z5", "change"),
    ("sort by cpu", 'button[data-sort="cpu"]', "", "click"),
    ("search again", "#search", "node-00", "input"),
    ("clear", "#clear-filters", "", "click"),
)


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_lag(url: str, seconds: float, pid: int | None = None) -> tuple[list[float], float]:
    """Loop-lag samples over ``seconds``, and the coordinator's CPU ms per second meanwhile."""
    lags: list[float] = []
    cpu0, t0 = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        lags.append(float(get_json(f"{url}/healthz")["loop_lag"]) * 1000)
        time.sleep(1.0)
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 1000 if pid else 0.0
    return lags, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def api_bytes(driver: Any) -> int:
    return int(driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/v1/') && !e.name.includes('/stream'))"
        ".reduce((a, e) => a + (e.encodedBodySize || 0), 0)"))


def measure(url: str, n: int, window: float, keep: bool, pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"nodes": n}
    sample_lag(url, min(3.0, window))  # let the start-up checks settle
    out["lag_without"], out["cpu_without"] = sample_lag(url, window, pid)
    with chromium() as driver:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        driver.get("data:,")  # the browser itself is up: the view is the page's own time
        started = time.monotonic()
        driver.get(f"{url}/")
        wait_for(lambda: driver.execute_script("return window.nodewatch.timings.allRows"),
                 60 + n / 200, "all rows loaded")
        out["load_wall_s"] = time.monotonic() - started
        timings = driver.execute_script("return window.nodewatch.timings")
        out["first_view_s"] = timings["firstView"] / 1000
        out["all_rows_s"] = timings["allRows"] / 1000
        out["timings"] = timings
        out["navigation"] = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {response: n.responseEnd, dom: n.domContentLoadedEventEnd}")
        shown = driver.execute_script("return window.nodewatch.state.rows.size")
        out["rows"] = shown
        out["filters"] = []
        for name, selector, value, kind in FILTERS:
            if name != "clear":  # each filter on its own, from the whole fleet
                driver.execute_async_script(APPLY, "#clear-filters", "", "click")
            result = driver.execute_async_script(APPLY, selector, value, kind)
            out["filters"].append((name, float(result["ms"]), int(result["shown"]),
                                   float(result["sync"])))
        # Follow changes for a while: round trips and what the page reads from the API.
        time.sleep(3.0)  # past the initial load: what the open page costs from now on
        before_bytes, before = api_bytes(driver), time.monotonic()
        trips: list[float] = []
        lag_with: list[float] = []
        cpu0 = cpu_seconds(pid)
        end = time.monotonic() + window
        next_lag = time.monotonic()
        while time.monotonic() < end:
            t0 = time.perf_counter()
            driver.execute_script("return 1")
            trips.append((time.perf_counter() - t0) * 1000)
            if time.monotonic() >= next_lag:
                lag_with.append(float(get_json(f"{url}/healthz")["loop_lag"]) * 1000)
                next_lag += 1.0
            time.sleep(0.2)
        out["cpu_with"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - before) * 1000
        out["round_trips"] = trips
        out["lag_with"] = lag_with
        out["api_kb_per_s"] = (api_bytes(driver) - before_bytes) / 1024 / (
            time.monotonic() - before)
        # The page away again (a blank page in the same browser): the floor once more, so
        # that drift in a shared machine's load shows instead of counting for the page.
        driver.get("data:,")
        out["lag_after"], out["cpu_after"] = sample_lag(url, window, pid)
        if keep:
            print(f"the page stays open at {url}/ (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    return out


def report(out: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    n = out["nodes"]
    first = out["first_view_s"]
    print(f"nodes {n:,}: the page holds {out['rows']:,} rows; load wall {out['load_wall_s']:.2f}s",
          flush=True)
    t = out["timings"]
    print(f"first useful view  {first:6.2f} s   (goal <= {GOALS['first_view_s']:.0f} s: "
          f"{verdict(first <= GOALS['first_view_s'])}); all rows in the table "
          f"{out['all_rows_s']:.2f} s")
    print(f"  from navigation start: document {out['navigation']['response'] / 1000:.2f} s, "
          f"script running {t['script'] / 1000:.2f} s, fleet counts drawn "
          f"{t['summary'] / 1000:.2f} s, first rows drawn {t['rows'] / 1000:.2f} s")
    worst = max(ms for _, ms, _, _ in out["filters"])
    for name, ms, shown, sync in out["filters"]:
        print(f"filter {name:<13} {ms:7.1f} ms  ({shown:,} rows shown; script {sync:.1f} ms, "
              f"the rest is style, layout and paint)")
    print(f"filter, worst      {worst:7.1f} ms  (goal <= {GOALS['filter_ms']:.0f} ms: "
          f"{verdict(worst <= GOALS['filter_ms'])})")
    trips = out["round_trips"]
    p95 = percentile(trips, 0.95)
    print(f"script round trip  p50 {statistics.median(trips):.1f} ms  p95 {p95:.1f} ms  "
          f"max {max(trips):.1f} ms over {len(trips)}  (goal <= {GOALS['round_trip_ms']:.0f} ms"
          f" at p95: {verdict(p95 <= GOALS['round_trip_ms'])})")
    without = out["lag_without"] + out["lag_after"]
    with_page = out["lag_with"]
    added = statistics.median(with_page) - statistics.median(without)
    print(f"loop lag without the page (before and after)  p50 {statistics.median(without):.1f} ms"
          f"  max {max(without):.1f} ms;  with it  p50 {statistics.median(with_page):.1f} ms  "
          f"max {max(with_page):.1f} ms  (added at p50 {added:+.1f} ms; goal <= "
          f"{GOALS['lag_added_ms']:.0f} ms: {verdict(added <= GOALS['lag_added_ms'])})")
    floor = (out["cpu_without"] + out["cpu_after"]) / 2
    print(f"coordinator CPU  without the page {out['cpu_without']:.0f} / {out['cpu_after']:.0f}"
          f" ms/s (before / after), with it {out['cpu_with']:.0f} ms/s: the open page costs "
          f"about {out['cpu_with'] - floor:+.0f} ms of coordinator CPU per second")
    print(f"the page reads {out['api_kb_per_s']:.1f} KB/s from the API while it follows "
          f"changes (a full /v1/nodes every second would be about "
          f"{n * 0.45:,.0f} KB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--interval", default="30s", help="healthy_interval of the coordinator")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per lag window")
    parser.add_argument("--keep", action="store_true", help="keep the page open at the end")
    parser.add_argument("--json", action="store_true", help="also print the raw figures")
    parser.add_argument("--pin", action="store_true",
                        help="put the coordinator and the browser on separate CPUs (on an "
                             "otherwise idle machine)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    # With --pin, the page and the coordinator on separate CPUs: the loop lag then shows the
    # coordinator's work for the page, not a browser competing for its CPU (on a machine
    # shared with other work, pinning makes the coordinator share its one CPU instead).
    pinned = args.pin and len(cpus) >= 2
    with tempfile.TemporaryDirectory(prefix="nw-dash-") as tmp, \
            fleet(args.nodes, Path(tmp), args.interval,
                  coordinator_cpus={cpus[0]} if pinned else None) as (url, pid):
        if pinned:
            os.sched_setaffinity(0, set(cpus[1:]))  # Chromium inherits it
        print(f"coordinator {url} watching {args.nodes:,} nginx-served nodes "
              f"(healthy_interval {args.interval}); window {args.window:g}s; "
              + (f"coordinator on CPU {cpus[0]}, browser on CPU {cpus[1:]}" if pinned
                 else "not pinned"), flush=True)
        out = measure(url, args.nodes, args.window, args.keep, pid)
        report(out)
        if args.json:
            print(json.dumps(out))


if __name__ == "__main__":
    main()
