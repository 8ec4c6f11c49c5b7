"""`psctl bench scaling` on real tiny jobs, and `[run] target_accuracy`'s config check.

The early stop itself: tests/test_saved_model.py (one job) and the bench runs below."""

from __future__ import annotations

import csv
import math

import pytest
from click.testing import CliRunner
from conftest import write_config

from dbnps.cli import main
from dbnps.common.config import from_dict
from dbnps.common.errors import ConfigError, UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 784-64-64 on 2000 images: test accuracy passes 0.6 within ~2 fine-tuning epochs.
TINY = {
    "model": {"sizes": [784, 64, 64]},
    "data": {"train_subset": 2000, "test_subset": 500},
    "pretrain": {"epochs": 1.0, "batch_size": 20, "momentum_switch_epoch": 1.0},
    "finetune": {"epochs": 30.0, "batch_size": 20, "lr": 0.2, "momentum_switch_epoch": 1.0},
    "run": {"eval_every_epochs": 0.5},
}
TARGET = 0.6


def test_target_accuracy_config_validation():
    assert from_dict({}).run.target_accuracy == 0.0
    assert from_dict({"run": {"target_accuracy": 0.97}}).run.target_accuracy == 0.97
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="target_accuracy"):
            from_dict({"run": {"target_accuracy": bad}})


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, path


def test_bench_scaling_until_target(tmp_path):
    cfg = write_config(tmp_path / "t.toml", TINY)
    out = tmp_path / "scal"
    args = ["bench", "scaling", "--workers", "1,2", "--config", str(cfg)]
    args += ["--target-accuracy", str(TARGET), "--out", str(out), "--timeout", "120"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "scaling.csv")
    assert [int(x["workers"]) for x in rows] == [1, 2]
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[0]["efficiency"]) == 1.0
    for x in rows:
        assert x["reached"] == "True"
        assert 0 < float(x["time_s"]) == float(x["time_to_target_s"]) <= float(x["train_s"])
        assert float(x["epochs_to_target"]) < 15
        assert float(x["samples_per_s"]) > 0 and float(x["updates_per_s"]) > 0
        assert float(x["final_accuracy"]) > 0.3
    t1, t2 = float(rows[0]["time_s"]), float(rows[1]["time_s"])
    assert math.isclose(float(rows[1]["speedup"]), t1 / t2, rel_tol=1e-4)
    assert_png(out / "scaling-time.png")
    assert_png(out / "scaling-speedup.png")
    assert "| # workers |" in r.output and "speed-up" in r.output
    assert (out / "k02" / "summary.json").is_file()
    assert "target_accuracy = 0.6" in (out / "config.toml").read_text()


def test_bench_scaling_fixed_epochs(tmp_path):
    cfg = write_config(tmp_path / "t.toml", TINY)
    out = tmp_path / "fixed"
    args = ["bench", "scaling", "--workers", "1", "--config", str(cfg), "--epochs", "1"]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    (row,) = read_csv(out / "scaling.csv")
    assert float(row["finetune_epochs"]) == pytest.approx(1.0, abs=0.05)
    assert float(row["time_s"]) == float(row["train_s"]) > 0
    assert row["reached"] == "False" and float(row["speedup"]) == 1.0


def test_scaling_arguments():
    from dbnps.scaling import add_speedup, parse_workers

    assert parse_workers("4,1,2,2") == [1, 2, 4]
    for bad in ("2,4", "1,x", "0,1", ""):
        with pytest.raises(UserError):
            parse_workers(bad)
    rows = [{"workers": 1, "time_s": 10.0}, {"workers": 4, "time_s": 4.0},
            {"workers": 8, "time_s": math.nan}]  # fmt: skip
    add_speedup(rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == 2.5
    assert rows[1]["efficiency"] == 0.625 and math.isnan(rows[2]["speedup"])
    r = CliRunner().invoke(main, ["bench", "scaling", "--config", "x.toml", "--workers", "1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
