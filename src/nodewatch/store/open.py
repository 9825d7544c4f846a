"""``open_store(url)``: the one place that maps a ``--store`` URL to its backend.

Backends are imported on demand, so a SQLite coordinator never loads the etcd or Redis clients.
"""

from __future__ import annotations

from pathlib import Path

from nodewatch.store.base import Store

__all__ = ["DEFAULT_SQLITE_PATH", "open_store", "sqlite_path"]

DEFAULT_SQLITE_PATH = Path("nodewatch-data") / "state.db"


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel/state.db`` is relative, ``sqlite:////abs/state.db`` absolute (as in
    SQLAlchemy, so the config default ``sqlite:///./nodewatch-data/state.db`` reads naturally);
    ``sqlite://`` alone means the default path."""
    rest = url.removeprefix("sqlite://")
    if rest in ("", "/"):
        return DEFAULT_SQLITE_PATH
    if not rest.startswith("/"):
        raise ValueError(f"expected sqlite:///path/to/state.db, got {url!r}")
    path = rest[1:]
    if path in (":memory:", ""):
        raise ValueError(f"the sqlite store needs a file path, got {url!r}")
    return Path(path)


def open_store(url: str, *, events_retained: int = 100_000,
               history_ttl: float = 3600.0, timeout: float | None = None,
               full_resolution: float | None = None) -> Store:
    """Build the (not yet opened) store a ``--store`` URL names; ``await store.open()`` next.

    ``timeout`` (the coordinator passes ``[coordinator] store_timeout``) bounds each request
    of a network client (Redis socket timeout, etcd call timeout), so the client gives up when
    the coordinator does, and every wait has one bound; ``None`` keeps the client defaults.
    ``full_resolution`` is how long raw samples live on etcd (their lease; the others prune).
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from nodewatch.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url), events_retained=events_retained)
    if scheme == "etcd":
        from nodewatch.store.etcd import EtcdStore

        options = {} if timeout is None else {"timeout": timeout}
        return EtcdStore.from_url(url, events_retained=events_retained, history_ttl=history_ttl,
                                  full_resolution=full_resolution, **options)
    if scheme in ("redis", "rediss"):
        from nodewatch.store.redis import RedisStore

        if timeout is None:
            return RedisStore(url, events_retained=events_retained)
        return RedisStore(url, events_retained=events_retained, socket_timeout=timeout)
    raise ValueError(f"unknown store URL {url!r}: expected sqlite:///path, etcd://… or redis://…")
