"""The Store protocol every backend satisfies (``nodewatch.store.open`` picks one by URL).

The coordinator's event loop is the only caller; every method is async and no backend may block
the loop. One contract suite (tests/store/test_contract.py) runs against every backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeVar

from nodewatch.model import Event, HistorySample, NodeState, SampleChunk

__all__ = ["Fenced", "Store", "StoreUnavailable", "WritesInFlight", "store_label"]


class StoreUnavailable(Exception):
    """A store call failed or did not answer within ``[coordinator] store_timeout``.

    ``store`` names the store (``sqlite (path)``, ``redis (url)``, ``etcd (endpoints)``),
    ``cause`` what went wrong. ``uncertain`` is set when the store cannot tell whether a write
    landed (a timeout after the request was sent): the caller must re-read, not assume.
    The HTTP edge answers 503 with the message.
    """

    def __init__(self, store: str, cause: str, *, uncertain: bool = False,
                 action: str = "write") -> None:
        super().__init__(f"store {store} cannot {action}: {cause}")
        self.action = action
        self.store = store
        self.cause = cause
        self.uncertain = uncertain


class Fenced(StoreUnavailable):
    """A store refused a node or event write because the key that made this coordinator the
    node's decider is no longer on its lease: another coordinator may decide for the node
    now, so nothing of this one's lands (a write sent before the lease was lost and delivered
    after it, through a slow or cut-off member, is refused rather than stored)."""

    def __init__(self, store: str, keys: Sequence[bytes]) -> None:
        names = ", ".join(sorted({k.decode(errors="replace") for k in keys})[:3])
        # Uncertain: a write in several transactions may have landed in part before the
        # lease was lost; the caller re-reads what is stored.
        super().__init__(store, f"this coordinator no longer holds {names} (fenced: "
                         "another coordinator may decide for these nodes)", uncertain=True)


def store_label(store: object) -> str:
    """``sqlite (nodewatch-data/state.db)``, ``redis (redis://host:6379/0)``, ``etcd (h:2379)``:
    how messages name a store."""
    kind = type(store).__name__.removesuffix("Store").lower() or "store"
    for attr in ("path", "url", "endpoints"):
        where = getattr(store, attr, None)
        if where is not None:
            text = ",".join(where) if isinstance(where, list) else str(where)
            return f"{kind} ({text})"
    return kind


class Store(Protocol):
    """Current node state, the event log, 1 h of history per node and small coordinator meta."""

    async def open(self) -> None:
        """Connect and create what is missing; nothing else may be called before."""

    async def close(self) -> None:
        """Flush pending writes, then release connections; the store cannot be reused."""

    async def flush(self) -> None:
        """Return once every write queued before this call is durable (survives kill -9)."""

    async def load_nodes(self) -> list[NodeState]:
        """Every stored node with its current ``revision``, ordered by node_id."""
        ...

    async def get_node(self, node_id: str) -> NodeState | None: ...

    async def save_nodes(self, nodes: Sequence[NodeState]) -> list[str]:
        """Compare-and-swap each node on ``revision``; return the node_ids that lost.

        A node is written only if the stored revision equals ``node.revision`` (0: must not
        exist yet); on success ``node.revision`` is set to the new, larger store revision. A
        write whose content equals the stored content succeeds without a change (replay-safe)
        and takes the stored revision. Losers are left untouched: re-read and retry.
        """
        ...

    async def delete_node(self, node_id: str) -> bool:
        """Remove a node whatever its revision; True if it existed. History ages out by TTL."""
        ...

    async def append_events(self, events: Sequence[Event]) -> None:
        """Store events (an id already stored is ignored) and drop the oldest over retention."""

    async def events_after(self, after: str | None, limit: int = 1000) -> list[Event]:
        """Events with id > ``after`` in id order; ``None`` starts at the oldest retained."""
        ...

    async def last_event_id(self) -> str | None: ...

    async def add_samples(self, samples: Sequence[HistorySample]) -> None:
        """Append history; a sample already stored (same node_id, ts, seq and tier) is ignored.

        Two tiers (store/tiers.py): raw samples (``span`` 0) and rollups (``span`` > 0), kept
        apart so that each ages out on its own."""

    async def add_chunks(self, chunks: Sequence[SampleChunk]) -> None:
        """Append raw samples gathered per node (store/tiers.py ``SampleChunks``), read back by
        ``history`` as the samples they hold: one row per chunk where the store can, else
        ``add_samples`` of ``chunk.samples()``."""

    async def history(self, node_id: str, since: float) -> list[HistorySample]:
        """One node's points with ``ts >= since``, ordered by ts: rollups older than the
        oldest raw sample returned, then the raw samples."""
        ...

    async def prune(self, now: float, history_ttl: float,
                    full_resolution: float | None = None) -> int:
        """Delete rollups older than ``now - history_ttl`` and raw samples older than
        ``now - full_resolution`` (``None``: ``history_ttl`` too) in short steps; rows deleted."""
        ...

    async def get_meta(self, key: str) -> str | None: ...

    async def put_meta(self, key: str, value: str) -> None: ...

    async def probe_write(self, now: float) -> None:
        """A durable write that proves the store takes new data again after a failure.

        A tiny write is not proof: a full SQLite disk still takes a row rewritten in place in
        the room its pages have, while new history and events fail. So SQLite's probe needs
        fresh room (and gives it back in the same transaction); Redis and etcd refuse every
        write when out of memory or space, so a small one tells."""


T = TypeVar("T")


class WritesInFlight:
    """Counts a backend's writes in flight, so ``flush()`` and ``close()`` can wait for every
    write issued before them (shared by the network backends)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, work: Awaitable[T]) -> T:
        self._count += 1
        self._idle.clear()
        try:
            return await work
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()
