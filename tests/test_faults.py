"""A job survives a dead worker: SIGKILL one of three workers mid-training (real MPI, ULFM)."""

from __future__ import annotations

import os

import pytest
from conftest import assert_exit_ok, kill_server_rank, write_config


def test_sigkill_of_one_worker_job_completes(tmp_path, job):
    cfg_path = write_config(
        tmp_path / "die.toml",
        {
            "model": {"sizes": [784, 128, 64]},
            "data": {"train_subset": 6000, "test_subset": 1000},
            "pretrain": {"epochs": 1.0},
            "finetune": {"epochs": 20.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
            # 5 s: a slow survivor on a loaded machine is not taken for dead
            "ps": {"heartbeat_timeout_s": 5.0},
            "run": {"eval_every_epochs": 5.0},
        },
    )
    # Worker 1 kills itself with SIGKILL at its 30th step (pretraining layer 2).
    res = job(
        cfg_path, workers=3, worker_args=("--inject-die-worker", "1", "--inject-die-after", "30")
    )
    assert_exit_ok(res)
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


@pytest.mark.parametrize(("servers", "rank"), [(1, 0), (2, 1)], ids=["rank0", "follower"])
def test_sigkill_of_a_server_rank_ends_the_job_with_a_clear_message(tmp_path, servers, rank):
    """No hang: workers waiting on a dead server give up after step_timeout_s, one line
    each.  `follower`: shard 1 of 2 dies; rank 0 lives on, the workers' waits for shard 1's
    acks time out, rank 0 then finds every worker gone and leaves through the bounded exit."""
    import signal
    import subprocess
    import threading
    import time

    from dbnps.common.launcher import mpi_env
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    cfg_path = write_config(
        tmp_path / "long.toml",
        {
            "model": {"sizes": [784, 64, 64]},
            "data": {"train_subset": 3000, "test_subset": 500},
            "pretrain": {"epochs": 0.0},
            "finetune": {"epochs": 1000.0},
            "ps": {"step_timeout_s": 3.0, "heartbeat_timeout_s": 3.0, "exit_timeout_s": 5.0},
            "run": {"log_every_s": 0.5},
        },
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = job_argv(cfg_path, 2, servers, resolve_data_dir(None), run_dir)
    proc = subprocess.Popen(
        argv,
        env=mpi_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("finetune epoch" in line for line in lines):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        kill_server_rank(run_dir, rank)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - t0
        reader.join(timeout=10)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert waited < 30, waited
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: worker")]
    assert errors, (proc.returncode, out[-3000:])


def test_a_rank_stuck_in_the_exit_collective_does_not_hang_the_job(tmp_path, job):
    """Worker 1 enters the end-of-job collective 10 minutes late: every rank leaves after
    exit_timeout_s with one line, and the results written before it are intact."""
    import time

    cfg_path = write_config(
        tmp_path / "late.toml",
        {
            "model": {"sizes": [784, 32]},
            "data": {"train_subset": 600, "test_subset": 200},
            "pretrain": {"epochs": 1.0},
            "finetune": {"epochs": 1.0},
            "ps": {"exit_timeout_s": 3.0},
        },
    )
    t0 = time.monotonic()
    res = job(
        cfg_path,
        workers=2,
        worker_args=("--inject-finalize-delay-worker", "1", "--inject-finalize-delay-s", "600"),
        timeout=90,
    )
    assert time.monotonic() - t0 < 60, res.output
    assert res.rc != 0
    assert "collective exit did not complete within 3s" in res.output
    assert "Traceback" not in res.output
    # Written before the collective: the summary and the model are there.
    assert res.summary["phase"] == "done" and 0 < res.summary["test_accuracy"] <= 1
    assert (res.run_dir / "model.npz").stat().st_size > 0
