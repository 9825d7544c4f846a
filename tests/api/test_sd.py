"""Prometheus service discovery: valid label names from any node label, and
``GET /v1/sd/prometheus`` with the node filters against a real Coordinator."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from nodewatch.api.app import build_app
from nodewatch.api.sd import BUILTIN_LABELS, label_name, node_label_names
from nodewatch.coordinator.service import Coordinator
from nodewatch.store.open import open_store
from nodewatch.testing import FakeProbe
from tests.api.credentials import CarryingClient
from tests.api.test_app import ADMIN, AGENT, make_config, reg_body
from tests.helpers import async_wait_until

VALID = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@pytest.mark.parametrize(("key", "name"), [
    ("zone", "zone"), ("rack-id", "rack_id"), ("app.kubernetes.io/name", "app_kubernetes_io_name"),
    ("1st", "_1st"), ("", "_"), ("zóna", "z_na"),
])
def test_label_name_makes_a_valid_prometheus_name(key: str, name: str) -> None:
    assert label_name(key) == name


def test_collisions_with_builtins_reserved_names_and_each_other_are_resolved() -> None:
    names = node_label_names(["health", "__meta_x", "zone-a", "zone_a", "zone.a", "node_id"])
    assert names["health"] == "label_health" and names["node_id"] == "label_node_id"
    assert names["__meta_x"] == "label__meta_x"
    assert [names[k] for k in ("zone-a", "zone.a", "zone_a")] == ["zone_a", "zone_a_2",
                                                                  "zone_a_3"]


@given(st.lists(st.text(max_size=8), max_size=8, unique=True))
def test_node_label_names_are_valid_distinct_and_never_builtin(keys: list[str]) -> None:
    names = node_label_names(keys)
    assert set(names) == set(keys)
    assert len(set(names.values())) == len(keys)
    for name in names.values():
        assert VALID.match(name) and not name.startswith("__") and name not in BUILTIN_LABELS


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Any, Coordinator]]:
    cfg = make_config(tmp_path, **{"detection.rise": 1})
    store = open_store(cfg.coordinator.store)
    coord = Coordinator(cfg, store, probe=FakeProbe(time.time))  # type: ignore[arg-type]
    await coord.start()
    client = CarryingClient(TestClient(TestServer(build_app(coord))))
    await client.start_server()
    try:
        yield client, coord
    finally:
        await client.close()
        await coord.stop()


async def test_one_group_per_node_with_its_address_state_and_labels(api: Any) -> None:
    client, coord = api
    for i, labels in ((1, {"zone": "a", "health": "x"}), (2, {"zone": "b", "rack-id": "7"})):
        resp = await client.post("/v1/register", headers=AGENT, json=reg_body(
            f"web-{i}", address=f"127.0.9.{i}:7301", labels=labels))
        assert resp.status == 200
    for i in (1, 2):  # the fake probe answers every check
        await async_wait_until(lambda i=i: _health(client, f"web-{i}", "healthy"),
                               message=f"web-{i} healthy")
    resp = await client.post("/v1/nodes/web-2/drain", json={"reason": "sd"}, headers=ADMIN)
    assert resp.status == 200
    resp = await client.get("/v1/sd/prometheus")
    assert resp.status == 200 and resp.content_type == "application/json"
    groups = await resp.json()
    assert groups == [
        {"targets": ["127.0.9.1:7301"],
         "labels": {"node_id": "web-1", "health": "healthy", "schedulable": "true",
                    "node_status": "ok", "admin": "active", "zone": "a", "label_health": "x"}},
        {"targets": ["127.0.9.2:7301"],
         "labels": {"node_id": "web-2", "health": "healthy", "schedulable": "false",
                    "node_status": "ok", "admin": "drained", "zone": "b", "rack_id": "7"}},
    ]
    # The same filters as /v1/nodes.
    for query, ids in (("schedulable=true", ["web-1"]), ("schedulable=false", ["web-2"]),
                       ("health=unknown,suspect", []),
                       ("health=healthy", ["web-1", "web-2"]), ("label=zone=a", ["web-1"]),
                       ("label=zone=c", [])):
        resp = await client.get(f"/v1/sd/prometheus?{query}")
        assert [g["labels"]["node_id"] for g in await resp.json()] == ids, query
    for query in ("health=sick", "schedulable=maybe", "label=zone"):
        resp = await client.get(f"/v1/sd/prometheus?{query}")
        assert resp.status == 400 and "error" in await resp.json()


async def _health(client: Any, node_id: str, wanted: str) -> bool:
    resp = await client.get(f"/v1/nodes/{node_id}")
    return bool((await resp.json())["health"] == wanted)
