"""The typed configuration model: one source for defaults, validation and the docs.

A TOML file is optional; every key has a default. Validation happens once, at start-up, and a
bad value stops the process with one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from nodewatch.errors import ConfigError
from nodewatch.tls import TlsSetupError, client_context, server_context

__all__ = ["ActionConfig", "AgentCheckConfig", "AgentConfig", "AgentRuleConfig", "BudgetConfig",
           "Config", "ConfigError", "CoordinatorConfig", "DetectionConfig", "Duration",
           "GuardConfig", "NodeConfig", "OutliersConfig", "ReviewConfig", "Tokens",
           "check_agent_config", "coordinator_urls", "format_duration", "load_config",
           "parse_duration", "token_list"]

NODE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
NODE_ID_RE = re.compile(NODE_ID_PATTERN)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class Duration(float):
    """Seconds, written in config as a string such as ``"250ms"``, ``"5s"`` or ``"1h"``."""


def parse_duration(text: str) -> Duration:
    """Parse ``"250ms"`` / ``"5s"`` / ``"1m"`` / ``"1h"``; a bare ``"0"`` means zero."""
    if text.strip() == "0":
        return Duration(0.0)
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"expected a duration such as '250ms', '5s', '1m' or '1h', got {text!r}")
    return Duration(float(match.group(1)) * _UNITS[match.group(2)])


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for docs and messages."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        if isinstance(value, str):
            return parse_duration(value)
        raise ValueError(f"expected a duration string such as '5s', got {type(value).__name__}")
    raise NotImplementedError(f"no decoder for {kind}")


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Duration):
        return float(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


Positive = Annotated[int, Meta(ge=1)]
Fraction = Annotated[float, Meta(gt=0, le=1)]
HostPort = Annotated[str, Meta(pattern=r"^\[?[A-Za-z0-9.:_-]*\]?:\d{1,5}$")]
NodeId = Annotated[str, Meta(pattern=NODE_ID_PATTERN)]


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: unknown keys are errors, every key has a default."""


# A coordinator token: one string, or a list of them (old and new during a rotation; every
# one is accepted). Empty, or an empty list, means no token is required.
Tokens = str | list[str]


def token_list(value: Tokens) -> tuple[str, ...]:
    """The accepted tokens of a ``Tokens`` value (empty: none configured)."""
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


