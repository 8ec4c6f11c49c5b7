"""Helpers for tests that drive detached jobs through the real `psctl` executable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
from conftest import write_config

PSCTL = str(Path(sys.executable).parent / "psctl")

# Small and endless: the tests stop the job; 2000 images keep data loading fast.
LONG_JOB = {
    "model": {"sizes": [784, 32, 32]},
    "data": {"train_subset": 2000, "test_subset": 500},
    "pretrain": {"epochs": 1.0},
    "finetune": {"epochs": 1.0e6},
    # An evaluation every few seconds: /metrics and status then carry a test accuracy.
    "run": {"eval_every_epochs": 50.0, "log_every_s": 2.0},
}


def psctl(*args: str, env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([PSCTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def session_alive(sid: int) -> list[int]:
    """Non-zombie processes in session `sid` (mpiexec, every rank, the supervisor)."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                out.append(proc.pid)
        except OSError:
            continue
    return out


@dataclass
class StartedJob:
    job_id: str
    run_dir: Path
    env: dict
    info: dict

    @property
    def grpc(self) -> str:
        return self.info["grpc"]

    @property
    def metrics(self) -> str:
        return self.info["metrics"]

    @property
    def token(self) -> str:
        return (self.run_dir / "token").read_text().strip()

    def psctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return psctl(*args, env=self.env, **kw)


def job_env(state_dir: Path) -> dict:
    env = dict(os.environ)
    env["DBNPS_STATE_DIR"] = str(state_dir)
    return env


def start_job(tmp: Path, job_id: str, *, workers: int = 2, args: tuple = ()) -> StartedJob:
    cfg = write_config(tmp / "long.toml", LONG_JOB)
    env = job_env(tmp / "state")
    res = psctl(
        "start",
        "--config",
        str(cfg),
        "--workers",
        str(workers),
        "--job-id",
        job_id,
        "--timeout",
        "80",
        *args,
        env=env,
    )
    run_dir = tmp / "state" / "runs" / job_id
    assert res.returncode == 0, res.stdout + res.stderr + _log(run_dir)
    info = json.loads((run_dir / "job.json").read_text())
    return StartedJob(job_id, run_dir, env, info)


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick; a small race is accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_quietly(job: StartedJob) -> None:
    """Teardown: make sure nothing of the job is left behind."""
    if session_alive(job.info["sid"]):
        job.psctl("stop", "--force", "--run", job.job_id)
    assert not session_alive(job.info["sid"])


def _log(run_dir: Path) -> str:
    try:
        return "\n--- job.log ---\n" + (run_dir / "job.log").read_text()[-4000:]
    except OSError:
        return ""


def run_mpi_job(
    cfg: Path, run_dir: Path, *, servers: int = 1, workers: int = 2, extra=(), env=None
) -> subprocess.CompletedProcess:
    """A real mpiexec job of `cfg` into `run_dir` (extra server args allowed), run to its end."""
    from dbnps.common.launcher import mpi_env
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(
        cfg, workers, servers, resolve_data_dir(None), run_dir, extra_server_args=tuple(extra)
    )
    return subprocess.run(
        argv,
        env=mpi_env(env or dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=150,
        errors="replace",
    )
