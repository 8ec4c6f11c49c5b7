"""RBM math: conditionals, sampling, free energy, CD-k / PCD gradients, learning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dbnps.common.config import from_dict
from dbnps.common.layout import Layout
from dbnps.common.rbm import (
    RBMWorkspace,
    cd_gradient,
    free_energy,
    hidden_probs,
    sample_bernoulli,
    sigmoid_,
    visible_probs,
)


class FixedRng:
    """Stands in for np.random.Generator: `random` hands out given uniforms in order."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64).ravel()
        self.pos = 0

    def random(self, shape, dtype=np.float64, out=None):
        n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
        if self.pos + n > self.values.size:
            raise AssertionError("more draws than the test provided")
        v = self.values[self.pos : self.pos + n].astype(dtype).reshape(shape)
        self.pos += n
        if out is None:
            return v
        out[...] = v
        return out


def sigm(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def tiny(n_vis=2, n_hid=3):
    layout = Layout([n_vis, n_hid], n_classes=2)
    return layout, layout.zeros(), layout.zeros()


def test_sigmoid_matches_formula_and_saturates_quietly():
    x = np.array([-1000, -100, -5, -0.5, 0, 0.5, 5, 100, 1000], dtype=np.float32)
    expect = sigm(x)
    with np.errstate(all="raise"):
        got = sigmoid_(x.copy())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expect, atol=2e-7)
    assert got[0] == 0.0 and got[-1] == 1.0


def test_conditionals_match_formulas():
    rng = np.random.default_rng(3)
    v = rng.random((4, 5), dtype=np.float32)
    W = rng.standard_normal((5, 3), dtype=np.float32)
    hb = rng.standard_normal(3, dtype=np.float32)
    vb = rng.standard_normal(5, dtype=np.float32)
    h = np.empty((4, 3), np.float32)
    assert hidden_probs(v, W, hb, out=h) is h
    np.testing.assert_allclose(h, sigm(v.astype(np.float64) @ W + hb), rtol=1e-5, atol=1e-6)
    vr = np.empty((4, 5), np.float32)
    visible_probs(h, W, vb, out=vr)
    np.testing.assert_allclose(vr, sigm(h.astype(np.float64) @ W.T + vb), rtol=1e-5, atol=1e-6)


def test_sample_bernoulli_uses_given_uniforms_and_frequencies():
    p = np.array([[0.1, 0.5, 0.9]], np.float32)
    out = np.empty_like(p)
    sample_bernoulli(p, FixedRng([0.05, 0.5, 0.95]), out=out)
    np.testing.assert_array_equal(out, [[1.0, 0.0, 0.0]])  # u < p: strict
    big = np.full((2000, 3), 0.0, np.float32) + p
    s = sample_bernoulli(big, np.random.default_rng(0), out=np.empty_like(big))
    assert set(np.unique(s)) <= {0.0, 1.0}
    np.testing.assert_allclose(s.mean(axis=0), p[0], atol=0.03)


def test_free_energy_equals_brute_force_marginal():
    rng = np.random.default_rng(1)
    nv, nh = 3, 4
    W = rng.standard_normal((nv, nh))
    hb, vb = rng.standard_normal(nh), rng.standard_normal(nv)
    V = np.array(list(itertools.product([0, 1], repeat=nv)), dtype=np.float64)
    H = np.array(list(itertools.product([0, 1], repeat=nh)), dtype=np.float64)
    for v in V:
        energies = -(v @ vb) - H @ hb - (v @ W) @ H.T  # E(v, h) for every h
        expect = -np.log(np.exp(-energies).sum())
        got = free_energy(v[None, :], W, hb, vb)[0]
        assert got == pytest.approx(expect, rel=1e-10)


