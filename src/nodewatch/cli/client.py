"""A small blocking client for the coordinator API, used by the command line.

Blocking urllib on purpose: a CLI call is one or two requests, and every failure must become
one readable :class:`ClientError` line (never a traceback), which is simplest without a loop.
Answers are decoded once, here, into typed results (the shapes of ``api/schemas.py``'s views,
declared again so that the CLI does not import the server's aiohttp stack).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from nodewatch.tls import client_context, explain_tls_failure, probe_handshake

DEFAULT_COORDINATOR = "http://127.0.0.1:7300"
ENV_COORDINATOR = "NODEWATCH_COORDINATOR"
ENV_ADMIN_TOKEN = "NODEWATCH_ADMIN_TOKEN"
ENV_CA = "NODEWATCH_CA"
ENV_CLIENT_CERT = "NODEWATCH_CLIENT_CERT"
ENV_CLIENT_KEY = "NODEWATCH_CLIENT_KEY"
# How the CLI names each setting in a message: the flag and its environment variable.
TLS_KEYS = (f"--ca ({ENV_CA})", f"--cert ({ENV_CLIENT_CERT})", f"--key ({ENV_CLIENT_KEY})")
_TLS_HINTS = {
    "untrusted": f"pass --ca FILE or set {ENV_CA} to the CA that signed it",
    "client_cert_required": f"pass --cert and --key, or set {ENV_CLIENT_CERT} and "
                            f"{ENV_CLIENT_KEY}",
    "client_cert_rejected": "it must be a client certificate (extendedKeyUsage clientAuth) "
                            "signed by the coordinator's tls_client_ca",
}

__all__ = ["Client", "ClientError", "CommandResult", "CoordinatorStatus", "DEFAULT_COORDINATOR",
           "DrainInfo", "EventInfo", "EventsPage", "IdentityInfo", "NodeInfo", "OutlierInfo",
           "TargetGroup",
           "resolve_coordinator"]

T = TypeVar("T")


class _Result(msgspec.Struct, kw_only=True):
    """Fields the coordinator adds later are ignored, not an error."""


class DrainInfo(_Result):
    """An ongoing soft offline of a node (``drain`` in a node)."""

    reason: str
    started: float
    deadline: float
    by: str
    complete: bool
    waiting_for: dict[str, float | None] | None = None


class IdentityInfo(_Result):
    """A node's identity as ``GET /v1/nodes`` shows it (never a secret or a hash)."""

    enrolled: bool = False
    credential_since: float | None = None
    pending_claim: str | None = None  # the address of a claim refused for want of the credential
    reenrol_from: str | None = None  # the address an operator approved to re-enrol from
    revoked: bool = False


class OutlierInfo(_Result):
    """A node ejected as an outlier (a gray failure): healthy, not schedulable until
    ``until`` and until its figures are back in line."""

    since: float
    until: float
    reason: str
    ejections: int = 1
    dry_run: bool = False
    figures: dict[str, Any] = msgspec.field(default_factory=dict)


class NodeInfo(_Result):
    """One node as ``GET /v1/nodes`` shows it."""

    node_id: str
    address: str
    health: str
    node_status: str
    admin: str
    schedulable: bool
    incarnation: int
    seq: int
    last_seen: float
    since: float
    consecutive_failures: int
    system: dict[str, float]
    load: dict[str, float]
    labels: dict[str, str]
    reasons: list[str]
    version: str = ""
    drain: DrainInfo | None = None
    outlier: OutlierInfo | None = None
    load_score: float | None = None
    identity: IdentityInfo | None = None


class EventInfo(_Result):
    """One event, as ``GET /v1/events`` and the event stream carry it."""

    id: str
    ts: float
    node_id: str
    kind: str
    from_: str = msgspec.field(default="", name="from")
    to: str = ""
    reason: str = ""
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)


class EventsPage(_Result):
    """A page of events and the id to ask after for the next one."""

    events: list[EventInfo]
    last_id: str | None = None


class CommandResult(_Result):
    """What an operator command did: the node afterwards (None once removed), its events."""

    events: list[EventInfo] = msgspec.field(default_factory=list)
    node: NodeInfo | None = None
    removed: str = ""


