"""The node agent: samples the host, evaluates self-checks, serves the agent HTTP API, keeps
its identity across restarts and (optionally) registers with a coordinator and pushes
heartbeats. Runs inside any asyncio loop: ``async with Agent(node_id="web-1"): ...``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from nodewatch.collect.checks import CustomCheck, build_check
from nodewatch.collect.coordinator_client import CoordinatorClient, UdpHeartbeatSender
from nodewatch.collect.identity import PersistedState, StateFile
from nodewatch.collect.metrics import MetricsRenderer
from nodewatch.collect.rules import RuleState, build_rules, evaluate_rules
from nodewatch.collect.sampler import HostSampler, Sampler, SystemSample
from nodewatch.config import AgentConfig, check_agent_config, coordinator_urls
from nodewatch.coordinator.probes import check_health
from nodewatch.model import NodeStatus
from nodewatch.protocol import (
    VERSION,
    AgentLease,
    HealthDoc,
    HeartbeatBody,
    ProbeReply,
    RegisterAnswer,
    RegisterBody,
    derive_status,
    encode_health,
    heartbeat_body,
    lease_proof,
    new_credential,
    node_heartbeat_key,
    split_host_port,
)
from nodewatch.tls import client_context
from nodewatch.web import beyond_loopback

__all__ = ["Agent"]

log = logging.getLogger("nodewatch.agent")

SEQ_BLOCK = 1000  # seqs reserved per state-file write (hi/lo); see identity.py
BUILTIN_LOAD = ("qps", "pending_tasks", "error_rate")
MAX_LOAD_KEYS = 256
PROBE_MAX_BYTES = 64 * 1024
FINAL_HEARTBEAT_TIMEOUT = aiohttp.ClientTimeout(total=2.0, connect=1.0)
# Over UDP an agent learns that its datagrams arrive from the coordinator's answer to the one
# datagram in UDP_CONFIRM_INTERVAL seconds that asks for it (``confirm``); when none came by the
# next heartbeat, that one goes over HTTP, so a lost answer, a one-way UDP path or a coordinator
# that went away is found out within a minute. An answer costs the coordinator about what a
# datagram does; an HTTP heartbeat costs it about ten (bench/fleet_udp.py).
UDP_CONFIRM_INTERVAL = 60.0
# A coordinator that does not answer (older, ``udp_confirm`` false in its register answer): one
# heartbeat in this many seconds goes over HTTP instead.
UDP_HTTP_INTERVAL = 300.0



def _report_crash(task: asyncio.Task[None]) -> None:
    """A background task (sampler, checks, coordinator loop) must never die silently."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("agent task %s stopped: %r", task.get_name(), exc, exc_info=exc)

