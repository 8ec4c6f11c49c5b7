"""The supervisor (`python -m dbnps.cli.supervise`) around a stand-in job: a Python
one-liner with the exit status under test, so no MPI is needed and each case takes
a fraction of a second; the real job is covered by tests/test_resume.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_checkpoint import _snap

from dbnps.runfiles import EXIT_DIVERGED, STOP_MARKER, STOPPED_BY_STOP
from dbnps.server.checkpoint.store import CheckpointStore


def _supervise(
    run_dir: Path, rc: int, restarts: int, before_exit: str = ""
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-c",
        "; ".join(filter(None, ["import sys", before_exit, f"sys.exit({rc})"])),
    ]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dbnps.cli.supervise",
            str(run_dir / "exit.json"),
            "--restart-on-failure",
            str(restarts),
            "--run-dir",
            str(run_dir),
            "--",
            *cmd,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_diverged_job_is_not_restarted(tmp_path):
    res = _supervise(tmp_path, EXIT_DIVERGED, restarts=3)
    ex = json.loads((tmp_path / "exit.json").read_text())
    assert ex["returncode"] == EXIT_DIVERGED and ex["restarts"] == 0, res.stdout + res.stderr
    assert not (tmp_path / "restarts.json").exists()
    [line] = [x for x in res.stdout.splitlines() if x.startswith("[supervise]")]
    assert "diverged" in line and "not restarted" in line, line
    # a crash is still retried, from the newest good checkpoint
    res = _supervise(tmp_path, 1, restarts=1)
    assert json.loads((tmp_path / "exit.json").read_text())["restarts"] == 1, res.stdout


def test_an_oserror_while_quarantining_does_not_kill_the_supervisor(tmp_path):
    """The corrupt newest checkpoint cannot be renamed away (its `.corrupt` name is
    taken by a directory): the supervisor says so, restarts from the older good one
    and writes exit.json (an uncaught OSError ended it before exit.json was written)."""
    store = CheckpointStore(tmp_path / "checkpoints", keep=5)
    for v in (20, 30):
        store.write(_snap(v))
    newest = store.paths()[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    blocker = newest.with_name(newest.name + ".corrupt")
    blocker.mkdir()
    (blocker / "x").write_text("in the way")
    res = _supervise(tmp_path, 1, restarts=1)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    ex = json.loads((tmp_path / "exit.json").read_text())
    assert ex["restarts"] == 1 and ex["returncode"] == 1, out
    [r] = json.loads((tmp_path / "restarts.json").read_text())
    assert r["resumed_from"].endswith("ckpt-20.npz") and r["version"] == 20, r
    assert "could not rename it" in out, out
    assert (tmp_path / "exit.json").stat().st_mode & 0o777 == 0o600


def test_a_job_the_stop_marker_ended_is_not_restarted(tmp_path):
    """The server writes the stop marker when a Stop RPC takes effect: a non-zero exit
    after it is the stop, not a crash; a marker left from before the launch is not."""
    touch = f"import pathlib; pathlib.Path({str(tmp_path / STOP_MARKER)!r}).touch()"
    res = _supervise(tmp_path, 1, restarts=2, before_exit=touch)
    ex = json.loads((tmp_path / "exit.json").read_text())
    assert ex["restarts"] == 0 and ex["stopped_by"] == STOPPED_BY_STOP, res.stdout + res.stderr
    # a stale marker (the job above left it) does not turn the next crash into a stop
    res = _supervise(tmp_path, 1, restarts=1)
    ex = json.loads((tmp_path / "exit.json").read_text())
    assert ex["restarts"] == 1 and "stopped_by" not in ex, res.stdout + res.stderr
