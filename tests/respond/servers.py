"""Real servers for respond tests: HAProxy and nginx started in a temp dir, a webhook
receiver and tiny named backends, each in its own thread or process and always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiohttp import web

from nodewatch.testing import HaproxyServer
from tests.helpers import free_port, require_binary, wait_until


class Haproxy(HaproxyServer):
    """The Debian haproxy of ``nodewatch.testing``; a missing one skips, or fails under CI."""

    def start(self, wait: float = 10.0) -> Haproxy:
        self.binary = require_binary("haproxy")
        super().start(wait)
        return self


@dataclass
class Nginx:
    """A Debian nginx with a temp prefix: master in the foreground, pid file and logs in the
    temp dir, one upstream ``app`` whose servers come from an included file."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    binary: str = ""

    @property
    def upstream_file(self) -> Path:
        return self.workdir / "upstream.conf"

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    def argv(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf),
                "-e", str(self.workdir / "error.log"), *extra]

    @property
    def reload_argv(self) -> list[str]:
        return self.argv("-s", "reload")

    def start(self, upstream: str) -> Nginx:
        self.binary = require_binary("nginx")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        self.upstream_file.write_text(upstream)
        d = self.workdir
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(f"  {kind}_temp_path {d}/{kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
            "events { worker_connections 64; }\n"
            "http {\n  access_log off;\n" + temps
            + f"  upstream app {{\n    include {self.upstream_file};\n  }}\n"
            f"  server {{\n    listen {self.host}:{self.port};\n"
            "    location / { proxy_pass http://app; proxy_connect_timeout 1s; }\n  }\n}\n"
        )
        log = (d / "nginx.out").open("ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError((d / "error.log").read_text(errors="replace"))
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return (d / "nginx.pid").exists()
            except OSError:
                return False

        wait_until(up, timeout=10, message="nginx listening")
        return self

    def get(self, path: str = "/") -> tuple[int, str]:
        """One request on a fresh connection (never a kept-alive old worker)."""
        request = urllib.request.Request(f"http://{self.host}:{self.port}{path}",
                                         headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class NamedBackend:
    """A tiny HTTP server that answers every GET with its own name."""

    def __init__(self, name: str, host: str) -> None:
        self.name = name
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.address = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class WebhookReceiver:
    """A real aiohttp server in its own thread and loop that records every POST; it can be
    told to fail the first ``fail_first`` requests with HTTP 500."""

    host: str = "127.0.0.1"
    fail_first: int = 0
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(dict(request.headers), body))
        if len(self.received) <= self.fail_first:
            return web.Response(status=500, text="scripted failure")
        return web.Response(status=204)

    def start(self) -> WebhookReceiver:
        ready = threading.Event()
        self.port = free_port(self.host)

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, self.host, self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("webhook receiver did not start")
        return self

    def kinds(self) -> list[tuple[str, str]]:
        """(action kind, node id) of every request received, in order."""
        out = []
        for item in list(self.received):
            data = item.json()
            out.append((data["action"], data["node_id"]))
        return out

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def verify_signature(secret: str, item: Received) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), item.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, item.headers.get("X-Nodewatch-Signature", ""))


@contextlib.contextmanager
def running(*servers: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            server.stop()


def wait_states(lb: Haproxy, want: dict[str, str], timeout: float = 10.0) -> None:
    def matches() -> bool:
        states = lb.states()
        return all(states.get(k) == v for k, v in want.items())

    try:
        wait_until(matches, timeout=timeout, message=f"haproxy states {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; now {lb.states()}") from None


def reached(nginx: Nginx, tries: int = 12) -> set[str]:
    """Which backends answer through nginx over ``tries`` fresh requests."""
    seen = set()
    for _ in range(tries):
        status, body = nginx.get()
        if status == 200:
            seen.add(body)
    return seen
