"""Custom self-checks (``[[agent.checks]]``): HTTP, TCP and command probes of local services.

Each check is built once into a coroutine function that answers ``None`` when it passes or a
short failure reason; it enforces its own timeout and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from nodewatch.config import AgentCheckConfig
from nodewatch.protocol import split_host_port

__all__ = ["CustomCheck", "build_check", "split_target"]

CheckFn = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class CustomCheck:
    name: str
    interval: float
    timeout: float
    run: CheckFn


def split_target(target: str) -> tuple[str, int]:
    """A check or probe target: a HOST:PORT whose port cannot be 0."""
    host, port = split_host_port(target)
    if port == 0:
        raise ValueError(f"expected HOST:PORT with a port of 1-65535, got {target!r}")
    return host, port


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _http_check(url: str, timeout: float, session: Callable[[], aiohttp.ClientSession]) -> CheckFn:
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def run() -> str | None:
        try:
            async with session().get(url, timeout=client_timeout) as response:
                if response.status >= 400:
                    return f"HTTP {response.status}"
                return None
        except TimeoutError:
            return f"timed out after {timeout:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _describe(exc)

    return run


def _tcp_check(target: str, timeout: float) -> CheckFn:
    host, port = split_target(target)

    async def run() -> str | None:
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            return f"connect timed out after {timeout:g}s"
        except OSError as exc:
            return f"cannot connect: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    return run


def _command_check(argv: list[str], timeout: float) -> CheckFn:
    async def run() -> str | None:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(timeout):
                code = await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return f"timed out after {timeout:g}s"
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        return None if code == 0 else f"exit status {code}"

    return run


def build_check(cfg: AgentCheckConfig, session: Callable[[], aiohttp.ClientSession]) -> CustomCheck:
    """Build the check's coroutine once; ``session`` gives the agent's shared client session."""
    timeout = float(cfg.timeout)
    if cfg.type == "command":
        argv = list(cfg.target) if isinstance(cfg.target, list) else [cfg.target]
        name = cfg.name or f"command {argv[0]}"
        run = _command_check(argv, timeout)
    elif cfg.type == "tcp":
        target = str(cfg.target)
        name = cfg.name or f"tcp {target}"
        run = _tcp_check(target, timeout)
    else:
        target = str(cfg.target)
        url = target if "://" in target else f"http://{target}"
        name = cfg.name or f"http {url}"
        run = _http_check(url, timeout, session)
    return CustomCheck(name=name, interval=float(cfg.interval), timeout=timeout, run=run)
