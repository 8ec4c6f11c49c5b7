"""Parameter-server benchmarks (issue 4 targets), each a ratio measured in one run.

  path      pull + push of the full 1.67 M-float model through the real windows,
            vs numpy memcpy of the same bytes in the same process.
  ingest    updates/s the server applies for the full model with K synthetic
            pushers (no training; oversubscribed up to 64 ranks on 2 cores), and
            the workers that rate sustains at the measured real step time.
  overhead  samples/s of 1 server + 1 worker vs the single-process trainer's
            step loop, both with 1 BLAS thread, full model, fine-tuning phase.

Usage: python bench/bench_ps.py [path|ingest|overhead|all] [--workers 1,2,4,...]
Writes bench/results/ps-<name>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbnps import scaling
from dbnps.common.config import dump_toml
from dbnps.common.launcher import mpi_env, spmd_argv
from dbnps.common.mnist import resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

FULL = [784, 500, 500, 2000]


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(dump_toml(sections))
    return path


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def save(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["machine"] = machine()
    (RESULTS / f"ps-{name}.json").write_text(json.dumps(result, indent=1))


def bench_path(reps: int = 50) -> dict:
    out = subprocess.run(
        spmd_argv(2, [str(REPO / "bench" / "mpi_param_path.py"), str(reps)]),
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    r = json.loads(re.search(r"^RESULT (.*)$", out.stdout, re.M).group(1))
    r["ratio_pull_plus_push_vs_memcpy"] = r["pull_plus_push_GBps"] / r["memcpy_GBps"]
    save("path", r)
    print(
        f"| pull | {r['pull_GBps']:.1f} GB/s | push+ack | {r['push_GBps']:.1f} GB/s | "
        f"memcpy | {r['memcpy_GBps']:.1f} GB/s | (pull+push)/memcpy | "
        f"{r['ratio_pull_plus_push_vs_memcpy']:.2f} |"
    )
    return r


def run_job(cfg: Path, workers: int, run_dir: Path, worker_args=(), timeout=600) -> dict:
    return scaling.run_job(
        cfg, workers, run_dir, resolve_data_dir(None), timeout, worker_args=tuple(worker_args)
    )[0]


def step_time(steps: int = 60, *, with_update: bool = False) -> float:
    """Seconds per real fine-tuning step of the full model, batch 100, 1 BLAS thread.

    `with_update` adds the momentum update after each gradient: exactly the
    single-process trainer's loop (`train_local`), the baseline of `overhead`.
    """
    code = f"""
import time, numpy as np
from dbnps.common.config import from_dict
from dbnps.common.job import layout_of, load_data, initial_params
from dbnps.common.steps import StepGradient
cfg = from_dict({{"model": {{"sizes": {FULL}}}, "pretrain": {{"epochs": 0.0}}}})
L = layout_of(cfg); d = load_data(cfg)
p = L.views(initial_params(cfg, L, d.X_train).copy()); g = L.zeros()
sg = StepGradient(L, cfg, d.X_train, d.y_train, np.random.default_rng(0))
sg.begin_phase(L.finetune_phase, p)
from dbnps.common.updaters import make_rule
rule = make_rule("momentum", L.size)
def one():
    sg.step(p, g, epoch=1.0)
    if {with_update}:
        rule.apply(p.flat, g.flat, 0.01, 0.9)
for _ in range(5): one()
t = time.perf_counter()
for _ in range({steps}): one()
print((time.perf_counter() - t) / {steps})
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(out.stdout.strip().splitlines()[-1])


