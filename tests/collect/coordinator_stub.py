"""A tiny recording coordinator for agent tests: it stores what the agent sends."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nodewatch.protocol import OWNER_HEADER
from tests.helpers import free_port


class RecordingCoordinator:
    def __init__(self, *, heartbeat_interval: float = 0.0, heartbeat_phase: float = 0.0,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_phase = heartbeat_phase
        self.forget_next_heartbeat = False
        self.owner = ""  # as a shared coordinator: the URL it names as the node's owner
        self.redirect = False  # answer a registration with 307 to the owner (client certs)
        self._runner: web.AppRunner | None = None

    async def _register(self, request: web.Request) -> web.Response:
        if self.redirect:
            return web.Response(status=307, headers={"Location": f"{self.owner}/v1/register",
                                                     OWNER_HEADER: self.owner})
        body = await request.json()
        self.auth.append(request.headers.get("Authorization", ""))
        self.registrations.append(body)
        return web.json_response({"decision": "new", "node": {"node_id": body["node_id"]},
                                  "heartbeat_interval": self.heartbeat_interval,
                                  "heartbeat_phase": self.heartbeat_phase,
                                  "owner": self.owner})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.auth.append(request.headers.get("Authorization", ""))
        if self.forget_next_heartbeat:
            self.forget_next_heartbeat = False
            return web.json_response({"error": "unknown node"}, status=404)
        self.heartbeats.append(body)
        return web.Response(status=204, headers={OWNER_HEADER: self.owner} if self.owner else {})

    async def start(self) -> RecordingCoordinator:
        app = web.Application()
        app.router.add_post("/v1/register", self._register)
        app.router.add_post("/v1/heartbeat", self._heartbeat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

