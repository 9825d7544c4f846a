"""Store fixtures: ``store_factory`` is parametrized over SQLite, etcd and Redis.

etcd and redis-server are real servers on free loopback ports, started once per session and
stopped at its end; each test gets its own key prefix, so tests never see each other's data.
A missing server binary skips on a laptop and fails under CI (tests.helpers.require_binary).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from nodewatch.store.base import Store
from nodewatch.store.etcd import EtcdStore
from nodewatch.store.redis import RedisStore
from nodewatch.store.sqlite import SqliteStore
from nodewatch.testing import EtcdCluster, RedisServer
from tests.helpers import require_binary

StoreFactory = Callable[..., Store]
_unique = itertools.count(1)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), binary=binary) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = require_binary("redis-server")
    with RedisServer(tmp_path_factory.mktemp("redis"), binary=binary) as server:
        yield server


@pytest.fixture(params=["sqlite", "etcd", "redis"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Build an unopened store; every call of one test points at the same data, so closing
    one and opening the next is a coordinator restart. Options: ``events_retained``."""
    test_id = next(_unique)
    if request.param == "sqlite":
        return lambda **options: SqliteStore(tmp_path / "state.db", **options)
    if request.param == "etcd":
        etcd: EtcdCluster = request.getfixturevalue("etcd_server")
        url = etcd.url(f"/test-{test_id}")
        return lambda **options: EtcdStore.from_url(url, **options)
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        url = redis.url(prefix=f"test{test_id}")
        return lambda **options: RedisStore(url, **options)
    raise AssertionError(request.param)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    opened = store_factory()
    await opened.open()
    yield opened
    await opened.close()
