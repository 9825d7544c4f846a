"""The shared record codec: lossless round trips, compact output, revision kept out."""

from __future__ import annotations

import dataclasses
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodewatch.model import (
    Admin,
    DrainState,
    Event,
    Health,
    HistorySample,
    NodeState,
    NodeStatus,
    SampleChunk,
)
from nodewatch.store.codec import (
    EventRecord,
    NodeRecord,
    SampleRecord,
    decode_chunk_body,
    decode_event,
    decode_node,
    decode_sample,
    decode_sample_body,
    encode_chunk_body,
    encode_event,
    encode_node,
    encode_node_packed,
    encode_sample,
    encode_sample_body,
    encode_sample_body_packed,
    material_digest,
)

text = st.text(max_size=20)
numbers = st.floats(allow_nan=False, allow_infinity=False)
metrics = st.dictionaries(text, numbers, max_size=4)

drains = st.builds(DrainState, reason=text, started=numbers, deadline=numbers,
                   by=st.sampled_from(["operator", "node"]), complete=st.booleans())
nodes = st.builds(
    NodeState,
    node_id=st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
    address=text,
    labels=st.dictionaries(text, text, max_size=3),
    health=st.sampled_from(Health),
    node_status=st.sampled_from(NodeStatus),
    admin=st.sampled_from(Admin),
    incarnation=st.integers(0, 2**40),
    seq=st.integers(0, 2**60),
    last_ts=numbers,
    system=metrics,
    load=metrics,
    reasons=st.lists(text, max_size=3),
    rejoins=st.lists(numbers, max_size=3),
    drain=st.none() | drains,
    cleaned_up=st.booleans(),
    revision=st.integers(0, 2**40),
)


def test_records_cover_every_field_of_the_domain_types() -> None:
    """A field added to a domain type must be added to its record, or it would not be stored."""
    node_fields = {f.name for f in dataclasses.fields(NodeState)} - {"revision"}
    assert set(NodeRecord.__struct_fields__) == node_fields
    assert set(EventRecord.__struct_fields__) == {f.name for f in dataclasses.fields(Event)}
    assert set(SampleRecord.__struct_fields__) == {
        f.name for f in dataclasses.fields(HistorySample)
    }


@given(nodes)
def test_node_round_trips_with_the_revision_given_by_the_store(node: NodeState) -> None:
    decoded = decode_node(encode_node(node), node.revision)
    assert decoded == node


@given(nodes, st.integers(0, 100))
def test_node_bytes_do_not_depend_on_the_revision(node: NodeState, other: int) -> None:
    assert encode_node(node) == encode_node(dataclasses.replace(node, revision=other))


def test_node_record_omits_defaults() -> None:
    assert b"labels" not in encode_node(NodeState(node_id="a", address="h:1"))
    assert b"revision" not in encode_node(NodeState(node_id="a", address="h:1", revision=9))


@given(st.builds(Event, id=text, ts=numbers, node_id=text, kind=text, from_=text, to=text,
                 reason=text, evidence=st.dictionaries(text, st.integers() | text, max_size=3)))
def test_event_round_trips_with_from_as_in_the_api(event: Event) -> None:
    data = encode_event(event)
    assert decode_event(data) == event
    if event.from_:
        assert b'"from":' in data


@given(st.builds(HistorySample, node_id=text, ts=numbers, seq=st.integers(0, 2**60),
                 health=text, system=metrics, load=metrics))
def test_sample_round_trips(sample: HistorySample) -> None:
    assert decode_sample(encode_sample(sample)) == sample


@given(st.builds(HistorySample, node_id=text, ts=numbers, seq=st.integers(0, 2**60),
                 health=text, system=metrics, load=metrics))
def test_sample_body_round_trips_with_the_key_fields_given_back(sample: HistorySample) -> None:
    body = encode_sample_body(sample)
    assert decode_sample_body(sample.node_id, sample.ts, sample.seq, body) == sample
    # A full record (as stored before bodies left out the key) decodes as a body too.
    full = encode_sample(sample)
    assert decode_sample_body(sample.node_id, sample.ts, sample.seq, full) == sample
    assert len(body) < len(full)
    packed = encode_sample_body_packed(sample)
    assert decode_sample_body(sample.node_id, sample.ts, sample.seq, packed) == sample


