"""The four action types (webhook, exec, haproxy, nginx), each built once from its config.

An action is a plain record of small functions with one signature each: ``run(call)`` does the
work and raises :class:`ActionError` (or times out) on failure, ``describe(call)`` says what it
would do (for ``dry_run`` and for evidence). No class hierarchy: the runner treats them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from yarl import URL

from nodewatch.config import ACTION_EVENTS, NODE_ID_RE, ActionConfig
from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Admin, Health, NodeState, NodeStatus

__all__ = [
    "Action",
    "ActionCall",
    "ActionError",
    "LbState",
    "build_action",
    "haproxy_command",
    "haproxy_server",
    "lb_state",
    "nginx_upstream",
    "node_for_haproxy_server",
    "signature",
]

LbState = Literal["ready", "drain", "maint"]
SIGNATURE_HEADER = "X-Nodewatch-Signature"
_MAX_OUTPUT = 300  # characters of a command's or server's answer kept in an error


class ActionError(Exception):
    """One attempt of an action failed; the message is safe to log (it carries no secret)."""


@dataclass(frozen=True, slots=True)
class ActionCall:
    """Everything an action may use: the request, its event, the node as it was when the
    request was made (the order of requests is the order of truth), and a live read-only view
    of all nodes for actions that rewrite a whole set (nginx)."""

    request: ActionRequest
    event: dict[str, Any] | None
    node: NodeState | None
    nodes: Callable[[], Mapping[str, NodeState]] = field(default=lambda: {})


Run = Callable[[ActionCall], Awaitable[None]]
Describe = Callable[[ActionCall], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Action:
    """One configured ``[[actions]]`` entry, decided at construction."""

    name: str
    on: frozenset[str]
    timeout: float
    retries: int
    run: Run
    describe: Describe
    close: Callable[[], Awaitable[None]]


async def _nothing_to_close() -> None:
    return None


NOTIFY_KINDS = ("unhealthy", "dead", "recovered")
LB_KINDS = ACTION_EVENTS
DEFAULT_ON = {"webhook": NOTIFY_KINDS, "exec": NOTIFY_KINDS, "haproxy": LB_KINDS,
              "nginx": LB_KINDS}


def build_action(cfg: ActionConfig, index: int = 0) -> Action:
    """The action for one config entry; the type is decided here, never on the hot path."""
    builders = {"webhook": webhook, "exec": exec_command, "haproxy": haproxy, "nginx": nginx}
    run, describe, close = builders[cfg.type](cfg)
    kinds = frozenset(cfg.on or DEFAULT_ON[cfg.type])
    return Action(name=f"{cfg.type}[{index}]", on=kinds, timeout=float(cfg.timeout),
                  retries=cfg.retries, run=run, describe=describe, close=close)


# ---------------------------------------------------------------------- load balancer state


def lb_state(kind: str, node: NodeState | None) -> LbState | None:
    """Where a load balancer should put the node; None means out for good (dead, removed).

    Derived from the node's state, not only from the event kind, so that e.g. a node that
    recovers while in review stays out until it is approved, and a node whose cleanup is
    held by the budget or the guard stays in.
    """
    if node is None or node.health is Health.DEAD or kind in ("dead", "removed"):
        return None
    if node.cleaned_up or node.admin is Admin.REVIEW or kind == "drain_deadline":
        return "maint"
    if node.health is Health.UNKNOWN:
        return "maint"  # registered, never seen healthy yet
    if node.admin is Admin.DRAINED or node.node_status in (NodeStatus.DRAINING,
                                                           NodeStatus.DEGRADED):
        return "drain"  # alive, keeps its connections, gets no new work
    if node.outlier is not None and not node.outlier.dry_run:
        return "drain"  # a gray failure: alive, but failing its callers (soft drain)
    return "ready"


def nginx_upstream(nodes: Mapping[str, NodeState]) -> str:
    """``server`` lines for an ``upstream`` block: in-service nodes plain, the others ``down``,
    dead nodes left out. nginx refuses an empty upstream, so an empty set gets a placeholder."""
    lines = ["# written by nodewatch: every change is replaced on the next event"]
    for node_id in sorted(nodes):
        node = nodes[node_id]
        state = lb_state("", node)
        if state is None or not node.address:
            continue
        suffix = "" if state == "ready" else " down"
        lines.append(f"server {node.address}{suffix};  # {node_id}")
    if len(lines) == 1:
        lines.append("server 127.0.0.1:9 down;  # no nodes")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- webhook


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC>`` of the exact body bytes, as receivers verify it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _safe_url(url: str) -> str:
    """The URL without credentials or query (either may hold a token): fit for logs."""
    try:
        parsed = URL(url)
    except ValueError:
        return "(invalid url)"
    return str(parsed.with_user(None).with_query(None).with_fragment(None))


def _payload(call: ActionCall) -> dict[str, Any]:
    req = call.request
    return {
        "action": req.kind,
        "node_id": req.node_id,
        "address": req.address,
        "reason": req.reason,
        "event": call.event,
        "node": call.node.to_json() if call.node is not None else None,
    }


def webhook(cfg: ActionConfig) -> tuple[Run, Describe, Callable[[], Awaitable[None]]]:
    """POST the event and node as JSON; 2xx is success. Signed with HMAC-SHA256 when
    ``secret`` is set; the secret is never logged or put into an error."""
    url, secret, shown = cfg.url, cfg.secret, _safe_url(cfg.url)
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        if not sessions:
            sessions.append(aiohttp.ClientSession(trust_env=False))
        return sessions[0]

    async def run(call: ActionCall) -> None:
        body = json.dumps(_payload(call), separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json",
                   "X-Nodewatch-Event": call.request.kind}
        if secret:
            headers[SIGNATURE_HEADER] = signature(secret, body)
        try:
            async with session().post(url, data=body, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    raise ActionError(f"webhook {shown} answered HTTP {resp.status}")
        except aiohttp.ClientError as exc:
            raise ActionError(f"webhook {shown}: {type(exc).__name__}") from None

    def describe(call: ActionCall) -> dict[str, Any]:
        return {"type": "webhook", "url": shown, "signed": bool(secret)}

    async def close() -> None:
        for s in sessions:
            await s.close()
        sessions.clear()

    return run, describe, close


# ---------------------------------------------------------------------- exec


def _argv(template: list[str], call: ActionCall) -> list[str]:
    """Substitute placeholders in each argument; no shell, so nothing is ever interpreted."""
    req = call.request
    values = {"{node_id}": req.node_id, "{address}": req.address, "{event}": req.kind,
              "{reason}": req.reason, "{event_id}": req.event_id}
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


async def _run_argv(argv: list[str], what: str) -> None:
    """Run a command to completion; kill it if the caller's timeout cancels us."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ActionError(f"{what}: cannot start {argv[0]!r}: {exc.strerror}") from None
    try:
        _, stderr = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip()[-_MAX_OUTPUT:]
        raise ActionError(f"{what}: {argv[0]!r} exited with {proc.returncode}"
                          + (f": {tail}" if tail else ""))