class CoordinatorStatus(_Result):
    """``GET /healthz``: the coordinator's own state."""

    status: str
    reasons: list[str] = msgspec.field(default_factory=list)
    role: str = ""
    leader: str = ""
    version: str = ""
    uptime: float = 0.0
    loop_lag: float = 0.0
    guard: bool = False
    in_grace: bool = False
    dry_run: bool = False
    nodes: dict[str, int] = msgspec.field(default_factory=dict)
    checks: int = 0
    poller: dict[str, Any] = msgspec.field(default_factory=dict)


class TargetGroup(_Result):
    """One Prometheus target group (``GET /v1/sd/prometheus``; ``api/sd.py``)."""

    targets: list[str]
    labels: dict[str, str]


class _NodesAnswer(_Result):
    nodes: list[NodeInfo]


class ClientError(Exception):
    """A failed call, already phrased as the one line an operator needs to read."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def resolve_coordinator(flag: str | None) -> str:
    """``--coordinator``, then ``NODEWATCH_COORDINATOR``, then the local default (SPEC)."""
    url = flag or os.environ.get(ENV_COORDINATOR) or DEFAULT_COORDINATOR
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


@dataclass
class Client:
    """Calls one coordinator; the admin token is sent only when one is given.

    ``ca`` (trusted instead of the system CAs) and ``cert``/``key`` (a client certificate) are
    for an https coordinator; the files are checked and the TLS context built once, here,
    raising :class:`nodewatch.tls.TlsSetupError` for a file that cannot work.
    """

    base_url: str
    token: str = ""
    timeout: float = 5.0
    ca: str = ""
    cert: str = ""
    key: str = ""
    _opener: urllib.request.OpenerDirector = field(init=False, repr=False)
    _context: ssl.SSLContext | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._context = client_context(self.ca, self.cert, self.key, keys=TLS_KEYS)
        handlers = [urllib.request.HTTPSHandler(context=self._context)] if self._context else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_env(cls, coordinator: str | None, timeout: float = 5.0, *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None) -> Client:
        """Flags first, then ``NODEWATCH_COORDINATOR`` / ``NODEWATCH_CA`` /
        ``NODEWATCH_CLIENT_CERT`` / ``NODEWATCH_CLIENT_KEY``, then the defaults."""
        env = os.environ.get
        return cls(resolve_coordinator(coordinator), env(ENV_ADMIN_TOKEN, ""), timeout,
                   ca=ca or env(ENV_CA, ""), cert=cert or env(ENV_CLIENT_CERT, ""),
                   key=key or env(ENV_CLIENT_KEY, ""))

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, model: type[T],
                 body: dict[str, Any] | None = None, timeout: float | None = None,
                 answers: frozenset[int] = frozenset()) -> T:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers=headers)
        try:
            resp = self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code not in answers:  # ``answers``: error codes whose body is the answer
                raise self._http_error(exc) from None
            resp = exc
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None
        with resp:
            try:
                raw = resp.read()
            except OSError as exc:
                raise self._unreachable(exc) from None
        try:
            return msgspec.json.decode(raw, type=model)
        except msgspec.ValidationError as exc:
            raise ClientError(f"{self.base_url} answered {method} {path.partition('?')[0]} "
                              f"with an unexpected shape: {exc}") from None
        except msgspec.DecodeError:
            raise ClientError(f"{self.base_url} answered with something that is not JSON; "
                              "is it a nodewatch coordinator?") from None

    def _unreachable(self, exc: BaseException) -> ClientError:
        failure = explain_tls_failure(exc)
        if failure is None and self.base_url.startswith("https://"):
            # A rejected client certificate arrives as a bare "closed without response".
            failure = probe_handshake(self.base_url, self._context,
                                      presents_certificate=bool(self.cert), timeout=self.timeout)
        if failure is not None:
            hint = _TLS_HINTS.get(failure.kind)
            return ClientError(failure.describe(f"the coordinator at {self.base_url}")
                               + (f" ({hint})" if hint else ""))
        reason: object = getattr(exc, "reason", exc)
        if isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        elif isinstance(reason, TimeoutError):
            why = "timed out"
        else:
            why = str(reason) or type(reason).__name__
        return ClientError(f"cannot reach the coordinator at {self.base_url}: {why} "
                           f"(set --coordinator or {ENV_COORDINATOR})")

    def _http_error(self, exc: urllib.error.HTTPError) -> ClientError:
        message = ""
        try:
            payload = json.loads(exc.read() or b"{}")
            if isinstance(payload, dict):
                message = str(payload.get("error", ""))
        except (ValueError, OSError):
            pass
        if exc.code == 401:
            hint = "set NODEWATCH_ADMIN_TOKEN" if not self.token else \
                "NODEWATCH_ADMIN_TOKEN does not match the coordinator's admin token"
            return ClientError(f"not authorised by {self.base_url}: {hint}", 401)
        return ClientError(message or f"{self.base_url} answered HTTP {exc.code}", exc.code)

    @staticmethod
    def _node_path(node_id: str) -> str:
        return "/v1/nodes/" + urllib.parse.quote(node_id, safe="")

    # ------------------------------------------------------------------ calls

    def healthz(self) -> CoordinatorStatus:
        # A failing coordinator answers 503 with the same body, saying why.
        return self._request("GET", "/healthz", CoordinatorStatus, answers=frozenset({503}))

    def nodes(self) -> list[NodeInfo]:
        return self._request("GET", "/v1/nodes", _NodesAnswer).nodes

    def prometheus_targets(self, query: list[tuple[str, str]] | None = None
                           ) -> list[TargetGroup]:
        """``GET /v1/sd/prometheus`` with the node filters (``schedulable``, ``health``,
        ``label``) as query pairs."""
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return self._request("GET", "/v1/sd/prometheus" + suffix, list[TargetGroup])

    def node(self, node_id: str) -> NodeInfo:
        return self._request("GET", self._node_path(node_id), NodeInfo)

    def command(self, name: str, node_id: str, reason: str = "",
                address: str = "") -> CommandResult:
        """``drain`` / ``undrain`` / ``approve`` / ``revoke`` (POST) or ``remove`` (DELETE);
        ``address``: for approve, the claim meant (see the API's ``ApproveBody``)."""
        if name == "remove":
            return self._request("DELETE", self._node_path(node_id), CommandResult)
        body: dict[str, str] | None = None
        if name == "drain":
            body = {"reason": reason}
        elif name == "approve" and (address or reason):
            body = {k: v for k, v in (("address", address), ("reason", reason)) if v}
        return self._request("POST", f"{self._node_path(node_id)}/{name}", CommandResult, body)

    def revoke(self, node_id: str) -> CommandResult:
        """Revoke the node's credential (admin): refused from now on, and the node's next
        registration goes to review with a new one."""
        return self.command("revoke", node_id)

    def events(self, after: str | None = None, wait: float = 0.0,
               limit: int = 1000) -> EventsPage:
        query: dict[str, str] = {"limit": str(limit)}
        if after:
            query["after"] = after
        if wait:
            query["wait"] = f"{wait:g}"
        path = "/v1/events" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        return self._request("GET", path, EventsPage, timeout=self.timeout + wait)

    def stream_events(self, after: str | None = None,
                      idle_timeout: float = 60.0) -> Iterator[EventInfo]:
        """Follow ``/v1/events/stream`` (SSE); the server's 15 s keep-alives reset the timeout."""
        path = "/v1/events/stream" + (f"?after={urllib.parse.quote(after)}" if after else "")
        headers = {"Accept": "text/event-stream"}
        request = urllib.request.Request(self.base_url + path, headers=headers)
        try:
            resp = self._opener.open(request, timeout=idle_timeout)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None
        with resp:
            data: list[str] = []
            while True:
                try:
                    line = resp.readline()
                except OSError as exc:
                    raise self._unreachable(exc) from None
                if not line:
                    raise ClientError(f"the coordinator at {self.base_url} closed the stream")
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[5:].lstrip(" "))
                elif text == "" and data:
                    event = _stream_event("\n".join(data))
                    data = []
                    if event is not None:
                        yield event


def _stream_event(data: str) -> EventInfo | None:
    """One event of the stream; one that is not an event is skipped."""
    try:
        return msgspec.json.decode(data, type=EventInfo)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
