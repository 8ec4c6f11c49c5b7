"""What every process of a job does first: read the config, load the data, make the model.

Shared by the single-process trainer, the server and the workers so that all
of them see the same training subset and the same initial parameters.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.config import Config
from dbnps.common.layout import Layout
from dbnps.common.mnist import MNIST, load_mnist


def layout_of(cfg: Config) -> Layout:
    return Layout(cfg.model.sizes, cfg.model.classes)


def load_data(cfg: Config, data_dir: str | None = None) -> MNIST:
    """MNIST with the config's subsets applied (`--data-dir` beats `[data] dir`)."""
    d = load_mnist(data_dir or cfg.data.dir or None)
    n, m = cfg.data.train_subset, cfg.data.test_subset
    if n:
        d.X_train, d.y_train = d.X_train[:n], d.y_train[:n]
    if m:
        d.X_test, d.y_test = d.X_test[:m], d.y_test[:m]
    return d


def initial_params(cfg: Config, layout: Layout, X_train: np.ndarray) -> np.ndarray:
    """The flat initial vector: the same seed gives the same vector in every process."""
    from dbnps.common.dbn import init_params

    return init_params(layout, np.random.default_rng(cfg.run.seed), X_train).flat
