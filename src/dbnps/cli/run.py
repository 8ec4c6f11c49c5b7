"""`psctl run`: a training job in the foreground (mpiexec -n S server : -n K worker)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from dbnps.cli.placement import placement_options
from dbnps.common.config import load
from dbnps.common.errors import UserError
from dbnps.jobs.format import outcome
from dbnps.jobs.launch import job_argv, plan_job, run_foreground


@click.command("run")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML job config (default: the full 784-500-500-2000-10 recipe)",
)
@click.option("--workers", "-k", type=int, default=2, show_default=True)
@click.option("--servers", "-s", type=int, default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="where the model and summary go (default: runs/<timestamp>)",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="progress bars on a terminal (plain log lines otherwise)",
)
@placement_options
def run_cmd(
    config, workers, servers, data_dir, run_dir, progress, hostfile, hosts, server_host
) -> None:
    """Run a distributed training job in the foreground and print its final accuracy."""
    cfg = load(config)  # a bad config fails here, once, not in every rank
    plan = plan_job(
        cfg, workers, servers, data_dir, hosts=hosts, hostfile=hostfile, server_host=server_host
    )
    run_dir = run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    os.umask(0o077)  # the run's files (model, summary, checkpoints) are the owner's only
    run_dir.mkdir(parents=True, exist_ok=True)
    bars = progress and sys.stderr.isatty()
    extra = ("--progress",) if bars else ()
    argv = job_argv(
        config, workers, servers, plan.data_dir, run_dir, extra_server_args=extra,
        placement=plan.placement,
    )  # fmt: skip
    where = f" on hosts {','.join(plan.placement.hosts)}" if plan.placement is not None else ""
    click.echo(f"psctl: {servers} server + {workers} workers{where}, run dir {run_dir}", err=True)
    t0 = time.time()
    rc = run_foreground(argv, progress=bars)
    if rc != 0:
        raise UserError(f"training job failed (mpiexec exit status {rc}); see the output above")
    click.echo(f"psctl: done in {time.time() - t0:.1f}s: {outcome(run_dir / 'summary.json')}")
    sys.stdout.flush()


COMMANDS = [run_cmd]
