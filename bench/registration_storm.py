"""A registration storm: N agents registering within one second against a real coordinator.

What a coordinator restart looks like when every agent re-registers at once (issue 14, point
6). A real coordinator process (``nodewatch coordinator``: SQLite store in a temp dir, agent
token, ``[coordinator] max_registrations_per_second`` = ``--rate``, burst ``--burst``) is sent
``--nodes`` registrations spread evenly over ``--window`` seconds, each by the agent's own
client code (``CoordinatorClient.register_until_done``: a 429 is honoured, its Retry-After
plus up to a second of jitter). Printed:

* the floor, measured first in the same run: the same number of cheap ``GET /healthz``
  requests sent the same way, and the time until every one was answered;
* the storm: time until every node is enrolled (every client has its answer; ``/v1/nodes``
  then counts them), how many 429s were sent, and the coordinator's loop lag, read from
  ``/healthz`` every 0.25 s during the storm (its maximum and last value) against
  ``max_loop_lag``.

The registered addresses are served by one Debian nginx on N loopback addresses (the health
body of ``coordinator_scale.py``, naming each node), so that each enrolled node is polled and
turns healthy like a real one: the storm's figure includes that work, and a third figure is the
time until every node is healthy. With ``--closed-ports`` (or without nginx) the addresses are
closed loopback ports instead (every first poll refused). Every loop is bounded
(``--timeout``). Prints figures; nothing is asserted.

    .venv/bin/python bench/registration_storm.py --nodes 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from nodewatch.collect.coordinator_client import CoordinatorClient, RegistrationThrottled
from nodewatch.protocol import RegisterAnswer, RegisterBody, new_credential
from nodewatch.testing import free_port

sys.path.insert(0, str(Path(__file__).parent))
from coordinator_scale import PORT, loopback, start_nginx, stop_nginx  # noqa: E402

TOKEN = "bench-agent-token"


class CountingClient(CoordinatorClient):
    """The agent's client, counting the 429s it was sent, the other refusals and the
    failures (timeouts, connection errors) by type."""

    throttled = 0
    failures: dict[str, int] = {}

    async def register(self, payload: RegisterBody) -> RegisterAnswer:
        try:
            return await super().register(payload)
        except RegistrationThrottled:
            CountingClient.throttled += 1
            raise
        except Exception as exc:
            name = type(exc).__name__
            CountingClient.failures[name] = CountingClient.failures.get(name, 0) + 1
            raise


def start_coordinator(tmp: Path, rate: float, burst: int) -> tuple[subprocess.Popen[bytes], str]:
    listen = f"127.0.0.1:{free_port()}"
    config = tmp / "coordinator.toml"
    config.write_text(f"""
[coordinator]
store = "sqlite:///{tmp}/state.db"
agent_token = "{TOKEN}"
max_registrations_per_second = {rate}
registration_burst = {burst}

