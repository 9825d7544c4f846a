"""The per-node machine's state: every node with the indexes kept in step with its health, and
the recent failed checks that rise and fall count over."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any

from nodewatch.detect.policy import Policy
from nodewatch.model import CheckResult, Health, NodeState

__all__ = ["FailedCheck", "FailureLog", "NodeTable", "NodesView"]


@dataclass(slots=True)
class FailedCheck:
    at: float
    failure: str
    detail: str
    latency: float
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "class": self.failure,
            "detail": self.detail,
            "latency": round(self.latency, 4),
            "source": self.source,
        }

    def describe(self) -> str:
        return f"{self.failure} ({self.detail})" if self.detail else self.failure


class FailureLog:
    """The current streak of failed checks per node: the evidence of every failure event, and
    when the streak began, since ``fall`` failures confirm only once they span ``fall_span``.

    The start is not persisted: after a restart a streak counts its time afresh from the next
    failure (the startup grace holds confirmations longer than that anyway).
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._failures: dict[str, deque[FailedCheck]] = {}
        self._since: dict[str, float] = {}

    def record(self, node_id: str, result: CheckResult) -> deque[FailedCheck]:
        self._since.setdefault(node_id, result.at)
        failures = self._failures.get(node_id)
        if failures is None:
            # The first failure, its quick re-check and fall - 1 more: the whole streak that
            # confirms a node, as its evidence.
            failures = self._failures[node_id] = deque(maxlen=max(self.policy.fall + 1, 3))
        failures.append(FailedCheck(result.at,
                                    result.failure.value if result.failure else "error",
                                    result.detail, result.latency, result.source))
        return failures

    def clear(self, node_id: str) -> None:
        self._failures.pop(node_id, None)
        self._since.pop(node_id, None)

    def span(self, node_id: str, now: float) -> float:
        """How long the node's current streak of failures has lasted."""
        return now - self._since.get(node_id, now)

    def fall_reached(self, node: NodeState, now: float) -> bool:
        """``fall`` consecutive failures spread over ``fall_span``: a failure that lasts
        (fall - 1) unhealthy intervals, however often the node was checked meanwhile (the quick
        re-check, the poll a lease expiry asks for and repeated peer probes add no time)."""
        if node.consecutive_failures < self.policy.fall:
            return False
        # A hair of slack for float sums of jittered intervals that land on the bound exactly.
        return self.span(node.node_id, now) >= self.policy.fall_span - 1e-9

    def last(self, node_id: str) -> FailedCheck | None:
        failures = self._failures.get(node_id)
        return failures[-1] if failures else None

    def classes(self, node_id: str) -> set[str]:
        """The failure classes in the node's current streak."""
        return {f.failure for f in self._failures.get(node_id, ())}

    def checks(self, node_id: str) -> list[dict[str, Any]]:
        """The recent failed checks with their class."""
        return [f.to_json() for f in self._failures.get(node_id, ())]


