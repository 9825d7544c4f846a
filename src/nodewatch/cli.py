"""The ``nodewatch`` command line."""

from __future__ import annotations

import click

from nodewatch import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodewatch")
def main() -> None:
    """nodewatch keeps a cluster's view of its nodes true."""


@main.command()
@click.option("--listen", help="HOST:PORT to serve the API on [127.0.0.1:7300]")
@click.option("--store", help="sqlite:///path, etcd://host:2379/prefix or redis://host:6379/0")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration file")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
def coordinator(listen: str | None, store: str | None, config_path: str | None,
                log_level: str) -> None:
    """Watch nodes, keep their state, respond to failures, serve the API."""
    import asyncio
    import logging
    import os

    from nodewatch.api.server import serve
    from nodewatch.config import ConfigError, load_config

    overrides = {
        "coordinator.listen": listen,
        "coordinator.store": store,
        "coordinator.admin_token": os.environ.get("NODEWATCH_ADMIN_TOKEN") or None,
        "coordinator.agent_token": os.environ.get("NODEWATCH_AGENT_TOKEN") or None,
    }
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        click.echo(f"nodewatch: {exc}", err=True)
        raise SystemExit(2) from None
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        click.echo(f"nodewatch: cannot serve on {cfg.coordinator.listen}: {exc.strerror}",
                   err=True)
        raise SystemExit(1) from None
    except ValueError as exc:
        click.echo(f"nodewatch: {exc}", err=True)
        raise SystemExit(2) from None


@main.command("agent")
@click.option("--node-id", help="Unique node id, [A-Za-z0-9._-]{1,128}.")
@click.option("--listen", help="HOST:PORT to serve the agent API on (default 0.0.0.0:7301).")
@click.option("--advertise", help="HOST:PORT the coordinator should use to reach this agent.")
@click.option("--coordinator", help="Coordinator URL to register with, e.g. http://10.0.0.1:7300.")
@click.option("--state-dir", help="Directory for the persisted incarnation and seq.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file; flags override it.")
@click.option("--sample-interval", help="Sampling interval, 1s-15s (default 5s).")
@click.option("--heartbeat-interval", help="Push heartbeats this often (0 = pull only).")
def agent_command(node_id: str | None, listen: str | None, advertise: str | None,
                  coordinator: str | None, state_dir: str | None, config_path: str | None,
                  sample_interval: str | None, heartbeat_interval: str | None) -> None:
    """Run the node agent (token from NODEWATCH_AGENT_TOKEN or [agent] agent_token)."""
    from nodewatch.collect.run import load_agent_config, run_agent
    from nodewatch.config import ConfigError

    try:
        cfg = load_agent_config(config_path, {
            "node_id": node_id, "listen": listen, "advertise": advertise,
            "coordinator": coordinator, "state_dir": state_dir,
            "sample_interval": sample_interval, "heartbeat_interval": heartbeat_interval,
        })
    except ConfigError as exc:
        click.echo(f"nodewatch agent: {exc}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(run_agent(cfg))
