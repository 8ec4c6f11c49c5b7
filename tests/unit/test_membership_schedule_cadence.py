"""Membership, the phase schedule and the worker's push cadence, in-process."""

from __future__ import annotations

import numpy as np
import pytest

from dbnps.common.config import from_dict
from dbnps.common.membership import Membership, live_shard, solo_worker
from dbnps.common.protocol import (
    DEAD,
    HEARTBEAT,
    LOSS,
    MEMBERS,
    ST_WORDS,
    STATE,
    STATE_DONE,
    STATE_RUNNING,
    STEPS,
    Header,
    dead_set,
    header_words,
    mark_dead,
)
from dbnps.common.schedule import PhaseSchedule, fractional_step, solo_samples
from dbnps.common.updaters import Momentum
from dbnps.worker.cadence import Cadence


def rows(beats, states):
    st = np.zeros((len(beats), ST_WORDS))
    st[:, HEARTBEAT], st[:, STATE] = beats, states
    return st


def test_a_silent_worker_is_marked_dead_once_and_a_done_one_never():
    m = Membership(3, timeout_s=5.0, start_time=100.0)
    stats = rows([101, 101, 101], [STATE_RUNNING, STATE_DONE, STATE_RUNNING])
    assert m.observe(stats, now=104.0) == []
    stats[2, HEARTBEAT] = 108.0
    dead = m.observe(stats, now=110.0)
    assert [w for w, _ in dead] == [0] and "no heartbeat for 9s" in dead[0][1]
    assert m.observe(stats, now=120.0) == [(2, "no heartbeat for 12s")]  # 0 is not reported again
    assert [m.state(w) for w in range(3)] == ["lost", "done", "lost"]
    assert m.all_left


def test_a_worker_that_never_reports_counts_from_the_server_start():
    m = Membership(2, timeout_s=5.0, start_time=100.0)
    stats = rows([0, 103], [0, STATE_RUNNING])
    assert m.state(0) == "starting" and m.up(0)  # the one rule: starting counts as up
    assert [w for w, _ in m.observe(stats, now=106.0)] == [0]
    assert not m.up(0) and m.up(1) and not m.all_left


def test_the_mean_loss_skips_workers_that_have_not_stepped():
    """A warm start's waiting workers heartbeat with no loss yet (NaN): the log said
    `loss nan` for every solo pretraining phase at K = 32."""
    m = Membership(3, timeout_s=5.0, start_time=100.0)
    stats = rows([101, 101, 101], [STATE_RUNNING] * 3)
    stats[:, LOSS] = [0.25, np.nan, np.nan]
    stats[:, STEPS] = [40, 0, 0]
    m.observe(stats, now=102.0)
    assert m.loss == pytest.approx(0.25)
    stats[1, LOSS], stats[1, STEPS] = 0.75, 3
    m.observe(stats, now=102.0)
    assert m.loss == pytest.approx(0.5)
    stats[:, STEPS] = 0
    m.observe(stats, now=102.0)
    assert np.isnan(m.loss)


def test_dead_workers_shards_are_redealt_over_the_survivors():
    assert live_shard(2, set(), 4) == (2, 4)
    assert live_shard(2, {1}, 4) == (1, 3)
    assert live_shard(3, {0, 1}, 4) == (1, 2)
    assert live_shard(1, {1}, 4) is None


def test_the_dead_bitmask_and_membership_counter():
    words = np.zeros(header_words(130), dtype=np.int64)
    for w in (0, 64, 129):
        mark_dead(words, w)
    assert dead_set(words, 130) == {0, 64, 129} and words[MEMBERS] == 3
    assert words[DEAD + 2] == 2  # bit 1 of the third word: worker 129
    assert Header(words, 130).dead == {0, 64, 129}


def schedule(pretrain=2.0, finetune=3.0, layers=2, n=100):
    cfg = from_dict(
        {
            "model": {"sizes": [784] + [16] * layers},
            "pretrain": {"epochs": pretrain},
            "finetune": {"epochs": finetune},
        }
    )
    return PhaseSchedule(cfg, layers, n)


def test_phase_boundaries_by_samples_applied():
    s = schedule()
    assert [s.samples(p) for p in range(4)] == [200, 200, 300, 0]
    assert not s.over(0, 199) and s.over(0, 200) and s.over(0, 250)
    assert s.after(0) == 1 and s.after(1) == 2 and s.after(2) == 3 == s.done_phase
    assert not s.over(s.done_phase, 10**9)  # done never ends


def test_phases_of_zero_epochs_are_skipped():
    s = schedule(pretrain=0.0)
    assert s.first_from(0) == 2  # straight to fine-tuning
    assert schedule(pretrain=0.0, finetune=0.0).first_from(0) == 3


def test_cadence_n_push_1_pushes_the_gradient_itself_every_step():
    c = Cadence(2, 1)
    g = np.arange(4, dtype=np.float32)
    assert c.step(g, 0, 4, 10) is g and c.samples == 10
    assert not c.pull_due
    assert c.step(g, 0, 4, 10) is g and c.pull_due


def test_cadence_n_push_3_sums_three_steps_and_their_samples():
    acc = np.full(6, 99, dtype=np.float32)  # stale contents outside [lo, hi) stay unread
    c = Cadence(1, 3, acc)
    grads = [np.full(6, v, dtype=np.float32) for v in (1.0, 2.0, 4.0)]
    assert c.step(grads[0], 2, 5, 10) is None
    assert c.step(grads[1], 2, 5, 20) is None
    out = c.step(grads[2], 2, 5, 30)
    assert out is acc and c.samples == 60
    np.testing.assert_array_equal(out[2:5], 7.0)
    assert c.step(grads[0], 2, 5, 1) is None  # a new sum starts after the push
    np.testing.assert_array_equal(acc[2:5], 1.0)


