"""The server's request handle (`dbnps.server.handle.Aggregate`), in-process on numpy arrays."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from dbnps.common.protocol import (
    APPLIED,
    PHASE,
    REJECTED_NONFINITE,
    REJECTED_PHASE,
    REJECTED_STALE,
    SAMPLES,
    SEQ,
    VERSION,
    Push,
)
from dbnps.common.schedule import fractional_step
from dbnps.common.updaters import make_rule
from dbnps.server.handle import Aggregate, Shard, compensate

N = 6


def shard(version=10, phase=1, rng=(0, N), open_=True, lr=0.5, write=contextlib.nullcontext):
    header = np.zeros(8, dtype=np.int64)
    header[VERSION], header[PHASE] = version, phase
    return Shard(np.ones(N, np.float32), header, rng, open_, lr, 0.0, write)


def push(worker, grad, *, pulled=10, phase=1, lo=0, hi=N, n=5):
    g = np.asarray(grad, dtype=np.float32)
    return Push(worker, 1, pulled, n, phase, lo, hi, g.copy())


def test_one_push_is_applied_with_the_rule_and_advances_version_and_samples():
    sh = shard()
    out = Aggregate(make_rule("sgd", N))([push(0, np.arange(N), n=7)], sh)
    assert out.results == {0: APPLIED} and out.applied == 1 and out.samples == 7
    np.testing.assert_allclose(sh.params, 1 - 0.5 * np.arange(N))
    assert sh.header[VERSION] == 11 and sh.header[SAMPLES] == 7


def test_a_batch_is_summed_once_conserving_every_accepted_gradient():
    """The sum of the batch lands in the parameters, whatever the number of pushes."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(4)]
    sh = shard(lr=1.0)
    out = Aggregate(make_rule("sgd", N))([push(w, g) for w, g in enumerate(grads)], sh)
    assert out.applied == 4 and sh.header[VERSION] == 14
    np.testing.assert_allclose(sh.params, 1 - np.sum(grads, axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"phase": 0}, REJECTED_PHASE),  # computed in another phase
        ({"lo": 1}, REJECTED_PHASE),  # does not cover the phase's range
        ({"pulled": 2}, REJECTED_STALE),  # tau = 8 > bound 4
    ],
)
def test_validation_reasons(change, reason):
    sh = shard()
    before = sh.params.copy()
    p = push(0, np.ones(N), **change)
    out = Aggregate(make_rule("sgd", N), staleness_bound=4)([p], sh)
    assert out.results == {0: reason} and out.applied == 0
    np.testing.assert_array_equal(sh.params, before)
    assert sh.header[VERSION] == 10


def test_staleness_bound_accepts_tau_equal_to_the_bound():
    out = Aggregate(make_rule("sgd", N), staleness_bound=4)(
        [push(0, np.ones(N), pulled=6)], shard()
    )
    assert out.results == {0: APPLIED} and out.staleness == [4]


def test_after_the_last_phase_every_push_is_refused():
    out = Aggregate(make_rule("sgd", N))([push(0, np.ones(N))], shard(open_=False))
    assert out.results == {0: REJECTED_PHASE}


def test_a_nonfinite_push_is_refused_and_the_others_of_its_batch_still_apply():
    bad = np.ones(N)
    bad[3] = np.nan
    sh = shard(lr=1.0)
    out = Aggregate(make_rule("sgd", N))(
        [push(0, np.ones(N)), push(1, bad), push(2, 2 * np.ones(N))], sh
    )
    assert out.results == {0: APPLIED, 1: REJECTED_NONFINITE, 2: APPLIED}
    np.testing.assert_allclose(sh.params, 1 - 3.0)
    assert sh.header[VERSION] == 12


def test_staleness_aware_lr_weighs_each_gradient_by_one_over_tau():
    """Zhang et al. 2016: g_i / max(tau_i, 1).  tau 0 and 1 weigh 1, tau 4 a quarter."""
    sh = shard(lr=1.0)
    pushes = [
        push(0, np.ones(N), pulled=10),
        push(1, np.ones(N), pulled=9),
        push(2, 4 * np.ones(N), pulled=6),
    ]
    Aggregate(make_rule("sgd", N), staleness_lr="inverse")(pushes, sh)
    np.testing.assert_allclose(sh.params, 1 - (1 + 1 + 4 / 4))


def test_staleness_aware_lr_alone_scales_a_single_stale_push():
    sh = shard(lr=1.0)
    Aggregate(make_rule("sgd", N), staleness_lr="inverse")([push(0, 2 * np.ones(N), pulled=8)], sh)
    np.testing.assert_allclose(sh.params, 1 - 2 / 2)


