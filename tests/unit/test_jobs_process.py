"""A job's processes (dbnps.jobs.process) on real, short-lived sessions of `sleep`."""

from __future__ import annotations

import subprocess
import time

import psutil

from dbnps.jobs import process


def _session(n: int = 2) -> subprocess.Popen:
    """A new session: a shell (the leader, like the supervisor) with n sleeping children."""
    return subprocess.Popen(
        ["sh", "-c", " & ".join(["sleep 30"] * n) + " & wait"], start_new_session=True
    )


def _members(leader: subprocess.Popen, n: int) -> list[int]:
    deadline = time.monotonic() + 5
    while len(pids := [p.pid for p in process.session_processes(leader.pid)]) < n + 1:
        assert time.monotonic() < deadline, pids
        time.sleep(0.02)
    return pids


def test_kill_session_ends_every_member_and_counts_them():
    leader = _session(2)
    try:
        created = process.created(leader.pid)
        assert len(_members(leader, 2)) == 3
        t0 = time.monotonic()
        assert process.kill_session(leader.pid, grace_s=2, created_at=created) == 3
        assert time.monotonic() - t0 < 2  # SIGTERM sufficed: no wait for the grace period
        assert process.session_processes(leader.pid) == []
        assert not process.pid_alive(leader.pid, created)  # a zombie until reaped: ended
    finally:
        leader.kill()
        leader.wait()


def test_a_session_whose_leader_pid_was_reused_is_left_alone():
    leader = _session(1)
    try:
        created = process.created(leader.pid)
        _members(leader, 1)
        info = {"sid": leader.pid, "pid_created": created - 3600}  # the job started earlier
        assert process.job_pids(info) == []
        assert process.kill_session(leader.pid, grace_s=0.5, created_at=created - 3600) == 0
        assert len(process.session_processes(leader.pid)) == 2  # untouched
        assert sorted(process.job_pids({"sid": leader.pid, "pid_created": created})) == sorted(
            p.pid for p in process.session_processes(leader.pid)
        )
    finally:
        for p in psutil.Process(leader.pid).children():
            p.kill()
        leader.kill()
        leader.wait()


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    trap = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"], start_new_session=True
    )
    try:
        created = process.created(trap.pid)
        _members(trap, 1)
        t0 = time.monotonic()
        process.kill_session(trap.pid, grace_s=0.5, created_at=created)
        assert 0.5 <= time.monotonic() - t0 < 5
        assert process.session_processes(trap.pid) == []
    finally:
        trap.kill()
        trap.wait()


def test_no_session_no_processes():
    assert process.job_pids({}) == [] and process.kill_session(0) == 0