class NodesView(Mapping[str, NodeState]):
    """A read-only view of the node table: reads go straight to the dict, writes do not exist."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: dict[str, NodeState]) -> None:
        self._nodes = nodes

    def __getitem__(self, node_id: str) -> NodeState:
        return self._nodes[node_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def keys(self) -> KeysView[str]:
        return self._nodes.keys()

    def values(self) -> ValuesView[NodeState]:
        return self._nodes.values()

    def items(self) -> ItemsView[str, NodeState]:
        return self._nodes.items()


class NodeTable:
    """Every node, and indexes kept in step with health so that no per-observation path scans
    all nodes. Writes go through its verbs; ``nodes`` is the read-only view."""

    def __init__(self, nodes: Iterable[NodeState] = ()) -> None:
        self._nodes: dict[str, NodeState] = {}
        self.view = NodesView(self._nodes)
        self._ids: list[str] | None = None
        self.unhealthy: set[str] = set()
        self.suspect_since: dict[str, float] = {}
        self.dead_count = 0
        self.unknown_count = 0  # never seen healthy since added (a start, a registration)
        self.out_count = 0  # cleaned up and not dead: what the budget counts
        # (since, node_id) of unhealthy nodes, for dead_after without scanning; lazy deletion.
        self._dead_due: list[tuple[float, str]] = []
        for node in nodes:
            self._nodes[node.node_id] = node
        for node in self._nodes.values():
            self._index(node, self._dead_due.append)
        heapq.heapify(self._dead_due)

    @property
    def nodes(self) -> Mapping[str, NodeState]:
        return self._nodes

    @property
    def suspect_count(self) -> int:
        return len(self.suspect_since)

    @property
    def watched(self) -> int:
        """Nodes not dead: dead ones are final until they register again."""
        return len(self._nodes) - self.dead_count

    def ids(self) -> list[str]:
        """All node ids, as a list to sample from (rebuilt only when nodes come or go)."""
        if self._ids is None or len(self._ids) != len(self._nodes):
            self._ids = list(self._nodes)
        return self._ids

    def _index(self, node: NodeState, due: Callable[[tuple[float, str]], None]) -> None:
        if node.health is Health.SUSPECT:
            self.suspect_since[node.node_id] = node.since
        elif node.health is Health.UNHEALTHY:
            self.unhealthy.add(node.node_id)
            due((node.since, node.node_id))
        elif node.health is Health.DEAD:
            self.dead_count += 1
        self.unknown_count += node.health is Health.UNKNOWN
        self.out_count += node.cleaned_up and node.health is not Health.DEAD

    def _unindex(self, node: NodeState) -> None:
        self.suspect_since.pop(node.node_id, None)
        self.unhealthy.discard(node.node_id)
        if node.health is Health.DEAD:
            self.dead_count -= 1
        self.unknown_count -= node.health is Health.UNKNOWN
        self.out_count -= node.cleaned_up and node.health is not Health.DEAD

    def add(self, node: NodeState) -> None:
        """A new node, or a replacement for the one with its id (a mirrored copy)."""
        old = self._nodes.get(node.node_id)
        if old is not None:
            self._unindex(old)
        self._nodes[node.node_id] = node
        self._ids = None
        self._index(node, lambda entry: heapq.heappush(self._dead_due, entry))

    def drop(self, node_id: str) -> NodeState | None:
        node = self._nodes.pop(node_id, None)
        if node is not None:
            self._unindex(node)
            self._ids = None
        return node

    def set_health(self, node: NodeState, health: Health) -> Health:
        """Change the node's health (its ``since`` already set); returns the health before."""
        before = node.health
        node.health = health
        self.unknown_count += (health is Health.UNKNOWN) - (before is Health.UNKNOWN)
        if health is Health.SUSPECT:
            self.suspect_since[node.node_id] = node.since
        else:
            self.suspect_since.pop(node.node_id, None)
        if before is Health.UNHEALTHY:
            self.unhealthy.discard(node.node_id)
        elif before is Health.DEAD:
            self.dead_count -= 1
            self.out_count += node.cleaned_up
        if health is Health.UNHEALTHY:
            self.unhealthy.add(node.node_id)
            heapq.heappush(self._dead_due, (node.since, node.node_id))
        elif health is Health.DEAD:
            self.dead_count += 1
            self.out_count -= node.cleaned_up
        return before

    def set_cleaned_up(self, node: NodeState, value: bool) -> None:
        if node.cleaned_up != value:
            if node.health is not Health.DEAD:
                self.out_count += 1 if value else -1
            node.cleaned_up = value

    def due_dead(self, now: float, dead_after: float) -> Iterator[tuple[float, NodeState]]:
        """Nodes unhealthy for ``dead_after`` or longer, with the time they went unhealthy."""
        due = self._dead_due
        while due and now - due[0][0] >= dead_after:
            since, node_id = heapq.heappop(due)
            node = self._nodes.get(node_id)
            if node is None or node.health is not Health.UNHEALTHY or node.since != since:
                continue  # stale entry: the node recovered, was removed or went down again
            yield since, node
