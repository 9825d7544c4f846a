"""Run a coordinator process: store + core + poller + HTTP API, stopped cleanly by a signal."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import ssl

from aiohttp import web

from nodewatch.api.app import build_app
from nodewatch.api.udp import start_udp_heartbeats
from nodewatch.config import Config
from nodewatch.coordinator.leadership import Leadership
from nodewatch.coordinator.runs import EtcdRuns
from nodewatch.coordinator.service import ActionSink, Coordinator
from nodewatch.coordinator.shares import ShareKeeper
from nodewatch.protocol import split_host_port
from nodewatch.respond.haproxy_stats import build_observers
from nodewatch.respond.runner import ActionRunner
from nodewatch.store.etcd import EtcdStore
from nodewatch.store.open import open_store
from nodewatch.systemd import Notifier
from nodewatch.tls import server_context
from nodewatch.web import beyond_loopback

__all__ = ["build_actions", "raise_descriptor_limit", "serve", "status_line", "tls_context",
           "tune_gc"]

log = logging.getLogger("nodewatch.coordinator")
ACCEPT_BACKLOG = 4096  # connections waiting to be accepted (see serve)
DESCRIPTORS_CAP = 1_048_576  # the soft limit asked for when the hard one is unlimited
DESCRIPTORS_PER_NODE = 1.2  # a kept-alive poll connection each, and room for the API's own


def raise_descriptor_limit(nodes: int = 0) -> int:
    """The soft descriptor limit up to the hard one, as servers do: a shell's usual 1,024 is
    out at about a thousand polled nodes (each keeps its connection), and a check that cannot
    open a socket is no evidence (``FailureClass.LOCAL``), so the nodes past it go unwatched.
    Warns when even the hard limit is short of ``nodes``. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = DESCRIPTORS_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # a kernel cap (fs.nr_open) below the hard limit
            log.info("descriptor limit stays at %d: %s", soft, exc)
    needed = int(nodes * DESCRIPTORS_PER_NODE) + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("descriptor limit %d is short of the %d that %d nodes may need (one kept-"
                    "alive poll connection each): checks past it fail on this side and watch "
                    "nothing; raise LimitNOFILE / ulimit -n, or share the nodes among more "
                    "coordinators", soft, needed, nodes)
    return int(soft)


def tune_gc() -> None:
    """Fewer, later full collections: with thousands of kept-alive connections a default
    full pass takes ~180 ms and shows up as check lateness. The loaded state is frozen so
    collections skip it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """Server TLS (1.2 or newer) from ``[coordinator] tls_cert/tls_key``; with
    ``tls_client_ca`` every client must present a certificate that CA signed."""
    c = config.coordinator
    return server_context(c.tls_cert, c.tls_key, c.tls_client_ca)


def build_actions(config: Config) -> ActionSink | None:
    """The respond stage for the configured ``[[actions]]`` (None when there are none)."""
    if not config.actions:
        return None
    runner = ActionRunner.from_config(config)
    log.info("%d [[actions]] configured%s", len(config.actions),
             " (dry run: recorded, never run)" if config.coordinator.dry_run else "")
    return runner


def _warn_if_open(config: Config) -> None:
    """One warning when the API is reachable beyond loopback without its tokens."""
    cc = config.coordinator
    host, _ = split_host_port(cc.listen, default_host="0.0.0.0")
    missing = [key for key, tokens in (("agent_token", cc.agent_tokens),
                                       ("admin_token", cc.admin_tokens)) if not tokens]
    if missing and beyond_loopback(host):
        log.warning("coordinator listens on %s beyond loopback without %s: anyone who reaches "
                    "it can %s; set [coordinator] %s", cc.listen, " or ".join(missing),
                    " and ".join(what for key, what in (
                        ("agent_token", "register nodes and send heartbeats"),
                        ("admin_token", "drain, approve and remove nodes")) if key in missing),
                    " and ".join(missing))


_HEALTH_ORDER = ("healthy", "suspect", "unhealthy", "dead", "unknown")


def status_line(coord: Coordinator) -> str:
    """The one-line summary systemd shows (``STATUS=``), e.g. "watching 120 nodes: 118
    healthy, 2 suspect; store ok". Names no store URL (it may carry a password)."""
    counts = coord.cluster.counts()
    parts = [f"{counts[h]} {h}" for h in _HEALTH_ORDER if counts.get(h)]
    store = coord.store_health
    line = f"watching {counts['total']} nodes" + (f": {', '.join(parts)}" if parts else "")
    line += "; store " + ("ok" if store is None or store.available else "unavailable")
    if coord.leadership is not None:
        line += f"; {coord.role}"
    if coord.sharing is not None:
        line += f"; {len(coord.held_shares)} of {coord.share_count} shares"
    health = coord.health()
    if health.status != "ok":
        line += f"; {health.status}" + (f" ({health.reasons[0]})" if health.reasons else "")
    return line


