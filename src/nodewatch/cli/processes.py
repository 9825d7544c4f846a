"""Run a coordinator and agents as real local processes: the demo and end-to-end tests.

Every child gets PR_SET_PDEATHSIG on Linux, so even a ``kill -9`` of the parent leaves no
process behind; a clean stop sends SIGTERM and waits, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "Proc", "http_json", "reachable"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: take SIGTERM when the parent dies, whatever the cause."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()  # Ctrl-C in the terminal reaches the parent only; it stops the children.


def http_json(url: str, method: str = "GET", body: dict[str, Any] | None = None,
              timeout: float = 2.0, token: str = "",
              context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """A tiny blocking JSON client for harness code (tests, demo), never used on a hot path."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def reachable(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        status, _ = http_json(url, timeout=0.5, context=context)
    except (OSError, ValueError):
        return False
    return status < 500


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: a clean stop when possible, never a leftover."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalCluster:
    """A coordinator and agents on loopback addresses, each agent on its own 127.0.x.y."""

    workdir: Path
    coordinator_listen: str = "127.0.0.1:7300"
    config_text: str = ""
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    coordinator: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    # Set when the coordinator serves https: the harness's own client context (CA, client cert).
    tls: ssl.SSLContext | None = None
    # --log-format for every child (text, json or auto), when set; else each resolves its own.
    log_format: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.coordinator_listen}"

    def _spawn(self, proc: Proc) -> Proc:
        log = proc.log_path.open("ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        proc.popen = subprocess.Popen(
            proc.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, preexec_fn=_die_with_parent, cwd=self.workdir,
        )
        log.close()
        return proc

    def config_path(self) -> Path:
        path = self.workdir / "nodewatch.toml"
        path.write_text(self.config_text)
        return path

    def start_coordinator(self, *extra: str, wait: float = 20.0) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.python, "-m", "nodewatch", "coordinator", "--listen",
                self.coordinator_listen, "--config", str(self.config_path()),
                *self._log_flags(), *extra]
        proc = self._spawn(Proc("coordinator", argv, self.workdir / "coordinator.log"))
        self.coordinator = proc
        self._wait_up(proc, f"{self.url}/healthz", wait, self.tls)
        return proc

    def start_agent(self, node_id: str, address: str, *extra: str, wait: float = 20.0,
                    state_dir: Path | None = None, coordinator: bool = True) -> Proc:
        state = state_dir or self.workdir / "agents" / node_id
        argv = [self.python, "-m", "nodewatch", "agent", "--node-id", node_id, "--listen",
                address, "--state-dir", str(state), "--config", str(self.config_path())]
        if coordinator:
            argv += ["--coordinator", self.url]
        argv += [*self._log_flags(), *extra]
        proc = self._spawn(Proc(node_id, argv, self.workdir / f"agent-{node_id}.log",
                                address=address))
        self.agents[node_id] = proc
        self._wait_up(proc, f"http://{address}/health", wait)
        return proc

    def _log_flags(self) -> list[str]:
        return ["--log-format", self.log_format] if self.log_format else []

    @staticmethod
    def _wait_up(proc: Proc, url: str, wait: float,
                 context: ssl.SSLContext | None = None) -> None:
        deadline = time.monotonic() + wait
        while not reachable(url, context):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not up after {wait}s:\n{proc.log()[-3000:]}")
            time.sleep(0.05)

    def node(self, node_id: str) -> dict[str, Any] | None:
        status, body = http_json(f"{self.url}/v1/nodes/{node_id}", context=self.tls)
        return body if status == 200 and isinstance(body, dict) else None

    def nodes(self) -> list[dict[str, Any]]:
        status, body = http_json(f"{self.url}/v1/nodes", context=self.tls)
        return list(body["nodes"]) if status == 200 else []

    def events(self, after: str | None = None) -> list[dict[str, Any]]:
        query = f"?after={after}" if after else ""
        status, body = http_json(f"{self.url}/v1/events{query}", context=self.tls)
        return list(body["events"]) if status == 200 else []

    def stop(self) -> None:
        for proc in list(self.agents.values()):
            proc.stop()
        if self.coordinator is not None:
            self.coordinator.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
