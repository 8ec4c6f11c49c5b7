"""The server's request handle on one push, in process: ms per apply of the full model.

    python bench/bench_handle.py [--baseline-rev REV] [--rounds 4] [--out bench/results/NAME]

`Aggregate.__call__` (validation, the weighted sum, the finite check, the
momentum rule) on one push of the 784-500-500-2000-10 model's 1,666,794
floats, as a whole-batch push (weight 1) and as a shared-batch push (100 of a
200-sample batch: weight 1/2, `compensate`).  With `--baseline-rev` the
server/handle.py of that git revision runs too, interleaved round by round
(A B A B) in the same process, so a change to the handle is measured against
what it replaced on the same machine minutes apart.  No MPI: the parameters
and the push live in plain arrays, so this is the handle's own cost, not the
server's wake-up, mailbox reads or acks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N = 1_666_794  # 784-500-500-2000-10


def load_handle(rev: str | None):
    """server/handle.py of the working tree, or of git revision `rev`."""
    if rev is None:
        from dbnps.server import handle

        return handle
    src = subprocess.run(
        ["git", "show", f"{rev}:server/handle.py"], cwd=ROOT, capture_output=True, text=True
    )
    if src.returncode != 0:
        raise SystemExit(f"error: no server/handle.py at {rev}: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "handle_baseline.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("handle_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["handle_baseline"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def time_push(mod, shared: bool, reps: int, rng) -> float:
    """Median ms of `reps` applies of one push (a fresh copy of the gradient each time)."""
    from dbnps.common.protocol import PHASE, VERSION, Push
    from dbnps.common.updaters import make_rule

    rule = make_rule("momentum", N)
    params = rng.standard_normal(N, dtype=np.float32)
    header = np.zeros(8, np.int64)
    header[VERSION], header[PHASE] = 10, 3
    g0 = rng.standard_normal(N, dtype=np.float32) * np.float32(1e-3)
    agg = mod.Aggregate(rule, staleness_lr="compensate" if shared else "none", split_batch=shared)
    times = []
    for _ in range(reps):
        g = g0.copy()
        shard = mod.Shard(params, header, (0, N), True, 0.2, 0.9, contextlib.nullcontext, batch=200)
        push = Push(0, 1, int(header[VERSION]), 100 if shared else 200, 3, 0, N, g)
        t0 = time.perf_counter()
        agg([push], shard)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", help="also time server/handle.py of this git revision")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=25, help="applies per measurement")
    ap.add_argument("--out", help="write <out>.md")
    args = ap.parse_args()
    arms = {"this": load_handle(None)}
    if args.baseline_rev:
        arms = {f"baseline {args.baseline_rev}": load_handle(args.baseline_rev), **arms}
    rng = np.random.default_rng(0)
    res: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, mod in arms.items():
            for shared in (False, True):
                kind = "shared (weight 1/2)" if shared else "whole (weight 1)"
                res.setdefault((name, kind), []).append(time_push(mod, shared, args.reps, rng))
    cmd = "python bench/bench_handle.py " + " ".join(sys.argv[1:])
    lines = [
        f"Aggregate on one full-model push, ms per apply (median of {args.reps}), "
        f"{args.rounds} rounds interleaved; `{cmd}`.",
        "",
        "| handle | push | ms per round |",
        "|---|---|---|",
    ]
    for (name, kind), ms in res.items():
        lines.append(f"| {name} | {kind} | {', '.join(f'{x:.2f}' for x in ms)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
