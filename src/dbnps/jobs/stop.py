"""Ending jobs: the graceful stop through the control plane, and `--force`.

A graceful stop asks rank 0 to checkpoint and end (Stop RPC), then waits for
the supervisor to record the exit and for every rank of the session to be
gone; `force_stop` kills the session without asking anyone.
"""

from __future__ import annotations

import time

from dbnps.common.errors import UserError
from dbnps.jobs import process
from dbnps.jobs.client import Target
from dbnps.jobs.registry import Run, find_run
from dbnps.runfiles import FORCE_MARKER, STOPPED_BY_FORCE, STOPPED_BY_STOP


def request_stop(target: Target, timeout: float):
    """The Stop RPC (checkpoint, let the workers finish, exit); its StopResponse."""
    from dbnps.v1 import control_pb2 as pb

    return target.call(
        "Stop", pb.StopRequest(wait=True, timeout_seconds=timeout), timeout=timeout + 10, auth=True
    )


def wait_stopped(run: Run, timeout: float) -> int:
    """Wait for a stopping job to exit with status 0 (UserError otherwise); returns how
    many processes were left behind after mpiexec ended and had to be killed."""
    orphaned = run.orphaned()  # its supervisor was killed: nobody will write exit.json
    # The supervisor ends when mpiexec has; an orphaned job has ended when its session has.
    ending = run.running if orphaned else run.supervised
    deadline = time.monotonic() + timeout
    while ending():
        if time.monotonic() > deadline:
            raise UserError(
                f"job {run.id} did not exit within {timeout:.0f}s after stopping; "
                f"see {run.log}, or `psctl stop --force --run {run.id}`"
            )
        time.sleep(0.1)
    leftovers = 0
    deadline = time.monotonic() + 5
    while process.job_pids(run.info) and time.monotonic() < deadline:
        time.sleep(0.1)  # ranks still exiting after mpiexec
    if process.job_pids(run.info):
        leftovers = process.kill_session(
            run.info["sid"], grace_s=2.0, created_at=run.info.get("pid_created")
        )
    if orphaned:
        run.record_end(STOPPED_BY_STOP, supervisor="gone")
        run.drop_target()
        return leftovers
    ex = run.exit_info()
    if ex is None:
        raise UserError(f"job {run.id} ended without an exit status; see {run.log}")
    if ex["returncode"] != 0:
        raise UserError(f"job {run.id} exited with status {ex['returncode']}; see {run.log}")
    return leftovers


def force_stop(run_id: str | None) -> tuple[Run, int]:
    """Kill every process of the run's session (no checkpoint); (the run, how many)."""
    run = find_run(run_id)
    if not process.job_pids(run.info):  # pid reuse: a session of that id may be someone else's
        raise UserError(f"job {run.id} is not running: {run.describe_end()}")
    # Read by the supervisor: the end is the user's doing, not a failure to restart.
    (run.dir / FORCE_MARKER).touch()
    n = process.kill_session(run.info["sid"], created_at=run.info.get("pid_created"))
    run.record_end(STOPPED_BY_FORCE)  # the supervisor was killed before it could say so
    run.drop_target()
    return run, n
