"""`psctl train --local`: pretrain and fine-tune a DBN in this one process.

The distributed job is `psctl run`; this command is the single-process
reference (and the baseline the parameter server is measured against).

`--threads N` caps the BLAS (and OpenMP) thread pools for the run with
threadpoolctl, in this process: no environment variable has to be set before
numpy loads OpenBLAS, so no re-execution.
"""

from __future__ import annotations

import contextlib
import time

import click

from dbnps.common.errors import UserError


def _blas_threads() -> str:
    """How many threads the loaded BLAS libraries use now ("" if none is loaded)."""
    from threadpoolctl import threadpool_info

    counts = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    return str(min(counts)) if counts else ""


@click.command("train")
@click.option("--local", is_flag=True, help="Train in this process (required for now).")
@click.option(
    "--config",
    "config_path",
    required=True,
    metavar="FILE",
    help="TOML job config (e.g. configs/mnist-dbn.toml).",
)
@click.option("--data-dir", default=None, metavar="DIR", help="MNIST IDX folder.")
@click.option(
    "--out",
    default="model.npz",
    show_default=True,
    metavar="FILE",
    help="Where to write the trained model (.npz).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="BLAS threads (default: OpenBLAS's choice).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train_cmd(
    local: bool,
    config_path: str,
    data_dir: str | None,
    out: str,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Pretrain the RBMs and fine-tune the DBN in one process."""
    if not local:
        raise UserError(
            "psctl train needs --local (single process); use `psctl run` for the "
            "distributed parameter-server job"
        )
    from dbnps.common import config as config_mod

    cfg = config_mod.load(config_path)  # ConfigError before any heavy import

    from threadpoolctl import threadpool_limits

    from dbnps.common.layout import Layout
    from dbnps.common.mnist import load_mnist
    from dbnps.common.model import save_model
    from dbnps.common.trainer import train_local

    # After the imports above: threadpoolctl limits the libraries loaded so far (numpy's
    # OpenBLAS among them), for this block only.
    with threadpool_limits(limits=threads) if threads else contextlib.nullcontext():
        blas_threads = _blas_threads()
        t0, c0 = time.perf_counter(), time.process_time()
        data = load_mnist(data_dir or cfg.data.dir or None, verify=cfg.data.verify)
        params, history = train_local(cfg, data, progress=not no_progress)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        acc = None
        if any(h["phase_index"] == len(cfg.model.sizes) - 1 for h in history):
            from dbnps.common.dbn import accuracy
            from dbnps.common.job import apply_subsets

            d = apply_subsets(cfg, data)  # the saved parameters, on the test set
            acc = accuracy(params, d.X_test, d.y_test)
    layout = Layout(cfg.model.sizes, cfg.model.classes)
    meta = {
        "trainer": "local",
        "config_path": config_path,
        "test_acc": acc,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "blas_threads": blas_threads,
        "history": history,
    }
    path = save_model(out, layout, params.flat, cfg, meta)
    acc_s = f"test accuracy {100 * acc:.2f}%" if acc is not None else "no fine-tuning"
    click.echo(f"{acc_s}; {wall:.1f}s wall, {cpu:.1f}s CPU; model written to {path}")


COMMANDS: list = [train_cmd]
