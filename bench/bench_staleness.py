"""Statistical efficiency vs number of workers: epochs and updates to a target accuracy.

    python bench/bench_staleness.py [--workers 1,2,4,8,16,32] [--rules none,inverse,compensate]
        [--target 0.98] [--config configs/mnist-dbn-fast.toml] [--out bench/results/staleness]
    python bench/bench_staleness.py --replot A.json B.json --out bench/results/staleness-all
    python bench/bench_staleness.py --workers 8,32 --set ps.split_batch=true --label split ...

For each K and each server-side rule (`[ps] staleness_lr`: "none" = plain
momentum SGD on every push, "inverse" = each push's gradient weighted 1/max(tau, 1),
Zhang et al. 2016; "compensate" = momentum and lr lowered for the implicit
momentum of asynchrony, `dbnps.server.handle.compensate`) one real job runs exactly as `psctl run --workers K` would
(`dbnps.scaling.run_job`) on balanced shards, with `[data] validation = 10000`
(the target is checked on held-out training images, never the test set) and
`[run] target_accuracy`, evaluating every half epoch.  From its summary:

- fine-tuning epochs to the target (resolution: one evaluation, 0.5 epoch);
- updates to the target (server versions applied in fine-tuning until then);
- the staleness distribution of the whole job (server histogram, in updates);
- whether the target was reached within `[finetune] epochs` at all.

On a 2-core machine the K workers are oversubscribed, so wall time is not the
point: epochs and updates to target do not depend on the core count.  The run
order interleaves the rules (K1 none, K1 inverse, K2 none, ...), so the box's
drift is shared.  Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study_config(
    base: Path, rule: str, target: float, cap: float, out: Path, sets: list[str] = ()
) -> Path:
    """The base config with the study's settings, then each `section.key=value` of `sets`."""
    import tomllib

    from dbnps.common.config import from_dict, load, to_toml

    cfg = load(base)
    # The rules are the server's (apply mode), measured on the live parameters: the
    # speed config's accumulate mode and parameter average are not the study's (--set can).
    cfg.ps.mode, cfg.ps.average = "apply", "none"
    if sets:
        d = cfg.to_dict()
        for kv in sets:
            key, _, value = kv.partition("=")
            section, _, name = key.partition(".")
            d.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
        cfg = from_dict(d)
    cfg.data.validation = 10000
    cfg.run.target_accuracy = target
    cfg.run.eval_every_epochs = 0.5
    cfg.finetune.epochs = cap
    cfg.ps.staleness_lr = rule
    out.write_text(to_toml(cfg))
    return out


def to_target(summary: dict, log: str, target: float) -> dict:
    """Fine-tuning epochs and updates until the first evaluation at or above `target`.

    Updates count from the version at which fine-tuning began (the server's
    "phase finetune starts at version N" log line).
    """
    m = re.search(r"phase finetune starts at version (\d+)", log)
    v_start = int(m.group(1)) if m else 0
    evals = [
        (h, h.get("validation_accuracy", h.get("test_accuracy")))
        for h in summary["history"]
        if h["phase"] == "finetune"
    ]
    evals = [(h, a) for h, a in evals if a is not None]
    best = max((a for _, a in evals), default=0.0)
    hit = next((h for h, a in evals if a >= target), None)
    if hit is None:
        return {"reached": False, "epochs": None, "updates": None, "best": best}
    return {"reached": True, "epochs": hit["epoch"], "updates": hit["version"] - v_start,
            "best": best}  # fmt: skip


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.scaling import run_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8,16,32")
    ap.add_argument("--rules", default="none,inverse")
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--cap", type=float, default=25.0, help="[finetune] epochs at most")
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-dbn-fast.toml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "staleness"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (TOML value), e.g. pretrain.momentum_final=0.0",
    )
    ap.add_argument("--replot", nargs="+", metavar="JSON", help="merge earlier runs, run nothing")
    ap.add_argument(
        "--curves", nargs="+", metavar="JSON", help="validation accuracy vs epoch of runs' rows"
    )
    ap.add_argument(
        "--bound-per-worker",
        type=float,
        default=0.0,
        metavar="F",
        help="[ps] staleness_bound = round(F * K) for K workers (0: as the config says)",
    )
    ap.add_argument(
        "--label", default="", help="name of this variant in tables and plots (default: the rule)"
    )
    args = ap.parse_args()
    if args.replot:
        replot(args.replot, Path(args.out))
        return
    if args.curves:
        curves(args.curves, Path(args.out), args.target)
        return
    ks = [int(k) for k in args.workers.split(",")]
    rules = args.rules.split(",")
    out = Path(args.out)
    work = out.parent / (out.name + "-runs")
    work.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(None)
    rows = []
    for k in ks:
        for rule in rules:
            sets = list(args.set)
            if args.bound_per_worker:
                sets.append(f"ps.staleness_bound={round(args.bound_per_worker * k)}")
            cfg = study_config(
                Path(args.config), rule, args.target, args.cap, work / f"k{k:02d}-{rule}.toml", sets
            )
            run_dir = work / f"k{k:02d}-{rule}"
            t0 = time.time()
            try:
                summary, wall = run_job(cfg, k, run_dir, data_dir, args.timeout)
            except Exception as exc:  # one failed K is a result too (memory, timeout)
                rows.append({"workers": k, "rule": rule, "set": args.set, "error": str(exc)})
                print(f"K={k} {rule}: failed: {exc}", flush=True)
                continue
            st = summary["staleness"]
            row = {
                "workers": k,
                "rule": f"{args.label} {rule}" if args.label else rule,
                "set": args.set,
                "cap": args.cap,
                **to_target(summary, (run_dir / "job.log").read_text(), args.target),
                "staleness_mean": st["mean"],
                "staleness_max": st["max"],
                "staleness_buckets": st["buckets"],
                "staleness_counts": st["counts"],
                "rejected": summary["rejected"],
                "wall_s": round(wall, 1),
                "started": time.strftime("%H:%M:%S", time.localtime(t0)),
                "curve": [  # (fine-tuning epoch, validation accuracy) of every evaluation
                    (h["epoch"], a)
                    for h in summary["history"]
                    if h["phase"] == "finetune"
                    and (a := h.get("validation_accuracy", h.get("test_accuracy"))) is not None
                ],
            }
            rows.append(row)
            print(
                f"K={k} {rule}: reached {row['reached']} epochs {row['epochs']} "
                f"updates {row['updates']} best {row['best']:.4f} "
                f"staleness mean {st['mean']:.2f} max {st['max']}  {wall:.0f}s",
                flush=True,
            )
            Path(str(out) + ".json").write_text(
                json.dumps({"command": " ".join(sys.argv), "target": args.target, "cap": args.cap,
                            "config": args.config, "set": args.set, "rows": rows}, indent=1) + "\n"
            )  # fmt: skip
    Path(str(out) + ".md").write_text(table(rows, args) + "\n")
    plot(rows, rules, Path(str(out) + ".png"), args.target)
    print(table(rows, args))


