"""Scaling benchmark: time to a target test accuracy (or for fixed epochs) vs number of workers.

For each worker count K the benchmark runs one real job exactly as `psctl run
--workers K --servers 1` does (`dbnps.jobs.launch.job_argv` + `launcher.mpi_env`)
on a copy of the config, and reads the run's `summary.json`:

- **until target** (default): ``[run] target_accuracy = A`` is set in the copy,
  so the server stops fine-tuning as soon as one of its periodic evaluations
  (every ``[run] eval_every_epochs``) reaches A; ``[finetune] epochs`` is the
  cap.  The time of a run is the ``t`` of the first history record with
  ``test_accuracy >= A`` (seconds since the server started: pretraining
  included, process start-up and data loading excluded).  The resolution is
  one evaluation period.
- **fixed epochs** (``epochs=E``): ``[finetune] epochs = E`` and no early stop;
  the time of a run is its training wall time (summary ``wall_s``).  If a target
  is also given, the time it was first reached is reported as well.

Speed-up of K workers = time(1 worker) / time(K); efficiency = speed-up / K.
Results go to `out_dir`: ``scaling.csv``, ``scaling.json``, ``table.md``,
``scaling-time.png``, ``scaling-speedup.png`` and one folder per run
(``k01/``, ``k02/`` ...: config, model, summary, job log).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbnps.common.config import load, to_toml
from dbnps.common.errors import UserError

COLUMNS = [
    "workers",
    "time_s",
    "speedup",
    "efficiency",
    "reached",
    "time_to_target_s",
    "train_s",
    "wall_s",
    "epochs_to_target",
    "finetune_epochs",
    "samples_per_s",
    "updates_per_s",
    "staleness_mean",
    "rejected",
    "final_accuracy",
]


def parse_workers(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique); must hold 1, the speed-up baseline."""
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(
            f"--workers must be a comma-separated list of integers, got {text!r}"
        ) from None
    if not ks or ks[0] < 1:
        raise UserError(f"--workers must be positive integers, got {text!r}")
    if ks[0] != 1:
        raise UserError(f"--workers must include 1 (the speed-up baseline), got {text!r}")
    return ks


def measure(summary: dict[str, Any], target: float) -> dict[str, Any]:
    """One row's measurements from a run's summary (see the module docstring)."""
    hist = summary.get("history", [])
    ft = [h for h in hist if h.get("phase") == "finetune"]
    hit = next(
        (h for h in ft if target > 0 and (h.get("test_accuracy") or 0.0) >= target),
        None,
    )
    train_s = float(summary.get("wall_s", math.nan))
    samples = sum(int(w.get("samples", 0)) for w in summary.get("workers", []))
    return {
        "reached": hit is not None,
        "time_to_target_s": float(hit["t"]) if hit else math.nan,
        "epochs_to_target": float(hit["epoch"]) if hit else math.nan,
        "train_s": train_s,
        "finetune_epochs": max((float(h.get("epoch", 0.0)) for h in ft), default=0.0),
        "samples_per_s": samples / train_s if train_s > 0 else math.nan,
        "updates_per_s": float(summary.get("ingest_updates_per_s", math.nan)),
        "staleness_mean": float(summary.get("staleness", {}).get("mean", math.nan)),
        "rejected": int(sum(summary.get("rejected", {}).values())),
        "final_accuracy": float(summary.get("test_accuracy", math.nan)),
    }


def add_speedup(rows: list[dict[str, Any]]) -> None:
    """speedup = time_s of the 1-worker row / time_s; efficiency = speedup / workers."""
    base = next((r["time_s"] for r in rows if r["workers"] == 1), math.nan)
    for r in rows:
        t = r["time_s"]
        r["speedup"] = base / t if t > 0 and math.isfinite(t) and math.isfinite(base) else math.nan
        r["efficiency"] = r["speedup"] / r["workers"]


def _json_num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v: Any, spec: str) -> str:
    return "–" if isinstance(v, float) and not math.isfinite(v) else format(v, spec)


