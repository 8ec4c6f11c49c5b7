"""`psctl start --resume`: which checkpoint a new job continues from, and with what.

The checkpoint is read and verified here (dbnps.server.checkpoint.store, imported
on use: it needs numpy); the rest is pure bookkeeping over run directories,
tested in-process (tests/unit/test_jobs_resume.py).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbnps.common.errors import UserError
from dbnps.jobs.registry import JOB_FILE, Run, find_run

Warn = Callable[[str], None]


@dataclass
class Resumed:
    """A verified checkpoint to resume from."""

    path: Path  # the checkpoint file (resolved)
    meta: dict[str, Any]  # its metadata (version, phase_name, update_rule, config, ...)
    cfg: Any  # the Config it was trained with
    n_params: int
    run: Path  # the run directory it belongs to (or the folder it lies in)

    def record(self) -> dict:
        """job.json `resumed_from`."""
        return {
            "checkpoint": str(self.path),
            "run": str(self.run),
            "version": self.meta["version"],
            "phase": self.meta["phase_name"],
            "samples_in_phase": self.meta["samples_in_phase"],
        }


def resume_location(spec: str) -> Path:
    """Where SPEC points: "" the latest run, an existing path as it is, else a run id."""
    if spec == "":
        return find_run(None).dir
    if Path(spec).exists():
        return Path(spec)
    return find_run(spec).dir


def run_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint file (runs/<id>/checkpoints/ckpt-N.npz), else its folder."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def resume_source(spec: str, warn: Warn) -> Resumed:
    """The checkpoint `psctl start --resume SPEC` continues from (verified), or UserError.

    SPEC: "" (the latest run), a run id, a run or checkpoints directory, or a
    checkpoint file.  In a directory the newest good checkpoint is taken; each
    newer corrupt one is reported with one `warn` line.
    """
    from dbnps.common.config import from_dict
    from dbnps.server.checkpoint.store import find_resumable

    path, (params, _, meta) = find_resumable(resume_location(spec), warn=warn)
    try:
        cfg = from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} has no usable config ({exc})") from None
    run = run_of(path)
    refuse_running(run)
    return Resumed(path.resolve(), meta, cfg, params.size, run.resolve())


def refuse_running(run_dir: Path) -> None:
    """A run that is still running is not resumed: two jobs would train from one
    checkpoint and write into one checkpoints folder."""
    try:
        run = Run.load(run_dir)
    except (OSError, ValueError):
        return  # not a psctl run directory (a copied checkpoint, a `psctl run` folder)
    if run.running():
        raise UserError(
            f"run {run.id} is still running (pid {run.info.get('pid')}): stop it first "
            f"(`psctl stop --run {run.id}`; its final checkpoint is then resumed)"
        )


def check_resumable(resumed: Resumed, update_rule: str, n_params: int, warn: Warn) -> None:
    """The new job's network must hold the checkpoint's parameters; another update
    rule is allowed, with a warning (its optimizer state restarts at zero)."""
    if resumed.n_params != n_params:
        raise UserError(
            f"cannot resume from {resumed.path}: it holds {resumed.n_params} parameters, "
            f"the config's network has {n_params}"
        )
    if resumed.meta.get("update_rule") != update_rule:
        warn(
            f"warning: {resumed.path} was trained with update rule "
            f"{resumed.meta.get('update_rule')}, the config says {update_rule}: the "
            "optimizer state restarts at zero"
        )


def listen_options(
    resumed_run: Path | None, grpc_port: int | None, metrics_port: int | None, bind: str | None
) -> tuple[int, int, str]:
    """(gRPC port, metrics port, bind address) of a new job.

    Given on the command line, else those the resumed run asked for (so the
    scrape configs, port-forwards and firewall rules made for it still hold),
    else any free port on loopback.  A run's request is read back from the
    server arguments in its job.json.
    """
    asked: dict[str, str] = {}
    if resumed_run is not None:
        try:
            argv = json.loads((Path(resumed_run) / JOB_FILE).read_text()).get("argv") or []
        except (OSError, ValueError, AttributeError):
            argv = []
        for flag, value in itertools.pairwise(argv):
            if flag == ":":
                break  # the workers' section
            if flag in ("--grpc-port", "--metrics-port", "--bind"):
                asked[flag] = value

    def port(given: int | None, flag: str) -> int:
        if given is not None:
            return given
        return int(asked[flag]) if asked.get(flag, "").isdigit() else 0

    if bind is None:
        bind = asked.get("--bind", "127.0.0.1")
    return port(grpc_port, "--grpc-port"), port(metrics_port, "--metrics-port"), bind
