"""The CLI client's typed results: the API's shapes, decoded once, re-encoded unchanged."""

from __future__ import annotations

import json

import msgspec
import pytest

from nodewatch.api import schemas
from nodewatch.cli.client import DrainInfo, EventInfo, EventsPage, NodeInfo
from nodewatch.model import DrainState, Event, Health, NodeState


@pytest.mark.parametrize(("result", "view"), [
    (NodeInfo, schemas.NodeView), (DrainInfo, schemas.DrainView),
    (EventInfo, schemas.EventView), (EventsPage, schemas.EventsResponse),
])
def test_client_results_have_the_fields_of_the_api_views(result: type[msgspec.Struct],
                                                         view: type[msgspec.Struct]) -> None:
    assert set(result.__struct_encode_fields__) == set(view.__struct_encode_fields__)


def test_a_node_and_an_event_round_trip_to_the_json_the_api_sent() -> None:
    node = NodeState("web-1", "10.0.0.1:7301", labels={"zone": "a"}, health=Health.HEALTHY,
                     incarnation=2, seq=7, last_seen=1000.5, system={"cpu_percent": 12.5},
                     load={"pending_tasks": 3.0}, reasons=["busy"], version="0.1.0",
                     drain=DrainState("maintenance", 990.0, 1290.0))
    wire = msgspec.json.encode({**node.to_json(), "load_score": 0.128})
    decoded = msgspec.json.decode(wire, type=NodeInfo)
    assert decoded.drain is not None and decoded.drain.reason == "maintenance"
    # What `status --json` prints is what the API sent, to the character.
    assert (json.dumps(msgspec.to_builtins(decoded), sort_keys=True)
            == json.dumps(json.loads(wire), sort_keys=True))
    event = Event("0000000000000003", 1000.0, "web-1", "suspect", "healthy", "suspect",
                  "timeout", {"checks": [{"failure": "timeout"}], "peers": []}).to_json()
    page = msgspec.json.decode(msgspec.json.encode({"events": [event], "last_id": event["id"]}),
                               type=EventsPage)
    assert page.events[0].from_ == "healthy" and page.last_id == event["id"]
    assert (json.dumps(msgspec.to_builtins(page.events[0]), sort_keys=True)
            == json.dumps(event, sort_keys=True))
