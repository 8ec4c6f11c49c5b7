"""The model a job saves is the one it reports: target stop and keep-best, real mpiexec jobs."""

from __future__ import annotations

import pytest
from conftest import write_config

from dbnps.common.config import load
from dbnps.common.dbn import accuracy
from dbnps.common.job import load_data
from dbnps.common.model import load_model

BASE = {
    "model": {"sizes": [784, 64]},
    "data": {"train_subset": 3000, "test_subset": 1000},
    "pretrain": {"epochs": 1.0},
    "finetune": {"epochs": 30.0, "lr": 0.5, "momentum_switch_epoch": 1.0},
    "run": {"eval_every_epochs": 0.5},
}


def saved_test_accuracy(cfg_path, run_dir) -> float:
    _, params, _, _ = load_model(run_dir / "model.npz")
    d = load_data(load(cfg_path))
    return accuracy(params, d.X_test, d.y_test)


def close(a: float, b: float, n: int) -> bool:
    # The test recomputes in another process with other BLAS threads: a near-tie
    # may flip one image, never more.
    return abs(a - b) <= 1.5 / n


def test_target_stop_saves_the_parameters_that_reached_the_target(tmp_path, job):
    cfg = write_config(
        tmp_path / "t.toml", {**BASE, "run": {**BASE["run"], "target_accuracy": 0.8}}
    )
    res = job(cfg, workers=2)
    assert res.rc == 0, res.output
    s = res.summary
    assert s["saved"]["which"] == "target" and s["eval_split"] == "test", s["saved"]
    assert s["saved"]["eval_accuracy"] >= 0.8
    # Reported as reached == reported as final == what the saved file scores.
    assert s["test_accuracy"] == s["saved"]["eval_accuracy"]
    assert f"test accuracy {s['test_accuracy']:.4f}" in res.output.replace("accuracy:", "accuracy")
    assert close(saved_test_accuracy(cfg, res.run_dir), s["test_accuracy"], 1000)
    # The stop came from the target, well before the 30 scheduled epochs, right after
    # an evaluation that reached it; the job ended as done, with its model.
    assert s["history"][-1]["epoch"] < 15, s["history"][-1]
    assert any((h.get("test_accuracy") or 0) >= 0.8 for h in s["history"])
    assert s["phase"] == "done" and "target accuracy" in res.output
    assert (res.run_dir / "model.npz").is_file()


def test_keep_best_selects_on_validation_and_reports_test(tmp_path, job):
    sections = {
        **BASE,
        "data": {**BASE["data"], "validation": 500},
        "finetune": {**BASE["finetune"], "epochs": 4.0},
        "run": {**BASE["run"], "keep_best": True},
    }
    cfg = write_config(tmp_path / "b.toml", sections)
    res = job(cfg, workers=2)
    assert res.rc == 0, res.output
    s = res.summary
    assert s["eval_split"] == "validation"
    vals = [h["validation_accuracy"] for h in s["history"] if "validation_accuracy" in h]
    assert len(vals) >= 4 and not any("test_accuracy" in h for h in s["history"])
    assert s["saved"]["which"] == "best"
    assert s["saved"]["eval_accuracy"] >= max(vals)
    assert close(saved_test_accuracy(cfg, res.run_dir), s["test_accuracy"], 1000)
    assert "validation accuracy" in res.output and "best on validation" in res.output


def test_keep_best_without_validation_is_refused(tmp_path):
    from dbnps.common.errors import ConfigError

    cfg = write_config(tmp_path / "x.toml", {"run": {"keep_best": True}})
    with pytest.raises(ConfigError, match="validation"):
        load(cfg)


def test_a_job_stopped_in_pretraining_reports_no_accuracy(tmp_path):
    import json
    import math

    from jobctl import job_env, psctl

    cfg = write_config(
        tmp_path / "p.toml",
        {
            "model": {"sizes": [784, 32]},
            "data": {"train_subset": 2000, "test_subset": 500},
            "pretrain": {"epochs": 1.0e6},
        },
    )
    env = job_env(tmp_path / "state")
    res = psctl("start", "--config", str(cfg), "--job-id", "pre", "--timeout", "80", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        stop = psctl("stop", "--run", "pre", env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        psctl("stop", "--force", "--run", "pre", env=env)
    run_dir = tmp_path / "state" / "runs" / "pre"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["stopped_in"] == "pretrain-1" and math.isnan(s["test_accuracy"])
    log = (run_dir / "job.log").read_text()
    assert "stopped in pretrain-1: not fine-tuned, no test accuracy" in log
    assert "final test accuracy" not in log
    # psctl logs shows the log as psctl run would: no Open MPI banner, no NUL bytes.
    shown = psctl("logs", "--run", "pre", env=env).stdout
    assert "stopped in pretrain-1" in shown and "[server] phase pretrain-1 starts" in shown
    assert "post-failure" in log and "post-failure" not in shown and "\x00" not in shown
    assert "post-failure" in psctl("logs", "--raw", "--run", "pre", env=env).stdout


def test_status_names_the_split_evaluations_use(tmp_path):
    """With a validation split, status and /metrics report validation accuracy, no test number."""
    import json
    import time
    import urllib.request

    from jobctl import job_env, psctl

    cfg = write_config(
        tmp_path / "v.toml",
        {
            "model": {"sizes": [784, 32]},
            "data": {"train_subset": 2500, "test_subset": 500, "validation": 500},
            "pretrain": {"epochs": 0.5},
            "finetune": {"epochs": 1.0e6},
            "run": {"eval_every_epochs": 1.0},
        },
    )
    env = job_env(tmp_path / "state")
    res = psctl("start", "--config", str(cfg), "--job-id", "val", "--timeout", "80", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        deadline = time.monotonic() + 60
        while True:
            st = json.loads(psctl("status", "--json", "--run", "val", env=env).stdout)
            if "eval_accuracy" in st or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.get("eval_split") == "validation" and 0 < st.get("eval_accuracy", 0) <= 1, st
        assert not st.get("has_test_accuracy")  # the test set is not looked at while training
        text = psctl("status", "--run", "val", env=env).stdout
        assert "validation accuracy 0." in text and "test accuracy -" in text, text
        info = json.loads((tmp_path / "state" / "runs" / "val" / "job.json").read_text())
        with urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'dbnps_eval_accuracy_ratio{split="validation"}' in body
        assert "dbnps_test_accuracy_ratio" not in body
    finally:
        psctl("stop", "--force", "--run", "val", env=env)
