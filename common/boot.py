"""Imported first by every rank, before mpi4py: a bound on the start-up.

A rank that dies while the others are inside `MPI_Init` (which mpi4py calls
at import) or the first collectives leaves them waiting there, in C, where
no Python timer runs (seen: a worker SIGKILLed 0.4 s after launch, the
others still waiting 45 s later).  faulthandler's watchdog is a C thread: if
set-up has not finished within `$DBNPS_STARTUP_TIMEOUT_S` (default 120 s) it
prints where every thread was and exits the rank with status 1, so the job
ends instead of hanging.  `done()` disarms it once the windows exist.
"""

from __future__ import annotations

import faulthandler
import os
import sys

TIMEOUT_S = float(os.environ.get("DBNPS_STARTUP_TIMEOUT_S", "120"))

# Test hook: the world rank named here SIGKILLs itself before MPI_Init (mpiexec
# tells each rank its number in the environment).
if os.environ.get("DBNPS_TEST_DIE_BEFORE_MPI", "-") == os.environ.get("OMPI_COMM_WORLD_RANK"):
    import signal

    os.kill(os.getpid(), signal.SIGKILL)

faulthandler.dump_traceback_later(TIMEOUT_S, exit=True, file=sys.stderr)


def done() -> None:
    """Set-up finished (windows created, first barrier passed): no bound from here on."""
    faulthandler.cancel_dump_traceback_later()


def _mpi_errors_leave_at_once(kind, exc, tb) -> None:
    """An MPI error nobody handled (a peer died in a collective): one line, then out.

    Not through interpreter exit: mpi4py's MPI_Finalize with a dead peer was seen
    to wait for ever, and the start-up watchdog is off by then.
    """
    if type(exc).__module__.startswith("mpi4py"):
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", "?")
        print(f"error: rank {rank}: MPI error: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
    sys.__excepthook__(kind, exc, tb)


sys.excepthook = _mpi_errors_leave_at_once
