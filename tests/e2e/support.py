"""What the end-to-end tests of several coordinators share: reading a coordinator's health and
what the exec action wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodewatch.cli.processes import LocalCluster, http_json


def healthz(c: LocalCluster) -> dict[str, Any]:
    """The coordinator's /healthz body ({} while it does not answer, e.g. killed)."""
    try:
        status, body = http_json(f"{c.url}/healthz")
    except OSError:
        return {}
    return body if status == 200 and isinstance(body, dict) else {}


def action_lines(path: Path) -> list[str]:
    """The lines the exec action appended (one per action run)."""
    return path.read_text().splitlines() if path.exists() else []
