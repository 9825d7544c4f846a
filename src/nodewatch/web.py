"""Small aiohttp helpers shared by the agent and the coordinator: JSON errors, capped bodies,
bearer tokens compared in constant time."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["HTTPProblem", "JSON", "RAW_BODY", "beyond_loopback", "error_response", "json_response",
           "problem_middleware", "read_json_object", "token_matches", "token_ok"]

JSON = "application/json"
def _enc_hook(value: Any) -> Any:
    # Config durations are float subclasses; encode them as plain seconds.
    if isinstance(value, float):
        return float(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status, content_type=JSON)


class HTTPProblem(Exception):
    """A client error with the message the caller should read; becomes ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


RAW_BODY: web.RequestKey[bytes] = web.RequestKey("raw_body", bytes)


async def read_json_object(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """Read and parse a JSON object body, refusing anything over ``max_bytes`` with 413."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise HTTPProblem(413, f"request body is {length} bytes; the limit is {max_bytes}")
    body = await request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise HTTPProblem(413, f"request body exceeds the limit of {max_bytes} bytes")
    request[RAW_BODY] = body  # kept: a request forwarded to another coordinator sends it on
    if not body.strip():
        raise HTTPProblem(400, "request body is empty; expected a JSON object")
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise HTTPProblem(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPProblem(400, f"expected a JSON object, got {type(data).__name__}")
    return data


def beyond_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from other machines: anything but a loopback
    address or ``localhost`` (a wildcard, an interface address, any other name)."""
    name = host.strip("[]").split("%", 1)[0]
    if name.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(name).is_loopback
    except ValueError:
        return True


def token_matches(given: str, expected: Sequence[str]) -> bool:
    """True when ``given`` equals one of ``expected``: each one is compared, in constant time,
    whichever matches (so the time says nothing about which token, or how much of one)."""
    given_bytes = given.encode()
    found = False
    for token in expected:
        found |= hmac.compare_digest(given_bytes, token.encode())
    return found


def token_ok(request: web.Request, expected: str | Sequence[str]) -> bool:
    """True when no token is configured, or the bearer token matches one of them (constant
    time). ``expected`` is one token or several (old and new during a rotation)."""
    tokens = (expected,) if isinstance(expected, str) else tuple(expected)
    tokens = tuple(token for token in tokens if token)
    if not tokens:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return token_matches(given.strip(), tokens)


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn HTTPProblem and aiohttp's own HTTP errors into ``{"error": ...}`` JSON."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except HTTPProblem as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != JSON:
            reason = exc.reason or "error"
            if exc.status == 413:
                reason = "request body too large"
            return error_response(exc.status, reason)
        raise
