"""StepGradient, the single-process trainer, model files and `psctl train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbnps.common.config import from_dict
from dbnps.common.errors import DataError
from dbnps.common.job import step_rng
from dbnps.common.layout import Layout
from dbnps.common.model import load_model, save_model
from dbnps.common.steps import StepGradient
from dbnps.common.trainer import train_local

ROOT = Path(__file__).resolve().parents[1]
PSCTL = str(Path(sys.executable).parent / "psctl")
SMALL = ROOT / "configs" / "small.toml"
SMALL_MIN_ACC = 0.90  # configs/small.toml reaches ~0.92 on its 2000 test images


@pytest.fixture(scope="module")
def mnist():
    from dbnps.common.mnist import load_mnist

    return load_mnist()


def tiny_cfg(**finetune):
    return from_dict(
        {
            "model": {"sizes": [784, 24, 16]},
            "data": {"train_subset": 300, "test_subset": 200},
            "pretrain": {"epochs": 1.0, "batch_size": 10},
            "finetune": {
                "epochs": 6.0,
                "batch_size": 10,
                "lr": 0.3,
                "momentum_switch_epoch": 1.0,
                **finetune,
            },
        }
    )


def grads_of(sg: StepGradient, layout: Layout, params, phases, steps=5):
    out = []
    for phase in phases:
        sg.begin_phase(phase, params)
        for i in range(steps):
            g = layout.views(np.full(layout.size, np.nan, np.float32))
            loss, n = sg.step(params, g, epoch=i / 10)
            out.append((phase, loss, n, g.flat.copy()))
    return out


def test_same_seed_same_gradient_sequence(mnist):
    cfg = tiny_cfg(dropout=0.5, input_dropout=0.2)
    layout = Layout(cfg.model.sizes)
    X, y = mnist.X_train[:300], mnist.y_train[:300]
    params = layout.init(np.random.default_rng(0))
    runs = [
        grads_of(StepGradient(layout, cfg, X, y, step_rng(7, 0)), layout, params, [0, 1, 2])
        for _ in range(2)
    ]
    for (pa, la, na, ga), (pb, lb, nb, gb) in zip(*runs, strict=True):
        assert (pa, la, na) == (pb, lb, nb)
        np.testing.assert_array_equal(ga, gb)
    other = grads_of(StepGradient(layout, cfg, X, y, step_rng(7, 1)), layout, params, [0])
    assert not np.array_equal(other[0][3], runs[0][0][3])


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_step_writes_exactly_the_phase_range(mnist, phase):
    cfg = tiny_cfg(warmup_epochs=0.05)
    layout = Layout(cfg.model.sizes)
    params = layout.init(np.random.default_rng(0))
    sg = StepGradient(layout, cfg, mnist.X_train[:300], mnist.y_train[:300], step_rng(0))
    sg.begin_phase(phase, params)
    lo, hi = layout.phase_range(phase)
    for epoch in (0.0, 1.0):  # fine-tune: warm-up (softmax only), then the whole stack
        g = layout.views(np.full(layout.size, np.nan, np.float32))
        loss, n = sg.step(params, g, epoch=epoch)
        assert n == 10 and np.isfinite(loss)
        assert np.all(np.isfinite(g.flat[lo:hi]))
        assert np.all(np.isnan(g.flat[:lo])) and np.all(np.isnan(g.flat[hi:]))
        if phase == layout.finetune_phase:
            for vb in g.vb:
                np.testing.assert_array_equal(vb, 0)
            stack_zero = not np.any(g.flat[: layout.slice_of("W_out")[0]])
            assert stack_zero == (epoch < 0.05)


def test_minibatches_walk_a_permutation_and_drop_the_tail(mnist):
    cfg = from_dict({"model": {"sizes": [784, 8]}, "finetune": {"batch_size": 20}})
    layout = Layout(cfg.model.sizes)
    X, y = mnist.X_train[:50], mnist.y_train[:50]
    sg = StepGradient(layout, cfg, X, y, np.random.default_rng(3))
    sg.begin_phase(layout.finetune_phase, layout.init(np.random.default_rng(0)))
    assert sg.steps_per_pass() == 2
    ref = np.random.default_rng(3)
    p1, p2 = ref.permutation(50), ref.permutation(50)
    got = [sg._next_indices().copy() for _ in range(3)]
    np.testing.assert_array_equal(got[0], p1[:20])
    np.testing.assert_array_equal(got[1], p1[20:40])
    np.testing.assert_array_equal(got[2], p2[:20])  # p1[40:50] dropped: new pass


def test_train_local_is_deterministic_and_learns(mnist):
    cfg = tiny_cfg()
    logs: list[str] = []
    p1, h1 = train_local(cfg, mnist, progress=False, log=logs.append)
    p2, _ = train_local(cfg, mnist, progress=False, log=lambda _: None)
    np.testing.assert_array_equal(p1.flat, p2.flat)  # bit-identical
    cfg.run.seed = 1
    p3, _ = train_local(cfg, mnist, progress=False, log=lambda _: None)
    assert not np.array_equal(p1.flat, p3.flat)
    phases = [h["phase"] for h in h1]
    assert phases == ["pretrain-1", "pretrain-2"] + ["finetune"] * 6
    assert all(h["test_acc"] is not None for h in h1[2:])
    assert h1[-1]["test_acc"] > 0.3  # 300 images, 180 steps: ~0.4 (chance 0.1)
    assert any("test acc" in line for line in logs)


def test_max_steps_caps_training(mnist):
    cfg = tiny_cfg()
    cfg.run.max_steps = 33  # pretrain-1 has 30 steps: stop 3 into pretrain-2
    seen = []
    p, hist = train_local(
        cfg, mnist, progress=False, log=lambda _: None, on_epoch=lambda r, _: seen.append(r)
    )
    assert hist == seen
    assert [h["phase"] for h in hist] == ["pretrain-1"]
    assert hist[-1]["steps"] == 30
    layout = Layout(cfg.model.sizes)
    fresh = layout.init(np.random.default_rng(0))
    assert not np.array_equal(p.W[1], fresh.W[1])  # 3 steps of pretrain-2 happened
    np.testing.assert_array_equal(p.W_out, fresh.W_out)  # fine-tuning never started


def test_model_roundtrip_and_corruption(tmp_path):
    layout = Layout([784, 12, 6])
    p = layout.init(np.random.default_rng(0))
    cfg = tiny_cfg()
    path = save_model(tmp_path / "m.npz", layout, p.flat, cfg, {"test_acc": 0.5})
    lay2, p2, cfg2, meta = load_model(path)
    assert lay2.sizes == layout.sizes and lay2.n_classes == 10
    np.testing.assert_array_equal(p2.flat, p.flat)
    assert cfg2["model"]["sizes"] == [784, 24, 16] and meta == {"test_acc": 0.5}
    assert [f.name for f in tmp_path.iterdir()] == ["m.npz"]  # no temp file left

    data = path.read_bytes()
    bad = tmp_path / "trunc.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_model(bad)
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DataError):
        load_model(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a dbnps model"):
        load_model(tmp_path / "other.npz")
    with pytest.raises(DataError, match="not found"):
        load_model(tmp_path / "missing.npz")


def psctl(*args, cwd=None, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [PSCTL, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[finetune]\nlr = -1\n", "[finetune] lr must be > 0"),
        ("[pretrain]\nbogus = 1\n", "unknown config key [pretrain] bogus"),
        ("[model]\nsizes = [784, 'x']\n", "[model] sizes must be a list of integers"),
        ("not = [valid", "not valid TOML"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, toml, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    r = psctl("train", "--local", "--config", str(cfg), "--threads", "1", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_needs_local_and_an_existing_config(tmp_path):
    r = psctl("train", "--config", str(SMALL), cwd=tmp_path)
    assert r.returncode == 2 and "psctl run" in r.stderr and "Traceback" not in r.stderr
    r = psctl("train", "--local", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.toml'}"


def test_cli_train_local_small_end_to_end(tmp_path):
    out = tmp_path / "model.npz"
    r = psctl(
        "train", "--local", "--config", str(SMALL), "--out", str(out),
        "--threads", "1", "--no-progress",
        cwd=tmp_path, env_extra={"OPENBLAS_NUM_THREADS": "2"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and str(out) in r.stdout
    layout, params, cfg, meta = load_model(out)
    assert layout.sizes == (784, 64, 64)
    assert meta["blas_threads"] == "1"  # --threads re-executed with the variable set
    assert meta["test_acc"] >= SMALL_MIN_ACC

    from dbnps.common.dbn import accuracy
    from dbnps.common.mnist import load_mnist

    d = load_mnist()
    n = cfg["data"]["test_subset"]
    assert accuracy(params, d.X_test[:n], d.y_test[:n]) == pytest.approx(meta["test_acc"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_recipe_reaches_98_8(tmp_path):
    """The full 784-500-500-2000-10 recipe (~15 min on 2 cores): >= 98.8% test accuracy."""
    out = tmp_path / "full.npz"
    r = psctl(
        "train", "--local", "--config", str(ROOT / "configs" / "mnist-dbn.toml"),
        "--out", str(out), "--threads", "1", "--no-progress",
        cwd=tmp_path, timeout=3600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_model(out)[3]["test_acc"] >= 0.988
