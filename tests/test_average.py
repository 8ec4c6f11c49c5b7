"""`[ps] average`: the server's parameter average, in real mpiexec jobs.

Evaluations and the saved model use the average while the workers train the
live parameters; a checkpoint holds the average, and a resumed job has it back
bit for bit before any worker pulls (test hook `DBNPS_TEST_SNAPSHOT_AFTER_RESUME`).
The math is in tests/unit/test_averaging.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import write_config
from jobctl import run_mpi_job

from dbnps.common.config import load
from dbnps.common.dbn import accuracy
from dbnps.common.job import load_data
from dbnps.common.model import load_model
from dbnps.server.checkpoint.format import load_checkpoint
from dbnps.server.checkpoint.snapshot import AFTER_RESUME_ENV

CFG = {
    "model": {"sizes": [784, 64]},
    "data": {"train_subset": 3000, "test_subset": 1000, "validation": 500},
    "pretrain": {"epochs": 1.0},
    "finetune": {"epochs": 4.0, "lr": 0.5, "momentum_switch_epoch": 1.0},
    "ps": {"average": "ema", "average_decay": 0.99, "average_every": 2, "step_timeout_s": 10.0},
    "run": {"eval_every_epochs": 0.5, "keep_best": True},
}


@pytest.mark.parametrize(("mode", "eval_live"), [("apply", True), ("accumulate", False)])
def test_evaluations_and_the_saved_model_use_the_average(tmp_path, job, mode, eval_live):
    """In accumulate mode the server samples the window the workers' accumulates wrote.
    `average_eval_live = false` skips the live parameters' evaluation beside the average."""
    ps = {**CFG["ps"], "average_start_epoch": 1.0, "mode": mode, "average_eval_live": eval_live}
    cfg = write_config(tmp_path / "a.toml", {**CFG, "ps": ps})
    res = job(cfg, workers=2)
    assert res.rc == 0, res.output
    s = res.summary
    hist = [h for h in s["history"] if "validation_accuracy" in h]
    # before the start epoch the live parameters are evaluated (no average yet), after it
    # the average, with the live parameters' accuracy beside it when average_eval_live
    assert any(h["epoch"] < 1.0 and "live_validation_accuracy" not in h for h in hist)
    later = [h for h in hist if "live_validation_accuracy" in h]
    if eval_live:
        assert len(later) >= 4 and all(h["epoch"] >= 1.0 for h in later)
        assert "(average; live " in res.output
    else:
        assert not later and "(average; live " not in res.output
    avg = s["average"]
    # 3 epochs of 25 updates each (2500 images / batch 100), a sample every 2
    assert avg["kind"] == "ema" and 30 <= avg["count"] <= 40, avg
    assert 0 < avg["live_eval_accuracy"] <= 1
    assert "parameter average (ema" in res.output
    assert s["saved"]["averaged"] and "best on validation averaged parameters" in res.output
    # the saved model is the one reported (the best evaluated average, on validation)
    _, params, _, _ = load_model(res.run_dir / "model.npz")
    d = load_data(load(cfg))
    assert abs(accuracy(params, d.X_test, d.y_test) - s["test_accuracy"]) <= 1.5 / 1000


def test_resume_restores_the_average_exactly(tmp_path):
    cfg = write_config(
        tmp_path / "cfg.toml", {**CFG, "run": {"checkpoint_every_updates": 20, "keep_best": True}}
    )
    first = run_mpi_job(cfg, tmp_path / "first", extra=("--keep-checkpoints", "50"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    picked = None
    for p in sorted(
        (tmp_path / "first" / "checkpoints").glob("ckpt-*.npz"), key=lambda p: int(p.stem[5:])
    ):
        _, _, meta = load_checkpoint(p)
        if meta["phase_name"] == "finetune" and meta.get("average", {}).get("count", 0) > 3:
            picked = p
            break
    assert picked is not None
    avg = meta["average_params"]
    assert avg.shape == (meta["n_params"],) and np.count_nonzero(avg) > 0.5 * avg.size

    after = tmp_path / "after"
    env = dict(os.environ, **{AFTER_RESUME_ENV: str(after)})
    second = run_mpi_job(cfg, tmp_path / "second", extra=("--resume", str(picked)), env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    [back] = after.glob("ckpt-*.npz")
    _, _, meta2 = load_checkpoint(back)
    np.testing.assert_array_equal(meta2["average_params"], avg)
    assert meta2["average"] == meta["average"]
