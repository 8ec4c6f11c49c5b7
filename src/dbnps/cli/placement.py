"""Placement options shared by `psctl run` and `psctl start` (no numpy, no MPI: imported lazily
by `psctl start` too).  The logic is `dbnps.common.launcher.placement_from_options`."""

from __future__ import annotations

from pathlib import Path

import click


def placement_options(f):
    """--hostfile FILE, --hosts H:N,..., --server-host HOST[,HOST...]."""
    f = click.option(
        "--server-host",
        default=None,
        metavar="HOST[,HOST...]",
        help="host(s) of the server rank(s) (default: the first host); S > 1: shard i on host i mod n",
    )(f)
    f = click.option(
        "--hosts",
        default=None,
        metavar="H:N,...",
        help="run across hosts: host:slots list, e.g. h0:1,h1:2 (default: all ranks here)",
    )(f)
    return click.option(
        "--hostfile",
        type=click.Path(path_type=Path),
        default=None,
        help="Open MPI hostfile (`host slots=N` per line) to place the ranks on",
    )(f)
