"""Fixtures of the end-to-end tests: one throwaway etcd per module (several coordinators)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nodewatch.testing import EtcdCluster
from tests.helpers import require_binary


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), binary=binary) as cluster:
        yield cluster
