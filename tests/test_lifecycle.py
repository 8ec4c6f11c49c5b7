"""Job lifecycle edges through the real `psctl`: most with hand-made run
directories (no MPI job is needed to show them, about a second each); the
killed supervisor with a real `psctl start` job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from jobctl import job_env, psctl, session_alive, start_job, stop_quietly
from test_checkpoint import _snap

from dbnps.runfiles import STOPPED_BY_STOP
from dbnps.server.checkpoint.store import CheckpointStore


def _run_dir(state: Path, job_id: str, **info) -> Path:
    d = state / "runs" / job_id
    d.mkdir(parents=True)
    (d / "job.json").write_text(json.dumps({"job_id": job_id, "run_dir": str(d), **info}))
    return d


def _one_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_stop_force_leaves_a_session_that_reused_the_jobs_pid_alone(tmp_path):
    """job.json names session S, but the process with pid S now is another, younger
    program (pid reuse): `stop --force` must not kill its session."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        created = psutil.Process(other.pid).create_time()
        _run_dir(
            tmp_path / "state",
            "old",
            pid=other.pid,
            sid=other.pid,
            pgid=other.pid,
            pid_created=created - 3600,  # the job's supervisor started an hour earlier
        )
        res = psctl("stop", "--force", "--run", "old", env=job_env(tmp_path / "state"))
        line = _one_error(res)
        assert "not running" in line, line
        time.sleep(0.2)
        assert other.poll() is None, "psctl stop --force killed an unrelated session"
    finally:
        other.kill()
        other.wait()


def test_a_moved_tls_certificate_is_one_error_line(tmp_path):
    me = os.getpid()
    d = _run_dir(
        tmp_path / "state",
        "tls",
        pid=me,
        sid=os.getsid(me),
        pid_created=psutil.Process(me).create_time(),
        tls_cert=str(tmp_path / "moved.pem"),
    )
    (d / "endpoints.json").write_text(json.dumps({"grpc": "127.0.0.1:9"}))
    line = _one_error(psctl("status", "--run", "tls", env=job_env(tmp_path / "state")))
    assert "moved.pem" in line and "--tls-ca" in line, line


def test_resume_of_a_run_that_is_still_running_is_refused(tmp_path):
    me = os.getpid()
    d = _run_dir(
        tmp_path / "state",
        "busy",
        pid=me,
        sid=os.getsid(me),
        pid_created=psutil.Process(me).create_time(),
    )
    CheckpointStore(d / "checkpoints").write(_snap(20))
    env = job_env(tmp_path / "state")
    line = _one_error(psctl("start", "--resume", "busy", "--job-id", "fork", env=env))
    assert "run busy is still running" in line and "psctl stop --run busy" in line, line
    assert not (tmp_path / "state" / "runs" / "fork").exists()


def test_a_killed_supervisor_leaves_a_job_psctl_still_sees_and_stops(tmp_path):
    """SIGKILL of `psctl start`'s supervisor: mpiexec and the ranks train on in the
    session.  The job is `orphaned` (not "gone"): status answers with a warning that
    nothing will restart it, and a graceful stop ends it and records the end (before,
    status said "not running" while the ranks trained on, and only --force reached them)."""
    job = start_job(tmp_path, "orphan")
    try:
        os.kill(job.info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(job.info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_alive(job.info["sid"]), "the ranks should outlive their supervisor"
        res = job.psctl("list")
        assert "orphaned" in res.stdout, res.stdout
        res = job.psctl("status", "--run", "orphan")
        assert res.returncode == 0, res.stderr
        assert "supervisor is gone" in res.stderr and "Traceback" not in res.stderr
        assert "phase" in res.stdout, res.stdout
        res = job.psctl("stop", "--run", "orphan", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert not session_alive(job.info["sid"])
        ex = json.loads((job.run_dir / "exit.json").read_text())
        assert ex["supervisor"] == "gone" and ex["stopped_by"] == STOPPED_BY_STOP, ex
        assert list((job.run_dir / "checkpoints").glob("ckpt-*.npz")), "no final checkpoint"
        res = job.psctl("list")
        assert "stopped" in res.stdout, res.stdout
    finally:
        stop_quietly(job)
