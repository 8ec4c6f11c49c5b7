"""Detached jobs: `psctl start | status | stop | checkpoint | checkpoints | logs | list`.

The click shell over `dbnps.jobs` (run directories, processes, the gRPC
client, formatting): each command parses its options, calls the library and
prints.  The commands find a job by `--run ID` (default: the latest) or talk
to any control plane with `--address HOST:PORT` (plus `--token-file` for the
mutating ones).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from dbnps.cli.placement import placement_options
from dbnps.common.errors import UserError
from dbnps.jobs import format as fmt
from dbnps.jobs.client import TOKEN_ENV, resolve_target


def target_options(fn):
    """--run / --address / --token-file / --tls-ca: which control plane to call."""
    fn = click.option(
        "--tls-ca",
        type=click.Path(path_type=Path),
        default=None,
        help="CA/cert to trust for a TLS control plane (with --address)",
    )(fn)
    fn = click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        default=None,
        help=f"bearer token file (default: the run's token, or ${TOKEN_ENV})",
    )(fn)
    fn = click.option(
        "--address", default=None, help="talk to the control plane at HOST:PORT directly"
    )(fn)
    fn = click.option("--run", "run_id", default=None, help="job id (default: the latest run)")(fn)
    return fn


def _warn(message: str) -> None:
    click.echo(message, err=True)


@click.command("start")
@click.option("--config", type=click.Path(path_type=Path), default=None, help="TOML job config")
@click.option("--workers", "-k", type=int, default=2, show_default=True)
@click.option("--servers", "-s", type=int, default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="0 (default): any free port; with --resume: the resumed run's",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="0 (default): any free port; with --resume: the resumed run's",
)
@click.option(
    "--bind",
    default=None,
    help="address the job listens on (default 127.0.0.1; with --resume: the resumed run's)",
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to be ready")
@click.option("--job-id", default=None, help="name of the run (default: time + random)")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path), default=None)
@click.option("--keep-checkpoints", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[RUN|CHECKPOINT]",
    help="continue from a checkpoint file, or the newest good one of a run "
    "(id or dir; alone: the latest run)",
)
@click.option(
    "--restart-on-failure",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="relaunch from the newest good checkpoint when the job dies, at most N times",
)
@placement_options
def start_cmd(**options) -> None:
    """Start a training job in the background and wait until it serves."""
    from dbnps.jobs.launch import StartOptions, start_job

    run, resumed = start_job(StartOptions(**options), warn=_warn)
    click.echo(fmt.started_text(run.info, resumed))


@click.command("status")
@target_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="refresh until the job ends (Ctrl-C to leave)")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
def status_cmd(run_id, address, token_file, tls_ca, as_json, watch, interval) -> None:
    """Show a job's phase, progress, updates and workers."""
    from dbnps.jobs.client import get_status

    target = resolve_target(run_id, address, token_file, tls_ca)
    if target.run is not None and target.run.orphaned():
        click.echo(
            f"psctl: warning: job {target.run.id}'s supervisor is gone: the job trains on, "
            "but will not be restarted and records no exit status; `psctl stop` still ends it",
            err=True,
        )
    while True:
        try:
            msg = get_status(target)
        except UserError:
            if watch and target.run is not None and not target.run.running():
                click.echo(f"job {target.run.id} {target.run.describe_end()}")
                return
            raise
        if as_json:
            click.echo(json.dumps(fmt.message_dict(msg), indent=None if watch else 1))
        else:
            if watch:
                click.clear()
            click.echo(fmt.status_text(msg, target.run.info if target.run else None))
        if not watch:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


@click.command("stop")
@target_options
@click.option("--force", is_flag=True, help="kill every process of the job (no checkpoint)")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True)
def stop_cmd(run_id, address, token_file, tls_ca, force, timeout) -> None:
    """Stop a job: checkpoint, let the workers finish, exit (or --force: kill it)."""
    from dbnps.jobs import stop

    if force:
        if address is not None:
            raise UserError("--force needs a run (--run ID), not --address")
        run, n = stop.force_stop(run_id)
        click.echo(f"psctl: killed job {run.id} ({n} processes)")
        return
    target = resolve_target(run_id, address, token_file, tls_ca)
    reply = stop.request_stop(target, timeout)
    if reply.final_checkpoint.path:
        click.echo(f"psctl: final checkpoint {reply.final_checkpoint.path}")
    run = target.run
    if run is None:
        click.echo(f"psctl: job at {target.address} is stopping")
        return
    leftovers = stop.wait_stopped(run, timeout)
    if leftovers:
        click.echo(f"psctl: killed {leftovers} leftover process(es) of job {run.id}", err=True)
    click.echo(f"psctl: job {run.id} stopped (exit status 0)")


@click.command("checkpoint")
@target_options
@click.option("--note", default="", help="text stored in the checkpoint")
def checkpoint_cmd(run_id, address, token_file, tls_ca, note) -> None:
    """Write a checkpoint of a running job now and print its path."""
    from dbnps.jobs.client import checkpoint_now

    target = resolve_target(run_id, address, token_file, tls_ca)
    click.echo(fmt.checkpoint_line(checkpoint_now(target, note)))


@click.command("checkpoints")
@target_options
@click.option("--json", "as_json", is_flag=True)
def checkpoints_cmd(run_id, address, token_file, tls_ca, as_json) -> None:
    """List a job's checkpoints (from the job, or from its run directory once it ended)."""
    from dbnps.jobs.client import list_checkpoints

    infos, who = list_checkpoints(run_id, address, token_file, tls_ca)
    records = [fmt.message_dict(c) for c in infos]
    click.echo(json.dumps(records, indent=1) if as_json else fmt.checkpoints_text(records, who))


@click.command("logs")
@click.option("--run", "run_id", default=None, help="job id (default: the latest run)")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@click.option("--raw", is_flag=True, help="the log file as written, Open MPI banners included")
def logs_cmd(run_id, follow, raw) -> None:
    """Print a job's log (stdout and stderr of every rank), cleaned as `psctl run` shows it."""
    from dbnps.jobs.logs import log_chunks
    from dbnps.jobs.registry import find_run

    out = click.get_binary_stream("stdout")
    try:
        for chunk in log_chunks(find_run(run_id), raw=raw, follow=follow):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        return


@click.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json) -> None:
    """List runs in the state directory."""
    from dbnps.jobs.registry import all_runs, run_rows, runs_dir

    runs = all_runs()
    for r in runs:
        if not r.running():
            r.drop_target()
    rows = run_rows(runs)
    click.echo(json.dumps(rows, indent=1) if as_json else fmt.runs_text(rows, runs_dir()))


COMMANDS = [start_cmd, status_cmd, stop_cmd, checkpoint_cmd, checkpoints_cmd, logs_cmd, list_cmd]
