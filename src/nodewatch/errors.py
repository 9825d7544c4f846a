"""The one error type every layer that reads settings raises (config, TLS files, the agent's
overrides): a module of its own so that ``config`` and ``tls`` share it without a cycle."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line an operator needs."""