def test_cadence_n_push_above_1_needs_a_buffer():
    with pytest.raises(ValueError, match="buffer"):
        Cadence(1, 2)


def test_warm_start_samples_per_phase_and_capped_by_the_phase():
    cfg = from_dict(
        {
            "pretrain": {"epochs": 2.0},
            "finetune": {"epochs": 10.0},
            "ps": {"pretrain_solo_epochs": 5.0, "solo_epochs": 1.5},
        }
    )
    # 3 RBMs: the whole of each 2-epoch RBM alone (5 > 2), then 1.5 of 10 fine-tuning epochs
    assert [solo_samples(cfg, p, 3, 1000, 2) for p in range(4)] == [2000, 2000, 2000, 1500]
    assert solo_samples(from_dict({}), 3, 3, 1000, 2) == 0  # default: no warm start


@pytest.mark.parametrize(
    ("k", "ps", "solo"),
    [
        (2, {}, 0),  # auto, whole batches
        (16, {}, 0),  # auto, shared batch, at the measured limit
        (17, {}, 2000),  # auto, above it: every pretraining epoch alone
        (32, {}, 2000),
        (32, {"split_batch": "off"}, 0),  # whole batches: auto does not warm-start
        (32, {"pretrain_solo_epochs": 0.5}, 500),  # a number wins at any K
        (32, {"pretrain_solo_epochs": 0}, 0),
    ],
)
def test_auto_warm_start_pretrains_alone_above_sixteen_workers_sharing_the_batch(k, ps, solo):
    cfg = from_dict({"pretrain": {"epochs": 2.0}, "ps": ps})
    assert [solo_samples(cfg, p, 3, 1000, k) for p in range(3)] == [solo] * 3
    assert solo_samples(cfg, 3, 3, 1000, k) == 0  # fine-tuning: solo_epochs (0)


def test_pretrain_solo_epochs_takes_auto_or_a_number_only():
    from dbnps.common.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrain_solo_epochs must be a number"):
        from_dict({"ps": {"pretrain_solo_epochs": "half"}})


def test_the_solo_worker_is_the_lowest_live_one():
    assert solo_worker(4, set()) == 0
    assert solo_worker(4, {0, 1}) == 2  # worker 0 died during its warm start: 2 takes over
    assert solo_worker(2, {0, 1}) is None


@pytest.mark.parametrize("key", ["solo_epochs", "pretrain_solo_epochs"])
def test_negative_warm_start_is_refused_naming_the_key(key):
    from dbnps.common.errors import ConfigError

    with pytest.raises(ConfigError, match=f"ps\\] {key} must be >= 0"):
        from_dict({"ps": {key: -1.0}})


def _displacements(k: int, lr: float, mu: float, grads: np.ndarray, match: bool) -> np.ndarray:
    """Parameter after each global push: k workers in turn, each its own Momentum
    rule (accumulate mode), with the schedule's (lr, mu) matched or as they are."""
    lr_w, mu_w = fractional_step(lr, mu, k) if match else (lr, mu)
    rules = [Momentum(1) for _ in range(k)]
    p, out = 0.0, []
    for i, g in enumerate(grads):
        p += float(rules[i % k].delta(np.array([g], np.float32), lr_w, mu_w)[0])
        out.append(p)
    return np.array(out)


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_matched_workers_move_the_parameters_as_the_servers_one_velocity(k):
    """k workers in accumulate mode, each with its own velocity, against the server's one
    (k = 1): one gradient's effect, summed over each stretch of k pushes, is the server's;
    a constant gradient reaches the same speed.  Unmatched, the workers remember k times
    longer: the gradient still moves the parameters after the server's would have stopped."""
    lr, mu, n = 0.1, 0.9, 64 * k
    impulse = np.zeros(n)
    impulse[0] = 1.0
    server = _displacements(1, lr, mu, impulse, match=True)
    mine = _displacements(k, lr, mu, impulse, match=True)
    ends = np.arange(k - 1, n, k)  # the last push of each stretch
    np.testing.assert_allclose(mine[ends], server[ends], rtol=1e-4)
    assert mine[-1] == pytest.approx(-lr / (1 - mu), rel=1e-3)
    unmatched = _displacements(k, lr, mu, impulse, match=False)
    at = round(2 / (1 - mu))  # two of the server's time constants: 88% of the effect in
    assert abs(unmatched[at]) < 0.8 * abs(server[at])
    const = np.ones(n)
    speed = np.diff(_displacements(k, lr, mu, const, match=True))[-k:].mean()
    assert speed == pytest.approx(-lr / (1 - mu), rel=1e-3)


@pytest.mark.parametrize(("lr", "mu", "k"), [(0.1, 0.9, 1), (0.2, 0.0, 4), (0.3, 0.5, 1)])
def test_matching_is_the_identity_for_one_worker_or_no_momentum(lr, mu, k):
    assert fractional_step(lr, mu, k) == pytest.approx((lr, mu))


def test_matched_values_at_two_workers():
    assert fractional_step(0.1, 0.9, 2) == pytest.approx((0.19, 0.81))
    assert fractional_step(0.1, 0.5, 2) == pytest.approx((0.15, 0.25))