class CoordinatorConfig(_Table):
    listen: HostPort = "127.0.0.1:7300"
    store: str = "sqlite:///./nodewatch-data/state.db"
    admin_token: Tokens = ""
    agent_token: Tokens = ""
    # POST /v1/observations (callers' evidence of gray failures); the admin token is accepted
    # too. With neither set, observations need no token.
    observer_token: Tokens = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    dry_run: bool = False
    max_loop_lag: Duration = Duration(1.0)
    max_body: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    events_retained: Annotated[int, Meta(ge=100)] = 100_000
    leader_ttl: Duration = Duration(5.0)  # etcd election lease: a dead leader's replacement time
    # Several coordinators on one etcd: "election" (one leader decides, the others mirror) or
    # "shares" (every coordinator decides for its shares of the nodes, rendezvous-hashed;
    # coordinator/shares.py). Ignored on SQLite and Redis (one coordinator).
    coordination: Literal["election", "shares"] = "election"
    # The URL other coordinators forward requests to and agents are sent to ("": http(s)://
    # listen, which must then not be a wildcard address when coordination = "shares").
    advertise_url: str = ""
    # HOST:PORT for UDP heartbeats (HMAC-signed with agent_token); empty = HTTP pushes only.
    heartbeat_udp: str = ""
    # Issue a node a new credential on a register answer once its credential is this old
    # (0: never rotate); the previous one is accepted until the node proves the new one.
    rotate_credentials_after: Duration = Duration(0.0)
    # Worker processes that run the HTTP checks (0 or 1: in the coordinator process itself).
    poller_processes: Annotated[int, Meta(ge=0, le=64)] = 0
    # Bound on every store call the coordinator makes; past it a command answers 503. A
    # command's whole write (waiting for an earlier write included) has this one bound, and
    # it is the Redis socket timeout and the etcd call timeout too (store/open.py).
    store_timeout: Duration = Duration(3.0)
    # A node that only saw routine observations (a new seq, load figures, last_seen) is written
    # again at most this often, spread over the interval (as Kubernetes' node Leases are); any
    # change a reader or a takeover needs (health, status, reasons, admin, drain, outlier,
    # identity, actions due, address, labels) is written at once. 1s to 1h.
    refresh_interval: Duration = Duration(60.0)
    # Events kept in memory while the store cannot write; past it the oldest are dropped
    # (counted, and an events_lost event is written on recovery; node state is never lost).
    max_queued_events: Annotated[int, Meta(ge=1)] = 10_000
    # Admission control of POST /v1/register (a token bucket): past this rate, and once the
    # burst is spent, a registration is answered 429 with Retry-After (agents back off).
    max_registrations_per_second: Annotated[float, Meta(gt=0, le=1_000_000)] = 200.0
    registration_burst: Annotated[int, Meta(ge=1, le=1_000_000)] = 400
    # POST /v1/observations: its own body cap (a load balancer reports a whole backend at
    # once) and the most observations one batch may carry.
    observations_max_body: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_observations: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # "json": one JSON object a line (nodewatch/logs.py); "auto": json unless on a terminal.
    # --log-format and NODEWATCH_LOG_FORMAT win over it.
    log_format: Literal["text", "json", "auto"] = "text"

    @property
    def agent_tokens(self) -> tuple[str, ...]:
        """Every accepted agent token (``agent_token`` as a tuple)."""
        return token_list(self.agent_token)

    @property
    def url(self) -> str:
        """Where other coordinators and agents reach this one (``advertise_url`` or listen)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        return f"{'https' if self.tls_cert else 'http'}://{self.listen}"

    @property
    def admin_tokens(self) -> tuple[str, ...]:
        """Every accepted admin token (``admin_token`` as a tuple)."""
        return token_list(self.admin_token)

    @property
    def observer_tokens(self) -> tuple[str, ...]:
        """Tokens accepted for observations: the observer tokens and the admin tokens."""
        return token_list(self.observer_token) + self.admin_tokens


class DetectionConfig(_Table):
    healthy_interval: Duration = Duration(30.0)
    unhealthy_interval: Duration = Duration(5.0)
    # How often a node confirmed unhealthy is checked (HAProxy's downinter); 0: as often as
    # unhealthy_interval. Where agents push, their first push after a recovery is a check.
    down_interval: Duration = Duration(0.0)
    timeout: Duration = Duration(3.0)
    connect_timeout: Duration = Duration(1.0)
    fall: Annotated[int, Meta(ge=1, le=100)] = 3
    rise: Annotated[int, Meta(ge=1, le=100)] = 2
    jitter: Annotated[float, Meta(ge=0, lt=1)] = 0.1
    concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 256
    dead_after: Duration = Duration(3600.0)
    history_ttl: Duration = Duration(3600.0)
    # History tiers (README "History at fleet size"): every sample for the last
    # history_full_resolution (0: none), then one rollup per node per history_rollup (mean,
    # maximum, worst health) for the rest of history_ttl; a full resolution of at least
    # history_ttl keeps every sample for the hour, with no rollups.
    history_full_resolution: Duration = Duration(300.0)
    history_rollup: Duration = Duration(60.0)
    # The same on an etcd store, coarser by default: at 100,000 nodes every sample would be
    # about 20,000 puts a second and 14 GB an hour, far past etcd's 2-8 GB database.
    etcd_history_full_resolution: Duration = Duration(0.0)
    etcd_history_rollup: Duration = Duration(300.0)
    startup_grace: Duration = Duration(45.0)
    max_response: Annotated[int, Meta(ge=256, le=16 * 1024 * 1024)] = 64 * 1024
    # How a pushing node's silence is judged (detect/phi.py): "fixed" polls it after
    # healthy_interval without a push; "phi" polls it once its silence is improbable by its own
    # arrival history (phi accrual), never later than healthy_interval.
    suspicion: Literal["fixed", "phi"] = "fixed"
    phi_threshold: Annotated[float, Meta(gt=0, le=100)] = 8.0  # as Akka and Cassandra
    phi_window: Annotated[int, Meta(ge=2, le=10_000)] = 100  # inter-arrival samples kept
    phi_min_samples: Annotated[int, Meta(ge=1, le=10_000)] = 10  # fixed deadline until then
    phi_min_std: Duration = Duration(0.1)  # floor: a steady node's last push is not its last
    phi_pause: Duration = Duration(3.0)  # margin for a pause its history has not shown yet

    @property
    def detection_window(self) -> float:
        """How long a node may go unobserved before it could have been confirmed down."""
        return self.healthy_interval + self.fall * self.unhealthy_interval


class GuardConfig(_Table):
    fraction: Fraction = 0.5
    min_nodes: Positive = 4
    indirect_probes: Annotated[int, Meta(ge=0, le=16)] = 2


class ReviewConfig(_Table):
    max_rejoins: Annotated[int, Meta(ge=0)] = 3
    auto_approve: bool = False
    # A node (proving its credential) that registers from a different address: "review"
    # holds it for an operator, "allow" lets it rejoin at the new address.
    address_change: Literal["review", "allow"] = "review"


class BudgetConfig(_Table):
    max_fraction: Fraction = 0.2
    max_rate: Annotated[float, Meta(gt=0)] = 10.0
    drain_deadline: Duration = Duration(600.0)


class OutliersConfig(_Table):
    """Gray failures (README, "Gray failures"): a node whose callers see far more errors (or
    latency) than its group's, with enough volume and for long enough, is ejected: healthy but
    unschedulable, drained softly, back by itself after ``base_ejection_time`` x ejections."""

    enabled: bool = True
    # A node label whose value forms the groups compared (e.g. "zone", "role"); "": the fleet.
    group_by: str = ""
    # The sliding window over which each node's requests, errors and latency are summed.
    window: Duration = Duration(5.0)
    # Envoy's request_volume: fewer requests in the window and the node is not judged (an
    # agent reporting error_rate without qps counts as exactly this many).
    min_requests: Annotated[float, Meta(gt=0)] = 100.0
    # Distinct sources (the node's agent, each observer) a verdict needs.
    min_sources: Annotated[int, Meta(ge=1, le=100)] = 1
    # Judged nodes a group needs before anyone in it is compared (Envoy's minimum_hosts).
    min_nodes: Annotated[int, Meta(ge=2)] = 5
    # An outlier's error rate is at least the group median plus error_margin and at least
    # factor times the median (the margin rules near 0, the factor when the median is high).
    error_margin: Fraction = 0.05
    factor: Annotated[float, Meta(ge=1)] = 3.0
    # The same for latency (p99, where callers or the application give one).
    latency_margin: Duration = Duration(0.1)
    latency_factor: Annotated[float, Meta(ge=1)] = 3.0
    # Hysteresis: an outlier this long before it is ejected; back in line this long (after
    # its back-off) before it returns.
    eject_after: Duration = Duration(2.0)
    clear_after: Duration = Duration(3.0)
    # Envoy's base_ejection_time x ejections, at most max_ejection_time; the count drops by
    # one for each max_ejection_time the node stays in line.
    base_ejection_time: Duration = Duration(30.0)
    max_ejection_time: Duration = Duration(300.0)
    # Never more than this fraction of a group out as outliers (at least one node).
    max_ejection_fraction: Fraction = 0.1
    # When at least this fraction of a group's judged nodes are outliers at once, the whole
    # group's errors rose together (a shared dependency): nobody is ejected, an event says so.
    group_rise_fraction: Fraction = 0.3


class NodeConfig(_Table):
    id: NodeId
    address: HostPort
    labels: dict[str, str] = msgspec.field(default_factory=dict)


ActionKind = Literal["webhook", "exec", "haproxy", "nginx"]
# Every kind the core requests actions for (detect.cluster emits exactly these).
ACTION_EVENTS = ("unhealthy", "recovered", "dead", "drained", "undrained", "approved",
                 "removed", "drain_deadline", "degraded", "status_ok", "review", "outlier",
                 "outlier_cleared")


class ActionConfig(_Table):
    type: ActionKind
    # Empty means the type's default: notifications (webhook, exec) on unhealthy / dead /
    # recovered; load balancers (haproxy, nginx) on every change of where a node belongs.
    on: list[str] = msgspec.field(default_factory=list)
    url: str = ""
    command: list[str] = msgspec.field(default_factory=list)
    socket: str = ""
    backend: str = ""
    file: str = ""
    reload: list[str] = msgspec.field(default_factory=list)
    timeout: Duration = Duration(5.0)
    retries: Annotated[int, Meta(ge=0, le=100)] = 5
    secret: str = ""
    # haproxy only: the leader also reads `show stat` over the same socket every
    # observe_interval, and HAProxy's own per-server counters become callers' counts for the
    # outlier rule (README, "Gray failures"); false: the action only sets server states.
    observe: bool = True
    observe_interval: Duration = Duration(1.0)


class AgentRuleConfig(_Table):
    metric: str
    above: float | None = None
    below: float | None = None
    # ``for`` is a Python keyword; the TOML key is ``for``.
    for_: Duration = msgspec.field(default=Duration(30.0), name="for")
    reason: str = ""


class AgentCheckConfig(_Table):
    type: Literal["http", "tcp", "command"]
    target: str | list[str]
    name: str = ""
    interval: Duration = Duration(10.0)
    timeout: Duration = Duration(2.0)


def _default_rules() -> list[AgentRuleConfig]:
    return [
        AgentRuleConfig(metric="cpu_percent", above=95.0),
        AgentRuleConfig(metric="mem_percent", above=95.0),
    ]


class AgentConfig(_Table):
    node_id: str = ""
    listen: HostPort = "0.0.0.0:7301"
    advertise: str = ""
    # The coordinator's URL; with shared coordinators, several (a list, or comma-separated):
    # the agent registers with any of them and is told which one watches it.
    coordinator: str | list[str] = ""
    state_dir: str = "./nodewatch-agent"
    sample_interval: Duration = Duration(5.0)
    agent_token: str = ""
    # TLS to an https coordinator: tls_ca verifies it (instead of the system CAs); tls_cert and
    # tls_key are this agent's client certificate when the coordinator sets tls_client_ca.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    heartbeat_interval: Duration = Duration(0.0)
    # "udp": push over the coordinator's UDP port when its register answer offers one.
    heartbeat_transport: Literal["http", "udp"] = "http"
    store: str = ""  # etcd://...: publish liveness under a lease (etcd lease mode)
    lease_ttl: Duration = Duration(15.0)
    max_body: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    probe_timeout: Duration = Duration(3.0)
    probe_connect_timeout: Duration = Duration(1.0)
    log_format: Literal["text", "json", "auto"] = "text"  # as [coordinator] log_format
    # Sent with every registration (e.g. {zone = "a", role = "web"}): the dashboard groups and
    # filters by them, outliers.group_by compares within one, Prometheus discovery passes them.
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    rules: list[AgentRuleConfig] = msgspec.field(default_factory=_default_rules)
    checks: list[AgentCheckConfig] = msgspec.field(default_factory=list)


class Config(_Table):
    coordinator: CoordinatorConfig = msgspec.field(default_factory=CoordinatorConfig)
    detection: DetectionConfig = msgspec.field(default_factory=DetectionConfig)
    guard: GuardConfig = msgspec.field(default_factory=GuardConfig)
    review: ReviewConfig = msgspec.field(default_factory=ReviewConfig)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    outliers: OutliersConfig = msgspec.field(default_factory=OutliersConfig)
    nodes: list[NodeConfig] = msgspec.field(default_factory=list)
    actions: list[ActionConfig] = msgspec.field(default_factory=list)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)


_RULE_METRICS = {"cpu_percent", "mem_percent", "load1", "connections"}


_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def _valid_host_port(text: str) -> bool:
    match = _HOST_PORT_RE.match(text)
    return match is not None and int(match.group(2)) <= 65535


def coordinator_urls(value: str | list[str]) -> list[str]:
    """``[agent] coordinator`` as URLs: a list, or one string with commas between URLs."""
    items = value if isinstance(value, list) else value.split(",")
    return [item.strip().rstrip("/") for item in items if item.strip()]


def _agent_problems(agent: AgentConfig) -> list[tuple[str, str]]:
    """The agent's cross-field rules, shared by ``load_config`` and ``Agent(...)`` overrides."""
    problems: list[tuple[str, str]] = []
    if agent.heartbeat_interval < 0:
        problems.append(("agent.heartbeat_interval", "expected a duration of at least 0"))
    if agent.heartbeat_transport not in ("http", "udp"):
        problems.append(("agent.heartbeat_transport", "expected one of http, udp"))
    if agent.lease_ttl < 1:
        problems.append(("agent.lease_ttl", "expected at least 1s (an etcd lease)"))
    if agent.store and not agent.store.startswith("etcd://"):
        problems.append(("agent.store", "expected an etcd://host:2379/prefix URL"))
    if not 1.0 <= agent.sample_interval <= 15.0:
        problems.append(("agent.sample_interval", "expected a duration between 1s and 15s"))
    if agent.node_id and not NODE_ID_RE.match(agent.node_id):
        problems.append(("agent.node_id", "expected 1-128 characters of [A-Za-z0-9._-]"))
    problems += _label_problems(agent.labels)
    urls = coordinator_urls(agent.coordinator)
    for url in urls:
        if not url.startswith(("http://", "https://")):
            problems.append(("agent.coordinator", f"expected http:// or https:// URLs, got "
                                                  f"{url!r}"))
    if len(urls) > 64:
        problems.append(("agent.coordinator", "expected at most 64 coordinator URLs"))
    for i, rule in enumerate(agent.rules):
        if rule.metric not in _RULE_METRICS and not rule.metric.startswith("load."):
            problems.append(
                (f"agent.rules[{i}].metric",
                 f"expected one of {sorted(_RULE_METRICS)} or load.NAME"),
            )
        if (rule.above is None) == (rule.below is None):
            problems.append((f"agent.rules[{i}]", "expected exactly one of 'above' or 'below'"))
    for i, check in enumerate(agent.checks):
        if check.interval <= 0 or check.timeout <= 0:
            problems.append((f"agent.checks[{i}]", "expected interval and timeout greater than 0"))
        if check.type == "command" and not isinstance(check.target, list):
            problems.append((f"agent.checks[{i}].target", "expected an argv list for a command"))
        if check.type != "command" and not isinstance(check.target, str):
            problems.append((f"agent.checks[{i}].target", "expected a string URL or HOST:PORT"))
    return problems


