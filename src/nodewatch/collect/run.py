"""Running the agent as a process (``nodewatch agent``): config, logging, uvloop, signals.

Kept apart from cli.py so the agent process imports only what the agent needs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from nodewatch.config import AgentConfig, ConfigError, load_config
from nodewatch.logs import configure_logging, resolve_format
from nodewatch.systemd import Notifier

if TYPE_CHECKING:
    from nodewatch.collect.agent import Agent

__all__ = ["load_agent_config", "run_agent", "status_line"]

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


def status_line(agent: Agent) -> str:
    """The one-line summary systemd shows (``STATUS=``), e.g. "node web-1 ok, seq 1842;
    registered (rejoin)"."""
    line = f"node {agent.node_id} {agent.status.value}"
    if agent.reasons:
        line += f" ({'; '.join(agent.reasons)})"
    line += f", seq {agent.seq}"
    if not agent.config.coordinator:
        return line + "; no coordinator"
    answer = agent.registration
    if agent.registered.is_set() and answer is not None:
        return line + f"; registered ({answer.decision})"
    return line + "; not registered"


async def _serve(cfg: AgentConfig) -> None:
    from nodewatch.collect.agent import Agent

    agent = Agent(cfg)
    notifier = Notifier.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    notifier.ready(status_line(agent))
    supervise = asyncio.create_task(notifier.supervise(lambda: status_line(agent)),
                                    name="systemd-notify")
    try:
        await stop.wait()
    finally:
        notifier.stopping("stopping: sending the final seq")
        supervise.cancel()
        await agent.stop()
        notifier.close()


def run_agent(cfg: AgentConfig, log_format: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code. ``log_format`` (the flag)
    wins over ``NODEWATCH_LOG_FORMAT`` and ``[agent] log_format``."""
    configure_logging(os.environ.get("NODEWATCH_LOG_LEVEL", "INFO"),
                      resolve_format(log_format, cfg.log_format),
                      secrets=[cfg.agent_token], node_id=cfg.node_id)
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
