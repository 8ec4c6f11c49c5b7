"""A job survives a dead worker: SIGKILL one of three workers mid-training (real MPI, ULFM)."""

from __future__ import annotations

from conftest import write_config


def test_sigkill_of_one_worker_job_completes(tmp_path, job):
    cfg_path = write_config(
        tmp_path / "die.toml",
        {
            "model": {"sizes": [784, 128, 64]},
            "data": {"train_subset": 6000, "test_subset": 1000},
            "pretrain": {"epochs": 1.0},
            "finetune": {"epochs": 20.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
            "ps": {"heartbeat_timeout_s": 1.0},
            "run": {"eval_every_epochs": 5.0},
        },
    )
    # Worker 1 kills itself with SIGKILL at its 30th step (pretraining layer 2).
    res = job(
        cfg_path, workers=3, worker_args=("--inject-die-worker", "1", "--inject-die-after", "30")
    )
    assert res.rc == 0, res.output
    s = res.summary
    assert s["phase"] == "done"
    assert s["dead_workers"] == [1]
    w0, w1, w2 = s["workers"]
    assert (w0["alive"], w1["alive"], w2["alive"]) == (True, False, True)
    assert w1["steps"] == 30 and w0["steps"] > 30 and w2["steps"] > 30
    assert "worker 1 (rank 2) marked dead" in res.output
    assert "redistributed over 2 workers" in res.output
    # Phase "done" means every scheduled fine-tuning sample was applied by the survivors.
    assert s["test_accuracy"] >= 0.88, s["test_accuracy"]
