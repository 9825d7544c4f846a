"""What the dashboard reads of a large fleet, at the cost of what changed: node views (and the
table's compact rows, ``node_row``) encoded once per change (``NodeViews``), the fleet's
counts, label groups and attention list kept up to date from the cluster's revisions
(``FleetSummary``), and an hour of counts in a ring.

Nothing here walks the whole fleet per request: a reader follows ``Cluster.revisions``
(``detect/journal.py``), and a full walk happens only when the cluster itself was replaced
(a restart of the core, a takeover) or its revisions forgot what a reader missed.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodewatch.model import Admin, Health, NodeState, NodeStatus

if TYPE_CHECKING:
    from nodewatch.detect.cluster import Cluster

__all__ = ["ATTENTION_LIMIT", "FleetSummary", "HISTORY_INTERVAL", "HISTORY_SPAN",
           "LABEL_VALUES_LIMIT", "NodeViews", "ROW_COLUMNS", "Revision", "attention_reasons",
           "current_revision", "node_row", "page", "parse_revision"]

HISTORY_INTERVAL = 15.0  # one sample of the fleet's counts every 15 s ...
HISTORY_SPAN = 3600.0  # ... for the last hour: 240 samples
ATTENTION_LIMIT = 200  # the attention list's length in one answer (the total is also given)
LABEL_VALUES_LIMIT = 64  # values per label key in one answer, most populous first
_REVISION_RE = re.compile(r"^([0-9a-f]{1,16})-(\d{1,20})$")
_SEVERITY = {"unhealthy": 0, "suspect": 1, "outlier": 2, "review": 3, "drain waiting": 4}


@dataclass(frozen=True)
class Revision:
    """A reader's place in a cluster's changes: ``EPOCH-N`` on the wire."""

    epoch: str
    number: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.number}"


def parse_revision(text: str) -> Revision | None:
    """``EPOCH-N`` as given in a ``revision``; None when it is not one."""
    match = _REVISION_RE.match(text)
    return Revision(match.group(1), int(match.group(2))) if match else None


def current_revision(cluster: Cluster) -> Revision:
    revisions = cluster.revisions
    return Revision(revisions.epoch, revisions.revision)


def attention_reasons(node: NodeState) -> list[str]:
    """Why an operator should look at this node now (empty: nothing to look at)."""
    why: list[str] = []
    if node.health in (Health.SUSPECT, Health.UNHEALTHY):
        why.append(node.health.value)
    if getattr(node, "outlier", False):  # gray failures (outlier detection), when present
        why.append("outlier")
    if node.admin is Admin.REVIEW:
        why.append("review")
    if node.drain is not None and not node.drain.complete:
        why.append("drain waiting")
    return why


# The table's row of a node (``GET /v1/nodes?format=rows``): what a list of thousands shows,
# as one JSON array per node, in this order (``api/schemas.py`` ``NodeRow``). About a quarter
# of a node view's bytes and half its encoding; a node's full view is one GET away.
ROW_COLUMNS = ("node_id", "address", "health", "node_status", "admin", "schedulable",
               "cpu_percent", "mem_percent", "load1", "qps", "error_rate", "last_seen",
               "labels", "reasons", "attention")


def node_row(node: NodeState) -> tuple[Any, ...]:
    """A node as a row of ``ROW_COLUMNS`` (the reasons as in its view)."""
    system, load = node.system, node.load
    reasons = node.reasons
    if node.health_reason or node.outlier is not None:
        reasons = [*reasons, *([node.health_reason] if node.health_reason else []),
                   *([f"outlier: {node.outlier.reason}"] if node.outlier is not None else [])]
    return (node.node_id, node.address, node.health.value, node.node_status.value,
            node.admin.value, node.schedulable, system.get("cpu_percent"),
            system.get("mem_percent"), system.get("load1"), load.get("qps"),
            load.get("error_rate"), node.last_seen, node.labels, reasons,
            attention_reasons(node))


class NodeViews:
    """Encoded node views (one cache per shape: the full view, the table's row), each encoded
    once per change of its node, and the node ids in order, sorted once per change of the set
    of nodes."""

    def __init__(self, cluster: Callable[[], Cluster],
                 shapes: Mapping[str, Callable[[NodeState], Any]],
                 encode: Callable[[Any], bytes]) -> None:
        self._cluster = cluster
        self._shapes = dict(shapes)
        self._encode = encode
        self._encoded: dict[str, dict[str, tuple[str, int, bytes]]] = {
            name: {} for name in self._shapes}
        self._order_key: tuple[str, int] | None = None
        self._order: list[str] = []

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(self._shapes)

    def encoded(self, nodes: Iterable[NodeState], shape: str) -> list[bytes]:
        """Each node's encoded ``shape``, from the cache while its node did not change."""
        revisions = self._cluster().revisions
        epoch, of, cache = revisions.epoch, revisions.of, self._encoded[shape]
        view, encode = self._shapes[shape], self._encode
        out: list[bytes] = []
        for node in nodes:
            number = of(node.node_id)
            cached = cache.get(node.node_id)
            if cached is not None and cached[1] == number and cached[0] == epoch and number:
                out.append(cached[2])
                continue
            data = encode(view(node))
            cache[node.node_id] = (epoch, number, data)
            out.append(data)
        if len(cache) > 2 * len(self._cluster().nodes) + 1024:
            self._prune(cache)
        return out

    def _prune(self, cache: dict[str, tuple[str, int, bytes]]) -> None:
        nodes = self._cluster().nodes
        for node_id in [i for i in cache if i not in nodes]:
            del cache[node_id]

    def ordered_ids(self) -> list[str]:
        """Every node id in order (cached until a node comes or goes)."""
        cluster = self._cluster()
        key = (cluster.revisions.epoch, cluster.revisions.members)
        if key != self._order_key:
            self._order = sorted(cluster.nodes)
            self._order_key = key
        return self._order

    def changes(self, since: Revision) -> tuple[list[str], list[str]] | None:
        """Ids changed and removed since ``since`` (changed ones in id order); None when the
        reader must read everything again (another epoch, or removals forgotten)."""
        revisions = self._cluster().revisions
        if since.epoch != revisions.epoch:
            return None
        found = revisions.since(since.number)
        if found is None:
            return None
        changed, removed = found
        # A removal may be noted after the node left (its last action is stored): the table
        # says who is still there.
        nodes = self._cluster().nodes
        gone = [i for i in changed if i not in nodes]
        return sorted(i for i in changed if i in nodes), sorted({*removed, *gone})


def page(ids: list[str], cursor: str | None, limit: int | None) -> tuple[list[str], str | None]:
    """The ids after ``cursor`` (ids in order), at most ``limit``, and the next cursor."""
    start = bisect.bisect_right(ids, cursor) if cursor else 0
    if limit is None or start + limit >= len(ids):
        return ids[start:], None
    chosen = ids[start:start + limit]
    return chosen, chosen[-1]


# What one node adds to the summary's counts: health, node status, admin, schedulable, labels,
# attention reasons (a plain tuple: built and compared for every changed node).
_Mark = tuple[str, str, str, bool, tuple[tuple[str, str], ...], tuple[str, ...]]


def _mark(node: NodeState) -> _Mark:
    return (node.health.value, node.node_status.value, node.admin.value, node.schedulable,
            tuple(node.labels.items()), tuple(attention_reasons(node)))


class FleetSummary:
    """Counts by health / node status / admin, counts by health per label value, the nodes
    that need attention, and an hour of counts sampled every ``HISTORY_INTERVAL``: kept up to
    date from what changed since the last look."""

    def __init__(self, cluster: Callable[[], Cluster], span: float = HISTORY_SPAN,
                 interval: float = HISTORY_INTERVAL) -> None:
        self._cluster = cluster
        self.interval = interval
        self.history: deque[dict[str, Any]] = deque(maxlen=max(1, int(span / interval)))
        self._at: Revision | None = None
        self._marks: dict[str, _Mark] = {}
        self.health: Counter[str] = Counter()
        self.node_status: Counter[str] = Counter()
        self.admin: Counter[str] = Counter()
        self.schedulable = 0
        self.labels: dict[str, dict[str, Counter[str]]] = {}
        self.attention: dict[str, tuple[str, ...]] = {}

    def refresh(self) -> Revision:
        """Bring the counts up to date; the revision they are at."""
        cluster = self._cluster()
        now = current_revision(cluster)
        if self._at == now:
            return now
        found = None
        if self._at is not None and self._at.epoch == now.epoch:
            found = cluster.revisions.material_since(self._at.number)
        if found is None:
            self._reset()
            changed: Iterable[str] = list(cluster.nodes)
            removed: Iterable[str] = ()
        else:
            changed, removed = found
        nodes = cluster.nodes
        for node_id in removed:
            self._take(node_id)
        for node_id in changed:
            node = nodes.get(node_id)
            if node is None:
                self._take(node_id)
            else:
                self._put(node_id, _mark(node))
        self._at = now
        return now

    def _reset(self) -> None:
        self._marks.clear()
        self.health.clear()
        self.node_status.clear()
        self.admin.clear()
        self.schedulable = 0
        self.labels.clear()
        self.attention.clear()

    def _take(self, node_id: str) -> None:
        mark = self._marks.pop(node_id, None)
        if mark is not None:
            self._count(node_id, mark, -1)

    def _put(self, node_id: str, mark: _Mark) -> None:
        old = self._marks.get(node_id)
        if old == mark:
            return
        if old is not None:
            self._count(node_id, old, -1)
        self._marks[node_id] = mark
        self._count(node_id, mark, 1)

    def _count(self, node_id: str, mark: _Mark, step: int) -> None:
        health, status, admin, schedulable, labels, attention = mark
        self.health[health] += step
        self.node_status[status] += step
        self.admin[admin] += step
        self.schedulable += step * schedulable
        for key, value in labels:
            groups = self.labels.get(key)
            if groups is None:
                groups = self.labels[key] = {}
            group = groups.get(value)
            if group is None:
                group = groups[value] = Counter()
            group[health] += step
            group["total"] += step
            if step < 0 and group["total"] <= 0:
                del groups[value]
                if not groups:
                    del self.labels[key]
        if attention:
            if step > 0:
                self.attention[node_id] = attention
            else:
                self.attention.pop(node_id, None)

    def counts(self) -> dict[str, Any]:
        """The counts now: every health, status and admin value, zeros included."""
        return {
            "total": len(self._marks),
            "schedulable": self.schedulable,
            "attention": len(self.attention),
            "health": {h.value: self.health[h.value] for h in Health},
            "node_status": {s.value: self.node_status[s.value] for s in NodeStatus},
            "admin": {a.value: self.admin[a.value] for a in Admin},
        }

    def sample(self, now: float) -> None:
        """Add one point to the hour of counts (the caller's timer calls it every interval)."""
        self.refresh()
        self.history.append({"ts": now, **self.counts()})

    def answer(self, history_since: float | None) -> dict[str, Any]:
        """The ``GET /v1/summary`` document (``api/schemas.py`` ``SummaryResponse``)."""
        revision = self.refresh()
        nodes = self._cluster().nodes
        ranked = sorted(self.attention.items(), key=lambda item: (
            min(_SEVERITY.get(why, 9) for why in item[1]), -nodes[item[0]].since, item[0]))
        attention = []
        for node_id, why in ranked[:ATTENTION_LIMIT]:
            node = nodes[node_id]
            attention.append({"node_id": node_id, "why": list(why), "health": node.health.value,
                              "node_status": node.node_status.value, "admin": node.admin.value,
                              "since": node.since, "reasons": node.to_json()["reasons"]})
        labels: dict[str, dict[str, dict[str, int]]] = {}
        for key, groups in sorted(self.labels.items()):
            top = sorted(groups.items(), key=lambda g: (-g[1]["total"], g[0]))
            labels[key] = {value: {k: n for k, n in group.items() if n}
                           for value, group in top[:LABEL_VALUES_LIMIT]}
        return {
            "revision": str(revision),
            **self.counts(),
            "labels": labels,
            "attention_nodes": attention,
            "history_interval": self.interval,
            "history": [s for s in self.history
                        if history_since is None or s["ts"] > history_since],
        }
