"""A small blocking client for the coordinator API, used by the command line.

Blocking urllib on purpose: a CLI call is one or two requests, and every failure must become
one readable :class:`ClientError` line (never a traceback), which is simplest without a loop.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_COORDINATOR = "http://127.0.0.1:7300"
ENV_COORDINATOR = "NODEWATCH_COORDINATOR"
ENV_ADMIN_TOKEN = "NODEWATCH_ADMIN_TOKEN"

__all__ = ["DEFAULT_COORDINATOR", "Client", "ClientError", "resolve_coordinator"]


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
    """Calls one coordinator; the admin token is sent only when one is given."""

    base_url: str
    token: str = ""
    timeout: float = 5.0

    @classmethod
    def from_env(cls, coordinator: str | None, timeout: float = 5.0) -> Client:
        return cls(resolve_coordinator(coordinator), os.environ.get(ENV_ADMIN_TOKEN, ""),
                   timeout)

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
            resp = urllib.request.urlopen(request, timeout=timeout or self.timeout)
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
            resp = urllib.request.urlopen(request, timeout=idle_timeout)
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
