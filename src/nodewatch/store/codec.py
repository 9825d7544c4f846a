"""NodeState / Event / HistorySample <-> compact JSON bytes, shared by every store backend.

SQLite stores nodes and sample bodies as MessagePack instead (``*_packed``: the same records,
about twice as fast to encode, a few bytes smaller); the decoders take either, told apart by
the first byte (a JSON record starts with ``{``, a MessagePack map never does).

Records are msgspec Structs mirroring the domain dataclasses with defaults omitted (the node's
is built from NodeState's own fields), so a stored node is about a third smaller than its full
JSON and decoding ignores fields it does not know (an older coordinator can read a newer one's
records). ``NodeState.revision`` is never encoded:
it belongs to the store (a column, an etcd mod_revision), not to the node's story.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from array import array
from operator import attrgetter
from typing import Any

import msgspec

from nodewatch.detect.journal import ROUTINE_FIELDS
from nodewatch.model import (
    HEALTH_CODES,
    Event,
    HistorySample,
    NodeState,
    SampleChunk,
)

__all__ = [
    "decode_chunk_body",
    "decode_event",
    "decode_node",
    "decode_sample",
    "decode_sample_body",
    "encode_chunk_body",
    "encode_event",
    "encode_node",
    "encode_node_packed",
    "encode_sample",
    "encode_sample_body",
    "encode_sample_body_packed",
    "material_digest",
]


def _record_of(model: type[Any], skip: tuple[str, ...] = ()) -> type[msgspec.Struct]:
    """A Struct with ``model``'s fields, types, order and defaults (minus ``skip``), omitting
    defaults when encoding: the stored shape follows the dataclass by construction."""
    hints = typing.get_type_hints(model)
    fields: list[tuple[str, Any, Any]] = []
    for item in dataclasses.fields(model):
        if item.name in skip:
            continue
        if isinstance(item.default, float):
            # msgspec omits a float default only when it is the very same object; a copy keeps
            # floats always written, as the hand-written record did (stored bytes unchanged).
            fields.append((item.name, hints[item.name], float(repr(item.default))))
        elif item.default is not dataclasses.MISSING:
            fields.append((item.name, hints[item.name], item.default))
        elif item.default_factory is not dataclasses.MISSING:
            fields.append((item.name, hints[item.name],
                           msgspec.field(default_factory=item.default_factory)))
        else:
            fields.append((item.name, hints[item.name]))  # type: ignore[arg-type]
    return msgspec.defstruct(f"{model.__name__.removesuffix('State')}Record", fields,
                             omit_defaults=True, module=__name__)


# Stored shape of a NodeState: its fields without ``revision``.
NodeRecord = _record_of(NodeState, skip=("revision",))


class EventRecord(msgspec.Struct, omit_defaults=True, rename={"from_": "from"}):
    """Stored shape of an Event (``from`` on the wire, as in the API)."""

    id: str
    ts: float
    node_id: str
    kind: str
    from_: str = ""
    to: str = ""
    reason: str = ""
    evidence: dict[str, Any] = {}


class SampleRecord(msgspec.Struct, omit_defaults=True):
    """Stored shape of a HistorySample (a raw sample's bytes are as before rollups)."""

    node_id: str
    ts: float
    seq: int
    health: str
    system: dict[str, float]
    load: dict[str, float]
    span: float | None = None  # None, not 0.0: msgspec omits a float default only by identity
    peak: dict[str, float] = {}


class SampleBody(msgspec.Struct, omit_defaults=True):
    """A HistorySample without what a store keeps in its key (node_id, ts, seq): about a
    fifth fewer bytes per sample. Decodes a full SampleRecord too (extra fields are ignored)."""

    health: str
    system: dict[str, float]
    load: dict[str, float]
    span: float | None = None
    peak: dict[str, float] = {}


class ChunkBody(msgspec.Struct, array_like=True):
    """A SampleChunk without its node_id (the store's key holds it): the columns as raw
    little-endian bytes, so a minute of one node's samples is one short blob."""

    system: list[str]
    load: list[str]
    ts: bytes
    seq: bytes
    health: bytes
    values: bytes


# attrgetter built from the record's own fields keeps the positional order right by construction.
_node_fields = attrgetter(*NodeRecord.__struct_fields__)
_event_fields = attrgetter(*EventRecord.__struct_fields__)
_material_fields = attrgetter(*(item.name for item in dataclasses.fields(NodeState)
                                if item.name not in ROUTINE_FIELDS))

_encoder = msgspec.json.Encoder()
_packer = msgspec.msgpack.Encoder()
_node_decoder = msgspec.json.Decoder(NodeState)
_node_unpacker = msgspec.msgpack.Decoder(NodeState)
_event_decoder = msgspec.json.Decoder(EventRecord)
_sample_decoder = msgspec.json.Decoder(SampleRecord)
_body_decoder = msgspec.json.Decoder(SampleBody)
_body_unpacker = msgspec.msgpack.Decoder(SampleBody)
_JSON_OBJECT = ord("{")
_chunk_unpacker = msgspec.msgpack.Decoder(ChunkBody)
_BIG_ENDIAN = sys.byteorder == "big"


def encode_node(node: NodeState) -> bytes:
    """The node's content without its store revision; equal content gives equal bytes."""
    return _encoder.encode(NodeRecord(*_node_fields(node)))


def encode_node_packed(node: NodeState) -> bytes:
    return _packer.encode(NodeRecord(*_node_fields(node)))


def decode_node(data: bytes, revision: int = 0) -> NodeState:
    node = (_node_decoder if data[0] == _JSON_OBJECT else _node_unpacker).decode(data)
    node.revision = revision
    return node


def encode_event(event: Event) -> bytes:
    return _encoder.encode(EventRecord(*_event_fields(event)))


def decode_event(data: bytes) -> Event:
    return Event(*_event_fields(_event_decoder.decode(data)))


def encode_sample(sample: HistorySample) -> bytes:
    return _encoder.encode(SampleRecord(sample.node_id, sample.ts, sample.seq, sample.health,
                                        sample.system, sample.load, sample.span or None,
                                        sample.peak))


def decode_sample(data: bytes) -> HistorySample:
    record = _sample_decoder.decode(data)
    return HistorySample(record.node_id, record.ts, record.seq, record.health, record.system,
                         record.load, record.span or 0.0, record.peak)


def encode_sample_body(sample: HistorySample) -> bytes:
    """The sample without node_id, ts and seq, for a store whose key holds them exactly."""
    return _encoder.encode(SampleBody(sample.health, sample.system, sample.load,
                                      sample.span or None, sample.peak))


def encode_sample_body_packed(sample: HistorySample) -> bytes:
    return _packer.encode(SampleBody(sample.health, sample.system, sample.load,
                                     sample.span or None, sample.peak))


def decode_sample_body(node_id: str, ts: float, seq: int, data: bytes) -> HistorySample:
    body = (_body_decoder if data[0] == _JSON_OBJECT else _body_unpacker).decode(data)
    return HistorySample(node_id, ts, seq, body.health, body.system, body.load,
                         body.span or 0.0, body.peak)


def _little(column: array[Any]) -> bytes:
    if _BIG_ENDIAN:
        column = array(column.typecode, column)
        column.byteswap()
    return column.tobytes()


def _column(typecode: str, data: bytes) -> array[Any]:
    column = array(typecode)
    column.frombytes(data)
    if _BIG_ENDIAN:
        column.byteswap()
    return column


def encode_chunk_body(chunk: SampleChunk) -> bytes:
    return _packer.encode(ChunkBody(list(chunk.system), list(chunk.load), _little(chunk.ts),
                                    _little(chunk.seq), chunk.health, _little(chunk.values)))


def decode_chunk_body(node_id: str, data: bytes) -> SampleChunk:
    """A stored chunk; a body whose columns disagree in length is refused (ValueError)."""
    body = _chunk_unpacker.decode(data)
    chunk = SampleChunk(node_id, tuple(body.system), tuple(body.load), _column("d", body.ts),
                        _column("q", body.seq), body.health, _column("d", body.values))
    n = len(chunk.ts)
    if not (len(chunk.seq) == len(chunk.health) == n
            and len(chunk.values) == n * (len(chunk.system) + len(chunk.load))):
        raise ValueError("a stored history chunk's columns disagree in length")
    if max(chunk.health, default=0) >= len(HEALTH_CODES):
        raise ValueError("a stored history chunk holds an unknown health code")
    return chunk


def material_digest(node: NodeState) -> int:
    """A hash of the node's material fields (all but ``detect.journal.ROUTINE_FIELDS``): equal
    for equal content, whatever was mutated in place (the bytes are taken now); about 3 us."""
    return hash(_packer.encode(_material_fields(node)))
