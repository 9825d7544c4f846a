"""The benchmarks that back issue 4's figures still run end to end (tiny sizes, a few seconds):
their numbers are printed, never asserted, but a bench that no longer starts is a broken
promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import require_binary

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str, timeout: float = 110.0) -> str:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_heartbeat_cost_measures_each_phase_and_the_fast_profile() -> None:
    require_binary("nginx")
    out = run("heartbeat_cost.py", "--nodes", "30", "--window", "1", "--warmup", "1.5",
              "--repeat", "1")
    lines = out.splitlines()
    for phase in ("poll", "udp", "http"):
        assert any(line.split()[:2] == ["30", phase] for line in lines), out
    assert "profile push-udp-3.5s-f2" in out
    [row] = [line for line in lines if line.split()[:1] == ["30"] and "asks," in line]
    assert "30 healthy" in row  # every node stayed healthy on pushes alone
    assert " 0 answered" not in row  # the datagrams that asked were answered


def test_fast_profile_e2e_times_a_real_kill() -> None:
    out = run("fast_profile_e2e.py", "--agents", "3", "--kills", "1")
    assert "kill   1 fast-0: unhealthy after" in out and "(checks: refused)" in out
    assert "kill -9 to unhealthy over 1 kills" in out


def test_detection_quality_prints_every_scenario_beside_the_others() -> None:
    out = run("detection_quality.py", "--nodes", "200", "--duration", "5m", "--profiles",
              "default,push-udp-3.5s-f2")
    for scenario in ("crash", "hang", "flap", "slow", "partition", "slow-coordinator"):
        assert f"push-udp-3.5s-f2 {scenario}" in out, out
    assert "Kubernetes" in out and "Nomad" in out and "HAProxy" in out


def test_coordinator_scale_runs_the_coordinator_the_bare_loop_and_wrk() -> None:
    require_binary("nginx")
    require_binary("wrk")
    out = run("coordinator_scale.py", "--nodes", "50", "--interval", "1", "--window", "2",
              "--warmup", "1")
    assert '"healthy": 50' in out, out
    assert "wrk    ceiling against one nginx address" in out


def test_agent_footprint_times_the_connection_count_at_a_tiny_size() -> None:
    out = run("agent_footprint.py", "--sockets-only", "--sockets", "50", "--hold", "1")
    [row] = [line for line in out.splitlines() if line.split()[:1] == ["50"]]
    assert "(sample 1s)" in row, out  # /health showed the 50 connections
    assert "tables/snmp" in out


def test_registration_storm_enrols_every_node_past_the_admission_rate() -> None:
    out = run("registration_storm.py", "--nodes", "120", "--rate", "100", "--burst", "40",
              "--timeout", "60")
    assert "floor   120 GET /healthz" in out, out
    assert "(120 nodes listed, 120 'new')" in out, out
    assert "coordinator loop lag max" in out


def test_dashboard_fleet_opens_the_page_and_prints_every_goal() -> None:
    require_binary("nginx")
    require_binary("chromium")
    require_binary("chromedriver")
    out = run("dashboard_fleet.py", "--nodes", "60", "--window", "2", timeout=170.0)
    for figure in ("first useful view", "filter, worst", "script round trip", "loop lag without",
                   "coordinator CPU", "the page reads"):
        assert figure in out, out
    assert "the page holds 60 rows" in out


def test_store_fleet_counts_the_write_pattern_and_replays_it_on_a_3_member_etcd() -> None:
    require_binary("etcd")
    out = run("store_fleet.py", "--nodes", "1000", "--driven", "200", "--duration", "40",
              "--etcd-seconds", "1", "--ceiling-processes", "1")
    for row in ("before ", "after (sqlite, redis)", "after (etcd)"):
        assert row in out, out
    assert "ceiling, CAS txns of 128 nodes" in out and "room to spare" in out, out


def test_fleet_udp_prints_the_floor_the_coordinator_and_the_kills() -> None:
    require_binary("nginx")
    out = run("fleet_udp.py", "--nodes", "200", "--window", "2", "--warmup", "1", "--kills",
              "3", "--kill-span", "1", "--confirm-wait", "7", "--settle-max", "30",
              timeout=150.0)
    assert "floor:" in out and "us/datagram" in out, out
    assert "coordinator:" in out and "x floor" in out, out
    assert "kills: 3 nodes" in out and "false confirmations" in out, out
    assert '"answers": 0,' not in out, out  # the coordinator answered the datagrams that asked
