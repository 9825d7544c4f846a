"""open_store(url): which backend a --store URL names, and where the SQLite file goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodewatch.config import CoordinatorConfig
from nodewatch.store.etcd import EtcdStore, parse_etcd_url
from nodewatch.store.open import DEFAULT_SQLITE_PATH, open_store, sqlite_path
from nodewatch.store.redis import RedisStore
from nodewatch.store.sqlite import SqliteStore


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./nodewatch-data/state.db", Path("nodewatch-data/state.db")),
        ("sqlite:///data/state.db", Path("data/state.db")),
        ("sqlite:////var/lib/nodewatch/state.db", Path("/var/lib/nodewatch/state.db")),
        ("sqlite://", DEFAULT_SQLITE_PATH),
        ("sqlite:///", DEFAULT_SQLITE_PATH),
    ],
)
def test_sqlite_url_names_a_file(url: str, path: Path) -> None:
    assert sqlite_path(url) == path


def test_config_default_store_is_the_default_sqlite_path() -> None:
    store = open_store(CoordinatorConfig().store)
    assert isinstance(store, SqliteStore)
    assert store.path == DEFAULT_SQLITE_PATH


def test_events_retained_reaches_the_store() -> None:
    store = open_store("sqlite:///x.db", events_retained=500)
    assert isinstance(store, SqliteStore) and store.events_retained == 500


def test_etcd_url_lists_endpoints_and_a_prefix() -> None:
    store = open_store("etcd://10.0.0.1:2379,etcd-2,10.0.0.3:2381/prod/nw", history_ttl=60.0)
    assert isinstance(store, EtcdStore)
    assert store.endpoints == ["10.0.0.1:2379", "etcd-2:2379", "10.0.0.3:2381"]
    assert store.prefix == "/prod/nw" and store.history_ttl == 60.0
    assert parse_etcd_url("etcd://h")[1] == "/nodewatch"


def test_redis_url_takes_an_optional_prefix() -> None:
    store = open_store("redis://127.0.0.1:6380/2?prefix=nw1", events_retained=7)
    assert isinstance(store, RedisStore)
    assert store.url == "redis://127.0.0.1:6380/2" and store.prefix == "nw1"
    assert store.events_retained == 7


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("etcd:///nodewatch", "no etcd endpoint"),
        ("postgres://db/x", "unknown store URL"),
        ("state.db", "unknown store URL"),
        ("sqlite:///:memory:", "needs a file path"),
    ],
)
def test_unusable_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)
