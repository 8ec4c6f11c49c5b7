"""Max-norm projection (dbnps.common.constraints) and its config key: pure numpy, no MPI."""

from __future__ import annotations

import numpy as np
import pytest

from dbnps.common import config
from dbnps.common.constraints import apply_max_norm, weight_matrices
from dbnps.common.errors import ConfigError
from dbnps.common.layout import Layout

LAYOUT = Layout([6, 5, 4], 3)  # W0 6x5, W1 5x4, W_out 4x3: small enough to check by hand
FT = LAYOUT.finetune_phase


def random_flat(scale: float = 3.0, seed: int = 0) -> np.ndarray:
    """Random parameters whose odd weight columns are 10x shorter than the even ones."""
    rng = np.random.default_rng(seed)
    flat = (rng.standard_normal(LAYOUT.size) * scale).astype(np.float32)
    for name, shape in weight_matrices(LAYOUT, FT):
        lo, hi = LAYOUT.slice_of(name)
        flat[lo:hi].reshape(shape)[:, 1::2] *= np.float32(0.1)
    return flat


def col_norms(flat: np.ndarray, name: str) -> np.ndarray:
    shape = dict(weight_matrices(LAYOUT, FT))[name]
    lo, hi = LAYOUT.slice_of(name)
    return np.linalg.norm(flat[lo:hi].reshape(shape).astype(np.float64), axis=0)


def test_long_columns_are_scaled_to_c_in_direction_short_ones_untouched():
    flat = random_flat()
    before = flat.copy()
    c = 4.0
    apply_max_norm(LAYOUT, flat, 0, FT, c)
    for name, shape in weight_matrices(LAYOUT, FT):
        lo, hi = LAYOUT.slice_of(name)
        old = before[lo:hi].reshape(shape).astype(np.float64)
        new = flat[lo:hi].reshape(shape).astype(np.float64)
        n_old = np.linalg.norm(old, axis=0)
        assert (n_old > c).any() and (n_old <= c).any(), "the data must exercise both cases"
        want = old * np.minimum(1.0, c / n_old)  # projection onto the ball of radius c
        np.testing.assert_allclose(new, want, rtol=1e-6)
        np.testing.assert_array_equal(new[:, n_old <= c], old[:, n_old <= c])
        assert col_norms(flat, name).max() <= c * (1 + 1e-6)


def test_columns_not_rows_are_bounded():
    # One unit with huge incoming weights, spread over its column: a per-row
    # projection would leave this column's norm at sqrt(6) * 10.
    flat = np.zeros(LAYOUT.size, np.float32)
    lo, hi = LAYOUT.slice_of("W0")
    W0 = flat[lo:hi].reshape(6, 5)
    W0[:, 2] = 10.0
    apply_max_norm(LAYOUT, flat, 0, FT, 1.0)
    np.testing.assert_allclose(W0[:, 2], 1.0 / np.sqrt(6), rtol=1e-6)
    assert not W0[:, [0, 1, 3, 4]].any()


def test_biases_are_never_touched():
    flat = random_flat(scale=100.0)
    before = flat.copy()
    apply_max_norm(LAYOUT, flat, 0, FT, 0.5)
    weights = {n for n, _ in weight_matrices(LAYOUT, FT)}
    for name in ("hb0", "vb0", "hb1", "vb1", "b_out"):
        lo, hi = LAYOUT.slice_of(name)
        np.testing.assert_array_equal(flat[lo:hi], before[lo:hi])
    assert weights == {"W0", "W1", "W_out"}


def test_a_pretraining_phase_bounds_only_its_rbm():
    flat = random_flat()
    before = flat.copy()
    lo, hi = LAYOUT.phase_range(1)  # RBM 2's block only, as the trainer passes it
    apply_max_norm(LAYOUT, flat[lo:hi], lo, 1, 1.0)
    assert col_norms(flat, "W1").max() <= 1.0 + 1e-6
    outside = np.ones(LAYOUT.size, bool)
    outside[slice(*LAYOUT.slice_of("W1"))] = False
    np.testing.assert_array_equal(flat[outside], before[outside])


