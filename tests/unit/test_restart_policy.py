"""`--restart-on-failure` policy (dbnps.cli.supervise.restart_decision), no MPI."""

from __future__ import annotations

import pytest

from dbnps.cli.supervise import restart_decision
from dbnps.runfiles import EXIT_DIVERGED


@pytest.mark.parametrize(
    "rc,stopped,done,budget,again",
    [
        (0, False, 0, 3, False),  # finished
        (1, False, 0, 3, True),  # a crash: retried
        (3, False, 0, 3, True),  # an MPI error (a rank died): retried
        (-9, False, 0, 3, True),  # mpiexec killed by a signal
        (137, False, 2, 3, True),
        (137, False, 3, 3, False),  # budget spent
        (1, False, 0, 0, False),  # no --restart-on-failure
        (1, True, 0, 3, False),  # stopped by the user: its exit status is no failure
        (EXIT_DIVERGED, False, 0, 3, False),  # diverged: deterministic, never retried
    ],
)
def test_restart_decision(rc, stopped, done, budget, again):
    got, why = restart_decision(rc, stopped=stopped, restarts_done=done, max_restarts=budget)
    assert got is again
    assert bool(why) is not again  # a reason whenever it does not restart


def test_divergence_says_why_it_is_not_retried():
    again, why = restart_decision(EXIT_DIVERGED, stopped=False, restarts_done=0, max_restarts=5)
    assert not again and "diverged" in why and "repeat" in why and "\n" not in why