[detection]
startup_grace = "1s"
""")
    log = tmp / "coordinator.log"
    proc = subprocess.Popen([sys.executable, "-m", "nodewatch", "coordinator", "--listen", listen,
                             "--config", str(config), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"http://{listen}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("coordinator exited:\n" + log.read_text())
        try:
            subprocess.run([sys.executable, "-c",
                            f"import urllib.request; urllib.request.urlopen('{url}/healthz')"],
                           check=True, capture_output=True, timeout=10)
            return proc, url
        except subprocess.CalledProcessError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("coordinator not up within 60 s")


async def spread(count: int, window: float, job: Any) -> list[Any]:
    """Start ``job(i)`` for i in range(count), evenly over ``window`` seconds."""
    start = time.monotonic()

    async def at(i: int) -> Any:
        delay = start + window * i / count - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await job(i)

    return await asyncio.gather(*(at(i) for i in range(count)))


async def floor(http: aiohttp.ClientSession, url: str, count: int, window: float) -> float:
    async def get(i: int) -> int:
        async with http.get(f"{url}/healthz") as response:
            await response.read()
            return response.status

    started = time.monotonic()
    statuses = await spread(count, window, get)
    took = time.monotonic() - started
    assert all(s in (200, 503) for s in statuses)
    return took


async def watch_lag(http: aiohttp.ClientSession, url: str, seen: list[float],
                    done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            async with http.get(f"{url}/healthz",
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
                seen.append(float((await response.json())["loop_lag"]))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            pass
        try:
            await asyncio.wait_for(done.wait(), 0.25)
        except TimeoutError:
            pass


def address(i: int, served: bool) -> str:
    return f"{loopback(i)}:{PORT}" if served else f"127.0.0.1:{1 + i % 999}"


async def storm(url: str, count: int, window: float, timeout: float,  # noqa: ASYNC109
                served: bool) -> dict[str, Any]:  # (``timeout``: the whole storm's bound)
    # No pool limit: each simulated agent has its own connection, as real agents would (a
    # shared pool would make requests wait for a slot and time out on the client side). Each is
    # closed after its answer: kept open, 10,000 of them plus the coordinator's 10,000 polls
    # exceed the 20,000 descriptors a process may have here, and registrations then fail with
    # EMFILE (a real agent's connection lives in its own process, on its own host).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, \
            aiohttp.ClientSession() as side:
        floor_took = await floor(http, url, count, window)
        await asyncio.sleep(1.0)
        # Each with an enrolment secret of its own, as the agent has (see Agent.start).
        clients = [CountingClient(url, TOKEN, lambda: http, request_timeout=30.0,
                                  credential=new_credential())
                   for _ in range(count)]
        lags: list[float] = []
        done = asyncio.Event()
        watcher = asyncio.create_task(watch_lag(side, url, lags, done))

        async def register(i: int) -> str:
            def body() -> RegisterBody:
                return RegisterBody(node_id=f"n{i}", address=address(i, served),
                                    incarnation=1, version="bench")

            answer = await clients[i].register_until_done(body)
            return answer.decision

        started = time.monotonic()
        answered: list[str] = []

        async def counted(i: int) -> str:
            decision = await register(i)
            answered.append(decision)
            return decision

        try:
            decisions = await asyncio.wait_for(spread(count, window, counted), timeout)
        except TimeoutError:
            decisions = answered  # reported as not all enrolled, with how many were
        finally:
            enrolled_after = time.monotonic() - started
            done.set()
            await watcher
        async with side.get(f"{url}/v1/nodes") as response:
            nodes = len((await response.json())["nodes"])
        healthy_after = float("nan")
        while served and time.monotonic() - started < timeout:
            async with side.get(f"{url}/v1/nodes?health=healthy") as response:
                if len((await response.json())["nodes"]) >= count:
                    healthy_after = time.monotonic() - started
                    break
            await asyncio.sleep(0.25)
        async with side.get(f"{url}/healthz") as response:
            health = await response.json()
    return {"floor": floor_took, "enrolled_after": enrolled_after, "nodes": nodes,
            "healthy_after": healthy_after,
            "new": sum(d == "new" for d in decisions), "throttled": CountingClient.throttled,
            "failures": dict(CountingClient.failures),
            "lag_max": max(lags, default=float("nan")), "lag_samples": len(lags),
            "lag_last": health["loop_lag"], "status": health["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=1.0,
                        help="seconds over which the registrations arrive")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="[coordinator] max_registrations_per_second")
    parser.add_argument("--burst", type=int, default=400, help="[coordinator] registration_burst")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up when not every node is enrolled by then")
    parser.add_argument("--closed-ports", action="store_true",
                        help="register closed loopback ports instead of nginx-served ones")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 50_000:
        raise SystemExit("--nodes must be between 1 and 50000")
    random.seed(1)
    logging.getLogger("nodewatch.agent").setLevel(logging.ERROR)  # 429s are counted instead
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.nodes + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the coordinator inherits it
    served = not args.closed_ports and Path("/usr/sbin/nginx").exists()
    nginx = start_nginx(args.nodes, 1) if served else None
    with tempfile.TemporaryDirectory(prefix="nodewatch-storm-") as tmp:
        proc, url = start_coordinator(Path(tmp), args.rate, args.burst)
        try:
            result = asyncio.run(storm(url, args.nodes, args.window, args.timeout, served))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if nginx is not None:
                stop_nginx(*nginx)
            log_lines = (Path(tmp) / "coordinator.log").read_text(errors="replace").splitlines()
            kinds: dict[str, int] = {}
            for line in log_lines:
                key = line.split(" ", 3)[-1][:70]
                kinds[key] = kinds.get(key, 0) + 1
            for key, count in sorted(kinds.items(), key=lambda kv: -kv[1])[:6]:
                print(f"coordinator log: {count} x {key}", file=sys.stderr)
    n, rate = args.nodes, args.rate
    print(f"registration storm: {n} registrations within {args.window:g}s, admission at "
          f"{rate:g}/s after a burst of {args.burst} (SQLite store)")
    print(f"floor   {n} GET /healthz sent the same way answered in {result['floor']:.2f}s")
    enrolled = ("every node enrolled" if result["new"] == n else
                f"NOT every node enrolled: {result['new']} of {n} within --timeout,")
    print(f"storm   {enrolled} after {result['enrolled_after']:.2f}s "
          f"({result['nodes']} nodes listed, {result['new']} 'new'); "
          f"ideal at the rate {max(0.0, (n - args.burst) / rate):.2f}s; "
          f"{result['throttled']} answers were 429 "
          f"({result['throttled'] / n:.2f} per registration); other failed attempts: "
          f"{result['failures'] or 'none'}")
    if served:
        print(f"healthy every node polled healthy after {result['healthy_after']:.2f}s "
              f"(nginx on {n} loopback addresses; healthy_interval 30 s, rise 2)")
    else:
        print("healthy not measured: the addresses are closed ports")
    print(f"lag     coordinator loop lag max {result['lag_max'] * 1000:.0f} ms over "
          f"{result['lag_samples']} samples of /healthz, {result['lag_last'] * 1000:.0f} ms at "
          f"the end (max_loop_lag 1000 ms); status {result['status']}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
