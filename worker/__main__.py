"""`python -m dbnps.worker`: one worker rank of an MPMD job (launched by psctl)."""

from __future__ import annotations

from dbnps.common import boot  # first, before mpi4py: bounds MPI_Init and set-up

# isort: split
import faulthandler
import os
import signal
import sys

import click
import numpy as np
from mpi4py import MPI

from dbnps.common import rma
from dbnps.common.config import load
from dbnps.common.errors import UserError, exit_on_user_error
from dbnps.common.job import check_ranks, check_shards, layout_of, load_data, settle_setup


@click.command()
@click.option("--config", "config_path", type=click.Path(), default=None)
@click.option("--data-dir", default=None)
@click.option("--inject-synthetic-grad", type=float, default=None, hidden=True)
@click.option("--inject-nan-worker", type=int, default=-1, hidden=True)
@click.option("--inject-nan-every", type=int, default=1, hidden=True)
@click.option("--inject-sleep-worker", type=int, default=-1, hidden=True)
@click.option("--inject-sleep-s", type=float, default=0.0, hidden=True)
@click.option("--inject-step-s", type=float, default=0.0, hidden=True)
@click.option("--inject-die-worker", type=int, default=-1, hidden=True)
@click.option("--inject-die-after", type=int, default=0, hidden=True)
@click.option(
    "--inject-die-in",
    type=click.Choice(["step", "pull", "push", "startup", "finalize"]),
    default="step",
    hidden=True,
)
@click.option("--inject-slow-phase-s", type=float, default=0.0, hidden=True)
@click.option("--inject-finalize-delay-worker", type=int, default=-1, hidden=True)
@click.option("--inject-finalize-delay-s", type=float, default=0.0, hidden=True)
@exit_on_user_error
def main(config_path, data_dir, **inject) -> None:
    from dbnps.worker.worker import Faults, Worker

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to stderr
    cfg = load(config_path)
    topo = rma.Topology.discover("worker")
    check_ranks(cfg, topo.n_workers, topo.n_servers)  # same verdict on every rank: no hang
    layout = layout_of(cfg)
    error = None
    X, y = np.zeros((0, 784), np.float32), np.zeros(0, np.uint8)
    if inject["inject_synthetic_grad"] is None:  # a synthetic pusher needs no images
        try:
            data = load_data(cfg, data_dir)
            X, y = data.X_train, data.y_train  # the worker cuts its own shard (and re-cuts it)
            check_shards(cfg, len(y), topo.n_workers)
        except UserError as exc:
            error = exc
    # Every rank leaves together if any set-up failed; a rank that died makes this
    # raise, which common/boot's excepthook turns into one line and an exit.
    settle_setup(topo.comm, error)
    faults = Faults(
        synthetic_grad=inject["inject_synthetic_grad"],
        nan_worker=inject["inject_nan_worker"],
        nan_every=inject["inject_nan_every"],
        sleep_worker=inject["inject_sleep_worker"],
        sleep_s=inject["inject_sleep_s"],
        step_s=inject["inject_step_s"],
        die_worker=inject["inject_die_worker"],
        die_after=inject["inject_die_after"],
        die_in=inject["inject_die_in"],
        slow_phase_s=inject["inject_slow_phase_s"],
        finalize_delay_worker=inject["inject_finalize_delay_worker"],
        finalize_delay_s=inject["inject_finalize_delay_s"],
    )
    try:
        worker = Worker(cfg, topo, layout, X, y, faults=faults)
        boot.done()
        worker.run()
    except (rma.PSTimeout, MPI.Exception) as exc:
        # The server is gone or stuck: say so once and leave without the collective
        # finish (it would wait for the dead rank).  mpiexec then ends the job.
        what = exc if isinstance(exc, rma.PSTimeout) else f"MPI error talking to the server: {exc}"
        print(f"error: worker {topo.worker_index}: {what}", file=sys.stderr, flush=True)
        os._exit(3)  # not through MPI_Finalize: with a dead peer it can wait for ever
    worker.finish()


if __name__ == "__main__":
    main()
