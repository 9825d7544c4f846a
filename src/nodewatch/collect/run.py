"""Running the agent as a process (``nodewatch agent``): config, logging, uvloop, signals.

Kept apart from cli.py so the agent process imports only what the agent needs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from nodewatch.config import AgentConfig, ConfigError, load_config

__all__ = ["load_agent_config", "run_agent"]

log = logging.getLogger("nodewatch.agent")


def load_agent_config(config_path: str | None, overrides: dict[str, Any]) -> AgentConfig:
    """File, then flags (through the same validation), then ``NODEWATCH_AGENT_TOKEN``."""
    cfg = load_config(config_path, {f"agent.{k}": v for k, v in overrides.items()}).agent
    token = os.environ.get("NODEWATCH_AGENT_TOKEN", "")
    if token:
        import msgspec

        cfg = msgspec.structs.replace(cfg, agent_token=token)
    if not cfg.node_id:
        source = config_path or "command line"
        raise ConfigError(f"{source}: agent.node_id: required (--node-id or [agent] node_id)")
    return cfg


async def _serve(cfg: AgentConfig) -> None:
    from nodewatch.collect.agent import Agent

    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()


def run_agent(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    logging.basicConfig(level=os.environ.get("NODEWATCH_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_serve(cfg))
    except OSError as exc:
        print(f"nodewatch agent: cannot listen on {cfg.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
