"""Parameter averaging (`dbnps.common.averaging`), the final lr anneal, and the
average's place in a checkpoint: in-process, no MPI."""

from __future__ import annotations

import numpy as np
import pytest

from dbnps.common.averaging import ParamAverage
from dbnps.common.config import from_dict
from dbnps.common.errors import ConfigError, DataError
from dbnps.common.schedule import hyper


def _iterates(n: int, size: int = 7, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.zeros(size, np.float32)
    out = []
    for _ in range(n):
        p = p + rng.standard_normal(size).astype(np.float32)
        out.append(p.copy())
    return out


def test_ema_every_update_is_the_textbook_ema():
    ps = _iterates(50)
    avg = ParamAverage(7, "ema", decay=0.9, every=1)
    want = ps[0].astype(np.float64)
    avg.observe(ps[0])
    for p in ps[1:]:
        avg.observe(p)
        want = 0.9 * want + 0.1 * p
    np.testing.assert_allclose(avg.avg, want, rtol=1e-5, atol=1e-5)
    assert avg.count == 50 and avg.pending == 0


def test_ema_every_n_samples_every_nth_iterate_with_decay_to_the_n():
    ps = _iterates(40)
    avg = ParamAverage(7, "ema", decay=0.9, every=4)
    took = [avg.observe(p) for p in ps]
    assert took == [i % 4 == 3 for i in range(40)]  # a sample after each 4th update
    samples = ps[3::4]
    want = samples[0].astype(np.float64)
    for p in samples[1:]:
        want = 0.9**4 * want + (1 - 0.9**4) * p
    np.testing.assert_allclose(avg.avg, want, rtol=1e-5, atol=1e-5)
    assert avg.count == 10


def test_a_batch_of_updates_counts_each_update():
    """The server observes once per batch of pushes: n updates weigh as n."""
    a = ParamAverage(3, "ema", decay=0.5, every=3)
    p0, p1 = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert not a.observe(p0, 2)
    assert a.observe(p0, 2)  # 4 >= 3: first sample copies
    assert not a.observe(p1, 1)
    assert a.observe(p1, 4)  # 5 updates since the last sample: weight 1 - 0.5**5
    np.testing.assert_allclose(a.avg, 1 - 0.5**5, rtol=1e-6)


def test_polyak_is_the_plain_mean_of_the_samples():
    ps = _iterates(30)
    avg = ParamAverage(7, "polyak", every=3)
    for p in ps:
        avg.observe(p)
    np.testing.assert_allclose(avg.avg, np.mean(ps[2::3], axis=0), rtol=1e-5, atol=1e-5)


def test_flush_takes_the_updates_since_the_last_sample():
    ps = _iterates(5)
    avg = ParamAverage(7, "polyak", every=3)
    for p in ps:
        avg.observe(p)
    assert avg.count == 1 and avg.pending == 2
    avg.flush(ps[-1])
    np.testing.assert_allclose(avg.avg, (ps[2] + ps[4]) / 2, rtol=1e-6)
    avg.flush(ps[-1])  # nothing pending: no second sample of the same parameters
    assert avg.count == 2


def test_state_round_trips_and_continues_identically():
    ps = _iterates(23)
    a = ParamAverage(7, "ema", decay=0.95, every=5)
    for p in ps[:13]:
        a.observe(p)
    arr, counts = a.state()
    b = ParamAverage(7, "ema", decay=0.95, every=5)
    b.load_state(arr.copy(), dict(counts))
    for p in ps[13:]:
        a.observe(p)
        b.observe(p)
    np.testing.assert_array_equal(a.avg, b.avg)
    assert (a.count, a.pending) == (b.count, b.pending)


def test_reset_forgets_the_average():
    a = ParamAverage(2, "ema", every=1)
    a.observe(np.ones(2, np.float32))
    a.reset()
    assert not a.ready and not a.avg.any() and a.pending == 0


def test_anneal_takes_the_lr_linearly_to_zero_over_the_last_epochs():
    cfg = from_dict({"finetune": {"epochs": 10.0, "lr": 0.4, "lr_decay": 0.5, "anneal_epochs": 4}})
    L = len(cfg.model.sizes) - 1
    lr = lambda e: hyper(cfg, L, L, e)[0]  # noqa: E731
    assert lr(5.5) == pytest.approx(0.4 * 0.5**5)  # before the anneal: the decay only
    assert lr(6.0) == pytest.approx(0.4 * 0.5**6)  # the anneal starts at 1
    assert lr(8.0) == pytest.approx(0.4 * 0.5**8 * 0.5)
    assert lr(10.0) == 0.0
    off = from_dict({"finetune": {"epochs": 10.0, "lr": 0.4}})
    assert hyper(off, L, L, 9.9)[0] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "ps, match",
    [
        ({"average": "swa"}, "average must be one of"),
        ({"average_decay": 1.0}, "average_decay"),
        ({"average_every": 0}, "average_every"),
        ({"average_start_epoch": -1.0}, "average_start_epoch"),
    ],
)
def test_bad_average_settings_are_refused(ps, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"ps": ps})


