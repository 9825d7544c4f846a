"""Issue 13: a store that cannot write makes commands answer 503 and changes nothing; what
was acknowledged survives a restart; detection goes on from memory meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api.app import build_app
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.store.sqlite import SqliteStore
from nodewatch.testing import FakeProbe
from tests.api.test_app import ADMIN, AGENT, make_config, reg_body


async def _fill(store: SqliteStore) -> None:
    """Make the database 'full': no new page may be allocated, and the free room in the
    existing pages is taken by padding."""
    pages = await store._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await store._write(lambda c: c.execute(f"PRAGMA max_page_count={pages}").fetchone())
    k = 0
    for size in (2000, 500, 100, 20, 1):
        while True:
            try:
                await store.put_meta(f"pad{k}", "x" * size)
            except Exception:  # noqa: BLE001 - full
                break
            k += 1


async def _unfill(store: SqliteStore) -> None:
    """Lift the page cap. The writer groups writes into one transaction, and a background
    write grouped with this one (an event the full disk still refuses) fails the group: try
    again until the cap is lifted (bounded)."""
    for _ in range(100):
        try:
            await store._write(lambda c: c.execute("PRAGMA max_page_count=1073741823").fetchone())
            return
        except sqlite3.OperationalError:
            await asyncio.sleep(0.05)
    raise AssertionError("could not lift the page cap in 100 tries")


async def _up(cfg: Any) -> tuple[TestClient[Any, Any], Coordinator]:
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    client = TestClient(TestServer(build_app(coord)))
    await client.start_server()
    return client, coord


async def test_full_sqlite_refuses_commands_with_503_and_loses_nothing_acknowledged(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"coordinator.store_timeout": "2s"})
    client, coord = await _up(cfg)
    acked = ""
    try:
        for i in range(3):
            resp = await client.post("/v1/register", json=reg_body(f"n{i}"), headers=AGENT)
            assert resp.status == 200
        assert (await client.post("/v1/nodes/n0/drain", json={"reason": "acked"},
                                  headers=ADMIN)).status == 200
        store = coord.store
        assert isinstance(store, SqliteStore)
        await _fill(store)
        # The free room left in the pages holds a few more commands; the first refused one
        # marks the disk full, and every later one is refused too (not 200).
        acked = "active"
        verb = "drain"
        for attempt in range(200):
            verb = "drain" if attempt % 2 == 0 else "undrain"
            resp = await client.post(f"/v1/nodes/n2/{verb}", json={"reason": "x"},
                                     headers=ADMIN)
            if resp.status != 200:
                break
            acked = "drained" if verb == "drain" else "active"
        assert resp.status == 503, await resp.text()
        for node_id, again in (("n1", "drain"), ("n0", "undrain"), ("n2", verb)):
            resp = await client.post(f"/v1/nodes/{node_id}/{again}", json={"reason": "x"},
                                     headers=ADMIN)
            assert resp.status == 503, await resp.text()
            error = (await resp.json())["error"]
            assert error.startswith(f"store sqlite ({tmp_path}/state.db) cannot write: ")
            assert "full" in error and "nothing was changed" in error
        # Nothing refused is applied, in memory or in the API.
        for node_id, admin in (("n0", "drained"), ("n1", "active"), ("n2", acked)):
            assert coord.cluster.nodes[node_id].admin.value == admin
            view = await (await client.get(f"/v1/nodes/{node_id}")).json()
            assert view["admin"] == admin
        assert not coord.store_health.available and coord.store_health.writes_failed >= 3
        assert coord.store_health.since is not None
        await _unfill(store)
        assert (await client.post("/v1/nodes/n1/drain", json={"reason": "after"},
                                  headers=ADMIN)).status == 200
        assert coord.store_health.available
    finally:
        await client.close()
        await coord.stop()
    client, coord = await _up(cfg)  # a restart: every acknowledged command is there
    try:
        admins = {i: coord.cluster.nodes[i].admin.value for i in ("n0", "n1", "n2")}
        assert admins == {"n0": "drained", "n1": "drained", "n2": acked}
    finally:
        await client.close()
        await coord.stop()