def table(rows: list[dict[str, Any]], time_name: str) -> str:
    """Markdown: the talk's table (#workers, time, speed-up, efficiency), then the details."""
    out = [
        f"| # workers | {time_name} (s) | speed-up | efficiency |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = _fmt(r["time_s"], ".2f") if math.isfinite(r["time_s"]) else "not reached"
        out.append(
            f"| {r['workers']} | {t} | {_fmt(r['speedup'], '.2f')} | "
            f"{_fmt(100 * r['efficiency'], '.0f')}{'' if math.isnan(r['efficiency']) else ' %'} |"
        )
    out += [
        "",
        "| # workers | fine-tune epochs to target | fine-tune epochs run | samples/s | "
        "updates/s | staleness mean | rejected | final test acc | job wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['workers']} | {_fmt(r['epochs_to_target'], '.2f')} | "
            f"{_fmt(r['finetune_epochs'], '.2f')} | {_fmt(r['samples_per_s'], ',.0f')} | "
            f"{_fmt(r['updates_per_s'], ',.0f')} | {_fmt(r['staleness_mean'], '.2f')} | "
            f"{r['rejected']} | {_fmt(100 * r['final_accuracy'], '.2f')} % | "
            f"{_fmt(r['wall_s'], '.1f')} |"
        )
    return "\n".join(out) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot(rows: list[dict[str, Any]], out_dir: Path, *, time_name: str, subtitle: str) -> list[Path]:
    """scaling-time.png (time vs workers) and scaling-speedup.png (with the ideal line)."""
    from dbnps.plots import pyplot, save

    plt = pyplot()
    ks = [r["workers"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(6.8, 4.8), constrained_layout=True)
    ok = [r for r in rows if math.isfinite(r["time_s"])]
    ax.plot([r["workers"] for r in ok], [r["time_s"] for r in ok], "o-", label="measured")
    for r in rows:
        if not math.isfinite(r["time_s"]):
            ax.annotate("not reached", (r["workers"], 0), textcoords="offset points",
                        xytext=(0, 8), ha="center", color="C3")  # fmt: skip
    if ok and ok[0]["workers"] == 1:
        t1 = ok[0]["time_s"]
        ax.plot(ks, [t1 / k for k in ks], "--", color="gray", label="ideal: time(1) / K")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("number of workers K")
    ax.set_ylabel(f"{time_name} (s)")
    ax.set_title(f"{time_name.capitalize()} vs workers\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(save(fig, out_dir / "scaling-time.png"))

    fig, ax = plt.subplots(figsize=(6.8, 4.8), constrained_layout=True)
    ax.plot(ks, ks, "--", color="gray", label="ideal (speed-up = K)")
    good = [r for r in rows if math.isfinite(r["speedup"])]
    ax.plot([r["workers"] for r in good], [r["speedup"] for r in good], "o-", label="measured")
    for r in good:
        ax.annotate(f"{100 * r['efficiency']:.0f} %", (r["workers"], r["speedup"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)  # fmt: skip
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlim(0, max(ks) * 1.08)
    ax.set_ylim(0, max([max(ks), *(r["speedup"] for r in good)]) * 1.08)
    ax.set_xlabel("number of workers K")
    ax.set_ylabel("speed-up over 1 worker (×)")
    ax.set_title(f"Speed-up vs workers (labels: efficiency)\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    paths.append(save(fig, out_dir / "scaling-speedup.png"))
    return paths


def run_job(
    config_path: Path,
    workers: int,
    run_dir: Path,
    data_dir: Path,
    timeout: float,
    *,
    worker_args: tuple[str, ...] = (),
) -> tuple[dict[str, Any], float]:
    """One `psctl run`-equivalent job (1 server); (summary, wall seconds). Log: run_dir/job.log.

    `worker_args` go to every worker (the benchmarks' synthetic-pusher flags).
    """
    from dbnps.common.launcher import mpi_env
    from dbnps.jobs.launch import job_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(config_path, workers, 1, data_dir, run_dir, worker_args)
    log = run_dir / "job.log"
    t0 = time.perf_counter()
    try:
        with log.open("w") as f:
            rc = subprocess.call(argv, env=mpi_env(), stdout=f, stderr=subprocess.STDOUT,
                                 timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"the {workers}-worker job ran past {timeout:g}s; see {log}") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        raise UserError(f"the {workers}-worker job failed (mpiexec exit status {rc}); see {log}")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"the {workers}-worker job wrote no readable summary: {exc}") from None
    return summary, wall


def run_scaling(
    config: str | Path,
    workers: Sequence[int],
    out_dir: str | Path,
    *,
    target: float = 0.0,
    epochs: float | None = None,
    data_dir: str | Path | None = None,
    timeout: float = 3600.0,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring); returns the rows, also written to `out_dir`."""
    from dbnps.common.job import layout_of
    from dbnps.common.mnist import resolve_data_dir

    workers = sorted(set(workers))
    if not workers or workers[0] != 1:
        raise UserError("workers must include 1 (the speed-up baseline)")
    if not 0 <= target <= 1:
        raise UserError(f"--target-accuracy must be in [0, 1] (0: none), got {target}")
    if epochs is None and target <= 0:
        raise UserError("give --target-accuracy (until target) or --epochs (fixed epochs)")
    if epochs is not None and epochs <= 0:
        raise UserError(f"--epochs must be > 0, got {epochs}")
    cfg = load(config)
    layout_of(cfg)
    data = resolve_data_dir(data_dir or cfg.data.dir or None)
    if epochs is None:
        cfg.run.target_accuracy = target
        mode, time_name = "until-target", "time to target"
    else:
        cfg.finetune.epochs = float(epochs)
        cfg.run.target_accuracy = 0.0
        mode, time_name = "fixed-epochs", "training time"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.toml"
    cfg_path.write_text(
        f"# {mode} copy of {config} written by the scaling benchmark\n" + to_toml(cfg)
    )
    arch = "-".join(map(str, cfg.model.sizes)) + f"-{cfg.model.classes}"
    what = (
        f"target {100 * target:g} % test acc (fine-tune cap {cfg.finetune.epochs:g} epochs)"
        if epochs is None
        else f"{epochs:g} fine-tune epochs"
    )
    about = [f"DBN {arch}, {Path(config).name}, 1 server, {os.cpu_count()} CPUs", what]
    subtitle = "\n".join(about)
    rows: list[dict[str, Any]] = []
    for k in workers:
        log(f"scaling: {k} worker(s): running ...")
        summary, wall = run_job(cfg_path, k, out_dir / f"k{k:02d}", data, timeout)
        row = {"workers": k, "wall_s": wall, **measure(summary, target)}
        row["time_s"] = row["time_to_target_s"] if epochs is None else row["train_s"]
        rows.append(row)
        if row["reached"]:
            reached = (
                f"target reached at {row['time_to_target_s']:.2f}s "
                f"(fine-tune epoch {row['epochs_to_target']:.2f})"
            )
        else:
            reached = "target not reached" if target > 0 else "done"
        log(
            f"scaling: {k} worker(s): {reached}; training {row['train_s']:.2f}s, "
            f"job {wall:.1f}s, final test acc {row['final_accuracy']:.4f}"
        )
    add_speedup(rows)
    md = table(rows, time_name)
    (out_dir / "table.md").write_text(f"{', '.join(about)}\n\n{md}")
    write_csv(rows, out_dir / "scaling.csv")
    (out_dir / "scaling.json").write_text(
        json.dumps(
            {
                "mode": mode,
                "config": str(config),
                "target_accuracy": target,
                "epochs": epochs,
                "machine": {
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                },
                "rows": [{k: _json_num(v) for k, v in r.items()} for r in rows],
            },
            indent=1,
        )
    )
    plot(rows, out_dir, time_name=time_name, subtitle=subtitle)
    log(md)
    return rows