def test_cd1_by_hand_zero_weights():
    """W = 0: every probability is 1/2; the statistics follow by hand."""
    _layout, p, g = tiny()
    ws = RBMWorkspace(1, 2, 3)
    v0 = np.array([[1.0, 0.0]], np.float32)
    err = cd_gradient(p, 0, v0, FixedRng([0.2, 0.7, 0.4]), k=1, weight_decay=0.0, grad=g, ws=ws)
    # h0 = hk = 1/2, vk = 1/2: dW = vk^T hk - v0^T h0
    np.testing.assert_allclose(g.W[0], [[-0.25] * 3, [0.25] * 3], atol=1e-7)
    np.testing.assert_allclose(g.hb[0], [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(g.vb[0], [-0.5, 0.5], atol=1e-7)
    assert err == pytest.approx(0.25, abs=1e-7)


def test_cd1_by_hand_2x3():
    """A 2x3 RBM whose probabilities are 3/4, 1/2, 1/4: computed on paper.

    W = [[ln3, 0, -ln3], [0, 0, 0]], zero biases, v0 = [1, 1]:
      h0 = sigm([ln3, 0, -ln3]) = [3/4, 1/2, 1/4]
      u  = [0.8, 0.4, 0.1]  ->  s0 = [0, 1, 1]            (u < h0)
      vk = sigm(s0 W^T) = sigm([-ln3, 0]) = [1/4, 1/2]
      hk = sigm(vk W) = sigm([ln3/4, 0, -ln3/4]) = [a, 1/2, 1-a],  a = 3^(1/4) / (1 + 3^(1/4))
      dW = vk^T hk - v0^T h0 + wd W,  dhb = hk - h0,  dvb = vk - v0
      err = ((3/4)^2 + (1/2)^2) / 2
    """
    _, p, g = tiny()
    ln3 = math.log(3.0)
    p.W[0][...] = [[ln3, 0, -ln3], [0, 0, 0]]
    ws = RBMWorkspace(1, 2, 3)
    v0 = np.array([[1.0, 1.0]], np.float32)
    wd = 0.01
    rng = FixedRng([0.8, 0.4, 0.1])
    err = cd_gradient(p, 0, v0, rng, k=1, weight_decay=wd, grad=g, ws=ws)
    assert rng.pos == 3  # CD-1 draws one hidden sample
    np.testing.assert_array_equal(ws.states, [[0, 1, 1]])
    a = 3**0.25 / (1 + 3**0.25)
    hk = np.array([a, 0.5, 1 - a])
    h0 = np.array([0.75, 0.5, 0.25])
    expect_W = np.array(
        [
            [0.25 * a - 0.75 + wd * ln3, 0.125 - 0.5, 0.25 * (1 - a) - 0.25 - wd * ln3],
            [0.5 * a - 0.75, 0.25 - 0.5, 0.5 * (1 - a) - 0.25],
        ]
    )
    np.testing.assert_allclose(g.W[0], expect_W, atol=1e-6)
    np.testing.assert_allclose(g.hb[0], hk - h0, atol=1e-6)
    np.testing.assert_allclose(g.vb[0], [-0.75, -0.5], atol=1e-6)
    assert err == pytest.approx(0.40625, abs=1e-6)


def reference_cd(W, hb, vb, v0, u_list, k, wd, chain=None):
    """Independent float64 CD-k / PCD-k: returns (dW, dhb, dvb, err, final states)."""
    B = v0.shape[0]
    h0 = sigm(v0 @ W + hb)
    u = iter(u_list)
    if chain is None:
        s = (next(u) < h0).astype(np.float64)
        recon = None
    else:
        s = chain
        recon = sigm(h0 @ W.T + vb)
    for i in range(k):
        vk = sigm(s @ W.T + vb)
        hk = sigm(vk @ W + hb)
        if i == 0 and recon is None:
            recon = vk
        if i < k - 1 or chain is not None:
            s = (next(u) < hk).astype(np.float64)
    dW = (vk.T @ hk - v0.T @ h0) / B + wd * W
    return dW, (hk - h0).mean(0), (vk - v0).mean(0), float(((v0 - recon) ** 2).mean()), s


@pytest.mark.parametrize("k", [1, 3])
def test_cdk_matches_reference_on_a_batch(k):
    rng = np.random.default_rng(7)
    B, nv, nh = 5, 6, 4
    layout = Layout([nv, nh], n_classes=2)
    p, g = layout.init(rng), layout.zeros()
    p.W[0][...] *= 100  # make the probabilities far from 1/2
    p.hb[0][...] = rng.standard_normal(nh)
    p.vb[0][...] = rng.standard_normal(nv)
    v0 = (rng.random((B, nv)) < 0.5).astype(np.float32)
    draws = [rng.random((B, nh)) for _ in range(k)]
    ws = RBMWorkspace(B, nv, nh)
    err = cd_gradient(
        p, 0, v0, FixedRng(np.concatenate([d.ravel() for d in draws])),
        k=k, weight_decay=0.001, grad=g, ws=ws,
    )  # fmt: skip
    W64 = p.W[0].astype(np.float64)
    dW, dhb, dvb, e, _ = reference_cd(
        W64, p.hb[0].astype(np.float64), p.vb[0].astype(np.float64), v0.astype(np.float64),
        draws, k, 0.001,
    )  # fmt: skip
    np.testing.assert_allclose(g.W[0], dW, atol=1e-5)
    np.testing.assert_allclose(g.hb[0], dhb, atol=1e-5)
    np.testing.assert_allclose(g.vb[0], dvb, atol=1e-5)
    assert err == pytest.approx(e, abs=1e-6)


def test_pcd_continues_the_chain():
    rng = np.random.default_rng(11)
    B, nv, nh = 4, 5, 3
    layout = Layout([nv, nh], n_classes=2)
    p, g = layout.init(rng), layout.zeros()
    p.W[0][...] *= 100
    ws = RBMWorkspace(B, nv, nh, persistent=True)
    W, hb, vb = (a.astype(np.float64) for a in (p.W[0], p.hb[0], p.vb[0]))
    chain = None
    for call in range(3):
        v0 = (rng.random((B, nv)) < 0.5).astype(np.float32)
        # First call: one draw starts the chain from the data, one continues it.
        draws = [rng.random((B, nh)) for _ in range(2 if call == 0 else 1)]
        fixed = FixedRng(np.concatenate([d.ravel() for d in draws]))
        err = cd_gradient(p, 0, v0, fixed, k=1, weight_decay=0.0, grad=g, ws=ws)
        assert fixed.pos == fixed.values.size
        if chain is None:
            chain = (draws.pop(0) < sigm(v0 @ W + hb)).astype(np.float64)
        dW, _dhb, dvb, e, chain = reference_cd(
            W, hb, vb, v0.astype(np.float64), draws, 1, 0.0, chain
        )
        np.testing.assert_allclose(g.W[0], dW, atol=1e-5)
        np.testing.assert_allclose(g.vb[0], dvb, atol=1e-5)
        np.testing.assert_array_equal(ws.states, chain)
        assert err == pytest.approx(e, abs=1e-6)


def test_reconstruction_error_drops_on_mnist(mnist_small):
    """CD-1 on 2000 MNIST digits: recon error falls over 3 epochs (784-100 RBM)."""
    from dbnps.common.dbn import init_params
    from dbnps.common.steps import StepGradient
    from dbnps.common.updaters import make_rule

    X, y = mnist_small
    cfg = from_dict({"model": {"sizes": [784, 100]}, "pretrain": {"batch_size": 20}})
    layout = Layout([784, 100])
    p = init_params(layout, np.random.default_rng(0), X)
    g = layout.zeros()
    sg = StepGradient(layout, cfg, X, y, np.random.default_rng(1))
    sg.begin_phase(0, p)
    rule = make_rule("momentum", layout.size)
    lo, hi = layout.phase_range(0)
    per_epoch = []
    for epoch in range(3):
        errs = []
        for _ in range(sg.steps_per_pass()):
            e, _n = sg.step(p, g, epoch=epoch)
            rule.apply(p.flat[lo:hi], g.flat[lo:hi], 0.1, 0.5, lo)
            errs.append(e)
        per_epoch.append(np.mean(errs))
    mean_image = float(((X - X.mean(0)) ** 2).mean())  # error of predicting the mean
    assert per_epoch[2] < per_epoch[1] < per_epoch[0], per_epoch
    assert per_epoch[2] < 0.75 * per_epoch[0], per_epoch
    assert per_epoch[2] < 0.5 * mean_image, (per_epoch, mean_image)


@pytest.fixture(scope="module")
def mnist_small():
    from dbnps.common.mnist import load_mnist

    d = load_mnist()
    return d.X_train[:2000], d.y_train[:2000]
