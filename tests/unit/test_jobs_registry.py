"""Run directories and their records (dbnps.jobs.registry), in a temporary state dir."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import psutil
import pytest

from dbnps.common.errors import UserError
from dbnps.jobs import registry
from dbnps.jobs.registry import Run
from dbnps.runfiles import STOPPED_BY_FORCE


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.STATE_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


def _me() -> dict:
    me = os.getpid()
    return {"pid": me, "sid": os.getsid(me), "pid_created": psutil.Process(me).create_time()}


def _new(job_id: str, **info) -> Run:
    d = registry.create_run_dir(job_id)
    run = Run(d, {"job_id": job_id, "run_dir": str(d), "workers": 2, "servers": 1, **info})
    run.save()
    return run


def test_a_record_round_trips_through_the_run_dir(state):
    run = _new("r1", **_me(), argv=["mpiexec", "-n", "1"], grpc="127.0.0.1:5")
    registry.mark_latest(run)
    assert stat.S_IMODE(run.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run.dir / registry.JOB_FILE).stat().st_mode) == 0o600
    for name in (None, "r1", str(run.dir)):
        back = registry.find_run(name)
        assert back.dir.resolve() == run.dir.resolve() and back.info == run.info, name
    assert back.id == "r1" and back.state() == "running" and back.running()


def test_latest_moves_to_the_newest_and_list_marks_it(state):
    registry.mark_latest(_new("a"))
    registry.mark_latest(_new("b"))
    assert registry.find_run(None).id == "b"
    rows = registry.run_rows(registry.all_runs())
    assert [(r["job_id"], r["latest"]) for r in rows] == [("a", False), ("b", True)]
    assert rows[0]["servers"] == 1 and rows[0]["workers"] == 2


def test_how_a_run_ended(state):
    run = _new("e")
    assert run.state() == "killed"  # no pid, no exit status
    assert "without an exit status" in run.describe_end()
    (run.dir / registry.EXIT_FILE).write_text(json.dumps({"returncode": 3, "ended": 0.0}))
    assert run.state() == "exited 3" and "exited with status 3 at" in run.describe_end()
    run.record_end(STOPPED_BY_FORCE)  # the supervisor's exit status stays
    assert run.exit_info()["returncode"] == 3
    other = _new("f")
    other.record_end(STOPPED_BY_FORCE)
    assert other.exit_info()["stopped_by"] == STOPPED_BY_FORCE and other.state() == "killed"
    assert f"killed by `{STOPPED_BY_FORCE}`" in other.describe_end()


def test_a_recycled_pid_is_not_the_job(state):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        created = psutil.Process(proc.pid).create_time()
        assert _new("live", pid=proc.pid, pid_created=created).running()
        assert not _new("old", pid=proc.pid, pid_created=created - 3600).running()
    finally:
        proc.kill()
        proc.wait()
    assert not registry.find_run("live").running()


@pytest.mark.parametrize("bad", ["latest", "..", "a/b", "x y", ""])
def test_a_bad_job_id_is_refused(state, bad):
    with pytest.raises(UserError, match="--job-id may use"):
        registry.create_run_dir(bad)


def test_user_errors_of_the_registry(state):
    with pytest.raises(UserError, match=r"no runs in .*psctl start"):
        registry.find_run(None)
    _new("dup")
    with pytest.raises(UserError, match="run dup exists already"):
        registry.create_run_dir("dup")
    with pytest.raises(UserError, match=r"no such run: nope \(see `psctl list`\)"):
        registry.find_run("nope")
    (registry.runs_dir() / "broken").mkdir()
    (registry.runs_dir() / "broken" / registry.JOB_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"run broken: unreadable job\.json"):
        registry.find_run("broken")
    assert [r.id for r in registry.all_runs()] == ["dup"]  # the unreadable one is skipped


def test_the_state_dir_follows_xdg_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.STATE_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert registry.runs_dir() == tmp_path / "xdg" / "dbnps" / "runs"
