"""`psctl`: the dbnps command line (click).

Each sub-command lives in its own module of this package; this file only
assembles the group and turns user mistakes (`UserError`) into one line on
stderr and exit status 2.

Sub-command modules are imported on first use (click's documented lazy
group): `psctl status` then loads neither numpy nor the data and plotting
code, and never mpi4py (tests/test_control.py checks both the map below and
the imports).
"""

from __future__ import annotations

import importlib
import sys

import click

from dbnps import __version__
from dbnps.common.errors import UserError

# command name -> module of this package whose COMMANDS holds it
LAZY_COMMANDS = {
    "bench": "bench",
    "checkpoint": "jobs",
    "checkpoints": "jobs",
    "data": "data",
    "list": "jobs",
    "logs": "jobs",
    "plot": "plot",
    "run": "run",
    "start": "jobs",
    "status": "jobs",
    "stop": "jobs",
    "train": "train",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return None
        mod = importlib.import_module(f"dbnps.cli.{LAZY_COMMANDS[name]}")
        return next(c for c in mod.COMMANDS if c.name == name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="psctl")
def main() -> None:
    """Train Deep Belief Networks on an MPI one-sided parameter server."""
