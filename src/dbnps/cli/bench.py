"""`psctl bench scaling`: time to accuracy vs number of workers (logic in `dbnps.scaling`)."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.group("bench")
def bench_group() -> None:
    """Benchmarks that run real jobs."""


@bench_group.command("scaling")
@click.option("--workers", "workers", default="1,2,4", show_default=True,
              help="comma-separated worker counts; must include 1 (the speed-up baseline)")  # fmt: skip
@click.option("--config", "config", type=click.Path(path_type=Path), required=True,
              help="TOML job config")  # fmt: skip
@click.option("--target-accuracy", "target", type=float, default=0.0,
              help="test accuracy to reach (0-1); each job stops when it gets there")  # fmt: skip
@click.option("--epochs", type=float, default=None,
              help="fixed-epochs variant: fine-tune this many epochs, no early stop")  # fmt: skip
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="results folder (default: bench/results/scaling-<date>)")  # fmt: skip
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="seconds one job may take")  # fmt: skip
def scaling_cmd(workers, config, target, epochs, out, data_dir, timeout) -> None:
    """Run one job per worker count (1 server each) and tabulate time, speed-up, efficiency.

    Until target (default): time = first evaluation at or above
    --target-accuracy.  With --epochs: time = training wall time.  Writes
    scaling.csv, scaling.json, table.md and two PNGs into --out.
    """
    from dbnps.scaling import parse_workers, run_scaling

    ks = parse_workers(workers)
    out = out or Path("bench/results") / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"
    run_scaling(config, ks, out, target=target, epochs=epochs, data_dir=data_dir,
                timeout=timeout, log=click.echo)  # fmt: skip
    click.echo(f"results in {out}")


COMMANDS = [bench_group]
