"""nodewatch: keeps a cluster's view of its nodes true.

The public API. Names load on first use, so that ``nodewatch status`` does not pay for the
agent's imports (aiohttp, psutil) and the agent does not pay for the CLI's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nodewatch.protocol import VERSION as __version__

if TYPE_CHECKING:
    from nodewatch.cli.client import Client, ClientError
    from nodewatch.collect.agent import Agent
    from nodewatch.config import Config, ConfigError, load_config
    from nodewatch.model import Admin, Event, Health, NodeStatus

__all__ = ["Admin", "Agent", "Client", "ClientError", "Config", "ConfigError", "Event", "Health",
           "NodeStatus", "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    # Plain imports, not importlib, so that the import-graph test sees every edge.
    if name == "Agent":
        from nodewatch.collect.agent import Agent

        return Agent
    if name in ("Client", "ClientError"):
        from nodewatch.cli import client

        return getattr(client, name)
    if name in ("Config", "ConfigError", "load_config"):
        from nodewatch import config

        return getattr(config, name)
    if name in ("Admin", "Event", "Health", "NodeStatus"):
        from nodewatch import model

        return getattr(model, name)
    raise AttributeError(f"module 'nodewatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
