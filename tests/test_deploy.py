"""The systemd units in deploy/: Type=notify with a watchdog, hardened, with state
directories, and valid for systemd itself (``systemd-analyze verify``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_binary

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ["nodewatch-coordinator.service", "nodewatch-agent.service"]


def settings(unit: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (DEPLOY / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key] = value
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_units_use_notify_a_watchdog_hardening_and_a_state_directory(unit: str) -> None:
    s = settings(unit)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] == "30s" and s["Restart"] == "always"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["CapabilityBoundingSet"] == "" and s["User"] == "nodewatch"
    state = s["StateDirectory"]
    assert s["ReadWritePaths"] == f"/var/lib/{state}"
    assert s["ExecStart"].startswith("/opt/nodewatch/bin/nodewatch ")


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    # verify also checks that ExecStart exists: point it at this environment's entry point.
    entry = str(Path(sys.executable).with_name("nodewatch"))
    for unit in UNITS:
        text = (DEPLOY / unit).read_text().replace("/opt/nodewatch/bin/nodewatch", entry)
        (tmp_path / unit).write_text(text)
    out = subprocess.run([analyze, "verify", *(str(tmp_path / u) for u in UNITS)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
