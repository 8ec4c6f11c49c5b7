"""What every process of a job does first: read the config, load the data, make the model.

Shared by the single-process trainer, the server and the workers so that all
of them see the same training subset and the same initial parameters.
"""

from __future__ import annotations

import sys

import numpy as np

from dbnps.common.config import Config
from dbnps.common.errors import UserError
from dbnps.common.layout import Layout
from dbnps.common.mnist import MNIST, load_mnist


def check_ranks(cfg: Config, workers: int, servers: int) -> None:
    """Refuse a job shape the config cannot run (psctl before launching; every rank at start)."""
    if workers < 1 or servers < 1:
        raise UserError("--workers and --servers must be >= 1")
    if cfg.ps.mode == "accumulate" and servers != 1:
        raise UserError(f'[ps] mode = "accumulate" runs with exactly 1 server rank, got {servers}')


def layout_of(cfg: Config) -> Layout:
    return Layout(cfg.model.sizes, cfg.model.classes)


def init_rng(seed: int) -> np.random.Generator:
    """The generator of `init_params` (server and single process alike)."""
    return np.random.default_rng(seed)


def step_rng(seed: int, worker: int = 0) -> np.random.Generator:
    """The generator of worker `worker`'s StepGradient (the single process is worker 0)."""
    return np.random.default_rng([seed, 1, worker])


def apply_subsets(cfg: Config, data: MNIST) -> MNIST:
    """`data` cut to [data] train_subset / test_subset (0: all), then the last
    [data] validation training images moved to the validation split.

    Every process of a job calls this, so the workers' shards, the server's
    evaluations and the single-process trainer see the same three sets.
    Applying it again is a no-op.
    """
    if len(data.y_val):  # already split
        return data
    n_tr = cfg.data.train_subset or len(data.X_train)
    n_te = cfg.data.test_subset or len(data.X_test)
    n_val = cfg.data.validation
    if n_val >= min(n_tr, len(data.X_train)):
        raise UserError(
            f"[data] validation = {n_val} leaves no training images "
            f"(the training set has {min(n_tr, len(data.X_train))})"
        )
    X, y = data.X_train[:n_tr], data.y_train[:n_tr]
    k = len(y) - n_val
    return MNIST(X[:k], y[:k], data.X_test[:n_te], data.y_test[:n_te], X[k:], y[k:])


def load_data(cfg: Config, data_dir: str | None = None) -> MNIST:
    """MNIST with the config's subsets applied (`--data-dir` beats `[data] dir`)."""
    data = load_mnist(
        data_dir or cfg.data.dir or None,
        verify=cfg.data.verify,
        train_subset=cfg.data.train_subset,
        test_subset=cfg.data.test_subset,
    )
    return apply_subsets(cfg, data)


def initial_params(cfg: Config, layout: Layout, X_train: np.ndarray) -> np.ndarray:
    """The flat initial vector: the same seed gives the same vector in every process."""
    from dbnps.common.dbn import init_params

    return init_params(layout, init_rng(cfg.run.seed), X_train).flat


def check_shards(cfg: Config, n_train: int, workers: int) -> None:
    """Every worker's shard must hold at least one minibatch of every phase.

    Pure, so every rank (and psctl, before launching) reaches the same verdict.
    """
    if n_train < 1:
        raise UserError("the training set is empty (check [data] and the data directory)")
    per_worker = n_train // workers
    batch = max(cfg.pretrain.batch_size, cfg.finetune.batch_size)
    if per_worker < batch:
        raise UserError(
            f"{n_train} training images over {workers} workers is {per_worker} per worker, "
            f"fewer than one minibatch ({batch}); use fewer workers or more data"
        )


def settle_setup(comm, error: UserError | None) -> None:
    """Collective, before any window exists: if set-up failed on any rank, all ranks leave.

    Each rank passes the error its own set-up raised (None when it went well).
    The first failing rank prints its one `error:` line; every rank exits with
    status 2, so no rank is left waiting in a collective for one that gave up.
    """
    errors = comm.allgather(None if error is None else str(error))
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if not failed:
        return
    rank, msg = failed[0]
    if comm.Get_rank() == rank:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def expected_train_images(cfg: Config) -> int:
    """Training images the workers share, from the config alone (MNIST has 60 000)."""
    return min(cfg.data.train_subset or 60_000, 60_000) - cfg.data.validation


def preflight(cfg: Config, workers: int, servers: int, *, on_one_host: bool = True) -> None:
    """What psctl checks before launching, so a doomed job is refused in one line."""
    from dbnps.common.resources import check_memory

    check_ranks(cfg, workers, servers)
    check_shards(cfg, expected_train_images(cfg), workers)
    if on_one_host:  # across hosts each host has its own memory; the ranks check their data
        check_memory(cfg, workers, servers)
