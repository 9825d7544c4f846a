"""The client commands against a real coordinator process: tables, JSON, operator commands,
and one clear line (never a traceback) for an unreachable coordinator, a 401 or a bad node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nodewatch.cli.client import DEFAULT_COORDINATOR, resolve_coordinator
from nodewatch.cli.commands import main
from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, interruptible, wait_until

TOKEN = "cli-admin-token"
CONFIG = """
[detection]
healthy_interval = "1s"
unhealthy_interval = "250ms"
startup_grace = "0"
"""


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("cli")
    with LocalCluster(workdir=workdir, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=CONFIG, env={"NODEWATCH_ADMIN_TOKEN": TOKEN}) as cluster:
        cluster.start_coordinator()
        for i in (1, 2):
            status, _ = http_json(f"{cluster.url}/v1/register", "POST", {
                "node_id": f"web-{i}", "address": f"127.0.6.{i}:{free_port()}",
                "incarnation": 1, "labels": {"zone": "a"}})
            assert status == 200
        yield cluster.url


def run(*args: str, token: str | None = TOKEN, coordinator: str | None = None) -> Result:
    env = {"NODEWATCH_ADMIN_TOKEN": token, "NODEWATCH_COORDINATOR": coordinator}
    return CliRunner().invoke(main, list(args), env=env)  # type: ignore[arg-type]


def one_clear_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_coordinator_url_comes_from_flag_then_env_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NODEWATCH_COORDINATOR", raising=False)
    assert resolve_coordinator(None) == DEFAULT_COORDINATOR
    monkeypatch.setenv("NODEWATCH_COORDINATOR", "http://127.0.0.9:1234/")
    assert resolve_coordinator(None) == "http://127.0.0.9:1234"
    assert resolve_coordinator("127.0.0.8:99") == "http://127.0.0.8:99"


def test_status_prints_a_table_and_json(coordinator: str) -> None:
    result = run("status", "--coordinator", coordinator)
    assert result.exit_code == 0, result.output
    assert "NODE" in result.output and "web-1" in result.output and "web-2" in result.output
    assert "2 nodes" in result.output
    result = run("status", "--json", coordinator=coordinator)  # found through the env var
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.output)["nodes"]
    assert [n["node_id"] for n in nodes] == ["web-1", "web-2"]


def test_drain_undrain_change_the_node(coordinator: str) -> None:
    result = run("drain", "web-1", "--reason", "kernel upgrade", "--coordinator", coordinator)
    assert result.exit_code == 0, result.output
    assert "web-1 drained" in result.output and "admin drained" in result.output
    _, node = http_json(f"{coordinator}/v1/nodes/web-1")
    assert node["admin"] == "drained" and node["schedulable"] is False
    result = run("undrain", "web-1", "--coordinator", coordinator)
    assert result.exit_code == 0 and "admin active" in result.output


def test_approve_of_a_node_not_in_review_says_why(coordinator: str) -> None:
    line = one_clear_line(run("approve", "web-2", "--coordinator", coordinator))
    assert line.startswith("nodewatch: ")


def test_a_pending_claim_shows_in_status_and_approve_names_the_address(
        coordinator: str) -> None:
    # web-1 holds a credential; a registration without it is a claim held for the operator.
    claim = f"127.0.6.9:{free_port()}"
    status, _ = http_json(f"{coordinator}/v1/register", "POST", {
        "node_id": "web-1", "address": claim, "incarnation": 2})
    assert status == 403
    result = run("status", "--coordinator", coordinator)
    assert result.exit_code == 0 and f"claim {claim}" in result.output, result.output
    line = one_clear_line(run("approve", "web-1", "--address", "127.0.6.8:1",
                              "--coordinator", coordinator))
    assert f"pending claim is from {claim}" in line and "nothing approved" in line
    result = run("approve", "web-1", "--address", claim, "--reason", "disk replaced",
                 "--coordinator", coordinator)
    assert result.exit_code == 0 and "web-1 approved" in result.output, result.output
    _, node = http_json(f"{coordinator}/v1/nodes/web-1")
    assert node["identity"]["reenrol_from"] == claim and node["identity"]["enrolled"] is False
    _, page = http_json(f"{coordinator}/v1/events?limit=1000")
    [approved] = [e for e in page["events"] if e["kind"] == "approved"]
    assert approved["reason"].endswith(": disk replaced")


def test_unknown_node_is_one_line_and_exit_1(coordinator: str) -> None:
    line = one_clear_line(run("drain", "ghost", "--coordinator", coordinator))
    assert "unknown node 'ghost'" in line


def test_missing_or_wrong_token_is_one_line_and_exit_1(coordinator: str) -> None:
    line = one_clear_line(run("drain", "web-1", "--coordinator", coordinator, token=""))
    assert "not authorised" in line and "NODEWATCH_ADMIN_TOKEN" in line
    line = one_clear_line(run("remove", "web-1", "--coordinator", coordinator, token="nope"))
    assert "does not match" in line and "nope" not in line and TOKEN not in line


def test_unreachable_coordinator_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["status", "--json"], ["drain", "web-1"], ["events"],
                 ["events", "--follow"]):
        line = one_clear_line(run(*args, "--coordinator", url))
        assert "cannot reach the coordinator" in line and url in line


def test_events_lists_recent_events(coordinator: str) -> None:
    result = run("events", "--coordinator", coordinator, "--last", "100")
    assert result.exit_code == 0, result.output
    assert "registered" in result.output and "web-1" in result.output
    result = run("events", "--json", "--coordinator", coordinator)
    kinds = {json.loads(line)["kind"] for line in result.output.splitlines()}
    assert "registered" in kinds


def test_events_follow_streams_new_events_until_ctrl_c(coordinator: str, tmp_path: Path) -> None:
    out = tmp_path / "follow.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodewatch", "events", "--follow", "--last", "0",
             "--coordinator", coordinator], stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=interruptible)
    try:
        # The stream starts after the backlog; keep draining until our event shows up.
        def drained_shown() -> bool:
            http_json(f"{coordinator}/v1/nodes/web-2/drain", "POST", {"reason": "follow-me"},
                      token=TOKEN)
            http_json(f"{coordinator}/v1/nodes/web-2/undrain", "POST", token=TOKEN)
            return "follow-me" in out.read_text()

        wait_until(drained_shown, timeout=20, interval=0.3, message="the drained event streamed")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    assert code == 0
    assert "Traceback" not in out.read_text()


def test_remove_forgets_the_node(coordinator: str) -> None:
    http_json(f"{coordinator}/v1/register", "POST", {
        "node_id": "temp-1", "address": "127.0.6.9:9", "incarnation": 1})
    result = run("remove", "temp-1", "--coordinator", coordinator)
    assert result.exit_code == 0 and "temp-1 removed" in result.output
    status, _ = http_json(f"{coordinator}/v1/nodes/temp-1")
    assert status == 404


# ---------------------------------------------------------------------- version and completion


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"nodewatch, version {version('nodewatch')}"


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o nosort -F"),
                                               ("zsh", "#compdef nodewatch")])
def test_completion_prints_the_shell_script(shell: str, marker: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0
    assert marker in result.output and "_NODEWATCH_COMPLETE" in result.output


def test_the_completion_script_completes_commands_and_options() -> None:
    """What the printed bash script asks the real entry point, answered by click."""
    nodewatch = Path(sys.executable).with_name("nodewatch")
    env = {**os.environ, "_NODEWATCH_COMPLETE": "bash_complete", "COMP_WORDS": "nodewatch s",
           "COMP_CWORD": "1"}
    out = subprocess.run([str(nodewatch)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert {"plain,sd", "plain,simulate", "plain,status"} <= set(out.stdout.split())
    env.update(COMP_WORDS="nodewatch sd --wa", COMP_CWORD="2")
    out = subprocess.run([str(nodewatch)], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["plain,--watch"]
