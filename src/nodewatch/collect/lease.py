"""The agent's etcd lease mode: publish ``P/agents/<node_id>`` under a lease kept alive about
every TTL/3. A dead agent stops refreshing and its key expires by itself; the coordinators'
leader watches the prefix and treats the expiry as a failed check. A clean stop revokes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

import msgspec

from nodewatch.protocol import AgentLease

__all__ = ["publish_under_lease"]

log = logging.getLogger("nodewatch.agent.lease")
RETRY = 1.0


async def publish_under_lease(url: str, node_id: str, announcement: Callable[[], AgentLease],
                              ttl: float) -> None:
    """Run until cancelled: (re)publish after a lost lease or an etcd outage."""
    from nodewatch.store.etcd import EtcdStore  # imported only in lease mode

    store = EtcdStore.from_url(url)
    await store.open()
    seconds = max(1, math.ceil(ttl))
    key = store.key("agents", node_id)
    lease: int | None = None
    try:
        while True:
            try:
                lease = await store.grant(seconds)
                await store.kv.put(key, msgspec.json.encode(announcement()), lease=lease,
                                   timeout=store.timeout)
                keepalive = store.keepalive(lease, seconds)
                log.info("published %s under lease %x (ttl %ss)", key.decode(), lease, seconds)
                try:
                    await keepalive.lost.wait()
                finally:
                    await keepalive.stop(revoke=False)
                log.warning("liveness lease %x lost; publishing again", lease)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - etcd unreachable: try again
                log.warning("cannot publish liveness to etcd: %s", error)
                await asyncio.sleep(RETRY)
    finally:
        if lease is not None and store.client is not None and store.client.lease is not None:
            with contextlib.suppress(Exception):
                await store.client.lease.revoke(lease, timeout=2.0, max_attempts=1)
        await store.close()
