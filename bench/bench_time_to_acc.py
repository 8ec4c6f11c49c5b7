"""Wall time of the single-process trainer to a test accuracy, per BLAS thread count.

For each thread count a fresh process (so OPENBLAS_NUM_THREADS takes effect)
runs `train_local` on the config — full pretraining, then fine-tuning with a
test evaluation every epoch — and stops as soon as test accuracy reaches the
target.  Wall time counts from the start of training (data already loaded) and
includes pretraining and the evaluations.

Usage::

    python bench/bench_time_to_acc.py [--config configs/mnist-dbn.toml]
        [--target 0.985] [--threads 1 2]

Writes bench/results/time-to-acc.json and .md (one row per thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(config: str, target: float, pretrain_epochs: float | None = None) -> dict:
    """Train in this process until `target`; returns the measurements."""
    from dbnps.common.config import load
    from dbnps.common.mnist import load_mnist
    from dbnps.common.trainer import train_local

    cfg = load(config)
    cfg.run.eval_every_epochs = 1.0
    if pretrain_epochs is not None:
        cfg.pretrain.epochs = pretrain_epochs
    data = load_mnist(cfg.data.dir or None)
    reached: dict = {}
    t0 = time.perf_counter()

    def on_epoch(rec, _params):
        acc = rec["test_acc"]
        if acc is not None and acc >= target:
            reached.update(
                wall_s=time.perf_counter() - t0,
                cpu_s=rec["cpu_s"],
                finetune_epochs=rec["epoch"],
                test_acc=acc,
                steps=rec["steps"],
            )
            return True
        return False

    _, history = train_local(cfg, data, progress=False, log=lambda m: print(m, flush=True),
                             on_epoch=on_epoch)  # fmt: skip
    best = max((h["test_acc"] for h in history if h["test_acc"] is not None), default=None)
    pre = [h for h in history if h["phase"].startswith("pretrain")]
    return {
        "threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        "target": target,
        "pretrain_epochs": cfg.pretrain.epochs,
        "reached": bool(reached),
        **reached,
        "total_s": time.perf_counter() - t0,
        "best_test_acc": best,
        "pretrain_end_s": pre[-1]["elapsed_s"] if pre else None,
        "loadavg_end": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn.toml"))
    ap.add_argument("--target", type=float, default=0.985)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--pretrain-epochs", type=float, default=None, help="override [pretrain] epochs"
    )
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = one_run(args.config, args.target, args.pretrain_epochs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for t in args.threads:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--child", "--config", args.config,
               "--target", str(args.target)]  # fmt: skip
        if args.pretrain_epochs is not None:
            cmd += ["--pretrain-epochs", str(args.pretrain_epochs)]
        print(f"== {t} thread(s): {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                print(f"  [{t}t] {line}", end="", flush=True)
        if proc.wait() != 0 or result is None:
            sys.exit(f"run with {t} threads failed")
        rows.append(result)
        w = result.get("wall_s")
        print(f"== {t} thread(s): {f'{w:.1f}s' if w else 'not reached'} to "
              f"{args.target:.2%} (best {result['best_test_acc']:.2%})", flush=True)  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time-to-acc.json").write_text(
        json.dumps({"config": os.path.relpath(args.config, ROOT), "runs": rows}, indent=2) + "\n"
    )
    lines = [
        f"# Time to {args.target:.1%} test accuracy, `{os.path.relpath(args.config, ROOT)}`",
        "",
        "| BLAS threads | pretrain epochs/layer | wall s to target | CPU s to target | pretraining s | fine-tune epochs | test acc | load avg at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['wall_s']:.1f}" if r.get("reached") else "not reached"
        cpu = f"{r['cpu_s']:.1f}" if r.get("reached") else "-"
        pre = f"{r['pretrain_end_s']:.1f}" if r.get("pretrain_end_s") else "-"
        lines.append(
            f"| {r['threads']} | {r['pretrain_epochs']:g} | {wall} | {cpu} | {pre} | {r.get('finetune_epochs', '-')} | "
            f"{r.get('test_acc', r['best_test_acc']):.2%} | {r['loadavg_end'][0]:.2f} |"
        )
    (out / "time-to-acc.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'time-to-acc.json'} and .md")


if __name__ == "__main__":
    main()
