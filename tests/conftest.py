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
SMALL = {"model": {"sizes": [784, 32, 32]}, "data": {"train_subset": 600, "test_subset": 200}}


def write_config(path: Path, sections: dict) -> Path:
    """Write a TOML config from {section: {key: value}}."""
    path.write_text(dump_toml(sections))
    return path


def kill_server_rank(run_dir: Path, rank: int | None = None) -> None:
    """SIGKILL the server rank(s) of the job whose command line names `run_dir`
    (only MPI rank `rank`, when given).

    Matched on `python -m dbnps.server` at the start of the command line:
    mpiexec's own command line names the same paths and must survive.
    """
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        ours = argv[1:3] == ["-m", "dbnps.server"] and any(str(run_dir) in a for a in argv)
        if ours and (rank is None or proc.environ().get("OMPI_COMM_WORLD_RANK") == str(rank)):
            found.append(proc)
    assert found, f"no server rank {'' if rank is None else rank} of {run_dir} is running"
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
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(config, workers, servers, resolve_data_dir(None), run_dir, tuple(worker_args))
    proc = subprocess.run(argv, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


@pytest.fixture
def job(tmp_path):
    return lambda config, **kw: run_job(config, tmp_path / "run", **kw)


def exactness_case(tmp_path: Path, mode: str):
    """The exactness check's job config and what the single-process trainer makes of it.

    1 worker, sync pushes, plain SGD, 600 images / batch 100 = 6 steps per phase:
    15 steps cross both RBMs into fine-tuning.  Returns (config path, trainer's
    final flat parameters, initial flat parameters).
    """
    from dbnps.common.config import load
    from dbnps.common.job import initial_params, layout_of, load_data
    from dbnps.common.trainer import train_local

    cfg_path = write_config(
        tmp_path / "exact.toml",
        {
            **SMALL,
            "pretrain": {"epochs": 1.0},
            "finetune": {"epochs": 1.0},
            "ps": {"update_rule": "sgd", "sync": True, "mode": mode},
            "run": {"max_steps": 15, "seed": 3},
        },
    )
    cfg = load(cfg_path)
    local, _ = train_local(cfg, load_data(cfg), progress=False, log=lambda *_: None)
    init = initial_params(cfg, layout_of(cfg), load_data(cfg).X_train)
    return cfg_path, local.flat, init


def assert_exact(res: JobResult, local, init) -> None:
    """The job applied the 15 pushes and ended where the trainer did.

    Same arithmetic in the same order; only BLAS's kernels differ (the test
    process may use 2 threads, the worker 1; kernels differ by CPU), so the two
    agree to float32 rounding.  A step missed or repeated moves weights by
    ~lr*|g| >> 1e-5.
    """
    import numpy as np

    from dbnps.common.model import load_model

    assert res.rc == 0, res.output
    s = res.summary
    assert s["applied"] == 15 and s["rejected"] == {}
    assert s["phase"] == "finetune"
    _, params, _, _ = load_model(res.run_dir / "model.npz")
    np.testing.assert_allclose(params.flat, local, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(local, init), "no training happened"


def assert_exit_ok(res) -> None:
    """rc 0, or rc 4 with only `rma.finalize_mpi`'s line: after a rank died, MPI_Finalize's
    PMIx fence sometimes waits for it (Open MPI's, not ours); the results are written first."""
    assert "Traceback" not in res.output, res.output[-3000:]
    assert res.rc in (0, 4), res.output[-3000:]
    if res.rc == 4:
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert errors and all("MPI_Finalize" in e for e in errors), errors