@given(nodes)
def test_packed_node_round_trips_and_bytes_follow_content_only(node: NodeState) -> None:
    data = encode_node_packed(node)
    assert decode_node(data, node.revision) == node
    assert encode_node_packed(dataclasses.replace(node, revision=node.revision + 1)) == data


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    data = b'{"node_id":"a","address":"h:1","seq":3,"future_field":[1,2]}'
    assert decode_node(data, 4) == NodeState(node_id="a", address="h:1", seq=3, revision=4)


def test_an_outlier_ejection_round_trips_through_the_codec() -> None:
    from nodewatch.model import OutlierState
    from nodewatch.store.codec import decode_node, encode_node, encode_node_packed

    node = NodeState(node_id="web-1", address="127.0.0.1:7301", ejections=2,
                     outlier_cleared_at=5.0,
                     outlier=OutlierState(since=10.0, until=70.0, reason="errors 40 %",
                                          ejections=2, evidence={"error_rate": 0.4}))
    for data in (encode_node(node), encode_node_packed(node)):
        assert decode_node(data) == node
    assert b'"outlier":' not in encode_node(NodeState(node_id="a", address="h:1"))


def test_the_material_digest_ignores_routine_fields_and_sees_every_other() -> None:
    base = NodeState("web-1", "10.0.0.1:7301", reasons=["cpu"], labels={"zone": "a"})
    routine = NodeState("web-1", "10.0.0.1:7301", reasons=["cpu"], labels={"zone": "a"},
                        seq=99, last_ts=5.0, last_seen=6.0, consecutive_failures=1,
                        consecutive_successes=4, system={"cpu_percent": 3.0},
                        load={"qps": 1.0}, revision=12)
    assert material_digest(routine) == material_digest(base)
    base.reasons.append("mem")  # mutated in place: the digest is of the bytes, taken now
    assert material_digest(base) != material_digest(routine)
    for change in ({"node_status": NodeStatus.DEGRADED}, {"admin": Admin.DRAINED},
                   {"health": Health.SUSPECT}, {"address": "10.0.0.2:7301"},
                   {"incarnation": 2}, {"udp_key": "ab"}):
        changed = dataclasses.replace(routine, **change)  # type: ignore[arg-type]
        assert material_digest(changed) != material_digest(routine), change


def test_a_rollup_round_trips_and_a_raw_sample_keeps_its_bytes() -> None:
    raw = HistorySample("web-1", 10.5, 3, "healthy", {"cpu_percent": 1.0}, {"qps": 2.0})
    assert b"span" not in encode_sample(raw) and b"span" not in encode_sample_body(raw)
    rolled = HistorySample("web-1", 10.5, 3, "suspect", {"cpu_percent": 1.0}, {}, 60.0,
                           {"cpu_percent": 4.0})
    assert decode_sample(encode_sample(rolled)) == rolled
    for body in (encode_sample_body(rolled), encode_sample_body_packed(rolled)):
        assert decode_sample_body("web-1", 10.5, 3, body) == rolled


@given(st.lists(st.tuples(numbers, st.integers(0, 2**63 - 1), st.integers(0, 4),
                          numbers, numbers), max_size=12))
def test_a_chunk_round_trips_column_by_column(rows: list[tuple[float, int, int, float,
                                                               float]]) -> None:
    chunk = SampleChunk("web-1", ("cpu_percent",), ("qps",), array("d", [r[0] for r in rows]),
                        array("q", [r[1] for r in rows]), bytes(r[2] for r in rows),
                        array("d", [v for r in rows for v in r[3:]]))
    assert decode_chunk_body("web-1", encode_chunk_body(chunk)) == chunk


def test_a_stored_chunk_that_does_not_add_up_is_refused() -> None:
    good = SampleChunk("n", ("cpu",), (), array("d", [1.0]), array("q", [1]), b"\x00",
                       array("d", [5.0]))
    for bad in (dataclasses.replace(good, health=b"\x09"),
                dataclasses.replace(good, values=array("d", [5.0, 6.0]))):
        with pytest.raises(ValueError):
            decode_chunk_body("n", encode_chunk_body(bad))
