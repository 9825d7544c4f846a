"""The Grafana dashboard in deploy/grafana: every metric its queries use is one a real
coordinator exposes on /metrics (as exposed: counters with ``_total``, histograms with
``_bucket``/``_sum``/``_count``), and a real Prometheus scraping that coordinator evaluates every
query without error. Grafana itself does not run; its provisioning files are checked for
what Grafana reads from them."""

from __future__ import annotations

import json
import re
import signal
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.e2e.test_prometheus import _start, _stop
from tests.helpers import free_port, require_binary, wait_until

pytestmark = pytest.mark.slow

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# What Grafana substitutes before a query reaches Prometheus ("All" of the instance variable).
VARIABLES = {"$instance": ".+"}
FAST = """
[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
timeout = "300ms"
connect_timeout = "200ms"
startup_grace = "0"

[agent]
sample_interval = "1s"

[[actions]]
type = "exec"
on = ["unhealthy"]
command = ["true"]
"""
PROMETHEUS_YML = """
global:
  scrape_interval: 1s
  scrape_timeout: 800ms
scrape_configs:
  - job_name: nodewatch-coordinator
    static_configs:
      - targets: [{target}]
"""


def dashboard() -> dict[str, Any]:
    return dict(json.loads((GRAFANA / "nodewatch.json").read_text()))


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    doc = dashboard()
    found = [t["expr"] for p in doc["panels"] for t in p.get("targets", ())]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            match = re.match(r"label_values\((\w+)", variable["query"]["query"])
            assert match, variable
            found.append(match.group(1))
    return found


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bnodewatch_[a-z0-9_]+\b", expr))


def substituted(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("grafana")
    with LocalCluster(workdir=tmp, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=FAST) as c:
        c.start_coordinator()
        for i in (1, 2):
            host = f"127.0.11.{i}"
            c.start_agent(f"web-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: len([n for n in c.nodes() if n["health"] == "healthy"]) == 2,
                   timeout=20, message="two healthy nodes")
        # One confirmed failure, so that detection latency and actions have a value.
        c.agents["web-2"].signal(signal.SIGKILL)
        wait_until(lambda: (c.node("web-2") or {}).get("health") == "unhealthy", timeout=20,
                   message="web-2 unhealthy")
        yield c


def exposed(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_dashboard_covers_what_operators_watch_and_parses() -> None:
    doc = dashboard()
    assert doc["uid"] == "nodewatch" and doc["schemaVersion"] >= 30
    titles = " / ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("health", "detection latency", "checks per second", "loop lag", "actions",
                  "store"):
        assert topic in titles, topic
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel


def test_provisioning_points_grafana_at_prometheus_and_the_dashboard() -> None:
    datasource = (GRAFANA / "provisioning" / "datasources" / "nodewatch.yaml").read_text()
    assert "apiVersion: 1" in datasource and "type: prometheus" in datasource
    assert re.search(r"url: http://\S+:9090", datasource)
    dashboards = (GRAFANA / "provisioning" / "dashboards" / "nodewatch.yaml").read_text()
    assert "type: file" in dashboards and re.search(r"path: /\S+", dashboards)


def test_every_metric_the_dashboard_queries_is_exposed_by_a_real_coordinator(
    cluster: LocalCluster,
) -> None:
    names = exposed(cluster.url)
    used = set().union(*(metric_names(e) for e in expressions()))
    assert used, "no metric found in the dashboard"
    missing = sorted(used - names)
    assert not missing, f"the dashboard queries metrics /metrics does not expose: {missing}"


def test_a_real_prometheus_evaluates_every_query_of_the_dashboard(
    cluster: LocalCluster, tmp_path: Path,
) -> None:
    binary = require_binary("prometheus")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    target = cluster.coordinator_listen
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_YML.format(target=json.dumps(target)))
    prometheus = _start([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")

    def query(expr: str) -> dict[str, Any]:
        status, body = http_json(f"{api}/api/v1/query?query={urllib.parse.quote(expr)}")
        assert isinstance(body, dict), (status, body)
        return body

    def scraped_twice() -> bool:
        try:
            body = query("count_over_time(nodewatch_checks_total[1m])")
        except OSError:
            return False
        result = body.get("data", {}).get("result", [])
        return bool(result) and float(result[0]["value"][1]) >= 2

    try:
        wait_until(scraped_twice, timeout=45, interval=0.25,
                   message="Prometheus scraped the coordinator twice\n"
                           f"{(tmp_path / 'prometheus.log').read_text()[-1500:]}")
        for expr in expressions():
            body = query(substituted(expr))
            assert body["status"] == "success", f"{expr}: {body}"
            assert "warnings" not in body, f"{expr}: {body['warnings']}"
        # The figures behind two panels are there: one confirmation, one action that ran.
        detected = query(substituted(
            'sum(nodewatch_detection_seconds_count{instance=~"$instance"})'))
        assert float(detected["data"]["result"][0]["value"][1]) >= 1
        wait_until(lambda: query('nodewatch_actions_total{result="succeeded"}')["data"]["result"]
                   and float(query('nodewatch_actions_total{result="succeeded"}')["data"]
                             ["result"][0]["value"][1]) >= 1, timeout=15, interval=0.25,
                   message="the exec action counted as succeeded")
    finally:
        _stop(prometheus)
