"""What the dashboard reads of a fleet: pages of nodes by cursor, only the changes since a
revision, and the fleet summary (counts, label groups, attention, an hour of counts), against
a real Coordinator and its HTTP app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodewatch.api import schemas
from nodewatch.api.app import FLEET_KEY, build_app
from nodewatch.api.fleet import ROW_COLUMNS, attention_reasons, page, parse_revision
from nodewatch.config import load_config
from nodewatch.coordinator.service import Coordinator
from nodewatch.model import NodeState
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Any, Coordinator, Any]]:
    cfg = load_config(None, {"coordinator.store": f"sqlite:///{tmp_path}/state.db",
                             "coordinator.admin_token": "admin-secret",
                             "detection.startup_grace": "0"})
    coord = Coordinator(cfg, open_store(cfg.coordinator.store),
                        probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    app = build_app(coord)
    client = CarryingClient(TestClient(TestServer(app)))
    await client.start_server()
    try:
        yield client, coord, app
    finally:
        await client.close()
        await coord.stop()


async def register(client: Any, node_id: str, **labels: str) -> None:
    resp = await client.post("/v1/register", json={
        "node_id": node_id, "address": "127.0.0.1:7301", "incarnation": 1,
        "labels": labels or {"zone": "a"}})
    assert resp.status == 200, await resp.text()


async def get(client: Any, path: str, status: int = 200) -> Any:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_pages_follow_the_cursor_in_node_id_order_to_the_last_page(api: Any) -> None:
    client, _, _ = api
    for i in (3, 1, 4, 0, 2):
        await register(client, f"n{i}")
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        data = await get(client, f"/v1/nodes?limit=2{f'&cursor={cursor}' if cursor else ''}")
        msgspec.convert(data, schemas.NodesResponse)
        seen += [n["node_id"] for n in data["nodes"]]
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert seen == ["n0", "n1", "n2", "n3", "n4"]
    # Filters apply before paging; a page that ends the list has no next cursor.
    data = await get(client, "/v1/nodes?limit=10&health=unknown,healthy&cursor=n2")
    assert [n["node_id"] for n in data["nodes"]] == ["n3", "n4"] and data["next_cursor"] is None
    assert (await get(client, "/v1/nodes?limit=3&sort=load"))["next_cursor"] is None
    for bad in ("limit=0", "limit=2.5", "limit=x", "cursor=n1&sort=load", "cursor=%20",
                "changed_since=nope"):
        assert "error" in await get(client, f"/v1/nodes?{bad}", status=400)


async def test_changed_since_answers_only_the_changes_and_the_removed_ids(api: Any) -> None:
    client, coord, _ = api
    for i in range(4):
        await register(client, f"n{i}")
    first = await get(client, "/v1/nodes")
    revision = first["revision"]
    assert parse_revision(revision) is not None
    nothing = await get(client, f"/v1/nodes?changed_since={revision}")
    assert (nothing["nodes"], nothing["removed"], nothing["reset"]) == ([], [], False)
    assert nothing["revision"] == revision

    assert (await client.post("/v1/nodes/n1/drain", json={"reason": "x"}, headers=ADMIN)).status \
        == 200
    assert (await client.delete("/v1/nodes/n3", headers=ADMIN)).status == 200
    changes = await get(client, f"/v1/nodes?changed_since={revision}")
    assert [n["node_id"] for n in changes["nodes"]] == ["n1"]
    assert changes["nodes"][0]["admin"] == "drained"
    assert changes["removed"] == ["n3"] and not changes["reset"]
    # A routine observation (a poll) is a change too: the page sees new load and last_seen.
    later = changes["revision"]
    coord.on_result(await coord.probe.check("n0", "127.0.0.1:7301"))
    assert [n["node_id"] for n in (await get(
        client, f"/v1/nodes?changed_since={later}"))["nodes"]] == ["n0"]
    # A revision of another epoch (a restarted coordinator): the whole list, marked reset.
    reset = await get(client, "/v1/nodes?changed_since=abc-1")
    assert reset["reset"] and {n["node_id"] for n in reset["nodes"]} == {"n0", "n1", "n2"}


async def test_cached_views_change_with_their_node(api: Any) -> None:
    client, _, _ = api
    await register(client, "n0")
    before = (await get(client, "/v1/nodes/n0"))
    assert (await get(client, "/v1/nodes"))["nodes"] == [before]
    await client.post("/v1/nodes/n0/drain", headers=ADMIN)
    [after] = (await get(client, "/v1/nodes"))["nodes"]
    assert after["admin"] == "drained" and after == await get(client, "/v1/nodes/n0")


async def test_rows_format_gives_the_tables_compact_rows_paged_and_changed(api: Any) -> None:
    client, coord, _ = api
    for i in range(4):
        await register(client, f"n{i}", zone="a", rack=f"r{i}")
    coord.on_result(await coord.probe.check("n2", "127.0.0.1:7301"))
    views = {n["node_id"]: n for n in (await get(client, "/v1/nodes"))["nodes"]}
    first = await get(client, "/v1/nodes?format=rows&limit=3")
    rows = msgspec.convert(first, schemas.NodeRowsResponse)
    assert rows.columns == list(ROW_COLUMNS) and rows.next_cursor == "n2"
    at = {name: i for i, name in enumerate(first["columns"])}
    # Each row says what the node's view says of the fields the table shows.
    for row in first["rows"]:
        view = views[row[at["node_id"]]]
        for name in ("address", "health", "node_status", "admin", "schedulable", "last_seen",
                     "labels", "reasons"):
            assert row[at[name]] == view[name], name
        assert row[at["cpu_percent"]] == view["system"].get("cpu_percent")
        assert row[at["qps"]] == view["load"].get("qps")
        assert row[at["attention"]] == []
    rest = await get(client, "/v1/nodes?format=rows&limit=3&cursor=n2")
    assert [r[0] for r in rest["rows"]] == ["n3"] and rest["next_cursor"] is None
    # Filters and changes as with views: a drain is one changed row, a removal an id.
    revision = first["revision"]
    await client.post("/v1/nodes/n1/drain", json={"reason": "x"}, headers=ADMIN)
    await client.delete("/v1/nodes/n3", headers=ADMIN)
    changes = await get(client, f"/v1/nodes?format=rows&changed_since={revision}")
    [row] = changes["rows"]
    assert row[at["node_id"]] == "n1" and row[at["admin"]] == "drained"
    assert row[at["schedulable"]] is False
    assert changes["removed"] == ["n3"] and changes["reset"] is False
    # A failing node is one to look at: its row says why, as the attention list does.
    coord.probe.set("n0", False)
    for _ in range(2):
        coord.on_result(await coord.probe.check("n0", "x"))
    [row] = (await get(client, f"/v1/nodes?format=rows&changed_since={changes['revision']}"))[
        "rows"]
    assert row[at["health"]] == "suspect" and row[at["attention"]] == ["suspect"]
    assert row[at["reasons"]] == (await get(client, "/v1/nodes/n0"))["reasons"]
    suspects = await get(client, "/v1/nodes?format=rows&health=suspect")
    assert [r[0] for r in suspects["rows"]] == ["n0"]
    # The default answer is unchanged: full views under nodes.
    assert "nodes" in await get(client, "/v1/nodes?format=views&limit=1")
    for bad, named in (("format=csv", "format"), ("format=", "format"),
                       ("format=rows&limit=0", "limit"), ("format=rows&health=ill", "health"),
                       ("format=rows&cursor=n1&sort=load", "cursor")):
        error = (await get(client, f"/v1/nodes?{bad}", status=400))["error"]
        assert named in error, (bad, error)


async def test_dashboard_assets_are_gzipped_and_revalidated_by_etag(api: Any) -> None:
    import gzip

    client, _, _ = api
    plain = await client.get("/", headers={"Accept-Encoding": "identity"})
    body = await plain.read()
    assert plain.headers.get("Content-Encoding") is None and b"nodewatchBoot" in body
    etag = plain.headers["ETag"]
    for path in ("/", "/static/dashboard.js", "/static/dashboard.css"):
        packed = await client.get(path, headers={"Accept-Encoding": "gzip, deflate"},
                                  auto_decompress=False)
        raw = await packed.read()
        assert packed.headers["Content-Encoding"] == "gzip", path
        assert packed.headers["Vary"] == "Accept-Encoding"
        assert len(raw) < len(gzip.decompress(raw)) / 2, path
    again = await client.get("/", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""
    assert (await client.get("/", headers={"If-None-Match": '"other"'})).status == 200


async def test_summary_counts_label_groups_attention_and_an_hour_of_counts(api: Any) -> None:
    client, coord, app = api
    for i in range(6):
        await register(client, f"n{i}", zone="a" if i < 4 else "b")
    await client.post("/v1/nodes/n2/drain", headers=ADMIN)
    coord.probe.set("n5", False)
    for _ in range(2):
        coord.on_result(await coord.probe.check("n5", "x"))
    data = await get(client, "/v1/summary")
    summary = msgspec.convert(data, schemas.SummaryResponse)
    assert summary.total == 6 and sum(summary.health.values()) == 6
    assert summary.admin == {"active": 5, "drained": 1, "review": 0}
    assert summary.health["suspect"] == 1
    assert summary.labels["zone"]["a"]["total"] == 4 and summary.labels["zone"]["b"] == {
        "total": 2, "unknown": 1, "suspect": 1}
    assert [a.node_id for a in summary.attention_nodes] == ["n5"]
    assert summary.attention_nodes[0].why == ["suspect"] and summary.attention == 1
    # Removing a node takes it out of every count; the ring keeps one sample per interval.
    await client.delete("/v1/nodes/n5", headers=ADMIN)
    fleet = app[FLEET_KEY]
    fleet.sample(coord.clock())
    data = await get(client, "/v1/summary")
    assert data["total"] == 5 and data["labels"]["zone"]["b"] == {"total": 1, "unknown": 1}
    assert data["attention_nodes"] == [] and data["history"][-1]["total"] == 5
    last = data["history"][-1]["ts"]
    assert (await get(client, f"/v1/summary?history_since={last}"))["history"] == []
    assert "error" in await get(client, "/v1/summary?history_since=x", status=400)


def test_attention_names_suspects_outliers_reviews_and_waiting_drains() -> None:
    from nodewatch.model import Admin, DrainState, Health

    node = NodeState("n", "a:1", health=Health.SUSPECT, admin=Admin.REVIEW,
                     drain=DrainState("r", 0.0, 10.0))
    assert attention_reasons(node) == ["suspect", "review", "drain waiting"]
    assert attention_reasons(NodeState("m", "a:1", health=Health.HEALTHY)) == []


def test_a_page_after_the_last_id_is_empty() -> None:
    assert page(["a", "b", "c"], "b", 5) == (["c"], None)
    assert page(["a", "b", "c"], "", 2) == (["a", "b"], "b")
    assert page(["a", "b", "c"], "c", 1) == ([], None)


async def test_events_of_one_node_and_the_newest_events_from_memory(api: Any) -> None:
    client, _, _ = api
    for i in range(3):
        await register(client, f"n{i}")
    for _ in range(2):
        await client.post("/v1/nodes/n1/drain", headers=ADMIN)
        await client.post("/v1/nodes/n1/undrain", headers=ADMIN)
    newest = await get(client, "/v1/events?newest=true&limit=3")
    kinds = [e["kind"] for e in newest["events"]]
    assert kinds[-1] == "undrained" and len(kinds) == 3, kinds
    assert newest["last_id"] == newest["events"][-1]["id"]
    mine = await get(client, "/v1/events?newest=true&node_id=n0&limit=50")
    assert [e["kind"] for e in mine["events"]] == ["registered"]
    filtered = await get(client, "/v1/events?node_id=n1")
    assert {e["node_id"] for e in filtered["events"]} == {"n1"}
    assert [e["kind"] for e in filtered["events"]].count("undrained") == 2
    assert "error" in await get(client, "/v1/events?node_id=%20", status=400)
