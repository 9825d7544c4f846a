"""The ``nodewatch`` command line."""

from __future__ import annotations

import click

from nodewatch import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodewatch")
def main() -> None:
    """nodewatch keeps a cluster's view of its nodes true."""