async def serve(config: Config, stop: asyncio.Event | None = None,
                ready: asyncio.Event | None = None,
                notifier: Notifier | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; under systemd (``NOTIFY_SOCKET``)
    tell it ``READY=1`` once serving, ``WATCHDOG=1`` and ``STATUS=`` while serving and
    ``STOPPING=1`` on the way out."""
    stop = stop or asyncio.Event()
    notifier = notifier or Notifier.from_env()
    ssl_context = tls_context(config)  # first: a bad TLS file stops start-up before any I/O
    raise_descriptor_limit()  # before the first poll; judged against the fleet once loaded
    store = open_store(config.coordinator.store,
                       events_retained=config.coordinator.events_retained,
                       history_ttl=config.detection.history_ttl,
                       timeout=config.coordinator.store_timeout,
                       full_resolution=config.detection.etcd_history_full_resolution)
    leadership = sharing = None
    cc = config.coordinator
    if isinstance(store, EtcdStore) and cc.coordination == "shares":
        sharing = ShareKeeper(store, cc.url, cc.leader_ttl)
    elif isinstance(store, EtcdStore):  # several coordinators may share it: elect a leader
        leadership = Leadership(store, cc.listen, cc.leader_ttl)
    observers = build_observers(config)
    if observers:
        log.info("observing %s through show stat", ", ".join(o.source for o in observers))
    coord = Coordinator(config, store, actions=build_actions(config), leadership=leadership,
                        sharing=sharing, observers=observers)
    if isinstance(store, EtcdStore):  # an action runs once across a change of decider
        coord.claims = EtcdRuns(store, cc.url if sharing is not None else cc.listen,
                                coord.may_decide, cc.store_timeout)
    await coord.start()
    raise_descriptor_limit(len(coord.cluster.nodes))
    tune_gc()
    udp = None
    if config.coordinator.heartbeat_udp:
        try:
            udp = await start_udp_heartbeats(coord)
        except BaseException:
            await coord.stop()
            raise
        log.info("UDP heartbeats on %s:%d", *udp.address)
    runner = web.AppRunner(build_app(coord, udp), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_host_port(config.coordinator.listen, default_host="0.0.0.0")
    # A deep accept queue: when every agent reconnects at once (a coordinator restart), the
    # default 128 overflows and the kernel drops SYNs, which clients see as connect timeouts
    # and retry seconds later; the kernel caps it at net.core.somaxconn.
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True,
                       backlog=ACCEPT_BACKLOG)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    supervise: asyncio.Task[None] | None = None
    try:
        await site.start()
        log.info("coordinator listening on %s%s (store %s)", config.coordinator.listen,
                 (" with TLS, client certificates required" if config.coordinator.tls_client_ca
                  else " with TLS") if ssl_context else "",
                 config.coordinator.store.split("@")[-1])
        _warn_if_open(config)
        notifier.ready(status_line(coord))
        supervise = asyncio.create_task(notifier.supervise(lambda: status_line(coord)),
                                        name="systemd-notify")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        log.info("coordinator stopping")
        notifier.stopping("stopping: writing pending state")
        if supervise is not None:
            supervise.cancel()
        if udp is not None:
            udp.close()
        await runner.cleanup()
        await coord.stop()
        notifier.close()