def table(rows: list[dict], args) -> str:
    lines = [
        f"Epochs and updates to {args.target:.1%} validation accuracy vs K workers; "
        f"`python bench/bench_staleness.py --workers {args.workers} --rules {args.rules}"
        + "".join(f" --set {kv}" for kv in getattr(args, "set", []))
        + (
            f" --bound-per-worker {args.bound_per_worker:g}"
            if getattr(args, "bound_per_worker", 0)
            else ""
        )
        + "`, "
        f"config {Path(args.config).name} (validation 10000, evaluations every 0.5 epoch, "
        f"at most {args.cap:g} fine-tuning epochs).",
        "",
        "| K | rule | fine-tune epochs to target | updates to target | best validation | "
        "staleness mean / max | stale pushes dropped | job wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workers']} | {r['rule']} | failed: {r['error']} | | | | | |")
            continue
        ep = f"{round(r['epochs'], 2):g}" if r["reached"] else f"not in {r.get('cap', args.cap):g}"
        up = f"{r['updates']:,}" if r["reached"] else "-"
        lines.append(
            f"| {r['workers']} | {r['rule']} | {ep} | {up} | {r['best']:.4f} | "
            f"{r['staleness_mean']:.2f} / {r['staleness_max']} | "
            f"{r['rejected'].get('stale', 0):,} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], rules: list[str], path: Path, target: float) -> None:
    """Left: epochs to the target (where reached); right: best validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    rules = list(dict.fromkeys(r["rule"] for r in rows if "error" not in r)) or rules
    for rule in rules:
        mine = [r for r in rows if r.get("rule") == rule and "error" not in r]
        pts = [(r["workers"], r["epochs"]) for r in mine if r["reached"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=rule)
        bx.plot([r["workers"] for r in mine], [r["best"] for r in mine], marker="o", label=rule)
    ones = [r["epochs"] for r in rows if r.get("workers") == 1 and r.get("reached")]
    if ones:  # issue 16's bound: at most 1.5x the epochs of one worker
        ax.axhline(1.5 * min(ones), color="grey", lw=0.8, ls="--", label="1.5 x K = 1")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("workers K")
        a.grid(True, alpha=0.3)
        a.legend()
    ax.set_ylabel(f"fine-tuning epochs to {target:.0%} (validation)")
    ax.set_ylim(bottom=0)
    bx.set_ylabel("best validation accuracy in the epoch cap")
    bx.axhline(target, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curves(paths: list[str], out: Path, target: float) -> None:
    """<out>.png: validation accuracy vs fine-tuning epoch of every row that has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"] if r.get("curve")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ep, acc = zip(*r["curve"], strict=True)
        ax.plot(ep, acc, marker=".", label=f"K = {r['workers']}, {r['rule']}")
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0.94, 0.985)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(str(out) + ".png"), dpi=110)


def replot(paths: list[str], out: Path) -> None:
    """One table and plot from several runs' JSON (e.g. one per rule)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    rows.sort(key=lambda r: (r["workers"], rules.index(r["rule"])))
    args = argparse.Namespace(
        target=runs[0]["target"], workers="1,2,4,8,16,32", rules=",".join(rules),
        config=runs[0]["config"], cap=runs[0].get("cap", 25.0),
    )  # fmt: skip
    text = table(rows, args)
    text += "\n\nMerged from " + ", ".join(f"`{Path(p).name}`" for p in paths) + "."
    Path(str(out) + ".md").write_text(text + "\n")
    plot(rows, rules, Path(str(out) + ".png"), args.target)
    print(text)


if __name__ == "__main__":
    main()
