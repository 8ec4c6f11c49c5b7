"""A job's processes, through psutil.

`psctl start` runs the supervisor in a new session, so one session id (the
supervisor's pid) covers the supervisor, mpiexec and every local rank.  A pid
alone does not name a process for long: job.json also keeps the supervisor's
creation time (`pid_created`), and every check here compares it, so a recycled
pid, or a new session that took the old number, is never taken for the job.
"""

from __future__ import annotations

import os
import time

import psutil

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
# psutil derives creation times from the boot time, which the kernel may report 1 s
# apart from one read to the next; a pid is not recycled that fast.
_SAME_TIME_S = 1.5


def created(pid: int) -> float | None:
    """When `pid` was created (Unix time), or None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _live(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has ended; its parent has not reaped it yet)."""
    try:
        return proc.status() not in _GONE
    except psutil.Error:
        return False


def pid_alive(pid: int, created_at: float | None = None) -> bool:
    """`pid` runs, and (given `created_at`) is the process created then."""
    try:
        proc = psutil.Process(pid)
        if not _live(proc):
            return False
        return created_at is None or abs(proc.create_time() - created_at) < _SAME_TIME_S
    except psutil.Error:
        return False


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session `sid`."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            # psutil has no session id; os.getsid is the one system call for it.
            if proc.info["status"] not in _GONE and os.getsid(proc.pid) == sid:
                out.append(proc)
        except OSError:  # gone meanwhile
            continue
    return out


def job_processes(sid: int | None, created_at: float | None) -> list[psutil.Process]:
    """Live processes of a job's session, only if that session is still the job's.

    Linux does not hand out a pid while a session of that id has members, so
    while any process of the job lives, the number names the job's session; once
    they are all gone, the pid (and with it a new session of the same id) may
    belong to anyone.  So: when a process with pid `sid` exists but was created
    at another time than the supervisor (`created_at`), the session is someone
    else's and nothing is returned; and only processes created after the
    supervisor count.
    """
    if not sid:
        return []
    procs = session_processes(sid)
    if created_at is None:
        return procs
    leader = created(sid)
    if leader is not None and abs(leader - created_at) >= _SAME_TIME_S:
        return []  # the pid was reused: not our session
    out = []
    for proc in procs:
        try:
            if proc.create_time() >= created_at - _SAME_TIME_S:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def job_pids(info: dict) -> list[int]:
    """The pids of `job_processes` for a job.json record."""
    return [p.pid for p in job_processes(info.get("sid"), info.get("pid_created"))]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process in `procs` has ended; those still live at `timeout`.

    Not psutil.wait_procs: for a process that is not our child it waits until
    the zombie is reaped, and a rank's zombie may outlive its end by the whole
    timeout (measured: 5 s for a 5 s timeout), while it has ended all the same.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _live(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_session(sid: int, grace_s: float = 5.0, *, created_at: float | None = None) -> int:
    """SIGTERM every process of the job's session, SIGKILL what is left after `grace_s`.

    `created_at`: the supervisor's creation time (job.json `pid_created`); with it
    only a session that is still the job's is touched (`job_processes`).  psutil
    signals a Process only while its pid still names the process it found, so a
    pid recycled meanwhile is not signalled.  Returns how many processes there were.
    """
    procs = job_processes(sid, created_at)
    _signal(procs, "terminate")
    _signal(_wait_gone(procs, grace_s), "kill")
    _wait_gone(procs, 5.0)
    # A process the job forked after the first look (mpiexec starting a rank as it
    # was told to stop) is killed too: nothing of the session may outlive a stop.
    late = job_processes(sid, created_at)
    _signal(late, "kill")
    _wait_gone(late, 5.0)
    return len(procs)


def _signal(procs: list[psutil.Process], how: str) -> None:
    """`proc.terminate()` or `proc.kill()` on each; one already gone is skipped."""
    for proc in procs:
        try:
            getattr(proc, how)()
        except psutil.Error:
            continue
