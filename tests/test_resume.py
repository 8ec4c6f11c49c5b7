"""Resume and restart with real processes and real signals.

* SIGKILL the server of a `psctl start --restart-on-failure 1` job: the
  supervisor relaunches it from the newest checkpoint and the job completes;
  the updates lost are at most one checkpoint interval.
* `psctl stop`, then `psctl start --resume`: the schedule continues where it
  stopped and the accuracy lands in the band of an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
from conftest import kill_server_rank, run_job, write_config
from jobctl import job_env, psctl, session_alive

from dbnps.server.checkpoint.format import load_checkpoint
from dbnps.v1 import control_pb2 as pb
from dbnps.v1 import control_pb2_grpc as pbg

EVERY = 100  # checkpoint_every_updates
CFG = {
    "model": {"sizes": [784, 64, 64]},
    "data": {"train_subset": 3000, "test_subset": 1000},
    "pretrain": {"epochs": 1.0},
    # Long enough (~1800 updates) that a stop or a kill always lands mid-run: the stop
    # comes at the start of fine-tuning, the kill past version 300.  Test accuracy is
    # flat from epoch 50 on (0.916 at 50, 0.914 at 100, 0.915 at 120 in one run); at 300
    # epochs the two tests took 385 s of a 2128 s make test on a loaded machine (the
    # resumed run and the baseline each train the whole schedule).
    "finetune": {"epochs": 60.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
    "ps": {"step_timeout_s": 3.0},
    "run": {"checkpoint_every_updates": EVERY, "eval_every_epochs": 50.0},
}


def _status(run_dir: Path) -> pb.Status | None:
    try:
        address = json.loads((run_dir / "endpoints.json").read_text())["grpc"]
    except (OSError, ValueError, KeyError):
        return None
    with grpc.insecure_channel(address) as ch:
        try:
            return pbg.ControlStub(ch).GetStatus(pb.GetStatusRequest(), timeout=2)
        except grpc.RpcError:
            return None


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start(tmp_path: Path, job_id: str, *args: str) -> tuple[Path, dict, dict]:
    env = job_env(tmp_path / "state")
    res = psctl("start", "--job-id", job_id, "--timeout", "80", *args, env=env)
    run_dir = tmp_path / "state" / "runs" / job_id
    log = (run_dir / "job.log").read_text(errors="replace")[-3000:] if run_dir.exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + log
    return run_dir, json.loads((run_dir / "job.json").read_text()), env


def _wait_end(run_dir: Path, info: dict, timeout: float = 90) -> dict:
    try:
        return _wait_for(
            lambda: (
                (run_dir / "exit.json").exists() and json.loads((run_dir / "exit.json").read_text())
            ),
            timeout,
            "the job to end",
        )
    finally:
        if session_alive(info["sid"]):
            psctl("stop", "--force", "--run", info["job_id"], env=job_env(run_dir.parents[1]))


def test_sigkill_of_the_server_restarts_from_the_last_checkpoint(tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", CFG)
    run_dir, info, env = _start(
        tmp_path, "restart", "--config", str(cfg), "--restart-on-failure", "1"
    )
    try:
        # Fine-tuning, past a few checkpoints: remember the last version seen, then kill.
        # Half an interval past the checkpoint due at 301: a kill right at 300+ raced
        # that checkpoint's background write and lost 102 updates on a loaded machine.
        st = _wait_for(
            lambda: (
                (s := _status(run_dir))
                and s.phase == "finetune"
                and s.version >= 3 * EVERY + EVERY // 2
                and s
            ),
            60,
            "fine-tuning past version 350",
        )
        seen = st.version
        kill_server_rank(run_dir)
        t_kill = time.monotonic()
        # The supervisor relaunches the job; its status counts the restart.
        st2 = _wait_for(
            lambda: (s := _status(run_dir)) and s.ready and s,
            60,
            "the restarted job to serve",
        )
        back_s = time.monotonic() - t_kill
        assert st2.restarts == 1 and st2.resumed_from, st2
        ex = _wait_end(run_dir, info)
    finally:
        if session_alive(info["sid"]):
            psctl("stop", "--force", "--run", "restart", env=env)
    log = (run_dir / "job.log").read_text(errors="replace")
    assert ex["returncode"] == 0 and ex["restarts"] == 1, log[-3000:]
    restarts = json.loads((run_dir / "restarts.json").read_text())
    assert len(restarts) == 1 and restarts[0]["returncode"] != 0
    from_version = restarts[0]["version"]
    assert restarts[0]["resumed_from"] == st2.resumed_from
    assert "[supervise] job exited with status" in log and "restart 1/1 from" in log
    lost = seen - from_version
    print(
        f"\nserver killed at version >= {seen}, resumed from {from_version}: "
        f"{lost} updates lost; serving again after {back_s:.1f}s"
    )
    # One interval: a checkpoint is due once EVERY versions have passed; a batch of pushes
    # applied together can overshoot it by K - 1 = 1.  `seen` is read before the kill
    # lands, so the job can pass it and checkpoint once more first (lost < 0: seen 391,
    # resumed from 409 under two test processes on 2 cores).
    assert lost <= EVERY + 1, (seen, from_version)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["phase"] == "done"
    assert summary["test_accuracy"] >= 0.85, summary["test_accuracy"]


def test_stop_then_resume_continues_the_schedule(tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", CFG)
    base = run_job(cfg, tmp_path / "baseline")
    assert base.rc == 0, base.output[-3000:]
    baseline = base.summary["test_accuracy"]

    run_dir, info, env = _start(tmp_path, "first", "--config", str(cfg))
    try:
        _wait_for(
            lambda: (s := _status(run_dir)) and s.phase == "finetune",
            60,
            "fine-tuning",
        )
        res = psctl("stop", "--run", "first", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        if session_alive(info["sid"]):
            psctl("stop", "--force", "--run", "first", env=env)
    final = Path(res.stdout.split("final checkpoint ")[1].split()[0])
    _, _, stop_meta = load_checkpoint(final)
    assert stop_meta["phase_name"] == "finetune" and stop_meta["stopped"]

    # No --config, no run: the latest run's newest good checkpoint and its own config.
    run2, info2, _ = _start(tmp_path, "second", "--resume")
    try:
        rf = info2["resumed_from"]
        assert rf["checkpoint"] == str(final.resolve()) and rf["run"] == str(run_dir.resolve())
        st = _status(run2)
        assert st is not None and st.resumed_from == str(final.resolve())
        assert st.progress.phase_index >= stop_meta["phase"]
        assert st.version >= stop_meta["version"]
        ex = _wait_end(run2, info2)
    finally:
        if session_alive(info2["sid"]):
            psctl("stop", "--force", "--run", "second", env=env)
    assert ex["returncode"] == 0
    log = (run2 / "job.log").read_text(errors="replace")
    assert f"resuming from {final.resolve()}: phase finetune, version {stop_meta['version']}" in log
    s = json.loads((run2 / "summary.json").read_text())
    assert s["phase"] == "done"
    # Only the rest of the schedule was trained: updates ~ total - done before the stop.
    assert s["version"] >= stop_meta["version"] + 1
    print(
        f"\nbaseline accuracy {baseline:.4f}, stopped at version {stop_meta['version']}, "
        f"resumed run {s['test_accuracy']:.4f} at version {s['version']}"
    )
    assert abs(s["test_accuracy"] - baseline) <= 0.03, (s["test_accuracy"], baseline)
