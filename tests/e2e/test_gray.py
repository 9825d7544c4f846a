"""Gray failures end to end (issue 15): a real coordinator, ten real agents and a real haproxy.

One agent's application pushes ``error_rate`` 0.4 (``PUT /metrics/load``) while nine push
0.002: the node stays healthy, becomes an unschedulable outlier with the figures in its reason
and an ``outlier`` event, is drained in haproxy, and returns (READY) once its figures are back
in line after its back-off. An observer posting counts takes out a node whose agent reports
nothing wrong, and so does HAProxy's own ``show stat`` with nobody posting anything: its
backends are small applications, one answering 500 to 30 % of the requests that this test's
bounded load loop sends through HAProxy. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from nodewatch.cli.commands import main
from nodewatch.cli.processes import LocalCluster, http_json
from nodewatch.testing import ErrorBackends, LoadLoop
from tests.e2e.test_respond import addresses, profile, wait_all_healthy
from tests.helpers import free_port, wait_until
from tests.respond.servers import Haproxy, running

IDS = [f"web-{i}" for i in range(10)]
OUTLIERS = """
[outliers]
base_ejection_time = "3s"
clear_after = "1s"

[agent]
sample_interval = "1s"
heartbeat_interval = "500ms"
"""


def push_load(c: LocalCluster, node_id: str, load: dict[str, float]) -> None:
    status, body = http_json(f"http://{c.agents[node_id].address}/metrics/load", "PUT", load)
    assert status == 200, body


def outlier_events(c: LocalCluster, node_id: str) -> list[dict[str, Any]]:
    return [e for e in c.events() if e["node_id"] == node_id
            and e["kind"] in ("outlier", "outlier_cleared")]


def test_an_agent_reporting_40_percent_errors_is_ejected_healthy_then_returns(
        tmp_path: Path) -> None:
    addrs = dict(zip(IDS, addresses("127.0.21", 10), strict=True))
    lb = Haproxy(tmp_path / "haproxy", addrs).start()
    actions = f"""
[[actions]]
type = "haproxy"
socket = "{lb.socket}"
backend = "be"
timeout = "2s"
"""
    text = profile().replace("[agent]\nsample_interval = \"1s\"\n", "") + OUTLIERS + actions
    with running(lb), LocalCluster(workdir=tmp_path / "cluster",
                                   coordinator_listen=f"127.0.0.1:{free_port()}",
                                   config_text=text) as c:
        c.start_coordinator()
        for node_id, address in addrs.items():
            c.start_agent(node_id, address)
        wait_all_healthy(c, 10)
        for node_id in IDS:
            push_load(c, node_id, {"error_rate": 0.4 if node_id == "web-3" else 0.002})

        wait_until(lambda: outlier_events(c, "web-3"), timeout=15.0,
                   message="an outlier event for web-3")
        [event] = outlier_events(c, "web-3")
        assert event["kind"] == "outlier"
        assert "errors 40 % vs group median 0.2 % over 5s, 1 observer (agent)" \
            in event["reason"]
        node = c.node("web-3") or {}
        assert node["health"] == "healthy" and node["schedulable"] is False
        assert node["outlier"]["ejections"] == 1
        wait_until(lambda: lb.states().get("web-3") == "DRAIN", timeout=10.0,
                   message="web-3 drained in haproxy")
        assert all((c.node(i) or {}).get("schedulable") for i in IDS if i != "web-3")
        # The CLI shows the verdict: web-3's row says outlier, its reason the figures.
        shown = CliRunner().invoke(main, ["status", "--coordinator", c.url],
                                   env={"COLUMNS": "250"})  # type: ignore[arg-type]
        assert shown.exit_code == 0, shown.output
        [row] = [line for line in shown.output.splitlines() if line.startswith("web-3")]
        assert "outlier" in row and "errors 40 %" in row, shown.output
        assert not any("outlier" in line for line in shown.output.splitlines()
                       if line.startswith(("web-1 ", "web-2 ")))

        push_load(c, "web-3", {"error_rate": 0.002})  # the application recovered
        wait_until(lambda: (c.node("web-3") or {}).get("schedulable"), timeout=20.0,
                   message="web-3 schedulable again")
        assert [e["kind"] for e in outlier_events(c, "web-3")] == ["outlier", "outlier_cleared"]
        wait_until(lambda: lb.states().get("web-3") == "READY", timeout=10.0,
                   message="web-3 ready in haproxy")


def test_an_observer_takes_out_a_node_whose_agent_reports_nothing_wrong(tmp_path: Path) -> None:
    text = profile().replace("[agent]\nsample_interval = \"1s\"\n", "") + OUTLIERS + """
