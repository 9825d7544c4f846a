"""Store fixtures: ``store_factory`` is parametrized over the backends (sqlite for now)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nodewatch.store.base import Store
from nodewatch.store.sqlite import SqliteStore

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Build an unopened store; every call of one test points at the same data, so closing
    one and opening the next is a coordinator restart. Options: ``events_retained``."""

    def make(**options: Any) -> Store:
        if request.param == "sqlite":
            return SqliteStore(tmp_path / "state.db", **options)
        raise AssertionError(request.param)

    return make


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    opened = store_factory()
    await opened.open()
    yield opened
    await opened.close()
