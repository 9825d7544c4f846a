"""Fixtures of the coordinator tests: a throwaway etcd per test (leadership, shares)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewatch.testing import EtcdCluster
from tests.helpers import require_binary


@pytest.fixture()
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path / "etcd", binary=binary) as cluster:
        yield cluster