[coordinator]
observer_token = "lb-secret"
"""
    with LocalCluster(workdir=tmp_path / "cluster", coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=text) as c:
        c.start_coordinator()
        for node_id, address in zip(IDS, addresses("127.0.22", 10), strict=True):
            c.start_agent(node_id, address)
        wait_all_healthy(c, 10)

        def observe() -> bool:
            status, body = http_json(
                f"{c.url}/v1/observations", "POST",
                {"source": "lb-a", "window": 0.5, "observations": [
                    {"node_id": n, "requests": 60, "errors": 30 if n == "web-7" else 0}
                    for n in IDS]}, token="lb-secret")
            assert status == 200, body
            return bool(outlier_events(c, "web-7"))

        wait_until(observe, timeout=15.0, interval=0.5, message="web-7 ejected by its callers")
        node = c.node("web-7") or {}
        assert node["health"] == "healthy" and node["schedulable"] is False
        assert node["load"].get("error_rate", 0) == 0  # its agent saw nothing wrong
        assert "errors 50 % vs group median 0 %" in node["outlier"]["reason"]
        assert "(lb-a)" in node["outlier"]["reason"]


def test_haproxy_counters_alone_take_out_a_node_whose_agent_reports_nothing_wrong(
        tmp_path: Path) -> None:
    apps = ErrorBackends(IDS).start()
    lb = Haproxy(tmp_path / "haproxy", apps.addresses)  # servers named by node id
    text = profile().replace("[agent]\nsample_interval = \"1s\"\n", "") + OUTLIERS + f"""
[[actions]]
type = "haproxy"
socket = "{lb.socket}"
backend = "be"
timeout = "2s"
observe_interval = "500ms"
"""
    # 20 requests per node in the 5 s window are enough to judge; the loop sends ~80 a second.
    text = text.replace("[outliers]\n", "[outliers]\nmin_requests = 20\n")
    with running(apps, lb.start()), LocalCluster(
            workdir=tmp_path / "cluster", coordinator_listen=f"127.0.0.1:{free_port()}",
            config_text=text) as c:
        c.start_coordinator()
        for node_id, address in zip(IDS, addresses("127.0.23", 10), strict=True):
            c.start_agent(node_id, address)
        wait_all_healthy(c, 10)
        wait_until(lambda: set(lb.states().values()) == {"READY"}, timeout=10.0,
                   message="every server ready in haproxy")
        with LoadLoop(lb.url, rate=80.0, max_requests=8_000, max_seconds=90.0) as load:
            apps.rates["web-4"] = 0.3
            wait_until(lambda: outlier_events(c, "web-4"), timeout=20.0,
                       message="web-4 ejected by HAProxy's counters")
            [event] = outlier_events(c, "web-4")
            assert "1 observer (haproxy:be)" in event["reason"], event["reason"]
            node = c.node("web-4") or {}
            assert node["health"] == "healthy" and node["schedulable"] is False
            assert node["load"].get("error_rate", 0) == 0  # its agent saw nothing wrong
            wait_until(lambda: lb.states().get("web-4") == "DRAIN", timeout=10.0,
                       message="web-4 drained in haproxy")
            assert all((c.node(i) or {}).get("schedulable") for i in IDS if i != "web-4")

            apps.rates["web-4"] = 0.0  # the application recovered
            wait_until(lambda: (c.node("web-4") or {}).get("schedulable"), timeout=20.0,
                       message="web-4 schedulable again")
            wait_until(lambda: lb.states().get("web-4") == "READY", timeout=10.0,
                       message="web-4 ready in haproxy")
            served = apps.served[("web-4", 200)]
            wait_until(lambda: apps.served[("web-4", 200)] > served + 10, timeout=10.0,
                       message="web-4 serving again")
        assert [e["kind"] for e in outlier_events(c, "web-4")] == ["outlier", "outlier_cleared"]
        assert load.statuses[200] > 0 and set(load.statuses) <= {200, 500}
