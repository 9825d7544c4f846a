"""The agent's current report: one place that derives status and reasons, and caches the
encoded ``/health`` body so that serving it costs no work beyond the HTTP response."""

from __future__ import annotations

from typing import Any

import msgspec

from nodewatch.detect.types import NodeStatus

__all__ = ["HealthDoc", "derive_status", "encode_health"]


class HealthDoc(msgspec.Struct, kw_only=True):
    """The ``GET /health`` body, field order as in SPEC.md."""

    status: NodeStatus
    node_id: str
    uptime: float
    version: str
    incarnation: int
    seq: int
    ts: float
    reasons: list[str]
    system: dict[str, float]
    load: dict[str, float]
    # Extensions: how often the agent samples and how many samples it took this incarnation,
    # so a coordinator can tell "kept running while unreachable" from "was frozen".
    sample_interval: float = 0.0
    samples: int = 0


_encoder = msgspec.json.Encoder()


def encode_health(doc: HealthDoc) -> bytes:
    return _encoder.encode(doc)


def derive_status(manual: NodeStatus | None, manual_reason: str, rule_reasons: list[str],
                  check_reasons: list[str]) -> tuple[NodeStatus, list[str]]:
    """Draining (manual) wins over degraded (manual, rule or check), which wins over ok."""
    reasons: list[str] = []
    if manual is not None:
        reasons.append(manual_reason or f"set {manual.value} by operator")
    reasons.extend(rule_reasons)
    reasons.extend(check_reasons)
    if manual is NodeStatus.DRAINING:
        return NodeStatus.DRAINING, reasons
    if reasons:
        return NodeStatus.DEGRADED, reasons
    return NodeStatus.OK, reasons


def heartbeat_payload(doc: HealthDoc) -> dict[str, Any]:
    return {
        "node_id": doc.node_id,
        "incarnation": doc.incarnation,
        "seq": doc.seq,
        "ts": doc.ts,
        "status": doc.status.value,
        "reasons": doc.reasons,
        "system": doc.system,
        "load": doc.load,
        "sample_interval": doc.sample_interval,
        "samples": doc.samples,
    }