# What a registration carries (protocol.RegisterBody): more would be refused at the coordinator.
_MAX_LABELS = 64
_MAX_LABEL_LENGTH = 256
_LABEL_KEY_RE = re.compile(r"^[^\s=]+$")


def _label_problems(labels: dict[str, str]) -> list[tuple[str, str]]:
    """An agent's labels: what a registration can carry, and keys a ``key=value`` filter can
    name (no "=", no spaces)."""
    if len(labels) > _MAX_LABELS:
        return [("agent.labels", f"expected at most {_MAX_LABELS} labels, got {len(labels)}")]
    problems: list[tuple[str, str]] = []
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(("agent.labels", "expected a table of strings"))
        elif not _LABEL_KEY_RE.match(key) or len(key) > _MAX_LABEL_LENGTH:
            problems.append((f"agent.labels[{key!r}]",
                             f"expected a key of 1-{_MAX_LABEL_LENGTH} characters without '=' "
                             "or spaces"))
        elif len(value) > _MAX_LABEL_LENGTH:
            problems.append((f"agent.labels[{key!r}]",
                             f"expected a value of at most {_MAX_LABEL_LENGTH} characters"))
    return problems


def check_agent_config(agent: AgentConfig) -> None:
    """Validate an agent config built in code (the ``Agent`` constructor's overrides skip the
    decoder's type checks); the first problem raises ``ConfigError`` naming its key."""
    problems = _agent_problems(agent)
    if not agent.node_id:
        problems.insert(0, ("agent.node_id", "expected 1-128 characters of [A-Za-z0-9._-]"))
    if problems:
        key, what = problems[0]
        raise ConfigError(f"{key}: {what}")


