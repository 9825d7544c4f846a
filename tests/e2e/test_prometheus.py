"""A real Prometheus (Debian's) discovers real agents through a real coordinator, over
``http_sd_configs`` (``GET /v1/sd/prometheus``) and ``file_sd_configs`` (the file that
``nodewatch sd --file --watch`` keeps fresh), scrapes them, and follows a node's failure."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, interruptible, require_binary, wait_until

pytestmark = pytest.mark.slow

FAST = """
[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
timeout = "300ms"
connect_timeout = "200ms"
startup_grace = "0"

[agent]
sample_interval = "1s"
"""

PROMETHEUS_YML = """
global:
  scrape_interval: 1s
  scrape_timeout: 800ms
scrape_configs:
  - job_name: nodewatch-http
    http_sd_configs:
      - url: {sd_url}
        refresh_interval: 1s
  - job_name: nodewatch-file
    file_sd_configs:
      - files: [{sd_file}]
        refresh_interval: 1s
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(workdir=tmp_path / "cluster", coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=FAST) as c:
        c.start_coordinator()
        for i in (1, 2):
            host = f"127.0.10.{i}"
            c.start_agent(f"web-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: len([n for n in c.nodes() if n["health"] == "healthy"]) == 2,
                   timeout=20, message="two healthy nodes")
        yield c


@pytest.fixture
def prometheus_binary() -> str:
    return require_binary("prometheus")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=interruptible)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _targets(api: str, job: str) -> dict[str, dict[str, Any]]:
    """Prometheus' active targets of ``job`` by node_id."""
    try:
        status, body = http_json(f"{api}/api/v1/targets?state=active")
    except OSError:
        return {}
    if status != 200:
        return {}
    return {t["labels"].get("node_id", "?"): t for t in body["data"]["activeTargets"]
            if t["labels"].get("job") == job}


def _query(api: str, promql: str) -> list[dict[str, Any]]:
    status, body = http_json(f"{api}/api/v1/query?query={urllib.parse.quote(promql)}")
    return list(body["data"]["result"]) if status == 200 else []


def test_prometheus_discovers_scrapes_and_follows_agents_through_nodewatch(
    cluster: LocalCluster, prometheus_binary: str, tmp_path: Path,
) -> None:
    sd_file = tmp_path / "targets.json"
    watcher = _start([sys.executable, "-m", "nodewatch", "sd", "--file", str(sd_file),
                      "--watch", "1s", "--coordinator", cluster.url], tmp_path / "sd.log")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_YML.format(
        sd_url=f"{cluster.url}/v1/sd/prometheus", sd_file=json.dumps(str(sd_file))))
    prometheus = _start([prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
    try:
        wait_until(lambda: sd_file.exists() and len(json.loads(sd_file.read_text())) == 2,
                   timeout=10, message="nodewatch sd writes both nodes")
        agents = {node_id: proc.address for node_id, proc in cluster.agents.items()}
        for job in ("nodewatch-http", "nodewatch-file"):
            def all_up(job: str = job) -> bool:
                found = _targets(api, job)
                return sorted(found) == ["web-1", "web-2"] and all(
                    t["health"] == "up" for t in found.values())
            wait_until(all_up, timeout=45, interval=0.25,
                       message=f"{job}: both agents discovered and up\n"
                               f"{(tmp_path / 'prometheus.log').read_text()[-1500:]}")
            for node_id, target in _targets(api, job).items():
                assert target["scrapeUrl"] == f"http://{agents[node_id]}/metrics"
                labels = target["labels"]
                assert labels["instance"] == agents[node_id]
                assert (labels["health"], labels["schedulable"]) == ("healthy", "true")
            # A query of an agent metric returns a value for each, labelled by node.
            promql = f'nodewatch_agent_status{{job="{job}", status="ok"}} == 1'
            wait_until(lambda promql=promql: len(_query(api, promql)) == 2, timeout=15,
                       interval=0.25, message=f"{job}: agent metrics queried")
            series = _query(api, f'nodewatch_system_cpu_percent{{job="{job}"}}')
            assert sorted(s["metric"]["node_id"] for s in series) == ["web-1", "web-2"]
        # A node's failure reaches Prometheus through discovery too: the coordinator confirms
        # web-2 unhealthy, the next refresh relabels its target, and the scrape fails.
        cluster.agents["web-2"].signal(signal.SIGKILL)
        for job in ("nodewatch-http", "nodewatch-file"):
            def followed(job: str = job) -> bool:
                target = _targets(api, job).get("web-2")
                return bool(target and target["labels"]["health"] == "unhealthy"
                            and target["labels"]["schedulable"] == "false"
                            and target["health"] == "down")
            wait_until(followed, timeout=20, interval=0.25,
                       message=f"{job}: web-2 relabelled unhealthy and down")
        assert _stop(watcher, signal.SIGINT) == 0
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        _stop(watcher)
        _stop(prometheus)
    assert "targets" in (tmp_path / "sd.log").read_text()