def test_anneal_longer_than_fine_tuning_is_refused():
    with pytest.raises(ConfigError, match="anneal_epochs"):
        from_dict({"finetune": {"epochs": 3.0, "anneal_epochs": 4.0}})


def _state(average, counts):
    from dbnps.server.checkpoint.format import RULE_STATE_SERVER
    from dbnps.server.checkpoint.snapshot import JobState

    cfg = from_dict({"model": {"sizes": [784, 16]}, "ps": {"average": "ema"}})
    n = 784 * 16 + 16 + 784 + 16 * 10 + 10
    rng = np.random.default_rng(0)
    return JobState(
        params=rng.standard_normal(n).astype(np.float32),
        rule_name="momentum",
        rule_state={"v": rng.random(n).astype(np.float32)},
        rule_state_kept=RULE_STATE_SERVER,
        version=7,
        shard_versions=[7],
        shard_bounds=[(0, n)],
        phase=1,
        phase_names=["pretrain-1", "finetune", "done"],
        samples_in_phase=700,
        phase_samples=60000,
        n_train=60000,
        n_workers=2,
        applied=7,
        rejected={},
        stopped=False,
        next_eval=1.0,
        test_accuracy=float("nan"),
        eval_accuracy=0.5,
        config=cfg.to_dict(),
        seed=0,
        extra={"average": counts} if counts is not None else {},
        average=average(n) if average is not None else None,
    )


def test_a_checkpoint_holds_the_average_and_its_counters(tmp_path):
    from dbnps.server.checkpoint.format import load_checkpoint
    from dbnps.server.checkpoint.snapshot import snapshot
    from dbnps.server.checkpoint.store import CheckpointStore

    avg = np.linspace(-1, 1, 13514, dtype=np.float32)
    counts = {"kind": "ema", "count": 3, "pending": 4}
    info = CheckpointStore(tmp_path).write(snapshot(_state(lambda n: avg[:n], counts)))
    params, rule, meta = load_checkpoint(info.path)
    np.testing.assert_array_equal(meta["average_params"], avg[: params.size])
    assert meta["average"] == counts and set(rule) == {"v"}
    # A job without an average writes none, and reads back none.
    info = CheckpointStore(tmp_path / "b").write(snapshot(_state(None, None)))
    assert "average_params" not in load_checkpoint(info.path)[2]


@pytest.mark.parametrize(
    "average, counts, match",
    [
        (lambda n: np.zeros(n, np.float32), None, "both its array and its counters"),
        (None, {"kind": "ema", "count": 1, "pending": 0}, "both its array and its counters"),
        (
            lambda n: np.zeros(n - 1, np.float32),
            {"kind": "ema", "count": 1, "pending": 0},
            "float32",
        ),
        (
            lambda n: np.full(n, np.nan, np.float32),
            {"kind": "ema", "count": 1, "pending": 0},
            "NaN",
        ),
        (lambda n: np.zeros(n, np.float32), {"kind": "swa", "count": 1, "pending": 0}, "valid"),
        (lambda n: np.zeros(n, np.float32), {"kind": "ema", "count": -1, "pending": 0}, "valid"),
    ],
)
def test_a_bad_average_in_a_checkpoint_is_refused(tmp_path, average, counts, match):
    from dbnps.server.checkpoint.format import load_checkpoint
    from dbnps.server.checkpoint.snapshot import snapshot
    from dbnps.server.checkpoint.store import CheckpointStore

    info = CheckpointStore(tmp_path).write(snapshot(_state(average, counts)))
    with pytest.raises(DataError, match=match):
        load_checkpoint(info.path)