def test_the_shard_changes_only_inside_the_write_bracket():
    """Parameters and VERSION change together between begin and end (the seqlock)."""
    seen = []

    @contextlib.contextmanager
    def write():
        sh.header[SEQ] += 1
        seen.append(("begin", int(sh.header[VERSION])))
        yield
        seen.append(("end", int(sh.header[VERSION])))
        sh.header[SEQ] += 1

    sh = shard(write=write)
    Aggregate(make_rule("sgd", N))([push(0, np.ones(N))], sh)
    assert seen == [("begin", 10), ("end", 11)] and sh.header[SEQ] % 2 == 0


def test_a_shard_without_the_phase_counts_pushes_without_touching_parameters():
    """S > 1: a server rank holding nothing of the phase still versions the push."""
    sh = shard(rng=(0, 0))
    out = Aggregate(make_rule("sgd", N))([push(0, np.zeros(0), lo=0, hi=0)], sh)
    assert out.results == {0: APPLIED} and sh.header[VERSION] == 11
    np.testing.assert_array_equal(sh.params, np.ones(N))


@pytest.mark.parametrize(
    ("k_eff", "want"),
    [
        (1.0, (0.2, 0.9)),  # no asynchrony: the schedule as it is
        (2.0, (0.2, 0.8)),  # mu' = 1 - K (1 - mu)
        (4.0, (0.2, 0.6)),
        (10.0, (0.2, 0.0)),  # the implicit momentum alone is 0.9
        (40.0, (0.05, 0.0)),  # beyond: the lr shrinks, lr / (K (1 - mu))
        (0.5, (0.2, 0.9)),  # K_eff < 1 is treated as 1
    ],
)
def test_compensate_keeps_the_effective_step_of_momentum_sgd(k_eff, want):
    lr, mu = compensate(0.2, 0.9, k_eff)
    assert lr == pytest.approx(want[0]) and mu == pytest.approx(want[1], abs=1e-12)
    # the invariant: lr' / (1 - mu_total) == lr / (1 - mu), with 1 - mu_total = (1 - mu') / K
    k = max(k_eff, 1.0)
    assert lr / ((1 - mu) / k) == pytest.approx(0.2 / (1 - 0.9))


class _Recorder:
    """An update rule that records the (lr, momentum) it is applied with."""

    size = N

    def __init__(self):
        self.calls = []

    def apply(self, params, step, lr, momentum, lo):
        self.calls.append((lr, momentum))


def test_compensate_applies_the_momentum_of_the_running_mean_staleness():
    """tau = 3 on every push: K_eff tends to 4, so momentum 0.9 is applied as 0.6."""
    rule = _Recorder()
    agg = Aggregate(rule, staleness_lr="compensate")
    for v in range(10, 400):
        sh = shard(version=v)
        sh.momentum = 0.9
        agg([push(0, np.ones(N), pulled=v - 3)], sh)
    lr, mu = rule.calls[-1]
    assert agg.tau_mean == pytest.approx(3.0)
    assert lr == 0.5 and mu == pytest.approx(0.6)
    # a synchronous push stream (tau 0) keeps the schedule's momentum
    rule0 = _Recorder()
    agg0 = Aggregate(rule0, staleness_lr="compensate")
    sh = shard()
    sh.momentum = 0.9
    agg0([push(0, np.ones(N), pulled=10)], sh)
    assert rule0.calls == [(0.5, 0.9)]


@pytest.mark.parametrize(("lr", "mu"), [(0.2, 0.9), (0.1, 0.5), (0.3, 0.0)])
def test_a_whole_step_is_the_schedule_as_it_is(lr, mu):
    assert fractional_step(lr, mu, 1.0) == pytest.approx((lr, mu))


def test_fractional_steps_forget_and_advance_like_whole_steps_per_sample():
    """32 momentum updates of w = 1/32 (gradients weighted by w) == 1 whole step, per sample.

    Forgetting: 32 updates with no gradient decay the velocity by mu, like one step.
    Progress: under a constant gradient both reach the same steady step per sample,
    lr g / (1 - mu) per whole step's worth of samples."""
    lr, mu, k = 0.2, 0.9, 32
    lr_w, mu_w = fractional_step(lr, mu, 1 / k)
    assert mu_w**k == pytest.approx(mu)
    v = 1.0
    for _ in range(k):
        v = mu_w * v
    assert v == pytest.approx(mu)
    g, v_whole, v_frac, whole, frac = 1.0, 0.0, 0.0, 0.0, 0.0
    for _ in range(200):  # 200 steps' worth of samples each way
        v_whole = mu * v_whole - lr * g
        whole += v_whole
        for _ in range(k):
            v_frac = mu_w * v_frac - lr_w * (g / k)
            frac += v_frac
    assert frac == pytest.approx(whole, rel=0.02)
    assert whole / 200 == pytest.approx(-lr * g / (1 - mu), rel=0.06)


