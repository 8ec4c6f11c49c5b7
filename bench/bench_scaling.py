"""Scaling benchmark: time to a target test accuracy vs number of workers.

A thin wrapper of `psctl bench scaling` (the logic is in `dbnps.scaling`, so
the installed command works without this folder)::

    python bench/bench_scaling.py --config configs/mnist-dbn.toml \
        --workers 1,2,4,8 --target-accuracy 0.98 [--epochs E] [--out DIR]

Default --out: bench/results/scaling-<date>/ of this repository.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dbnps.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(RESULTS / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}")]
    main(["bench", "scaling", *args], prog_name="bench_scaling.py")
