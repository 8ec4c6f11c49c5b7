"""Time to a target accuracy: dbnps (`psctl run`, 2 workers) against a PyTorch peer on the same cores.

The peer is the same DBN and the same recipe written the way a PyTorch user
would write it, in one process with ``torch.set_num_threads(2)``:

- the same initial parameters (dbnps's `initial_params`: W ~ N(0, 0.01^2), zero
  hidden biases, vb of RBM 0 = logit of the pixel means);
- greedy pretraining, CD-k, ``[pretrain] epochs`` per RBM, momentum SGD with the
  config's lr, momentum_start -> momentum_final at momentum_switch_epoch and
  weight cost, mean-field propagation of the data to the next RBM;
- fine-tuning by backprop (autograd) of the sigmoid stack + softmax with the
  config's (inverted) dropout, weight decay on the weight matrices, and the
  same update ``v <- mu v - lr g; p <- p + v`` with lr decayed by lr_decay per
  epoch (torch.optim.SGD scales the velocity by the current lr instead, which
  differs once lr decays, so the rule is written out with _foreach ops);
- minibatches of the config's batch sizes from a fresh permutation per pass,
  the last partial batch dropped, as `dbnps.common.steps` does;
- an evaluation every ``[run] eval_every_epochs`` of fine-tuning; it stops at
  the first one that reaches the target.

Both sides evaluate on the test set by default: this is a speed measurement, not
model selection.  ``--validation N`` holds out the last N training images for
both, and then the stop is on validation accuracy (use it to choose recipes).

Runs go A B A B (dbnps, peer, dbnps, peer, ...) in one invocation; each time is
the wall time of the whole process tree from spawn to exit (imports, MPI
start-up, data loading, pretraining, evaluations, saving), measured here.  The
result is the ratio of the medians, plus each adjacent pair's ratio.  While a
run goes, psutil samples every process of it (peak RSS per process; the
server rank's CPU times, user and system, over its life) and the load average
is recorded before and after.

Usage::

    python bench/bench_peer.py [--config configs/mnist-dbn-fast.toml] [--target 0.985]
        [--rounds 2] [--workers 2] [--threads 2] [--validation 0] [--only dbnps|peer]
        [--name peer] [--peer-config C] [--baseline-config C] [--baseline-psctl P]

``--peer-config`` gives the peer its own recipe (default: ``--config``), so each
side can run its best one.  ``--baseline-config`` / ``--baseline-psctl`` add a
third arm, a dbnps run with another config and/or another checkout, run
before dbnps in each round.

Writes bench/results/<name>.json and <name>.md.  Needs the bench extra
(``pip install -e .[bench]``: torch==2.13.0, the CPU build).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PSCTL = Path(sys.executable).with_name("psctl")


# -- the PyTorch peer (runs in a child process) -----------------------------------------------


def peer_train(cfg, target: float, threads: int) -> dict:
    """Train the DBN of `cfg` with PyTorch until an evaluation reaches `target`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    from dbnps.common.job import initial_params, layout_of, load_data

    if cfg.pretrain.persistent:
        raise SystemExit("the peer implements CD-k only, not [pretrain] persistent = true")
    if cfg.ps.update_rule != "momentum":
        raise SystemExit(
            f"the peer implements [ps] update_rule = momentum, not {cfg.ps.update_rule}"
        )
    if cfg.ps.average not in ("none", "ema"):
        raise SystemExit(f"the peer implements [ps] average = none or ema, not {cfg.ps.average}")
    if cfg.finetune.anneal_epochs or cfg.finetune.max_norm or cfg.finetune.shift_pixels:
        raise SystemExit(
            "the peer does not implement [finetune] anneal_epochs, max_norm or shift_pixels"
        )
    data = load_data(cfg)
    layout = layout_of(cfg)
    L = layout.n_layers
    split = "validation" if len(data.y_val) else "test"
    X = torch.from_numpy(data.X_train)
    y = torch.from_numpy(data.y_train.astype(np.int64))
    Xe = torch.from_numpy(data.X_val if split == "validation" else data.X_test)
    ye = torch.from_numpy((data.y_val if split == "validation" else data.y_test).astype(np.int64))
    p = layout.views(initial_params(cfg, layout, data.X_train))
    W = [torch.from_numpy(w.copy()) for w in p.W]
    hb = [torch.from_numpy(b.copy()) for b in p.hb]
    vb = [torch.from_numpy(b.copy()) for b in p.vb]
    W_out, b_out = torch.from_numpy(p.W_out.copy()), torch.from_numpy(p.b_out.copy())
    gen = torch.Generator().manual_seed(cfg.run.seed)
    n = len(y)
    t_loaded = time.perf_counter()
    phases = []

    def batches(total: int, b: int):
        """Index chunks of b rows from fresh permutations until `total` samples were served."""
        done = 0
        while done < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - b + 1, b):
                if done >= total:
                    return
                yield done, perm[i : i + b]
                done += b

    # Pretraining: CD-k per RBM on the mean-field activities of the RBM below.
    pc = cfg.pretrain
    data_l = X
    with torch.no_grad():
        for l in range(L):
            t0 = time.perf_counter()
            Wl, hbl, vbl = W[l], hb[l], vb[l]
            B = min(pc.batch_size, n)
            vW, vh, vv = torch.zeros_like(Wl), torch.zeros_like(hbl), torch.zeros_like(vbl)
            gW = torch.empty_like(Wl)
            for done, idx in batches(round(pc.epochs * n), B):
                mom = (
                    pc.momentum_start if done / n < pc.momentum_switch_epoch else pc.momentum_final
                )
                v0 = data_l[idx]
                h0 = torch.addmm(hbl, v0, Wl).sigmoid_()
                hk = h0
                for _ in range(pc.cd_k):
                    s = torch.bernoulli(hk, generator=gen)
                    vk = torch.addmm(vbl, s, Wl.t()).sigmoid_()
                    hk = torch.addmm(hbl, vk, Wl).sigmoid_()
                # dW = (vk^T hk - v0^T h0) / B + wd W, as two in-place GEMMs.
                torch.addmm(Wl, vk.t(), hk, beta=pc.weight_decay, alpha=1.0 / B, out=gW)
                gW.addmm_(v0.t(), h0, alpha=-1.0 / B)
                vW.mul_(mom).add_(gW, alpha=-pc.lr)
                vh.mul_(mom).add_((hk - h0).mean(0), alpha=-pc.lr)
                vv.mul_(mom).add_((vk - v0).mean(0), alpha=-pc.lr)
                Wl.add_(vW)
                hbl.add_(vh)
                vbl.add_(vv)
            data_l = torch.addmm(hbl, data_l, Wl).sigmoid_()  # the next RBM's data
            phases.append({"phase": f"pretrain-{l + 1}", "s": time.perf_counter() - t0})
    del data_l

    # Fine-tuning: autograd through the sigmoid stack and the softmax.
    fc = cfg.finetune
    params = [*W, *hb, W_out, b_out]
    weights = [*W, W_out]
    for t in params:
        t.requires_grad_(True)
    vel = [torch.zeros_like(t) for t in params]

    def logits(x, train: bool):
        a = F.dropout(x, fc.input_dropout, training=train) if fc.input_dropout else x
        for l in range(L):
            a = torch.addmm(hb[l], a, W[l]).sigmoid()
            if train and fc.dropout:
                a = F.dropout(a, fc.dropout, training=True)
        return torch.addmm(b_out, a, W_out)

    # [ps] average = "ema", as the server's (dbnps.common.averaging): a sample of the
    # parameters every average_every updates from average_start_epoch, weight 1 - decay^n;
    # evaluations use the average.
    ps = cfg.ps
    avg, pending = None, 0

    def fold_average() -> None:
        nonlocal avg, pending
        pending += 1
        if pending < ps.average_every:
            return
        if avg is None:
            avg = [t.detach().clone() for t in params]
        else:
            torch._foreach_lerp_(avg, [t.detach() for t in params], 1.0 - ps.average_decay**pending)
        pending = 0

    def evaluate() -> float:
        with torch.no_grad():
            live = None
            if avg is not None:  # evaluate the average in place of the live parameters
                live = [t.clone() for t in params]
                torch._foreach_copy_(params, avg)
            right = sum(
                int((logits(Xe[i : i + 1000], False).argmax(1) == ye[i : i + 1000]).sum())
                for i in range(0, len(ye), 1000)
            )
            if live is not None:
                torch._foreach_copy_(params, live)
        return right / len(ye)

    t0 = time.perf_counter()
    B = min(fc.batch_size, n)
    total = round(fc.epochs * n)
    evals, reached = [], None
    for done, idx in batches(total, B):
        epoch = done / n
        if epoch < fc.warmup_epochs:
            raise SystemExit("the peer does not implement [finetune] warmup_epochs")
        lr = fc.lr * fc.lr_decay ** int(epoch)
        mom = fc.momentum_start if epoch < fc.momentum_switch_epoch else fc.momentum_final
        loss = F.cross_entropy(logits(X[idx], True), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            if fc.weight_decay:
                torch._foreach_add_([*grads[:L], grads[2 * L]], weights, alpha=fc.weight_decay)
            torch._foreach_mul_(vel, mom)
            torch._foreach_add_(vel, grads, alpha=-lr)
            torch._foreach_add_(params, vel)
        if ps.average == "ema" and epoch >= ps.average_start_epoch:
            fold_average()
        prev, now = epoch, (done + B) / n
        ev = cfg.run.eval_every_epochs
        if int(now / ev) > int(prev / ev) or done + B >= total:
            acc = evaluate()
            evals.append({"epoch": round(now, 4), "acc": acc, "t": time.perf_counter() - t_start})
            if acc >= target:
                reached = evals[-1]
                break
    phases.append({"phase": "finetune", "s": time.perf_counter() - t0})
    return {
        "split": split,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "startup_s": t_loaded - t_start,
        "phases": phases,
        "evals": evals,
        "reached": reached is not None,
        "epoch_at_target": reached["epoch"] if reached else None,
        "accuracy": evals[-1]["acc"] if evals else None,
    }


# -- the parent: A B A B ------------------------------------------------------------------------


def _watch(proc: subprocess.Popen, server_marker: str | None) -> dict:
    """Poll the process tree of `proc` until it exits: peak RSS per process, server CPU times."""
    import psutil

    root = psutil.Process(proc.pid)
    peak: dict[int, dict] = {}
    server = {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for q in procs:
            try:
                with q.oneshot():
                    rss = q.memory_info().rss
                    rec = peak.setdefault(q.pid, {"cmd": " ".join(q.cmdline()[1:4]), "rss": 0})
                    rec["rss"] = max(rec["rss"], rss)
                    if server_marker and server_marker in q.cmdline():
                        # (mpirun's own command line names the server module too: the
                        # rank is the matching process that has used the most CPU)
                        ct = q.cpu_times()
                        seen = server.get("user_s", 0.0) + server.get("system_s", 0.0)
                        if ct.user + ct.system >= seen:
                            server = {
                                "user_s": ct.user,
                                "system_s": ct.system,
                                "life_s": time.time() - q.create_time(),
                            }
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        time.sleep(0.2)
    top = max(peak.values(), key=lambda r: r["rss"], default={"cmd": "", "rss": 0})
    return {
        "peak_rss_mib_largest": top["rss"] / 2**20,
        "largest_process": top["cmd"],
        "peak_rss_mib_sum": sum(r["rss"] for r in peak.values()) / 2**20,
        "server_cpu": server,
    }


def _job_config(config: str, target: float, validation: int | None, tmp: Path) -> Path:
    """The config file with the stop (and split) set, holding only the keys it had:
    a `--baseline-psctl` from an older checkout must parse it too."""
    import tomllib

    import tomli_w

    raw = tomllib.loads(Path(config).read_text())
    raw.setdefault("run", {})["target_accuracy"] = target
    if validation is not None:
        raw.setdefault("data", {})["validation"] = validation
    path = tmp / "job.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def run_dbnps(
    config: str, target: float, workers: int, validation: int | None, psctl: Path = PSCTL
) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        job = _job_config(config, target, validation, tmp)
        cmd = [str(psctl), "run", "--config", str(job), "--workers", str(workers),
               "--run-dir", str(tmp / "run"), "--no-progress"]  # fmt: skip
        env = dict(os.environ)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        with open(tmp / "out.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            watch = _watch(proc, "dbnps.server")
        wall = time.perf_counter() - t0
        out = (tmp / "out.log").read_text()
        if proc.returncode != 0:
            raise SystemExit(f"psctl run failed ({proc.returncode}):\n{out[-3000:]}")
        s = json.loads((tmp / "run" / "summary.json").read_text())
        profile = [ln for ln in out.splitlines() if "ms/step" in ln]
    hist = s["history"]
    key = "validation_accuracy" if validation else "test_accuracy"
    hit = next((h for h in hist if (h.get(key) or 0) >= target), None)
    pre = [h["t"] for h in hist if h["phase"].startswith("pretrain")]
    cpu = watch["server_cpu"]
    return {
        "wall_s": wall,
        "reached": hit is not None,
        "epoch_at_target": hit["epoch"] if hit else None,
        "t_at_target_server_s": hit["t"] if hit else None,
        "pretrain_end_server_s": max(pre) if pre else None,
        "accuracy_saved_test": s.get("test_accuracy"),
        "evals": [{"epoch": h["epoch"], "acc": h[key], "t": h["t"]} for h in hist if key in h],
        "staleness_mean": s["staleness"]["mean"],
        "server_apply_s": s.get("apply_seconds"),
        "server_busy_s": s.get("busy_seconds"),
        "server_cpu_share_of_one_core": (cpu["user_s"] + cpu["system_s"]) / cpu["life_s"]
        if cpu
        else None,
        # rank 0's own split (thread CPU times, server life): serve, wait, eval, process
        "server_cpu_seconds": s.get("cpu_seconds"),
        "server_life_s": s.get("wall_s"),
        "mailbox_looks": s.get("mailbox_looks"),
        "push_forecast": s.get("push_forecast"),
        **watch,
        "profile": profile,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
    }


def run_peer(config: str, target: float, threads: int, validation: int | None) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        job = _job_config(config, target, validation, tmp)
        cmd = [sys.executable, __file__, "--child", "--config", str(job),
               "--target", str(target), "--threads", str(threads)]  # fmt: skip
        # One knob for the peer's threads: torch.set_num_threads, nothing inherited.
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        with open(tmp / "out.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            watch = _watch(proc, None)
        wall = time.perf_counter() - t0
        out = (tmp / "out.log").read_text()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"peer failed ({proc.returncode}):\n{out[-3000:]}")
    r = json.loads(line[7:])
    return {"wall_s": wall, **r, **watch, "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def _fmt_run(kind: str, r: dict) -> str:
    last = r["evals"][-1]["acc"] if r.get("evals") else float("nan")
    what = (
        f"{r['wall_s']:.1f} s, epoch {r['epoch_at_target']:g}"
        if r["reached"]
        else f"NOT reached ({r['wall_s']:.1f} s, last {last:.4f})"
    )
    extra = ""
    if kind != "peer" and r.get("server_cpu_share_of_one_core") is not None:
        extra = f", server {100 * r['server_cpu_share_of_one_core']:.0f}% of a core"
        split, life = r.get("server_cpu_seconds"), r.get("server_life_s")
        if split and life:
            extra += (
                " ("
                + ", ".join(
                    f"{k} {100 * split[k] / life:.1f}%"
                    for k in ("serve", "book", "eval", "wait")
                    if k in split
                )
                + ")"
            )
    return (f"{what}, peak RSS {r['peak_rss_mib_largest']:.0f} MiB{extra}, "
            f"load {r['loadavg_before'][0]:.2f}->{r['loadavg_after'][0]:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn-fast.toml"))
    ap.add_argument("--target", type=float, default=0.985)
    ap.add_argument("--rounds", type=int, default=2, help="pairs, each dbnps then the peer")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of the peer")
    ap.add_argument("--validation", type=int, default=None,
                    help="override [data] validation (the stop then uses it)")  # fmt: skip
    ap.add_argument("--only", choices=["dbnps", "peer"], default=None)
    ap.add_argument("--peer-config", default=None, help="the peer's recipe (default: --config)")
    ap.add_argument("--baseline-psctl", type=Path, default=None,
                    help="also run this psctl (another checkout's venv) before dbnps each round")  # fmt: skip
    ap.add_argument("--baseline-config", default=None,
                    help="also run dbnps with this config before dbnps each round")  # fmt: skip
    ap.add_argument("--name", default="peer", help="bench/results/<name>.json and .md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        from dbnps.common.config import load

        print("RESULT " + json.dumps(peer_train(load(a.config), a.target, a.threads)), flush=True)
        return
    kinds = [a.only] if a.only else ["dbnps", "peer"]
    base = a.baseline_psctl or a.baseline_config
    arms = (["base"] if base else []) + kinds
    peer_config = a.peer_config or a.config
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for r in range(a.rounds):
        for kind in arms:
            if kind == "peer":
                res = run_peer(peer_config, a.target, a.threads, a.validation)
            elif kind == "base":
                res = run_dbnps(a.baseline_config or a.config, a.target, a.workers,
                                a.validation, a.baseline_psctl or PSCTL)  # fmt: skip
            else:
                res = run_dbnps(a.config, a.target, a.workers, a.validation, PSCTL)
            runs[kind].append(res)
            print(f"round {r + 1} {kind}: {_fmt_run(kind, res)}", flush=True)
    res = {
        "config": os.path.relpath(a.config, ROOT),
        "peer_config": os.path.relpath(peer_config, ROOT),
        "baseline_config": os.path.relpath(a.baseline_config, ROOT) if a.baseline_config else None,
        "target": a.target,
        "validation": a.validation,
        "workers": a.workers,
        "peer_threads": a.threads,
        "command": " ".join(["python", "bench/bench_peer.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "baseline_psctl": str(a.baseline_psctl) if a.baseline_psctl else None,
        **runs,
    }
    times = {k: [x["wall_s"] if x["reached"] else float("nan") for x in v] for k, v in runs.items()}
    if len(kinds) == 2:
        pairs = [d / q for d, q in zip(times["dbnps"], times["peer"], strict=True)]
        res["ratio_per_pair"] = pairs
        res["ratio_of_medians"] = statistics.median(times["dbnps"]) / statistics.median(
            times["peer"]
        )
    out = ROOT / "bench" / "results"
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        f"Time to {a.target:.1%} ({'validation' if a.validation else 'test'} accuracy), "
        f"whole process, `{res['config']}`"
        + (f" (peer: `{res['peer_config']}`)" if res["peer_config"] != res["config"] else "")
        + (f" (base: `{res['baseline_config']}`)" if a.baseline_config else "")
        + f", {a.workers} workers vs PyTorch with "
        f"{a.threads} threads, {os.cpu_count()} CPUs; `{res['command']}`.",
        "",
        "| round | " + " | ".join(arms) + (" | dbnps / PyTorch |" if len(kinds) == 2 else ""),
        "|---" * (len(arms) + 1 + (len(kinds) == 2)) + "|",
    ]
    for i in range(a.rounds):
        cells = [_fmt_run(k, runs[k][i]) for k in arms]
        if len(kinds) == 2:
            cells.append(f"{res['ratio_per_pair'][i]:.2f}")
        md.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if len(kinds) == 2:
        base = f"{statistics.median(times['base']):.1f} s | " if "base" in times else ""
        md.append(f"| **median** | {base}{statistics.median(times['dbnps']):.1f} s | "
                  f"{statistics.median(times['peer']):.1f} s | "
                  f"**{res['ratio_of_medians']:.2f}** |")  # fmt: skip
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