def _phi_problems(det: DetectionConfig) -> list[tuple[str, str]]:
    """The phi accrual keys' cross-field rules."""
    problems: list[tuple[str, str]] = []
    if det.phi_min_samples > det.phi_window:
        problems.append(("detection.phi_min_samples", "expected at most detection.phi_window"))
    if det.phi_min_std <= 0:
        problems.append(("detection.phi_min_std", "expected a duration greater than 0"))
    return problems


def _history_problems(det: DetectionConfig) -> list[tuple[str, str]]:
    """The history tiers' rules, for SQLite and Redis and for etcd alike."""
    problems: list[tuple[str, str]] = []
    for prefix in ("", "etcd_"):
        full = getattr(det, f"{prefix}history_full_resolution")
        rollup = getattr(det, f"{prefix}history_rollup")
        if full < 0:
            problems.append((f"detection.{prefix}history_full_resolution",
                             "expected a duration of at least 0"))
        if not 10 <= rollup <= 86400:
            problems.append((f"detection.{prefix}history_rollup",
                             "expected a duration between 10s and 1d"))
    return problems


def _check_semantics(cfg: Config) -> list[tuple[str, str]]:
    """Cross-field rules that a type cannot express: (key, what is expected)."""
    problems: list[tuple[str, str]] = []
    det = cfg.detection
    for key in ("healthy_interval", "unhealthy_interval", "timeout", "connect_timeout"):
        if getattr(det, key) <= 0:
            problems.append((f"detection.{key}", "expected a duration greater than 0"))
    if det.connect_timeout > det.timeout:
        problems.append(("detection.connect_timeout", "expected at most detection.timeout"))
    if det.dead_after <= 0:
        problems.append(("detection.dead_after", "expected a duration greater than 0"))
    problems.extend(_phi_problems(det))
    if not 0 < cfg.coordinator.store_timeout <= 300:
        problems.append(("coordinator.store_timeout",
                         "expected a duration greater than 0 and at most 5m"))
    for key in ("agent_token", "admin_token", "observer_token"):
        value = getattr(cfg.coordinator, key)
        if isinstance(value, list):
            if any(not token or token != token.strip() for token in value):
                problems.append((f"coordinator.{key}", "expected non-empty tokens without "
                                 "surrounding spaces"))
            elif len(set(value)) != len(value):
                problems.append((f"coordinator.{key}", "expected each token once"))
            elif len(value) > 16:
                problems.append((f"coordinator.{key}", "expected at most 16 tokens"))
    cc = cfg.coordinator
    if cc.advertise_url and not cc.advertise_url.startswith(("http://", "https://")):
        problems.append(("coordinator.advertise_url", "expected an http:// or https:// URL"))
    if cc.coordination == "shares" and not cc.store.startswith("etcd://"):
        problems.append(("coordinator.coordination", "\"shares\" needs an etcd:// store "
                         "(several coordinators share the fleet through etcd)"))
    if cc.coordination == "shares" and not cc.advertise_url and \
            cc.listen.rsplit(":", 1)[0] in ("", "0.0.0.0", "[::]", "::"):
        problems.append(("coordinator.advertise_url", "expected the URL other coordinators "
                         "and agents reach this one at (listen is a wildcard address)"))
    if cfg.coordinator.leader_ttl < 1:
        problems.append(("coordinator.leader_ttl", "expected at least 1s (an etcd lease)"))
    if cfg.coordinator.heartbeat_udp and not _valid_host_port(cfg.coordinator.heartbeat_udp):
        problems.append(("coordinator.heartbeat_udp",
                         "expected HOST:PORT (port 0-65535), or empty for no UDP heartbeats"))
    if det.history_ttl < 1:
        problems.append(("detection.history_ttl", "expected at least 1s"))
    problems.extend(_history_problems(det))
    if not 1 <= cfg.coordinator.refresh_interval <= 3600:
        problems.append(("coordinator.refresh_interval",
                         "expected a duration between 1s and 1h"))
    out = cfg.outliers
    for key in ("window", "base_ejection_time"):
        if getattr(out, key) <= 0:
            problems.append((f"outliers.{key}", "expected a duration greater than 0"))
    if out.max_ejection_time < out.base_ejection_time:
        problems.append(("outliers.max_ejection_time", "expected at least base_ejection_time"))
    if out.group_by and not re.match(r"^[A-Za-z0-9._/-]{1,128}$", out.group_by):
        problems.append(("outliers.group_by", "expected a label key (or empty for the fleet)"))
    problems.extend(_agent_problems(cfg.agent))
    seen: set[str] = set()
    for i, node in enumerate(cfg.nodes):
        if node.id in seen:
            problems.append((f"nodes[{i}].id", f"expected a unique id, {node.id!r} repeats"))
        seen.add(node.id)
    for i, action in enumerate(cfg.actions):
        need = {"webhook": "url", "exec": "command", "haproxy": "socket", "nginx": "file"}
        if not getattr(action, need[action.type]):
            problems.append((f"actions[{i}].{need[action.type]}", f"required for {action.type}"))
        unknown = [kind for kind in action.on if kind not in ACTION_EVENTS]
        if unknown:
            problems.append((f"actions[{i}].on",
                             f"unknown event {unknown[0]!r}; expected any of "
                             f"{', '.join(ACTION_EVENTS)}"))
        if action.type == "haproxy" and not action.backend:
            problems.append((f"actions[{i}].backend", "required for haproxy"))
        if action.type == "haproxy" and action.observe and not (
                0 < action.observe_interval <= out.window):
            problems.append((f"actions[{i}].observe_interval",
                             f"expected a duration greater than 0 and at most outliers.window "
                             f"({format_duration(out.window)}): counts older than the window "
                             f"never count"))
    return problems