def test_a_shard_constrains_the_matrices_inside_it_and_skips_the_rest():
    flat = random_flat()
    before = flat.copy()
    lo, _ = LAYOUT.slice_of("W1")  # a shard from W1 to the end: W1 and W_out, not W0
    shard = flat[lo:]
    apply_max_norm(LAYOUT, shard, lo, FT, 1.0)
    assert np.shares_memory(shard, flat)
    assert col_norms(flat, "W1").max() <= 1.0 + 1e-6
    assert col_norms(flat, "W_out").max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(flat[:lo], before[:lo])


def test_a_matrix_split_across_the_slice_edge_is_refused():
    flat = random_flat()
    before = flat.copy()
    a, b = LAYOUT.slice_of("W1")
    mid = (a + b) // 2
    with pytest.raises(ValueError, match=r"W1 .* only partly inside"):
        apply_max_norm(LAYOUT, flat[mid:], mid, FT, 1.0)
    with pytest.raises(ValueError, match=r"W1 .* only partly inside"):
        apply_max_norm(LAYOUT, flat[:mid], 0, FT, 1.0)
    # Nothing written, not even W0, which lies wholly inside the second slice.
    np.testing.assert_array_equal(flat, before)


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bound_that_is_not_a_positive_number_is_refused(c):
    with pytest.raises(ValueError, match="max-norm bound"):
        apply_max_norm(LAYOUT, random_flat(), 0, FT, c)


def test_config_key_defaults_off_and_rejects_negative_values():
    assert config.from_dict({}).finetune.max_norm == 0.0
    assert config.from_dict({"finetune": {"max_norm": 3.5}}).finetune.max_norm == 3.5
    with pytest.raises(ConfigError, match=r"^\[finetune\] max_norm must be >= 0 \(0: off\)"):
        config.from_dict({"finetune": {"max_norm": -1.0}})
    with pytest.raises(ConfigError, match=r"^\[finetune\] max_norm must be a number"):
        config.from_dict({"finetune": {"max_norm": "3"}})


def _tiny_job(max_norm: float, init: np.ndarray | None = None):
    from dbnps.common.mnist import MNIST
    from dbnps.common.trainer import train_local

    rng = np.random.default_rng(1)
    X = rng.random((200, 784), dtype=np.float32)
    y = rng.integers(0, 10, 200).astype(np.uint8)
    cfg = config.from_dict(
        {
            "model": {"sizes": [784, 8, 6]},
            "pretrain": {"epochs": 0.0 if init is not None else 1.0, "batch_size": 20},
            # A large lr so the weights would outgrow the bound without the projection.
            "finetune": {"epochs": 2.0, "batch_size": 20, "lr": 5.0, "max_norm": max_norm},
            "run": {"seed": 3},
        }
    )
    params, _ = train_local(
        cfg, MNIST(X, y, X[:20], y[:20]), progress=False, log=lambda m: None, init=init
    )
    return params


def test_the_trainer_bounds_every_weight_column_after_fine_tuning():
    unbounded = _tiny_job(0.0)
    bounded = _tiny_job(0.5)
    for W in [*bounded.W, bounded.W_out]:
        assert np.linalg.norm(W, axis=0).max() <= 0.5 * (1 + 1e-5)
    assert np.linalg.norm(unbounded.W_out, axis=0).max() > 0.5  # the bound was binding


def test_the_trainer_starts_fine_tuning_from_given_parameters():
    pre = _tiny_job(0.0).flat.copy()
    a = _tiny_job(0.0, init=pre)
    b = _tiny_job(0.0, init=pre)
    np.testing.assert_array_equal(a.flat, b.flat)  # deterministic from the same start
    assert not np.array_equal(a.flat, pre)  # and it trained
    with pytest.raises(Exception, match="initial parameters hold 3 floats"):
        _tiny_job(0.0, init=np.zeros(3, np.float32))
