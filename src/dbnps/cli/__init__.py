"""`psctl`: the dbnps command line (click).

Each sub-command lives in its own module of this package; this file only
assembles the group and turns user mistakes (`UserError`) into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import sys

import click

from dbnps import __version__
from dbnps.common.errors import UserError


class _Group(click.Group):
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


def _register() -> None:
    # Imported here so `psctl --help` stays fast and each module stays small.
    from dbnps.cli import bench, data, jobs, plot, run, train

    for mod in (bench, data, jobs, plot, run, train):
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()
