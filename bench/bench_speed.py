"""Time to a test accuracy: single process (2 BLAS threads) vs 2 workers (1 thread each).

Issue 4's speed target, measured in one run on the same machine with the same
config: the single-process trainer with OPENBLAS_NUM_THREADS=2 against
`psctl run --workers 2` (each rank 1 BLAS thread) with `[run] target_accuracy`
so the job stops when rank 0's evaluation reaches the target.  Both clocks
start after data loading and include pretraining and evaluations; both
evaluate test accuracy once per fine-tuning epoch.  This shared 2-core VM
drifts by +-20% over minutes, so runs go in ABBA order (local, PS, PS,
local, ...) and the ratio is of the mean times.

Usage: python bench/bench_speed.py [--config configs/mnist-dbn.toml] [--target 0.985]
       [--rounds 2]
Writes bench/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def distributed(config: str, target: float, workers: int, mode: str | None = None) -> dict:
    cfg = load(config)
    if mode is not None:
        cfg.ps.mode = mode
    cfg.run.target_accuracy = target
    cfg.run.eval_every_epochs = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speed.toml"
        path.write_text(to_toml(cfg))
        s, wall = run_job(path, workers, Path(tmp) / "run", resolve_data_dir(None), 3600)
    hit = next((h for h in s["history"] if h.get("test_accuracy", 0) >= target), None)
    pre = [h["t"] for h in s["history"] if h["phase"].startswith("pretrain")]
    return {
        "workers": workers,
        "seconds_to_target": hit["t"] if hit else None,
        "epoch_at_target": hit["epoch"] if hit else None,
        "pretrain_end_s": max(pre) if pre else None,
        "final_accuracy": s["test_accuracy"],
        "command_wall_s": wall,
        "applied": s["applied"],
        "staleness_mean": s["staleness"]["mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn.toml"))
    ap.add_argument("--target", type=float, default=0.985)
    ap.add_argument(
        "--rounds", type=int, default=2, help="ABBA rounds: local, PS, then PS, local, ..."
    )
    ap.add_argument(
        "--mode", choices=["apply", "accumulate"], default=None, help="override [ps] mode"
    )
    a = ap.parse_args()
    runs: list[tuple[str, dict]] = []
    for r in range(a.rounds):
        order = ("local", "ps") if r % 2 == 0 else ("ps", "local")
        for kind in order:
            res = (
                local(a.config, a.target, 2)
                if kind == "local"
                else distributed(a.config, a.target, 2, a.mode)
            )
            runs.append((kind, res))
            print(f"round {r + 1} {kind}:", json.dumps(res), flush=True)
    loc = [x for k, x in runs if k == "local"]
    dist = [x for k, x in runs if k == "ps"]
    t_loc = [x["seconds_to_target"] for x in loc]
    t_ps = [x["seconds_to_target"] for x in dist]
    if None in t_loc or None in t_ps:
        sys.exit(f"a run did not reach {a.target}: local {t_loc}, ps {t_ps}")
    ratios = [p / q for p, q in zip(t_ps, t_loc, strict=True)]  # same round, adjacent runs
    ratio = statistics.mean(t_ps) / statistics.mean(t_loc)
    res = {
        "config": os.path.relpath(a.config, ROOT),
        "ps_mode": a.mode or load(a.config).ps.mode,
        "target": a.target,
        "rounds": a.rounds,
        "local_2_threads": loc,
        "ps_2_workers": dist,
        "ratio_per_round": ratios,
        "ratio_ps_over_local": ratio,
        "machine": machine(),
    }
    out = ROOT / "bench" / "results"
    suffix = f"-{a.mode}" if a.mode else ""
    (out / f"speed{suffix}.json").write_text(json.dumps(res, indent=1))
    rows = "".join(
        f"| {i + 1} | {q['seconds_to_target']:.0f} s ({q['pretrain_end_s']:.0f} s pretraining, "
        f"{q.get('finetune_epochs')} epochs) | {p['seconds_to_target']:.0f} s "
        f"({p['pretrain_end_s']:.0f} s pretraining, {p['epoch_at_target']:g} epochs) | "
        f"{p['seconds_to_target'] / q['seconds_to_target']:.2f} |\n"
        for i, (q, p) in enumerate(zip(loc, dist, strict=True))
    )
    md = (
        f"Time to {a.target:.1%} test accuracy, `{res['config']}`, `[ps] mode = "
        f'"{res["ps_mode"]}"`, rounds in ABBA order.\n\n'
        f"| round | single process, 2 BLAS threads | 1 server + 2 workers, 1 thread each "
        f"| PS / local |\n|---|---|---|---|\n{rows}\n"
        f"ratio of the mean times (PS / local) = {ratio:.2f}\n"
    )
    (out / f"speed{suffix}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