def _key_from_path(message: str) -> tuple[str, str]:
    """Turn msgspec's "... - at `$.a.b[0]`" into ("a.b[0]", "...")."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return "", message
    key = where.rstrip("`").removeprefix("$").removeprefix(".")
    return key, text


def _literal_choices(key: str) -> list[str]:
    """The allowed values of a Literal-typed key, for a message that says what is expected."""
    kind: Any = Config
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        hints = typing.get_type_hints(kind, include_extras=True) if isinstance(kind, type) else {}
        kind = hints.get(part)
        while typing.get_origin(kind) in (list, Annotated):
            kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is Literal:
        return [str(arg) for arg in typing.get_args(kind)]
    return []


def _from_mapping(raw: dict[str, Any], source: str) -> Config:
    try:
        cfg = msgspec.convert(raw, Config, dec_hook=_dec_hook, str_keys=True)
    except msgspec.ValidationError as exc:
        key, what = _key_from_path(str(exc))
        what = what[:1].lower() + what[1:]
        unknown = re.match(r"object contains unknown field `(.+)`", what)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            what = "unknown key"
        if what.startswith("invalid enum value"):
            choices = _literal_choices(key)
            if choices:
                what += f"; expected one of {', '.join(choices)}"
        raise ConfigError(f"{source}: {key or '(top level)'}: {what}") from None
    problems = _check_semantics(cfg)
    if problems:
        key, what = problems[0]
        raise ConfigError(f"{source}: {key}: {what}")
    return cfg


def _check_tls_files(cfg: Config, source: str) -> None:
    """Build the TLS contexts once to prove the files: readable PEM, each key its cert's."""
    agent, coordinator = cfg.agent, cfg.coordinator
    try:
        server_context(coordinator.tls_cert, coordinator.tls_key, coordinator.tls_client_ca)
        client_context(agent.tls_ca, agent.tls_cert, agent.tls_key)
    except TlsSetupError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, check_files: bool = True) -> Config:
    """Load the TOML file (if any), apply command-line overrides, validate everything once.

    ``overrides`` maps dotted keys (``"agent.listen"``) to raw values as a user would write them
    in the file, so flags and file go through the same checks. ``check_files`` also opens the
    TLS files it names (off for tools that only read thresholds, such as ``simulate``).
    """
    raw: dict[str, Any] = {}
    source = str(path) if path else "command line"
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        table = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    cfg = _from_mapping(raw, source)
    if check_files:
        _check_tls_files(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON-ready view (durations as seconds); secrets are masked."""
    data: dict[str, Any] = msgspec.to_builtins(cfg, enc_hook=_enc_hook)
    for table, key in (("coordinator", "admin_token"), ("coordinator", "agent_token"),
                       ("coordinator", "observer_token"), ("agent", "agent_token")):
        value = data[table].get(key)
        if isinstance(value, list):
            data[table][key] = ["***" for _ in value]
        elif value:
            data[table][key] = "***"
    for action in data["actions"]:
        if action.get("secret"):
            action["secret"] = "***"
    return data