def test_split_batch_weighs_each_push_by_its_samples_and_steps_by_the_batch():
    """Batch 100 shared by 4 workers: 4 pushes of 25 samples weigh 1/4 each, and the
    rule gets the lr and momentum of one whole step (w = 100/100)."""
    rule = _Recorder()
    sh = shard(lr=0.2)
    sh.momentum, sh.batch = 0.9, 100
    grads = [np.full(N, float(w + 1), np.float32) for w in range(4)]
    captured = []
    rule.apply = lambda p, g, lr, mom, lo: captured.append((g.copy(), lr, mom))
    Aggregate(rule, split_batch=True)([push(w, g, n=25) for w, g in enumerate(grads)], sh)
    ((g, lr, mom),) = captured
    np.testing.assert_allclose(g, np.full(N, (1 + 2 + 3 + 4) / 4))  # the batch's mean gradient
    assert (lr, mom) == pytest.approx((0.2, 0.9))
    # one push of 25 samples alone: a quarter step
    captured.clear()
    Aggregate(rule, split_batch=True)([push(0, grads[1], n=25)], sh)
    ((g, lr, mom),) = captured
    np.testing.assert_allclose(g, np.full(N, 2 / 4))
    assert (lr, mom) == pytest.approx(fractional_step(0.2, 0.9, 0.25))
    # without split_batch the same push is a whole step
    captured.clear()
    Aggregate(rule)([push(0, grads[1], n=25)], sh)
    assert captured[0][1:] == (0.2, 0.9) and captured[0][0][0] == 2.0


def test_split_batch_compensate_counts_staleness_in_whole_steps():
    """Pushes of 25 samples of a 100-sample batch, each 4 pushes stale: tau = 1 step, so
    K_eff tends to 2 and momentum 0.9 is applied as 0.8 (in pushes it would be 5: 0.5)."""
    rule = _Recorder()
    agg = Aggregate(rule, staleness_lr="compensate", split_batch=True)
    for v in range(10, 400):
        sh = shard(version=v)
        sh.momentum, sh.batch = 0.9, 100
        agg([push(0, np.ones(N), pulled=v - 4, n=25)], sh)
    assert agg.tau_mean == pytest.approx(1.0)
    lr_w, mu_w = fractional_step(0.5, 0.9, 0.25)
    assert rule.calls[-1] == pytest.approx(compensate(lr_w, mu_w, 2.0))


@pytest.mark.parametrize("rule_name", ["sgd", "momentum"])
def test_push_weights_ride_on_the_lr_of_a_linear_rule_with_the_same_result(rule_name):
    """SGD and momentum are linear in the gradient, so the handle folds the pushes'
    weights into the lr (no scaling pass): the parameters come out as with the
    explicitly weighted sum, for one weighted push, equal weights, and mixed ones."""
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]

    def run(pushes, *, inverse=False):
        rule = "inverse" if inverse else "none"
        agg = Aggregate(make_rule(rule_name, N), staleness_lr=rule, split_batch=True)
        sh = shard(lr=0.5)
        sh.momentum, sh.batch = 0.9, 100
        agg(pushes, sh)
        return sh.params.copy()

    # one push of 25 samples of a 100-sample batch: a quarter of its gradient, a quarter step
    lr_w, _ = fractional_step(0.5, 0.9, 0.25)  # fresh velocity: the step is lr_w * g / 4
    got = run([push(0, grads[0], n=25)])
    np.testing.assert_allclose(got, 1 - lr_w * grads[0] / 4, rtol=1e-5, atol=1e-6)
    # ... and the push's own buffer went to the rule, its weight in the lr
    lone = push(0, grads[0], n=25)
    g, scale = Aggregate(make_rule(rule_name, N)).sum([lone], 10, 0, N, per=100)
    assert g is lone.grad and scale == 0.25
    # three pushes of 25: 3/4 of a step on the sum of their quarter gradients
    lr_w, _ = fractional_step(0.5, 0.9, 0.75)
    got = run([push(w, g, n=25) for w, g in enumerate(grads)])
    np.testing.assert_allclose(got, 1 - lr_w * sum(grads) / 4, rtol=1e-5, atol=1e-5)
    # mixed weights (inverse: tau 0, 2, 4 -> 1, 1/2, 1/4, each n / per = 1/2)
    pushes = [push(w, g, n=50, pulled=10 - 2 * w) for w, g in enumerate(grads)]
    lr_w, _ = fractional_step(0.5, 0.9, 1.5)
    want = 1 - lr_w * (grads[0] / 2 + grads[1] / 4 + grads[2] / 8)
    np.testing.assert_allclose(run(pushes, inverse=True), want, rtol=1e-5, atol=1e-5)
