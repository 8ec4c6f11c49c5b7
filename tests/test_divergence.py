"""A diverging job ends with one error line and exit status 5 instead of running for ever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import write_config

PSCTL = Path(sys.executable).parent / "psctl"
SMALL = {"model": {"sizes": [784, 32]}, "data": {"train_subset": 1000, "test_subset": 200}}


def run(tmp_path, sections):
    cfg = write_config(tmp_path / "d.toml", {**SMALL, **sections})
    argv = [PSCTL, "run", "--config", cfg, "--workers", "2", "--run-dir", tmp_path / "run"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


def diverged_line(res) -> str:
    lines = [x for x in res.stderr.splitlines() if x.startswith("error: training diverged")]
    assert len(lines) == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr[-2000:]
    return lines[0]


def test_every_push_non_finite_ends_the_job(tmp_path):
    """lr = 1e30: two updates, then only NaN gradients (was: ~1.7k rejections/s for ever)."""
    res = run(tmp_path, {"pretrain": {"lr": 1e30, "epochs": 1000.0}})
    assert res.returncode == 2, res.stderr[-2000:]  # psctl: the job failed, one line
    assert "diverged in pretrain-1" in diverged_line(res)
    assert "mpiexec exit status 5" in res.stderr
    assert not (tmp_path / "run" / "model.npz").exists()


def test_non_finite_pushes_in_a_row_end_the_job(tmp_path, job):
    """The loss stays finite (the server never applies a NaN), the counter decides."""
    cfg = write_config(tmp_path / "n.toml", {**SMALL, "ps": {"max_nonfinite_in_a_row": 20}})
    res = job(cfg, workers=1, worker_args=("--inject-nan-worker", "0"), timeout=90)
    assert res.rc == 5, res.output[-2000:]
    line = [x for x in res.output.splitlines() if "error: training diverged" in x]
    assert len(line) == 1 and "20 pushes in a row had non-finite gradients" in line[0]


def test_a_loss_beyond_the_bound_ends_the_job(tmp_path):
    """Fine-tuning lr = 1e6: a finite but absurd loss (was: exit 0 at 11%, no warning)."""
    res = run(tmp_path, {"pretrain": {"epochs": 0.0}, "finetune": {"lr": 1e6, "epochs": 1000.0}})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "finetune" in diverged_line(res)
    assert "mpiexec exit status 5" in res.stderr
