"""DBN: backprop gradient (finite differences), propagation, init, prediction."""

from __future__ import annotations

import numpy as np
import pytest

from dbnps.common.dbn import (
    BackpropWorkspace,
    accuracy,
    backprop_gradient,
    init_params,
    predict,
    propagate,
)
from dbnps.common.layout import Layout, Params

SIZES = (6, 5, 4)
CLASSES = 3


def params64(layout: Layout, flat: np.ndarray) -> Params:
    """Named float64 views of `flat`, same offsets as Layout.views (for exact checks)."""

    def v(name, shape):
        lo, hi = layout.slice_of(name)
        return flat[lo:hi].reshape(shape)

    s, L = layout.sizes, layout.n_layers
    return Params(
        flat=flat,
        W=[v(f"W{l}", (s[l], s[l + 1])) for l in range(L)],
        hb=[v(f"hb{l}", (s[l + 1],)) for l in range(L)],
        vb=[v(f"vb{l}", (s[l],)) for l in range(L)],
        W_out=v("W_out", (s[-1], layout.n_classes)),
        b_out=v("b_out", (layout.n_classes,)),
    )


def setup64(seed=0, B=4):
    layout = Layout(SIZES, CLASSES)
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(layout.size)  # large weights: gradients far from 0
    p = params64(layout, flat)
    g = params64(layout, np.full(layout.size, np.nan))
    X = rng.random((B, SIZES[0]))
    y = rng.integers(0, CLASSES, B)
    ws = BackpropWorkspace(SIZES, CLASSES, B, dtype=np.float64)
    return layout, p, g, X, y, ws


@pytest.mark.parametrize(
    ("dropout", "input_dropout", "wd"), [(0.0, 0.0, 0.0), (0.0, 0.0, 0.01), (0.4, 0.25, 0.003)]
)
def test_backprop_matches_finite_differences(dropout, input_dropout, wd):
    layout, p, g, X, y, ws = setup64()
    kw = dict(ws=ws, weight_decay=wd, dropout=dropout, input_dropout=input_dropout)

    def objective() -> float:
        # Same seed every call: the dropout masks are fixed, so the loss is smooth in p.
        loss = backprop_gradient(p, X, y, np.random.default_rng(5), grad=scratch, **kw)
        l2 = sum(float((W**2).sum()) for W in [*p.W, p.W_out])
        return loss + 0.5 * wd * l2

    scratch = params64(layout, np.empty(layout.size))
    backprop_gradient(p, X, y, np.random.default_rng(5), grad=g, **kw)
    assert np.all(np.isfinite(g.flat))
    eps = 1e-6
    numeric = np.empty(layout.size)
    for i in range(layout.size):
        old = p.flat[i]
        p.flat[i] = old + eps
        up = objective()
        p.flat[i] = old - eps
        down = objective()
        p.flat[i] = old
        numeric[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(g.flat, numeric, rtol=1e-5, atol=1e-8)
    for vb in g.vb:  # the objective does not depend on visible biases
        np.testing.assert_array_equal(vb, 0)
    assert np.abs(numeric).max() > 1e-2  # the check is not vacuous


def test_float32_path_agrees_with_float64():
    # (no dropout: float32 and float64 uniforms are different draws)
    layout, p64, g64, X, y, _ = setup64(seed=2, B=8)
    p32 = layout.views(p64.flat.astype(np.float32))
    g32 = layout.views(np.full(layout.size, np.nan, np.float32))
    ws32 = BackpropWorkspace(SIZES, CLASSES, 8)
    ws64 = BackpropWorkspace(SIZES, CLASSES, 8, dtype=np.float64)
    l32 = backprop_gradient(
        p32, X.astype(np.float32), y, np.random.default_rng(1), grad=g32, ws=ws32
    )
    l64 = backprop_gradient(p64, X, y, np.random.default_rng(1), grad=g64, ws=ws64)
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32.flat, g64.flat, rtol=1e-4, atol=1e-6)


def test_softmax_only_writes_only_the_output_layer():
    layout, p, g, X, y, ws = setup64(seed=3)
    full = params64(layout, np.empty(layout.size))
    backprop_gradient(p, X, y, np.random.default_rng(0), grad=full, ws=ws, dropout=0.2)
    backprop_gradient(
        p, X, y, np.random.default_rng(0), grad=g, ws=ws, dropout=0.2, softmax_only=True
    )
    lo, _ = layout.slice_of("W_out")
    np.testing.assert_array_equal(g.flat[:lo], 0)
    np.testing.assert_array_equal(g.flat[lo:], full.flat[lo:])
    assert np.abs(g.W_out).max() > 0


def test_loss_is_mean_cross_entropy():
    _layout, p, g, X, y, ws = setup64(seed=4)
    loss = backprop_gradient(p, X, y, np.random.default_rng(0), grad=g, ws=ws)
    a = X
    for W, hb in zip(p.W, p.hb, strict=True):
        a = 1 / (1 + np.exp(-(a @ W + hb)))
    z = a @ p.W_out + p.b_out
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(q[np.arange(len(y)), y]).mean(), rel=1e-12)
    # prediction is the arg-max of the same forward pass
    np.testing.assert_array_equal(predict(p, X, batch=3), z.argmax(1))
    assert accuracy(p, X, y) == pytest.approx(np.mean(z.argmax(1) == y))


def test_propagate_is_the_mean_field_stack_and_batch_invariant():
    layout = Layout([7, 5, 4, 3])
    rng = np.random.default_rng(0)
    p = layout.init(rng)
    p.flat[...] = rng.standard_normal(layout.size).astype(np.float32)
    X = rng.random((10, 7), dtype=np.float32)
    assert propagate(p, X, 0) is X
    a = X.astype(np.float64)
    for l in range(3):
        a = 1 / (1 + np.exp(-(a @ p.W[l] + p.hb[l])))
        got = propagate(p, X, l + 1)
        assert got.dtype == np.float32 and got.shape == (10, layout.sizes[l + 1])
        np.testing.assert_allclose(got, a, rtol=1e-5, atol=1e-6)
        # Batching must not change the values; BLAS picks kernels by CPU and matrix
        # shape, so batch 3 and batch 10 agree to float32 rounding, not bit for bit.
        np.testing.assert_allclose(propagate(p, X, l + 1, batch=3), got, rtol=1e-5, atol=1e-6)


def test_init_params_visible_bias_is_logit_of_pixel_means():
    layout = Layout([4, 3], n_classes=2)
    X = np.array([[0, 1, 0.5, 1], [0, 0, 0.5, 1], [0, 1, 0.5, 1], [0, 0, 0.5, 1]], np.float32)
    p = init_params(layout, np.random.default_rng(0), X)
    pm = np.array([1e-3, 0.5, 0.5, 1 - 1e-3])
    np.testing.assert_allclose(p.vb[0], np.log(pm / (1 - pm)), rtol=1e-5)
    np.testing.assert_array_equal(p.hb[0], 0)
    # Same seed as Layout.init for the weights.
    np.testing.assert_array_equal(p.W[0], layout.init(np.random.default_rng(0)).W[0])


def test_init_params_weights_scale():
    layout = Layout([784, 500], n_classes=10)
    X = np.random.default_rng(0).random((50, 784), dtype=np.float32)
    p = init_params(layout, np.random.default_rng(1), X)
    assert p.flat.dtype == np.float32
    assert abs(float(p.W[0].std()) - 0.01) < 5e-4
