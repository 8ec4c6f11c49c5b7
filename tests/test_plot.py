"""`psctl plot` and DBN sampling, on a real tiny `psctl run` job and a tiny local model."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_job, write_config

from dbnps.cli import main
from dbnps.common.config import load
from dbnps.common.job import layout_of, load_data
from dbnps.common.model import load_model, save_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY = {
    "model": {"sizes": [784, 32, 32]},
    "data": {"train_subset": 1000, "test_subset": 300},
    "pretrain": {"epochs": 1.0, "batch_size": 20},
    "finetune": {"epochs": 2.0, "batch_size": 20, "lr": 0.2},
    "run": {"eval_every_epochs": 0.5},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plot")
    res = run_job(write_config(tmp / "tiny.toml", TINY), tmp / "run", workers=1, timeout=120)
    assert res.rc == 0, res.output
    return res.run_dir


def psctl(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_png(path, min_bytes=15_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_curves_from_run_dir_summary_and_model(run_dir, tmp_path):
    for i, src in enumerate([run_dir, run_dir / "summary.json", run_dir / "model.npz"]):
        out = tmp_path / f"curves{i}.png"
        r = psctl("plot", "curves", src, "-o", out)
        assert r.exit_code == 0, r.output
        assert_png(out)
        assert png_size(out)[0] > 1000  # three panels side by side
    # default output name next to the source
    assert psctl("plot", "curves", run_dir).exit_code == 0
    assert_png(run_dir / "curves.png")


def test_curves_from_local_trainer_history(tmp_path):
    from dbnps import plots
    from dbnps.common.trainer import train_local

    cfg = load(write_config(tmp_path / "t.toml", TINY))
    params, history = train_local(cfg, load_data(cfg), progress=False, log=lambda *_: None)
    meta = {"trainer": "local", "test_acc": history[-1]["test_acc"], "history": history}
    model = save_model(tmp_path / "local.npz", layout_of(cfg), params.flat, cfg, meta)
    records, info = plots.load_history(model)
    assert info["trainer"] == "local"
    assert records[0]["phase"] == "pretrain-1"
    assert any(np.isfinite(r["acc"]) for r in records)
    r = psctl("plot", "curves", model)
    assert r.exit_code == 0, r.output
    assert_png(tmp_path / "local-curves.png")


@pytest.mark.parametrize("n", [1, 10, 16, 32])
def test_tile_grid_dimensions(n):
    from dbnps.plots import grid_shape, tile_grid

    rng = np.random.default_rng(n)
    tiles = rng.standard_normal((n, 28, 28)).astype(np.float32) * 5
    img = tile_grid(tiles, normalise=True)
    rows, cols = grid_shape(n)
    assert rows * cols >= n > (rows - 1) * cols
    assert img.shape == (rows * 29 + 1, cols * 29 + 1)
    assert img.dtype == np.float32
    # every tile is normalised on its own to exactly [0, 1]
    for i in range(n):
        r, c = divmod(i, cols)
        tile = img[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)]
        assert tile.shape == (28, 28)
        assert tile.min() == 0.0 and tile.max() == 1.0


def test_filters_png(run_dir, tmp_path):
    out = tmp_path / "f.png"
    r = psctl("plot", "filters", run_dir / "model.npz", "-o", out, "--n", 16)
    assert r.exit_code == 0, r.output
    assert_png(out, min_bytes=10_000)
    # --n larger than the layer: clipped to its 32 hidden units, not an error
    r = psctl("plot", "filters", run_dir / "model.npz", "-o", tmp_path / "g.png", "--n", 500)
    assert r.exit_code == 0, r.output
    assert_png(tmp_path / "g.png", min_bytes=10_000)


def test_samples_png(run_dir, tmp_path):
    for extra in (["--label", 3], ["--init", "random"]):
        out = tmp_path / f"s{extra[1]}.png"
        r = psctl("plot", "samples", run_dir / "model.npz", "-o", out, "--gibbs", 5, "--n", 16,
                  *extra)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert_png(out, min_bytes=10_000)


def test_sampling_shape_range_determinism(run_dir, tmp_path):
    from dbnps.common.sampling import gibbs_top, sample_digits, top_start

    layout, p, _, _ = load_model(run_dir / "model.npz")
    data = load_data(load(write_config(tmp_path / "t.toml", TINY)))
    X, y = data.X_train, data.y_train

    def draw(seed, **kw):
        return sample_digits(p, 12, np.random.default_rng(seed), gibbs=7, X=X, y=y, **kw)

    s1, idx1 = draw(5)
    s2, idx2 = draw(5)
    s3, _ = draw(6)
    assert s1.shape == (12, 784) and s1.dtype == np.float32
    assert np.all(s1 >= 0) and np.all(s1 <= 1)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(idx1, idx2)
    assert not np.array_equal(s1, s3)
    _, idx4 = draw(5, label=7)
    assert np.all(y[idx4] == 7)
    s5, idx5 = draw(5, init="random")
    assert idx5 is None and s5.shape == (12, 784) and s5.dtype == np.float32
    # zero Gibbs steps: the start state itself (up-pass of the images)
    v0, _ = top_start(p, 3, np.random.default_rng(0), X=X)
    np.testing.assert_array_equal(gibbs_top(p, v0, np.random.default_rng(1), 0), v0)
    assert v0.shape == (3, layout.sizes[-2])
    with pytest.raises(ValueError):
        top_start(p, 3, np.random.default_rng(0), X=X, label=3)  # labels missing


def test_bad_inputs_one_error_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "summary.json"
    broken.write_text("{ not json")
    cases = [
        ("plot", "filters", tmp_path / "missing.npz"),
        ("plot", "filters", bad),
        ("plot", "samples", bad, "--gibbs", 1),
        ("plot", "curves", tmp_path / "missing"),
        ("plot", "curves", empty),
        ("plot", "curves", broken),
    ]
    for args in cases:
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.output
