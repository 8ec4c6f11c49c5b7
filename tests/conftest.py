"""Shared helpers: write a job config and run a real mpiexec job of dbnps."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dbnps.common.config import dump_toml
from dbnps.common.launcher import mpi_env

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, sections: dict) -> Path:
    """Write a TOML config from {section: {key: value}}."""
    path.write_text(dump_toml(sections))
    return path


def kill_server_rank(run_dir: Path) -> None:
    """SIGKILL the server rank(s) of the job whose command line names `run_dir`.

    Matched on `python -m dbnps.server` at the start of the command line:
    mpiexec's own command line names the same paths and must survive.
    """
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv[1:3] == ["-m", "dbnps.server"] and any(str(run_dir) in a for a in argv):
            found.append(proc)
    assert found, f"no server rank of {run_dir} is running"
    for proc in found:
        proc.kill()


@dataclass
class JobResult:
    rc: int
    output: str
    run_dir: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def run_job(
    config: Path,
    run_dir: Path,
    *,
    workers: int = 2,
    servers: int = 1,
    worker_args: tuple[str, ...] = (),
    timeout: float = 180,
) -> JobResult:
    """A real `mpiexec -n S dbnps.server : -n K dbnps.worker` job, built by the launcher."""
    from dbnps.cli.run import job_argv
    from dbnps.common.mnist import resolve_data_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(config, workers, servers, resolve_data_dir(None), run_dir, tuple(worker_args))
    proc = subprocess.run(argv, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


@pytest.fixture
def job(tmp_path):
    return lambda config, **kw: run_job(config, tmp_path / "run", **kw)
