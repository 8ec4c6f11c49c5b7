"""Time to a test accuracy: single process (2 BLAS threads) vs 2 workers (1 thread each).

Issue 4's speed target, measured in one run on the same machine with the same
config: the single-process trainer with OPENBLAS_NUM_THREADS=2 against
`psctl run --workers 2` (each rank 1 BLAS thread) with `[run] target_accuracy`
so the job stops when rank 0's evaluation reaches the target.  Both clocks
start after data loading and include pretraining and evaluations.

Usage: python bench/bench_speed.py [--config configs/mnist-dbn.toml] [--target 0.985]
Writes bench/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_ps import machine  # noqa: E402

from dbnps.common.config import load, to_toml  # noqa: E402
from dbnps.common.mnist import resolve_data_dir  # noqa: E402
from dbnps.scaling import run_job  # noqa: E402


def local(config: str, target: float, threads: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_time_to_acc.py"),
            "--child",
            "--config",
            config,
            "--target",
            str(target),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[7:])
    r["seconds_to_target"] = r.get("wall_s")
    return r


def distributed(config: str, target: float, workers: int) -> dict:
    cfg = load(config)
    cfg.run.target_accuracy = target
    cfg.run.eval_every_epochs = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speed.toml"
        path.write_text(to_toml(cfg))
        s, wall = run_job(path, workers, Path(tmp) / "run", resolve_data_dir(None), 3600)
    hit = next((h for h in s["history"] if h.get("test_accuracy", 0) >= target), None)
    return {
        "workers": workers,
        "seconds_to_target": hit["t"] if hit else None,
        "epoch_at_target": hit["epoch"] if hit else None,
        "final_accuracy": s["test_accuracy"],
        "command_wall_s": wall,
        "applied": s["applied"],
        "staleness_mean": s["staleness"]["mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn.toml"))
    ap.add_argument("--target", type=float, default=0.985)
    a = ap.parse_args()
    loc = local(a.config, a.target, 2)
    print("local (2 BLAS threads):", json.dumps(loc), flush=True)
    dist = distributed(a.config, a.target, 2)
    print("psctl run --workers 2:", json.dumps(dist), flush=True)
    ratio = dist["seconds_to_target"] / loc["seconds_to_target"]
    res = {
        "config": a.config,
        "target": a.target,
        "local_2_threads": loc,
        "ps_2_workers": dist,
        "ratio_ps_over_local": ratio,
        "machine": machine(),
    }
    out = ROOT / "bench" / "results"
    (out / "speed.json").write_text(json.dumps(res, indent=1))
    md = (
        f"| run | time to {a.target:.1%} | epochs |\n|---|---|---|\n"
        f"| single process, 2 BLAS threads | {loc['seconds_to_target']:.0f} s | "
        f"{loc.get('finetune_epochs', '')} |\n"
        f"| 1 server + 2 workers, 1 thread each | {dist['seconds_to_target']:.0f} s | "
        f"{dist['epoch_at_target']} |\n\nratio (PS / local) = {ratio:.2f}\n"
    )
    (out / "speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