class Agent:
    """One node's agent. Configure with an :class:`AgentConfig` and/or keyword overrides.

    ``clock`` (wall time) and ``sampler`` are injectable for tests; ``run_sampler=False``
    leaves sampling to the caller (``await agent.sample_now()``).
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        node_id: str | None = None,
        listen: str | None = None,
        advertise: str | None = None,
        coordinator: str | None = None,
        state_dir: str | Path | None = None,
        sample_interval: float | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_transport: str | None = None,
        agent_token: str | None = None,
        labels: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        sampler: Sampler | None = None,
        proc_root: str | Path = "/proc",
        run_sampler: bool = True,
        version: str = VERSION,
    ) -> None:
        overrides: dict[str, Any] = {
            key: value for key, value in {
                "node_id": node_id, "listen": listen, "advertise": advertise,
                "coordinator": coordinator,
                "state_dir": None if state_dir is None else str(state_dir),
                "sample_interval": sample_interval, "heartbeat_interval": heartbeat_interval,
                "agent_token": agent_token, "heartbeat_transport": heartbeat_transport,
            }.items() if value is not None
        }
        cfg = msgspec.structs.replace(config or AgentConfig(), **overrides)
        check_agent_config(cfg)
        # Decided once: the context for an https coordinator (None: library defaults).
        self._coordinator_tls = client_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        self.config = cfg
        self.node_id = cfg.node_id
        # [agent] labels, and those given in code on top of them.
        self.labels = {**cfg.labels, **(labels or {})}
        self.version = version
        self._clock = clock
        self._sampler: Sampler = sampler or HostSampler(proc_root)
        self._run_sampler = run_sampler
        self._state_file = StateFile(cfg.state_dir, cfg.node_id)
        self._rules = build_rules(cfg.rules)
        self._rule_states = [RuleState() for _ in self._rules]
        self._rule_reasons: list[str] = []
        self._check_reasons: dict[str, str] = {}
        self._manual: NodeStatus | None = None
        self._manual_reason = ""
        self._status = NodeStatus.OK
        self._reasons: list[str] = []
        # Why the state directory cannot be written ('' while it can); shown in /health.
        self._state_error = ""
        self._system: dict[str, float] = SystemSample(0.0, 0.0, 0.0, 0).as_dict()
        self._load: dict[str, float] = dict.fromkeys(BUILTIN_LOAD, 0)
        self._incarnation = 0
        self._seq = 0
        self._samples = 0  # samples taken this incarnation: tells a partition from a hang
        self._reserved = 0
        self._ts = 0.0
        self._uptime = 0.0
        self._started_at = 0.0
        self._previous: PersistedState | None = None
        self._credential = ""  # the node credential (a secret: never logged)
        self.last_seq_before_start = 0
        self.last_ts_before_start = 0.0
        self._doc: HealthDoc | None = None
        self._doc_bytes: bytes | None = None
        self._doc_version = 0
        self._metrics = MetricsRenderer(self._current_doc, lambda: not self._state_error)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_slots = asyncio.Semaphore(32)
        self._coordinator: CoordinatorClient | None = None
        self.registration: RegisterAnswer | None = None
        self.registered = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._last_beat_seq = -1
        self.heartbeats_sent = {"http": 0, "udp": 0}
        self._bound: tuple[str, int] | None = None
        self._running = False
        self._stopped = False

    # -- public state ---------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def status(self) -> NodeStatus:
        return self._status

    @property
    def reasons(self) -> list[str]:
        return self._all_reasons()

    @property
    def state_error(self) -> str:
        """Why the state directory cannot be written, '' while it can."""
        return self._state_error

    def _all_reasons(self) -> list[str]:
        return [*self._reasons, self._state_error] if self._state_error else list(self._reasons)

    @property
    def load(self) -> dict[str, float]:
        return dict(self._load)

    @property
    def system(self) -> dict[str, float]:
        return dict(self._system)

    @property
    def listen_address(self) -> str:
        """``host:port`` actually bound (the port is known after ``start()`` for port 0)."""
        if self._bound is None:
            raise RuntimeError("the agent is not started")
        host, port = self._bound
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        host, port = self._bound or ("127.0.0.1", 0)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def advertise_address(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        host, port = self._bound or split_host_port(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            # A wildcard listen address means nothing to a coordinator: name the host.
            host = socket.gethostname()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def health(self) -> dict[str, Any]:
        """The current ``/health`` body as a dict."""
        result: dict[str, Any] = msgspec.to_builtins(self._current_doc())
        return result

    def health_bytes(self) -> bytes:
        """The encoded ``/health`` body, encoded once per change."""
        body = self._doc_bytes
        if body is None:
            body = self._doc_bytes = encode_health(self._current_doc())
        return body

    def metrics_bytes(self) -> bytes:
        """Prometheus text, rendered once per change."""
        self._current_doc()
        return self._metrics.render(self._doc_version)

    # -- in-process API -------------------------------------------------------------------

    def set_load(self, values: Mapping[str, float | None] | None = None,
                 **more: float | None) -> None:
        """Merge business load (``qps``, ``pending_tasks``, ``error_rate``, custom numbers).

        ``None`` drops a custom key (a built-in one goes back to 0). Invalid input raises
        ``ValueError`` and changes nothing. Load is not a new sample: it rides on the next one.
        """
        update = {**(values or {}), **more}
        for key, value in update.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"load value {key!r} must be a number, got "
                                 f"{type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"load value {key!r} must be finite")
        new_keys = {key for key, value in update.items() if value is not None} - set(self._load)
        if len(self._load) + len(new_keys) > MAX_LOAD_KEYS:
            raise ValueError(f"at most {MAX_LOAD_KEYS} load values are kept")
        for key, value in update.items():
            if value is not None:
                self._load[key] = value
            elif key in BUILTIN_LOAD:
                self._load[key] = 0
            else:
                self._load.pop(key, None)
        self._invalidate()

    async def set_status(self, status: NodeStatus | str, reason: str = "") -> None:
        """Set (degraded, draining) or clear (ok) the manual status; a change is a new seq."""
        value = NodeStatus(status)
        manual = None if value is NodeStatus.OK else value
        reason = reason if manual is not None else ""
        if (manual, reason) == (self._manual, self._manual_reason):
            return
        self._manual, self._manual_reason = manual, reason
        await self._publish()

    async def sample_now(self) -> None:
        """Take one sample, step the rules and publish it (the sampler task's body)."""
        sample = await self._sampler.sample()
        now = self._clock()
        self._system = sample.as_dict()
        self._samples += 1
        metrics: dict[str, float] = dict(self._system)
        for key, value in self._load.items():
            metrics[f"load.{key}"] = value
        self._rule_states, self._rule_reasons = evaluate_rules(
            self._rules, self._rule_states, now, metrics)
        await self._publish(now)
        # last_ts must stay within about one sample of the truth, even after a crash.
        await self._persist()

    async def probe(self, target: str, *, limits: tuple[float, float] | None = None
                    ) -> ProbeReply:
        """Check a peer's ``/health`` the way the coordinator does (``GET /probe``);
        ``limits`` is (timeout, connect_timeout), the agent's configured ones by default."""
        total, connect = limits or (self.config.probe_timeout, self.config.probe_connect_timeout)
        async with self._probe_slots:
            result = await check_health(
                self._client(), target, target, timeout=total, connect_timeout=connect,
                max_bytes=PROBE_MAX_BYTES,
                clock=time.monotonic, verify_node_id=False)
        return ProbeReply(
            target=target,
            reachable=result.ok,
            latency=round(result.latency, 6),
            # The class of failure only (timeout, refused, http_status, bad_body, error): no
            # text from the target (status code, body, error message) leaves the node.
            failure=None if result.failure is None else result.failure.value,
            status=None if result.report is None else result.report.status.value,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Take the next incarnation, serve the API, start sampling, checks and registration."""
        if self._running or self._stopped:
            raise RuntimeError("an Agent starts once")
        self._started_at = self._clock()
        previous = await asyncio.to_thread(self._state_file.load)
        self._previous = previous
        if previous is not None:
            self._credential = previous.credential
            self._incarnation = previous.incarnation + 1
            # After a clean stop the seq is exact; after a crash the reservation ceiling is the
            # only value known to be at or past every seq that was exposed.
            last_seq = previous.seq if previous.clean else max(previous.seq, previous.reserved)
            self.last_seq_before_start = last_seq
            self.last_ts_before_start = previous.last_ts
            self._seq = last_seq
            self._ts = previous.last_ts
        else:
            self._incarnation = 1
        if not self._credential:
            # An enrolment secret of our own, kept like a credential and presented on the
            # first registration: the coordinator accepts it until we prove the credential it
            # issues, so an answer lost on the way (a timeout, a crash) can be asked for again
            # instead of locking the node out until an operator approves it.
            self._credential = new_credential()
        # Strict here: a new incarnation that is not durable would be taken again by the next
        # start, whose reports would then look stale to the coordinator.
        await self._persist(required=True)
        self._sampler.prime()
        self._running = True
        try:
            await self.sample_now()
            await self._serve()
        except BaseException:
            self._running = False
            await self._close_io()
            raise
        if self._run_sampler:
            self._spawn(self._sample_loop(), "sampler")
        for check_cfg in self.config.checks:
            self._spawn(self._check_loop(build_check(check_cfg, self._client)), "check")
        urls = coordinator_urls(self.config.coordinator)
        if urls:
            plain = [u for u in urls if not u.startswith("https://")]
            if self._coordinator_tls is not None and plain:
                log.warning("[agent] tls_ca/tls_cert/tls_key are set but the coordinator URL "
                            "%s is not https: they are not used", plain[0])
            self._coordinator = CoordinatorClient(urls,
                                                  self.config.agent_token, self._client,
                                                  ssl_context=self._coordinator_tls,
                                                  client_certificate=bool(self.config.tls_cert),
                                                  credential=self._credential)
            self._spawn(self._coordinator_loop(), "coordinator")
        if self.config.store:
            from nodewatch.collect.lease import publish_under_lease

            self._spawn(publish_under_lease(
                self.config.store, self.node_id,
                self._lease_announcement, self.config.lease_ttl),
                "lease")
        log.info("agent %s listening on %s (incarnation %d)", self.node_id,
                 self.listen_address, self._incarnation)
        if not self.config.agent_token and self._bound and beyond_loopback(self._bound[0]):
            log.warning("agent %s listens on %s beyond loopback without an agent token: "
                        "anyone who reaches it can use GET /probe; set [agent] agent_token "
                        "(or NODEWATCH_AGENT_TOKEN) to require it", self.node_id,
                        self.config.listen)

    async def stop(self) -> None:
        """Stop serving, persist the final state, send it as a final heartbeat. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if not self._running:
            return
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self._running = True
            self._seq = await self._reserve_next()
            self._ts = self._clock()
            self._uptime = self._ts - self._started_at
            self._invalidate()
            await self._persist(clean=True)
            if self._coordinator is not None and self.registered.is_set():
                outcome = await self._coordinator.heartbeat(
                    heartbeat_body(self._current_doc(), final=True), FINAL_HEARTBEAT_TIMEOUT)
                if outcome.status == 0 or outcome.status >= 300:
                    log.warning("final heartbeat not accepted: %s %s", outcome.status,
                                outcome.detail)
        finally:
            self._running = False
            await self._close_io()
        log.info("agent %s stopped at seq %d", self.node_id, self._seq)

    # -- internals ------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def _close_io(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _serve(self) -> None:
        from nodewatch.collect.app import build_app

        host, port = split_host_port(self.config.listen) if not self.config.listen.startswith(
            ":") else ("", int(self.config.listen[1:]))
        runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host or None, port, reuse_address=True)
        await site.start()
        bound = runner.addresses[0]
        self._bound = (host or "0.0.0.0", int(bound[1]))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"nodewatch-agent-{name}")
        task.add_done_callback(_report_crash)
        self._tasks.append(task)

    def _current_doc(self) -> HealthDoc:
        doc = self._doc
        if doc is None:
            doc = self._doc = HealthDoc(
                status=self._status, node_id=self.node_id, uptime=round(self._uptime, 3),
                version=self.version, incarnation=self._incarnation, seq=self._seq,
                ts=self._ts, reasons=self._all_reasons(), system=dict(self._system),
                load=dict(self._load), sample_interval=float(self.config.sample_interval),
                samples=self._samples,
            )
        return doc

    def _invalidate(self) -> None:
        self._doc = None
        self._doc_bytes = None
        self._doc_version += 1

    async def _reserve_next(self) -> int:
        """The next seq, persisting a new reservation first when the block is used up, so the
        state file is never behind a seq anyone has seen."""
        while self._seq + 1 > self._reserved:
            if not await self._persist():
                # The state dir cannot be written (the reason says so): report on rather than
                # freeze the node's status. A crash now may restart with a last_seq behind
                # what was seen, which the coordinator answers with a review, never a rejoin
                # it should not make.
                break
        self._seq += 1
        return self._seq

    async def _publish(self, now: float | None = None) -> None:
        """A new report: derive status, take the next seq, re-encode lazily."""
        if not self._running:
            return
        status, reasons = derive_status(self._manual, self._manual_reason, self._rule_reasons,
                                        list(self._check_reasons.values()))
        changed = status is not self._status
        self._seq = await self._reserve_next()
        self._status, self._reasons = status, reasons
        self._ts = self._clock() if now is None else now
        self._uptime = self._ts - self._started_at
        self._invalidate()
        if changed:
            log.info("status %s: %s", status.value, "; ".join(reasons) or "all clear")
            self._beat_now.set()

    async def _persist(self, clean: bool = False, *, required: bool = False) -> bool:
        """Write the state file; False when it cannot be written (read-only, full, not
        permitted): the agent goes on serving, with a reason, and retries with each sample.
        ``required`` raises instead."""
        reserved = self._seq if clean else max(self._reserved, self._seq + SEQ_BLOCK)
        state = PersistedState(node_id=self.node_id, incarnation=self._incarnation,
                               seq=self._seq, reserved=max(reserved, self._reserved),
                               last_ts=self._ts, clean=clean, credential=self._credential)
        try:
            await self._state_file.save_async(state)
        except OSError as exc:
            if required:
                raise
            error = f"state dir {self._state_file.dir} cannot be written: {exc}"
            if error != self._state_error:
                log.error("%s; serving on, retrying with every sample", error)
                self._state_error = error
                self._invalidate()
            return False
        if self._state_error:
            log.warning("state dir %s can be written again", self._state_file.dir)
            self._state_error = ""
            self._invalidate()
        self._reserved = max(self._reserved, state.reserved)
        return True

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = float(self.config.sample_interval)
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += interval
            if due < loop.time():
                due = loop.time() + interval
            try:
                await self.sample_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sampling failed; keeping the previous sample")

    async def _check_loop(self, check: CustomCheck) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            reason = await check.run()
            await self.set_check_result(check.name, reason)
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    async def set_check_result(self, name: str, failure: str | None) -> None:
        """Record one custom check's outcome; a change is a new report."""
        text = None if failure is None else f"check {name} failed: {failure}"
        if self._check_reasons.get(name) == text:
            return
        if text is None:
            self._check_reasons.pop(name, None)
        else:
            self._check_reasons[name] = text
        await self._publish()

    def _register_body(self, first: bool) -> RegisterBody:
        return RegisterBody(
            node_id=self.node_id,
            address=self.advertise_address,
            incarnation=self._incarnation,
            last_seq=self.last_seq_before_start if first else self._seq,
            last_ts=self.last_ts_before_start if first else self._ts,
            version=self.version,
            labels=self.labels,
            heartbeat_interval=float(self.config.heartbeat_interval),
        )

    def _lease_announcement(self) -> AgentLease:
        """The registration published under the etcd lease (the current seq and ts), signed
        with the node's key once it holds a credential."""
        body = self._register_body(False)
        lease = AgentLease(body.node_id, body.address, body.incarnation, body.last_seq,
                           body.last_ts, body.version, body.labels, body.heartbeat_interval)
        return msgspec.structs.replace(
            lease, proof=lease_proof(lease, node_heartbeat_key(self._credential)))

    async def _coordinator_loop(self) -> None:
        client = self._coordinator
        assert client is not None
        first = True
        while True:
            answer = await client.register_until_done(
                functools.partial(self._register_body, first))
            first = False
            if answer.credential:
                await self._adopt_credential(client, answer.credential)
            self.registration = answer
            self.registered.set()
            log.info("registered with %s: %s", client.url, answer.decision)
            if answer.owner and client.follow(answer.owner):
                log.info("watched by %s: heartbeats go there", client.url)
            interval = float(self.config.heartbeat_interval or answer.heartbeat_interval or 0)
            if interval <= 0:
                return
            phase = answer.heartbeat_phase if 0 <= answer.heartbeat_phase < interval else 0.0
            ended = await self._heartbeat_loop(client, interval, phase, answer.heartbeat_udp,
                                               answer.udp_confirm)
            self.registered.clear()
            if ended == "unknown":
                log.warning("coordinator does not know this node any more; registering again")
            elif ended == "moved":
                log.info("another coordinator watches this node now: registering with %s",
                         client.url)
            else:
                log.warning("coordinator refused this node's credential; registering again")

    async def _adopt_credential(self, client: CoordinatorClient, credential: str) -> None:
        """A credential from a register answer (enrolment, re-enrolment or a rotation): kept
        in the state file (atomically, mode 0600) and proven from now on."""
        old, self._credential = self._credential, credential
        if await self._persist():
            client.set_credential(credential)  # proven only once it is stored
            log.info("node credential received and stored in %s", self._state_file.dir)
        else:
            # Not stored: keep proving the old one (the coordinator accepts it until the new
            # one is proven), so that a restart does not find a credential nobody else holds.
            self._credential = old
            log.error("node credential received but the state dir %s cannot be written: "
                      "keeping the previous one; the next registration asks again",
                      self._state_file.dir)

    async def _open_udp(self, client: CoordinatorClient, offer: str) -> UdpHeartbeatSender | None:
        """A UDP sender when this agent wants UDP and the coordinator offers it, else None."""
        if not offer or self.config.heartbeat_transport != "udp":
            return None
        try:
            return await UdpHeartbeatSender.open(offer, client.url, self.config.agent_token,
                                                 self.node_id, self._incarnation,
                                                 on_unknown=self._beat_now.set,
                                                 credential=self._credential)
        except (OSError, ValueError) as exc:
            log.warning("cannot send UDP heartbeats to %s (%s); using HTTP", offer,
                        type(exc).__name__)
            return None

    def _send_udp(self, udp: UdpHeartbeatSender, payload: HeartbeatBody, udp_confirm: bool,
                  until_confirm: int) -> bool:
        """Send this heartbeat over UDP, asking for an answer when it is the one to ask; False:
        send it over HTTP (the coordinator forgot this node, the last datagram that asked went
        unanswered, it is the periodic HTTP one of a coordinator that does not answer, or it
        does not fit in a datagram)."""
        if udp.unknown_heard:  # the coordinator forgot us: ask it over HTTP now
            udp.unknown_heard = False
            return False
        if udp.unanswered():  # lost, a one-way path, or nobody listening
            udp.forget_confirm()
            return False
        due = until_confirm <= 1 and not udp.asking
        if due and not udp_confirm:
            return False
        if not udp.send(payload, confirm=due):
            return False
        self.heartbeats_sent["udp"] += 1
        return True

    async def _heartbeat_loop(self, client: CoordinatorClient, interval: float,
                              phase: float, udp_offer: str = "", udp_confirm: bool = False) -> str:
        udp = await self._open_udp(client, udp_offer)
        try:
            return await self._beat(client, interval, phase, udp, udp_confirm)
        finally:
            if udp is not None:
                udp.close()

    async def _beat(self, client: CoordinatorClient, interval: float, phase: float,
                    udp: UdpHeartbeatSender | None, udp_confirm: bool = False) -> str:
        loop = asyncio.get_running_loop()
        due = loop.time() + phase
        self._beat_now.clear()
        # Every confirm_every-th datagram asks for an answer (a coordinator that answers), or
        # every confirm_every-th heartbeat goes over HTTP (one that does not).
        confirm_every = max(1, math.ceil(
            (UDP_CONFIRM_INTERVAL if udp_confirm else UDP_HTTP_INTERVAL) / interval))
        until_confirm = confirm_every
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._beat_now.wait()
            self._beat_now.clear()
            if loop.time() >= due:
                due += interval
                if due < loop.time():
                    due = loop.time() + interval
            if self._seq == self._last_beat_seq:
                await self._publish()  # every heartbeat carries a newer seq than the last
            payload = heartbeat_body(self._current_doc())
            self._last_beat_seq = self._seq
            if udp is not None and self._send_udp(udp, payload, udp_confirm, until_confirm):
                until_confirm = confirm_every if until_confirm <= 1 else until_confirm - 1
                continue
            until_confirm = confirm_every
            outcome = await client.heartbeat(payload)
            self.heartbeats_sent["http"] += 1
            if outcome.status == 404:
                return "unknown"
            if outcome.status == 403:
                return "rejected"
            if outcome.owner and client.follow(outcome.owner):
                return "moved"  # register with the owner: its UDP port, its answer
            if outcome.status == 0 and len(client.urls) > 1:
                client.failover()
                return "moved"
            if outcome.status == 0 or outcome.status >= 300:
                log.debug("heartbeat: %s %s", outcome.status, outcome.detail)
