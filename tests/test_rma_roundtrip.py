"""A real 3-rank `mpiexec` job: passive-target Accumulate into a server window is exact."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dbnps.common import launcher

SCRIPT = Path(__file__).parent / "mpi_programs" / "rma_roundtrip.py"


def test_rma_accumulate_roundtrip_is_exact() -> None:
    argv = launcher.spmd_argv(3, [str(SCRIPT)])
    proc = subprocess.run(argv, env=launcher.mpi_env(), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RMA_ROUNDTRIP OK n=1000 min_delta=60000.0 max_delta=60000.0" in proc.stdout, out
    assert "rank 1: shard 30000" in proc.stdout, out
    assert "rank 2: shard 30000" in proc.stdout, out
