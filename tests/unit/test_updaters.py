"""Update rules' math and state round trip (`dbnps.common.updaters`)."""

from __future__ import annotations

import numpy as np

from dbnps.common.updaters import make_rule


def test_momentum_follows_v_mu_v_minus_lr_g():
    rule = make_rule("momentum", 3)
    p = np.zeros(3, np.float32)
    g1, g2 = np.array([1, 2, 3], np.float32), np.array([1, 0, -1], np.float32)
    rule.apply(p, g1.copy(), 0.1, 0.9)
    rule.apply(p, g2.copy(), 0.1, 0.9)
    v1 = -0.1 * g1
    v2 = 0.9 * v1 - 0.1 * g2
    np.testing.assert_allclose(rule.v, v2, rtol=1e-6)
    np.testing.assert_allclose(p, v1 + v2, rtol=1e-6)


def test_adagrad_divides_by_the_root_of_the_squared_gradient_sum():
    rule = make_rule("adagrad", 2, adagrad_eps=1e-6)
    p = np.zeros(2, np.float32)
    g = np.array([2.0, -0.5], np.float32)
    rule.apply(p, g.copy(), 0.1, 0.0)
    rule.apply(p, g.copy(), 0.1, 0.0)
    s = 2 * g * g
    np.testing.assert_allclose(rule.s, s)
    expect = -0.1 * g / (np.sqrt(g * g) + 1e-6) - 0.1 * g / (np.sqrt(s) + 1e-6)
    np.testing.assert_allclose(p, expect, rtol=1e-5)


def test_rule_state_round_trips_and_continues_identically():
    """A checkpoint's state, loaded into a fresh rule, gives the same next update."""
    rng = np.random.default_rng(1)
    for name in ("momentum", "adagrad"):
        a, b = make_rule(name, 5), make_rule(name, 5)
        for _ in range(3):
            a.apply(np.zeros(5, np.float32), rng.standard_normal(5).astype(np.float32), 0.1, 0.9)
        b.load_state({k: v.copy() for k, v in a.state().items()})
        g = rng.standard_normal(5).astype(np.float32)
        pa, pb = np.zeros(5, np.float32), np.zeros(5, np.float32)
        a.apply(pa, g.copy(), 0.1, 0.9)
        b.apply(pb, g.copy(), 0.1, 0.9)
        np.testing.assert_array_equal(pa, pb)


def test_offset_lo_uses_the_slice_of_the_state():
    rule = make_rule("momentum", 6)
    rule.apply(np.zeros(2, np.float32), np.ones(2, np.float32), 1.0, 0.0, lo=4)
    np.testing.assert_array_equal(rule.v, [0, 0, 0, 0, -1, -1])


def test_reset_forgets_the_state():
    rule = make_rule("momentum", 2)
    rule.apply(np.zeros(2, np.float32), np.ones(2, np.float32), 1.0, 0.9)
    rule.reset()
    assert not rule.v.any()