def exec_command(cfg: ActionConfig) -> tuple[Run, Describe, Callable[[], Awaitable[None]]]:
    """Run ``command`` (an argv list) with ``{node_id}`` ``{address}`` ``{event}``
    ``{reason}`` substituted; exit status 0 is success."""
    template = list(cfg.command)

    async def run(call: ActionCall) -> None:
        await _run_argv(_argv(template, call), "exec")

    def describe(call: ActionCall) -> dict[str, Any]:
        return {"type": "exec", "argv": _argv(template, call)}

    return run, describe, _nothing_to_close


# ---------------------------------------------------------------------- haproxy


HAPROXY_MAX_ANSWER = 64 << 20  # bytes: `show stat` of a very large backend stays well under


async def haproxy_command(socket_path: str, command: str,
                          max_answer: int = HAPROXY_MAX_ANSWER) -> str:
    """One command over HAProxy's runtime API (UNIX admin socket); returns its whole answer.

    Non-interactive mode: HAProxy closes the connection once it answered, so the answer is
    everything up to EOF (a long ``show stat`` arrives in many chunks). The caller bounds it
    in time; ``max_answer`` bounds it in memory."""
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path)
    except OSError as exc:
        raise ActionError(f"haproxy socket {socket_path}: {exc.strerror or exc}") from None
    chunks: list[bytes] = []
    size = 0
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        while chunk := await reader.read(1 << 16):
            size += len(chunk)
            if size > max_answer:
                raise ActionError(f"haproxy {command.split()[0]!r}: answer over "
                                  f"{max_answer} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise ActionError(f"haproxy socket {socket_path}: {exc.strerror or exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return b"".join(chunks).decode(errors="replace")


def haproxy_server(node_id: str) -> str:
    """The HAProxy server name of a node: its id (one rule for the action and the observer)."""
    return node_id


def node_for_haproxy_server(server: str) -> str | None:
    """The node a server name stands for (the inverse of :func:`haproxy_server`); None for a
    name that cannot be a node id (the server is not one nodewatch watches)."""
    return server if NODE_ID_RE.match(server) else None


def haproxy(cfg: ActionConfig) -> tuple[Run, Describe, Callable[[], Awaitable[None]]]:
    """``set server BACKEND/SERVER state maint|drain|ready``, the server named by
    :func:`haproxy_server`. Dead and removed nodes go to maint and stay there (nothing puts
    them back)."""
    socket_path, backend = cfg.socket, cfg.backend

    def command(call: ActionCall) -> str:
        state = lb_state(call.request.kind, call.node) or "maint"
        return f"set server {backend}/{haproxy_server(call.request.node_id)} state {state}"

    async def run(call: ActionCall) -> None:
        text = command(call)
        answer = (await haproxy_command(socket_path, text)).strip()
        if answer:  # success is an empty answer; anything else is haproxy's error message
            raise ActionError(f"haproxy {text!r}: {answer[:_MAX_OUTPUT]}")

    def describe(call: ActionCall) -> dict[str, Any]:
        return {"type": "haproxy", "socket": socket_path, "command": command(call)}

    return run, describe, _nothing_to_close


# ---------------------------------------------------------------------- nginx


def _write_atomically(path: Path, text: str) -> None:
    """tmp file in the same directory, fsync, rename: nginx never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def nginx(cfg: ActionConfig) -> tuple[Run, Describe, Callable[[], Awaitable[None]]]:
    """Rewrite the upstream file from the current set of nodes, then run ``reload``.

    Serialized by one lock so two events never interleave a write and a reload; a file that
    nginx already runs with (the last successful reload) is not reloaded again.
    """
    path, reload = Path(cfg.file), list(cfg.reload)
    lock = asyncio.Lock()
    applied: list[str] = []  # the text of the last successful reload

    async def run(call: ActionCall) -> None:
        async with lock:
            text = nginx_upstream(call.nodes())
            if applied and applied[0] == text:
                return
            try:
                await asyncio.to_thread(_write_atomically, path, text)
            except OSError as exc:
                raise ActionError(f"nginx: cannot write {path}: {exc.strerror}") from None
            applied.clear()
            if reload:
                await _run_argv(reload, "nginx reload")
            applied.append(text)

    def describe(call: ActionCall) -> dict[str, Any]:
        return {"type": "nginx", "file": str(path), "reload": reload,
                "upstream": nginx_upstream(call.nodes()).splitlines()[1:]}

    return run, describe, _nothing_to_close
