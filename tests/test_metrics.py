"""Prometheus `/metrics` of a real detached job: values move, `promtool check metrics` is silent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from jobctl import session_alive, start_job, stop_quietly
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    j = start_job(tmp_path_factory.mktemp("metrics"), "metrics-test")
    yield j
    stop_quietly(j)


def scrape(job) -> tuple[str, dict]:
    with urllib.request.urlopen(f"http://{job.metrics}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def test_values_move_between_scrapes(job):
    _, a = scrape(job)
    time.sleep(0.6)
    text, b = scrape(job)
    for name in ("dbnps_updates_applied_total", "dbnps_parameter_version", "dbnps_pushes_total"):
        assert b[(name, ())] > a[(name, ())] > 0, name
    assert b[("dbnps_update_staleness_count", ())] > a[("dbnps_update_staleness_count", ())]
    assert (
        b[("dbnps_update_staleness_bucket", (("le", "+Inf"),))]
        == b[("dbnps_update_staleness_count", ())]
    )
    assert b[("dbnps_pushed_bytes_total", ())] > 0
    for w, rank in (("0", "1"), ("1", "2")):
        lv = (("rank", rank), ("worker", w))
        assert b[("dbnps_worker_steps_total", lv)] > a[("dbnps_worker_steps_total", lv)]
        assert b[("dbnps_worker_up", lv)] == 1
        assert 0 <= b[("dbnps_worker_heartbeat_age_seconds", lv)] < 10
        assert ("dbnps_worker_samples_per_second", lv) in b
    assert b[("dbnps_phase", (("phase", "finetune"),))] == 1
    assert b[("dbnps_phase", (("phase", "pretrain-1"),))] == 0
    assert b[("dbnps_updates_rejected_total", (("reason", "stale"),))] == 0
    assert ("dbnps_loss", ()) in b and b[("dbnps_ready", ())] == 1
    assert b[("dbnps_checkpoint_duration_seconds_count", ())] == 0
    # a checkpoint shows up in the checkpoint metrics
    res = job.psctl("checkpoint", "--run", job.job_id)
    assert res.returncode == 0, res.stderr
    _, c = scrape(job)
    assert c[("dbnps_checkpoint_duration_seconds_count", ())] == 1
    assert c[("dbnps_checkpoints_retained", ())] == 1
    assert text.count("# TYPE dbnps_") == text.count("# HELP dbnps_")


def test_promtool_finds_nothing(job):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (Debian: apt-get install prometheus; .ci/run does it)"
    text, _ = scrape(job)
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


def test_deploy_files_match_the_metrics(job, tmp_path):
    """The dashboard is a Grafana dashboard whose queries parse and name metrics we export."""
    promtool = shutil.which("promtool")
    assert promtool
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 5
    exprs = []
    for p in dash["panels"]:
        assert {"type", "title", "gridPos", "targets"} <= set(p)
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        exprs += [t["expr"] for t in p["targets"]]
    used = set(re.findall(r"dbnps_[a-z0-9_]+", " ".join(exprs)))
    # Test accuracy is exported once the first scheduled evaluation has finished.
    deadline = time.monotonic() + 60
    while True:
        _, samples = scrape(job)
        exported = {name for name, _ in samples}
        if used <= exported or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert used and used <= exported, used - exported
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dbnps:panel{i}", "expr": e.replace("$job_id", ".*")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    for cmd in (
        ["check", "rules", str(tmp_path / "rules.yml")],
        ["check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        res = subprocess.run([promtool, *cmd], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr


def test_force_stop_leaves_nothing(job):
    sid = job.info["sid"]
    assert session_alive(sid)
    res = job.psctl("stop", "--force", "--run", job.job_id)
    assert res.returncode == 0, res.stderr
    assert not session_alive(sid)
    res = job.psctl("stop", "--force", "--run", job.job_id)
    assert res.returncode != 0 and res.stderr.startswith("error: ")
