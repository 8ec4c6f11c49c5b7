"""How close the DBN trainer runs to the machine's raw float32 GEMM rate.

In one run, for the config's architecture and batch sizes:

1. raw: each GEMM the trainer issues (same shapes, same transposed operands,
   same `out=` destinations) timed alone in a tight loop -> seconds per batch
   of GEMM work and the raw GFLOP/s of that mix;
2. achieved: one epoch (``--epochs``) of every pretraining layer and of
   fine-tuning, run exactly as the trainer does (StepGradient.step + update
   rule) -> analytic GEMM FLOPs / wall time;
3. ratio = achieved / raw (1.0 would mean every non-GEMM cost is free).

FLOPs are counted analytically (2 m k n per GEMM; bias, sigmoid, sampling,
gather and the update rule are overhead that is not counted).  Per batch of B:

    CD-k on RBM (nv, nh):  (1 + 2k + 2) * 2 B nv nh   [h0, k x (vk, hk), V^T H (2B rows)]
    backprop:  forward 2B n_{l-1} n_l per layer + softmax, dW the same again,
               delta propagation the same minus the input layer.

Usage::

    python bench/bench_numerics.py --threads 2 [--config configs/mnist-dbn.toml]

Writes bench/results/numerics-<threads>t.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reexec(threads: int) -> None:
    want = str(threads)
    if os.environ.get("OPENBLAS_NUM_THREADS") == want:
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS=want, OMP_NUM_THREADS=want)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def gemm_ops(sizes, n_classes, B, phase, k=1):
    """[(name, count, make_operands)] of one minibatch step of `phase`.

    make_operands() -> (a, b, out) laid out exactly as the trainer's arrays
    (transposed operands are transposed views, not copies).
    """
    import numpy as np

    f32 = np.float32
    rng = np.random.default_rng(0)

    def mat(m, n):
        return rng.random((m, n), dtype=f32)

    L = len(sizes) - 1
    ops = []
    if phase < L:
        nv, nh = sizes[phase], sizes[phase + 1]
        ops.append(
            (f"v·W ({B}x{nv}·{nv}x{nh})", 1 + k, lambda: (mat(B, nv), mat(nv, nh), mat(B, nh)))
        )
        ops.append(
            (f"h·Wᵀ ({B}x{nh}·{nh}x{nv})", k, lambda: (mat(B, nh), mat(nv, nh).T, mat(B, nv)))
        )
        ops.append(
            (
                f"Vᵀ·H ({nv}x{2 * B}·{2 * B}x{nh})",
                1,
                lambda: (mat(2 * B, nv).T, mat(2 * B, nh), mat(nv, nh)),
            )
        )
        return ops
    dims = [*sizes, n_classes]
    for l in range(len(dims) - 1):
        a, b = dims[l], dims[l + 1]
        ops.append(
            (f"fwd a·W ({B}x{a}·{a}x{b})", 1, lambda a=a, b=b: (mat(B, a), mat(a, b), mat(B, b)))
        )
        ops.append(
            (f"dW aᵀ·δ ({a}x{B}·{B}x{b})", 1, lambda a=a, b=b: (mat(B, a).T, mat(B, b), mat(a, b)))
        )
        if l > 0:
            ops.append(
                (f"δ·Wᵀ ({B}x{b}·{b}x{a})", 1, lambda a=a, b=b: (mat(B, b), mat(a, b).T, mat(B, a)))
            )
    return ops


def time_gemm(a, b, out, min_time=0.2, repeats=5):
    """Median seconds of one np.dot(a, b, out=out) over `repeats` timed loops."""
    import numpy as np

    for _ in range(3):
        np.dot(a, b, out=out)
    n = 1
    while True:  # calibrate the loop length
        t = time.perf_counter()
        for _ in range(n):
            np.dot(a, b, out=out)
        dt = time.perf_counter() - t
        if dt > min_time / 4:
            break
        n *= 2
    n = max(1, int(n * (min_time / 4) / max(dt, 1e-9)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            np.dot(a, b, out=out)
        samples.append((time.perf_counter() - t) / n)
    return float(np.median(samples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="OpenBLAS threads (default 1)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn.toml"))
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs timed per phase")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    _reexec(args.threads)

    import numpy as np

    from dbnps.common.config import load
    from dbnps.common.dbn import init_params
    from dbnps.common.job import init_rng, step_rng
    from dbnps.common.layout import Layout
    from dbnps.common.mnist import load_mnist
    from dbnps.common.schedule import batch_size
    from dbnps.common.steps import StepGradient
    from dbnps.common.updaters import make_rule

    cfg = load(args.config)
    layout = Layout(cfg.model.sizes, cfg.model.classes)
    L = layout.n_layers
    data = load_mnist(cfg.data.dir or None)
    X, y = data.X_train, data.y_train
    load_before = os.getloadavg()

    phases = []
    params = init_params(layout, init_rng(cfg.run.seed), X)
    grad = layout.zeros()
    sg = StepGradient(layout, cfg, X, y, step_rng(cfg.run.seed))
    for phase in range(L + 1):
        B = batch_size(cfg, phase, L)
        k = cfg.pretrain.cd_k
        ops = gemm_ops(layout.sizes, layout.n_classes, B, phase, k)
        operands = [(name, count, *make()) for name, count, make in ops]

        def measure_raw(operands=operands):
            return [time_gemm(a, b, out) for _, _, a, b, out in operands]

        raw_before = measure_raw()

        # Achieved: the trainer's loop for `epochs` epochs, timed in 20 chunks.
        t = time.perf_counter()
        sg.begin_phase(phase, params)
        t_begin = time.perf_counter() - t
        rule = make_rule(cfg.ps.update_rule, layout.size)
        lo, hi = layout.phase_range(phase)
        p_sl, g_sl = params.flat[lo:hi], grad.flat[lo:hi]
        for _ in range(5):  # warm-up (not timed)
            sg.step(params, grad, epoch=10.0)
            rule.apply(p_sl, g_sl, 0.01, 0.9, lo)
        steps = max(20, int(args.epochs * len(X) / sg.batch))
        chunk = steps // 20
        steps = chunk * 20
        chunk_s = []
        t_step = 0.0
        for _ in range(20):
            tc = time.perf_counter()
            for _ in range(chunk):
                t1 = time.perf_counter()
                sg.step(params, grad, epoch=10.0)  # past any warm-up: full backprop
                t_step += time.perf_counter() - t1
                rule.apply(p_sl, g_sl, 0.01, 0.9, lo)
            chunk_s.append(time.perf_counter() - tc)
        wall = sum(chunk_s)
        wall_median = float(np.median(chunk_s)) * 20
        raw_after = measure_raw()

        # Per GEMM the faster of the two medians: the least disturbed estimate.
        raw_rows = []
        t_gemm = flops = 0.0
        for (name, count, a, b, _), tb, ta in zip(operands, raw_before, raw_after, strict=True):
            tg = min(tb, ta)
            fl = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            raw_rows.append({"op": name, "count": count, "s": tg, "gflops": fl / tg / 1e9})
            t_gemm += count * tg
            flops += count * fl
        if phase < L and cfg.pretrain.persistent:
            nv, nh = layout.sizes[phase], layout.sizes[phase + 1]
            flops += 2.0 * B * nv * nh  # the PCD reconstruction (timed like v·W)
            t_gemm += raw_rows[0]["s"]
        raw_gf = flops / t_gemm / 1e9
        ach_gf = flops * steps / wall / 1e9
        ach_med = flops * steps / wall_median / 1e9
        phases.append(
            {
                "phase": layout.phase_name(phase),
                "batch": sg.batch,
                "steps": steps,
                "gflop_per_step": flops / 1e9,
                "raw_gemm_s_per_step": t_gemm,
                "raw_gflops": raw_gf,
                "epoch_wall_s": wall,
                "epoch_wall_median_chunk_s": wall_median,
                "step_only_s": t_step,
                "update_rule_s": wall - t_step,
                "begin_phase_s": t_begin,
                "achieved_gflops": ach_gf,
                "achieved_gflops_median_chunk": ach_med,
                "ratio": ach_gf / raw_gf,
                "ratio_median_chunk": ach_med / raw_gf,
                "gemms": raw_rows,
            }
        )
        print(
            f"{layout.phase_name(phase):11s} raw {raw_gf:6.1f} GF/s  achieved {ach_gf:6.1f} GF/s"
            f"  ratio {ach_gf / raw_gf:5.1%} (median chunk {ach_med / raw_gf:5.1%})"
            f"  epoch {wall:6.2f}s  (update rule {wall - t_step:.2f}s)",
            flush=True,
        )

    tot_flops = sum(p["gflop_per_step"] * p["steps"] for p in phases)
    tot_raw = sum(p["raw_gemm_s_per_step"] * p["steps"] for p in phases)
    tot_wall = sum(p["epoch_wall_s"] for p in phases)
    tot_med = sum(p["epoch_wall_median_chunk_s"] for p in phases)
    summary = {
        "raw_gflops": tot_flops / tot_raw,
        "achieved_gflops": tot_flops / tot_wall,
        "ratio": tot_raw / tot_wall,
        "ratio_median_chunk": tot_raw / tot_med,
    }
    print(
        f"{'all':11s} raw {summary['raw_gflops']:6.1f} GF/s  achieved "
        f"{summary['achieved_gflops']:6.1f} GF/s  ratio {summary['ratio']:5.1%}"
        f" (median chunk {summary['ratio_median_chunk']:5.1%})"
    )
    result = {
        "threads": args.threads,
        "config": os.path.relpath(args.config, ROOT),
        "layout": repr(layout),
        "epochs_timed": args.epochs,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "phases": phases,
        "summary": summary,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"numerics-{args.threads}t"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Numerics: {layout!r}, {args.threads} BLAS thread(s)",
        "",
        f"Config `{result['config']}`, {args.epochs:g} epoch(s) timed per phase, numpy "
        f"{np.__version__}, {os.cpu_count()} CPUs, load average before/after "
        f"{load_before[0]:.2f}/{result['loadavg_after'][0]:.2f}.",
        "",
        "| phase | batch | GFLOP/step | raw GEMM GF/s | achieved GF/s | ratio | ratio (median chunk) | epoch s | update rule s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p['phase']} | {p['batch']} | {p['gflop_per_step']:.3f} | {p['raw_gflops']:.1f} | "
            f"{p['achieved_gflops']:.1f} | {p['ratio']:.1%} | {p['ratio_median_chunk']:.1%} | "
            f"{p['epoch_wall_s']:.2f} | "
            f"{p['update_rule_s']:.2f} |"
        )
    lines.append(
        f"| **all** | | | {summary['raw_gflops']:.1f} | {summary['achieved_gflops']:.1f} | "
        f"**{summary['ratio']:.1%}** | {summary['ratio_median_chunk']:.1%} | {tot_wall:.2f} | |"
    )
    lines += [
        "",
        "Raw: each GEMM timed alone (median of 5 loops), before and after the phase's epoch;",
        "the faster of the two is kept.  Achieved: the epoch in 20 chunks; 'median chunk'",
        "extrapolates the median chunk (robust to bursts of load from other processes).",
        "",
        "Raw rate of each GEMM:",
        "",
    ]
    lines += ["| phase | GEMM | per step | GF/s |", "|---|---|---|---|"]
    for p in phases:
        for r in p["gemms"]:
            lines.append(f"| {p['phase']} | {r['op']} | {r['count']} | {r['gflops']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
