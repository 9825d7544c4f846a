"""Prometheus service discovery: the nodes as ``http_sd`` / ``file_sd`` target groups.

One group per node, its target the agent's address (the agent serves ``GET /metrics`` on the
address it registered), its labels the node's state plus its own labels made valid Prometheus
label names (``[a-zA-Z_][a-zA-Z0-9_]*``, never ``__``-prefixed, never a built-in's name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from nodewatch.model import NodeState

__all__ = ["BUILTIN_LABELS", "TargetGroup", "label_name", "node_label_names", "target_groups"]

# The labels every group has; a node label of the same name becomes ``label_NAME``.
BUILTIN_LABELS = ("node_id", "health", "schedulable", "node_status", "admin")
_INVALID = re.compile(r"[^A-Za-z0-9_]")


class TargetGroup(msgspec.Struct):
    """One entry of Prometheus' ``http_sd`` / ``file_sd`` list."""

    targets: list[str]
    labels: dict[str, str]


def label_name(key: str) -> str:
    """``key`` as a valid label name: other characters become ``_``, a leading digit (or an
    empty key) gets a ``_`` in front."""
    name = _INVALID.sub("_", key)
    return name if name and not name[0].isdigit() else "_" + name


def node_label_names(keys: Iterable[str]) -> dict[str, str]:
    """Each node label key -> its label name, all distinct and none a built-in: a name
    Prometheus reserves (``__``) becomes ``label__…``, a built-in ``label_NAME``, and keys
    that sanitise alike (``zone-a``, ``zone_a``) get ``_2``, ``_3`` in the order of the keys."""
    taken = set(BUILTIN_LABELS)
    names: dict[str, str] = {}
    for key in sorted(keys):
        base = label_name(key)
        if base.startswith("__"):
            base = "label" + base
        elif base in taken and base in BUILTIN_LABELS:
            base = "label_" + base
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
            if name.startswith("__"):  # "_" + "_2"
                name = "label" + name
        taken.add(name)
        names[key] = name
    return names


def target_groups(nodes: Iterable[NodeState]) -> list[TargetGroup]:
    """The groups for ``nodes`` (those without an address are left out), by node id."""
    groups: list[TargetGroup] = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        if not node.address:
            continue
        labels = {name: node.labels[key]
                  for key, name in node_label_names(node.labels).items()}
        labels.update(node_id=node.node_id, health=node.health.value,
                      schedulable="true" if node.schedulable else "false",
                      node_status=node.node_status.value, admin=node.admin.value)
        groups.append(TargetGroup(targets=[node.address], labels=labels))
    return groups
