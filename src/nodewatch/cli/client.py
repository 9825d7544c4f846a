"""A small blocking client for the coordinator API, used by the command line.

Blocking urllib on purpose: a CLI call is one or two requests, and every failure must become
one readable :class:`ClientError` line (never a traceback), which is simplest without a loop.
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
from typing import Any

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

__all__ = ["Client", "ClientError", "DEFAULT_COORDINATOR", "resolve_coordinator"]


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

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float | None = None) -> Any:
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
            raise self._http_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None
        with resp:
            try:
                raw = resp.read()
            except OSError as exc:
                raise self._unreachable(exc) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
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

    def healthz(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz"))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/nodes")["nodes"])

    def node(self, node_id: str) -> dict[str, Any]:
        return dict(self._request("GET", self._node_path(node_id)))

    def command(self, name: str, node_id: str, reason: str = "") -> dict[str, Any]:
        """``drain`` / ``undrain`` / ``approve`` (POST) or ``remove`` (DELETE)."""
        if name == "remove":
            return dict(self._request("DELETE", self._node_path(node_id)))
        body = {"reason": reason} if name == "drain" else None
        return dict(self._request("POST", f"{self._node_path(node_id)}/{name}", body))

    def events(self, after: str | None = None, wait: float = 0.0,
               limit: int = 1000) -> dict[str, Any]:
        query: dict[str, str] = {"limit": str(limit)}
        if after:
            query["after"] = after
        if wait:
            query["wait"] = f"{wait:g}"
        path = "/v1/events" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        return dict(self._request("GET", path, timeout=self.timeout + wait))

    def stream_events(self, after: str | None = None,
                      idle_timeout: float = 60.0) -> Iterator[dict[str, Any]]:
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
                    try:
                        event = json.loads("\n".join(data))
                    except ValueError:
                        event = None
                    data = []
                    if isinstance(event, dict):
                        yield event
