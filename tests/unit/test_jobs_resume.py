"""Resume resolution (dbnps.jobs.resume) over hand-made run directories, no checkpoint I/O."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from dbnps.common.errors import UserError
from dbnps.jobs import registry, resume
from dbnps.jobs.registry import Run


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.STATE_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


def _run(job_id: str, **info) -> Run:
    run = Run(registry.create_run_dir(job_id), {"job_id": job_id, **info})
    run.save()
    registry.mark_latest(run)
    return run


def test_spec_resolves_to_the_latest_run_a_run_id_or_a_path(tmp_path):
    a, b = _run("a"), _run("b")
    assert resume.resume_location("") == b.dir.resolve()
    assert resume.resume_location("a") == a.dir
    ckpt = tmp_path / "elsewhere" / "ckpt-3.npz"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert resume.resume_location(str(ckpt)) == ckpt
    with pytest.raises(UserError, match="no such run: zzz"):
        resume.resume_location("zzz")


def test_the_run_of_a_checkpoint():
    assert resume.run_of(Path("/s/runs/j/checkpoints/ckpt-1.npz")) == Path("/s/runs/j")
    assert resume.run_of(Path("/copies/ckpt-1.npz")) == Path("/copies")


def test_a_running_run_is_not_resumed_an_ended_or_foreign_one_is(tmp_path):
    me = os.getpid()
    busy = _run("busy", pid=me, pid_created=psutil.Process(me).create_time())
    with pytest.raises(UserError, match=r"run busy is still running .*psctl stop --run busy"):
        resume.refuse_running(busy.dir)
    resume.refuse_running(_run("over", pid=None).dir)
    resume.refuse_running(tmp_path)  # no job.json: a folder of copied checkpoints


def _resumed(n_params: int = 10, rule: str = "momentum") -> resume.Resumed:
    meta = {"version": 7, "phase_name": "finetune", "samples_in_phase": 64, "update_rule": rule}
    return resume.Resumed(Path("/r/checkpoints/ckpt-7.npz"), meta, None, n_params, Path("/r"))


def test_the_network_must_match_another_rule_only_warns():
    warned: list[str] = []
    resume.check_resumable(_resumed(), "momentum", 10, warned.append)
    assert warned == []
    with pytest.raises(UserError, match="holds 10 parameters, the config's network has 11"):
        resume.check_resumable(_resumed(), "momentum", 11, warned.append)
    resume.check_resumable(_resumed(rule="adagrad"), "momentum", 10, warned.append)
    [w] = warned
    assert w.startswith("warning: ") and "adagrad" in w and "restarts at zero" in w


def test_the_record_names_checkpoint_run_and_position():
    assert _resumed().record() == {
        "checkpoint": "/r/checkpoints/ckpt-7.npz",
        "run": "/r",
        "version": 7,
        "phase": "finetune",
        "samples_in_phase": 64,
    }


def test_listen_options_come_from_the_flags_then_the_resumed_run_then_defaults():
    argv = ["mpiexec", "-n", "1", "python", "-m", "dbnps.server", "--grpc-port", "5001",
            "--metrics-port", "5002", "--bind", "0.0.0.0",
            ":", "-n", "2", "python", "-m", "dbnps.worker", "--grpc-port", "9"]  # fmt: skip
    old = _run("old", argv=argv)
    assert resume.listen_options(None, None, None, None) == (0, 0, "127.0.0.1")
    assert resume.listen_options(old.dir, None, None, None) == (5001, 5002, "0.0.0.0")
    assert resume.listen_options(old.dir, 0, 7000, "127.0.0.1") == (0, 7000, "127.0.0.1")
    (old.dir / registry.JOB_FILE).write_text(json.dumps({"argv": ["--grpc-port", "x"]}))
    assert resume.listen_options(old.dir, None, None, None) == (0, 0, "127.0.0.1")
    (old.dir / registry.JOB_FILE).write_text("[1, 2]")  # not a record at all
    assert resume.listen_options(old.dir, None, None, None) == (0, 0, "127.0.0.1")
