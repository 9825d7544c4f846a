"""The fault suite: real processes in network namespaces under real faults.

Selected with ``-m faults`` only (the main run's addopts say ``-m "not faults"``). Needs root,
iproute2, nftables, taskset and faketime: missing, the suite skips on a laptop and fails in CI.
A session-wide sweep first removes what a crashed earlier session left (namespaces, links,
mounts named ``nwf<pid>…`` of a pid that is gone), and at the end this session's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.netns import Network, missing_tools, sweep
from tests.faults.results import Recorder
from tests.helpers import IN_CI


@pytest.fixture(scope="session", autouse=True)
def _fault_session() -> Iterator[None]:
    missing = missing_tools()
    if missing:
        message = f"fault suite needs {', '.join(missing)} (scripts/dev.sh test installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    sweep()
    try:
        yield
    finally:
        sweep(only_own=True)


@pytest.fixture
def net() -> Iterator[Network]:
    network = Network()
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="session")
def results_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("NODEWATCH_FAULT_RESULTS")
    path = Path(configured) if configured else tmp_path_factory.getbasetemp() / "faults.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def recorder(results_path: Path, request: pytest.FixtureRequest) -> Recorder:
    return Recorder(results_path, request.node.name)