def bench_ingest(workers: list[int], pushes_total: int = 3000, n_push: int = 1) -> dict:
    """Pushers sleep the real step time instead of computing (their compute would run on
    other cores of a real cluster), so the 2 cores here go to the server and the copies."""
    rows = []
    t_step = step_time()
    with tempfile.TemporaryDirectory() as tmp:
        for k in workers:
            steps = max(pushes_total // k, 20)
            cfg = write_config(
                Path(tmp) / f"ingest{k}.toml",
                {
                    "model": {"sizes": FULL},
                    "pretrain": {"epochs": 0.0},
                    "finetune": {"epochs": 1e6, "momentum_switch_epoch": 0.0},
                    "ps": {"update_rule": "momentum", "n_push": 1},
                    "run": {"max_steps": steps, "log_every_s": 1e6},
                },
            )
            args = ("--inject-synthetic-grad", "0.0001", "--inject-step-s", f"{t_step:.4f}")
            s = run_job(cfg, k, Path(tmp) / f"run{k}", args)
            rate, cap = s["ingest_updates_per_s"], s["capacity_updates_per_s"]
            busy = s["busy_seconds"] / max(s["applied"], 1)
            rows.append(
                {
                    "workers": k,
                    "applied": s["applied"],
                    "rejected": s["rejected"],
                    "updates_per_s": rate,
                    "capacity_updates_per_s": cap,
                    "busy_ms_per_update": 1e3 * busy,
                    "offered_updates_per_s": k / (t_step * n_push),
                    "staleness_mean": s["staleness"]["mean"],
                }
            )
            print(
                f"| {k} | {k / (t_step * n_push):,.0f} | {rate:,.0f} | {cap:,.0f} | "
                f"{1e3 * busy:.3f} | {s['staleness']['mean']:.1f} |",
                flush=True,
            )
    best = max(r["capacity_updates_per_s"] for r in rows)
    # A worker pushes once every n_push steps, so K workers need K / (n_push * t_step) updates/s.
    sustained = best * t_step * n_push
    result = {
        "rows": rows,
        "step_time_s": t_step,
        "n_push": n_push,
        "max_updates_per_s": best,
        "workers_sustained": sustained,
        "model": "workers_sustained = max_updates_per_s x step_time x n_push",
    }
    save("ingest", result)
    print(
        f"step time {1e3 * t_step:.1f} ms (full model, batch 100, 1 BLAS thread); "
        f"server capacity {best:,.0f} updates/s -> sustains {sustained:.0f} workers at n_push={n_push}"
    )
    return result


def bench_overhead(steps: int = 400, rounds: int = 3, mode: str = "apply") -> dict:
    """Alternate the two measurements `rounds` times; the ratio is the median of the rounds.

    The VM drifts over minutes, so each round pairs a local measurement with
    the PS run right after it.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(
            Path(tmp) / "ovh.toml",
            {
                "model": {"sizes": FULL},
                "pretrain": {"epochs": 0.0},
                "finetune": {"epochs": 1e6},
                "ps": {"mode": mode},
                "run": {"max_steps": steps, "log_every_s": 1e6},
            },
        )
        for r in range(rounds):
            local_rate = 100 / step_time(steps // 2, with_update=True)
            s = run_job(cfg, 1, Path(tmp) / f"run{r}")
            # Samples/s between the first and the last applied update: steady state, no start-up.
            ps_rate = 100 * s["ingest_updates_per_s"]
            rows.append({"local_samples_per_s": local_rate, "ps_samples_per_s": ps_rate,
                         "ratio": ps_rate / local_rate})  # fmt: skip
            print(
                f"| {r + 1} | {local_rate:,.0f} | {ps_rate:,.0f} | {ps_rate / local_rate:.2f} |",
                flush=True,
            )
    ratio = statistics.median(r["ratio"] for r in rows)
    result = {"mode": mode, "rounds": rows, "ratio": ratio, "steps": steps, "blas_threads": 1}
    save("overhead" if mode == "apply" else f"overhead-{mode}", result)
    print(f"median ratio (1 server + 1 worker / local, samples/s) = {ratio:.2f}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["path", "ingest", "overhead", "all"])
    ap.add_argument("--workers", default="1,2,4,8,16,32,64")
    ap.add_argument("--n-push", type=int, default=1)
    ap.add_argument("--mode", choices=["apply", "accumulate"], default="apply", help="[ps] mode")
    a = ap.parse_args()
    if a.what in ("path", "all"):
        bench_path()
    if a.what in ("overhead", "all"):
        print("| round | local samples/s (1 thread) | 1 server + 1 worker samples/s | ratio |")
        print("|---|---|---|---|")
        bench_overhead(mode=a.mode)
    if a.what in ("ingest", "all"):
        print(
            "| pushers | offered updates/s | applied updates/s | server capacity updates/s "
            "| server ms/update | staleness mean |"
        )
        print("|---|---|---|---|---|---|")
        bench_ingest([int(x) for x in a.workers.split(",")], n_push=a.n_push)


if __name__ == "__main__":
    main()
