"""The README keeps its promises: the two commands first, a current configuration reference,
the dashboard picture, and deploy/ examples that really load."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from nodewatch.collect.run import load_agent_config
from nodewatch.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from detection_quality import FAST_PROFILE, PROFILES  # noqa: E402

README = ROOT / "README.md"


def test_the_two_commands_come_first() -> None:
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None and text.index(block.group(0)) < text.index("\n## ")
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["bash scripts/dev.sh demo", "bash scripts/dev.sh test"]


def test_configuration_reference_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"),
                             "--check", str(README)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = README.read_text()
    for key in ("healthy_interval", "unhealthy_interval", "max_fraction", "[[agent.rules]]",
                "heartbeat_interval", "auto_approve"):
        assert f"`{key}`" in text


def test_dashboard_picture_is_embedded_and_exists() -> None:
    assert "](docs/dashboard.png)" in README.read_text()
    assert (ROOT / "docs" / "dashboard.png").stat().st_size > 10_000


def test_deploy_examples_load_and_units_run_real_commands() -> None:
    cfg = load_config(ROOT / "deploy" / "coordinator.toml")
    assert cfg.detection.healthy_interval == 30 and cfg.actions
    agent = load_agent_config(str(ROOT / "deploy" / "agent.toml"), {})
    assert agent.node_id == "web-1" and agent.checks and agent.labels["zone"] == "a"
    fast = load_config(ROOT / "deploy" / "coordinator-fast-push.toml")
    fast_agent = load_agent_config(str(ROOT / "deploy" / "agent-fast-push.toml"), {})
    shared = load_config(ROOT / "deploy" / "coordinator-shared.toml")
    assert shared.coordinator.coordination == "shares"
    assert shared.coordinator.url == "http://10.0.0.11:7300"
    # The example is the profile that bench/detection_quality.py and heartbeat_cost.py measure.
    measured = next(p for p in PROFILES if p.name == FAST_PROFILE)
    assert (fast.detection.healthy_interval, fast.detection.unhealthy_interval,
            fast.detection.down_interval, fast.detection.fall, fast.detection.timeout) == (
        measured.policy.healthy_interval, measured.policy.unhealthy_interval,
        measured.policy.down_interval, measured.policy.fall, measured.timeout)
    assert fast.coordinator.heartbeat_udp and fast_agent.heartbeat_transport == "udp"
    assert fast_agent.heartbeat_interval == measured.heartbeat_interval
    for unit, command in (("nodewatch-coordinator.service", "coordinator"),
                          ("nodewatch-agent.service", "agent")):
        text = (ROOT / "deploy" / unit).read_text()
        [exec_start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        assert f"/bin/nodewatch {command} --config /etc/nodewatch/" in exec_start
        assert "TOKEN=" not in exec_start  # secrets come from EnvironmentFile, never the unit
