"""nodewatch: keeps a cluster's view of its nodes true."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Agent", "__version__"]

if TYPE_CHECKING:
    from nodewatch.collect.agent import Agent


def __getattr__(name: str) -> Any:
    # Lazy so that `import nodewatch` (the CLI, the coordinator) does not pay for the agent.
    if name == "Agent":
        from nodewatch.collect.agent import Agent

        return Agent
    raise AttributeError(name)
