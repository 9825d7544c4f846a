"""A test client that carries node credentials the way an agent does."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from nodewatch.protocol import CREDENTIAL_HEADER, node_heartbeat_key

__all__ = ["CarryingClient"]


class CarryingClient:
    """A ``TestClient`` that keeps the credential each register answer issues (per node) and
    presents it on that node's later registers and heartbeats, as the agent does; anything
    else is the wrapped client's. A request that sets the header itself keeps its own."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self._client = client
        self.credentials: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def udp_key(self, node_id: str) -> bytes:
        return node_heartbeat_key(self.credentials.get(node_id, ""))

    async def post(self, path: str, *, json: Any = None, headers: dict[str, str] | None = None,
                   **kwargs: Any) -> ClientResponse:
        node_id = json.get("node_id") if isinstance(json, dict) else None
        headers = dict(headers or {})
        if isinstance(node_id, str) and node_id in self.credentials:
            headers.setdefault(CREDENTIAL_HEADER, self.credentials[node_id])
        resp: ClientResponse = await self._client.post(path, json=json, headers=headers,
                                                       **kwargs)
        if path == "/v1/register" and resp.status == 200 and isinstance(node_id, str):
            issued = (await resp.json()).get("credential")
            if issued:
                self.credentials[node_id] = issued
        return resp
