"""`psctl run`: a training job in the foreground (mpiexec -n S server : -n K worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from dbnps.cli.placement import placement_options
from dbnps.common.config import load
from dbnps.common.errors import UserError
from dbnps.common.job import layout_of, preflight
from dbnps.common.launcher import Placement, mpi_env, mpmd_argv, placement_from_options
from dbnps.common.mnist import resolve_data_dir
from dbnps.joboutput import relay


def job_argv(
    config: Path | None,
    workers: int,
    servers: int,
    data_dir: Path,
    run_dir: Path,
    extra_worker_args: tuple[str, ...] = (),
    *,
    extra_server_args: tuple[str, ...] = (),
    fault_tolerant: bool = True,
    placement: Placement | None = None,
) -> list[str]:
    """The mpiexec argv of a job; `extra_server_args` carry e.g. the control-plane flags.

    `fault_tolerant` runs MPI with ULFM (`--with-ft ulfm`): a dead worker no longer
    takes the job down, the server notices its silence and the others finish.
    `placement` (`launcher.placement_from_options`): the host of every rank.
    """
    common = ["--data-dir", str(data_dir)]
    if config is not None:
        common += ["--config", str(config)]
    server_args = [
        *common,
        "--out",
        str(run_dir / "model.npz"),
        "--summary",
        str(run_dir / "summary.json"),
        *extra_server_args,
    ]
    return mpmd_argv(
        servers,
        workers,
        server_args,
        [*common, *extra_worker_args],
        fault_tolerant=fault_tolerant,
        placement=placement,
    )


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
    layout_of(cfg)
    data = resolve_data_dir(data_dir or cfg.data.dir or None)
    preflight(cfg, workers, servers, on_one_host=not (hosts or hostfile))
    placement = placement_from_options(
        servers, workers, hosts=hosts, hostfile=hostfile, server_host=server_host
    )
    run_dir = run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    os.umask(0o077)  # the run's files (model, summary, checkpoints) are the owner's only
    run_dir.mkdir(parents=True, exist_ok=True)
    bars = progress and sys.stderr.isatty()
    extra = ("--progress",) if bars else ()
    argv = job_argv(
        config, workers, servers, data, run_dir, extra_server_args=extra, placement=placement
    )
    where = f" on hosts {','.join(placement.hosts)}" if placement is not None else ""
    click.echo(f"psctl: {servers} server + {workers} workers{where}, run dir {run_dir}", err=True)
    t0 = time.time()
    # Through pipes, not the terminal: joboutput drops Open MPI's banners and NULs
    # and draws the progress bars.
    proc = subprocess.Popen(
        argv, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        rc = relay(proc, progress=bars)
    except KeyboardInterrupt:  # mpiexec got the same SIGINT from the terminal
        proc.wait()
        raise UserError("interrupted; the job was stopped") from None
    if rc != 0:
        raise UserError(f"training job failed (mpiexec exit status {rc}); see the output above")
    click.echo(f"psctl: done in {time.time() - t0:.1f}s: {outcome(run_dir / 'summary.json')}")
    sys.stdout.flush()


def outcome(summary_path: Path) -> str:
    """One line: what the job saved, how it scored, and what the server applied."""
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:  # mpiexec said 0 but the server wrote no summary
        raise UserError(f"the job ended without a summary ({summary_path}: {exc})") from None
    saved = s.get("saved") or {}
    acc = s["test_accuracy"]
    score = f"test accuracy {acc:.4f}" if acc == acc else "not fine-tuned (no test accuracy)"
    val = saved.get("eval_accuracy", float("nan"))
    if saved.get("eval_split") == "validation" and val == val:
        score += f", validation {val:.4f}"
    which = {"last": "last", "best": "best on validation", "target": "target-reaching"}
    how = which.get(saved.get("which", "last"), "last")
    return (
        f"{score}; saved the {how} parameters (version {saved.get('version', s['version'])}) "
        f"to {Path(summary_path).parent / 'model.npz'}; "
        f"{s['applied']} updates applied, {sum(s['rejected'].values())} rejected"
    )


COMMANDS = [run_cmd]
