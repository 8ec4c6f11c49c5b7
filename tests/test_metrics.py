"""Prometheus `/metrics` of a real detached job: values move, `promtool check metrics` is
silent, and a real Prometheus server run with the shipped config finds the job by itself
and answers every dashboard query with data."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from jobctl import free_port, session_alive, start_job, stop_quietly
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
    serve, wait = (("dbnps_server_cpu_seconds_total", (("role", r),)) for r in ("serve", "wait"))
    assert b[serve] > a[serve] > 0 and b[wait] >= 0
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


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


# The shipped config's file_sd path (root's default state dir) and scrape interval.
SHIPPED_SD_PATH = "/root/.local/state/dbnps/prometheus/*.json"


def _prometheus_api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 400: the query does not parse; say why
        raise AssertionError(f"{url}: {exc.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def prometheus(job, tmp_path):
    """The real Prometheus server with deploy/prometheus.yml, pointed at the test's state dir."""
    binary = shutil.which("prometheus")
    assert binary, "the Prometheus server is needed (Debian: apt-get install prometheus)"
    shipped = (DEPLOY / "prometheus.yml").read_text()
    assert SHIPPED_SD_PATH in shipped and "scrape_interval: 5s" in shipped
    sd = Path(job.env["DBNPS_STATE_DIR"]) / "prometheus" / "*.json"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        shipped.replace(SHIPPED_SD_PATH, str(sd)).replace(
            "scrape_interval: 5s", "scrape_interval: 1s"
        )
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "Prometheus not ready in 30 s"
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(10)
    log.close()


def test_prometheus_finds_the_job_and_the_dashboard_has_data(job, prometheus):
    """Discovery through psctl's file_sd file, then every dashboard expression returns data."""
    target = Path(job.info["prometheus_target"])
    assert json.loads(target.read_text()) == [
        {"targets": [job.metrics], "labels": {"launcher": "psctl"}}
    ]
    deadline = time.monotonic() + 30
    while True:
        active = _prometheus_api(prometheus, "/api/v1/targets")["activeTargets"]
        mine = [t for t in active if t["labels"].get("instance") == job.metrics]
        if mine and mine[0]["health"] == "up":
            break
        assert time.monotonic() < deadline, active
        time.sleep(0.5)
    assert mine[0]["labels"]["job"] == "dbnps" and mine[0]["labels"]["launcher"] == "psctl"
    # A checkpoint between scrapes gives the checkpoint-duration rate a value (not 0/0).
    time.sleep(1.5)
    assert job.psctl("checkpoint", "--run", job.job_id).returncode == 0
    pending = {expr: title for title, expr in _dashboard_exprs()}
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            # Grafana's regex variable; a PromQL string needs "\\." for a literal dot
            q = expr.replace("$job_id", job.job_id.replace(".", "\\\\."))
            result = _prometheus_api(prometheus, "/api/v1/query", query=q)["result"]
            if result and all(math.isfinite(float(r["value"][1])) for r in result):
                del pending[expr]
        time.sleep(1)
    assert not pending, f"dashboard queries without data: {pending}"


def test_force_stop_leaves_nothing(job):
    sid = job.info["sid"]
    assert session_alive(sid)
    res = job.psctl("stop", "--force", "--run", job.job_id)
    assert res.returncode == 0, res.stderr
    assert not session_alive(sid)
    # recorded as the user's kill, not as a failure; the Prometheus target is withdrawn
    listed = json.loads(job.psctl("list", "--json").stdout)
    assert [(r["job_id"], r["state"]) for r in listed] == [(job.job_id, "killed")]
    assert json.loads((job.run_dir / "exit.json").read_text())["stopped_by"] == "psctl stop --force"
    assert not Path(job.info["prometheus_target"]).exists()
    res = job.psctl("status", "--run", job.job_id)
    assert res.returncode != 0 and "killed by `psctl stop --force`" in res.stderr, res.stderr
    res = job.psctl("stop", "--force", "--run", job.job_id)
    assert res.returncode != 0 and res.stderr.startswith("error: ")


def test_supervisor_keeps_the_target_current(tmp_path):
    """A restart may move /metrics to a new port: the target file follows, and goes at the end."""
    from dbnps.cli.supervise import _TargetPublisher

    endpoints, target = tmp_path / "endpoints.json", tmp_path / "sd" / "job.json"
    pub = _TargetPublisher(endpoints, target, period_s=0.02)
    pub.start()

    def published(deadline_s: float = 5.0):
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                return json.loads(target.read_text())[0]["targets"]
            except (OSError, ValueError):
                time.sleep(0.02)
        return None

    try:
        assert published(0.2) is None  # nothing before rank 0 says where it listens
        endpoints.write_text(json.dumps({"metrics": "127.0.0.1:1111"}))
        assert published() == ["127.0.0.1:1111"]
        endpoints.unlink()  # the supervisor drops it before a restart
        endpoints.write_text(json.dumps({"metrics": "127.0.0.1:2222"}))
        deadline = time.monotonic() + 5
        while published() != ["127.0.0.1:2222"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert published() == ["127.0.0.1:2222"]
    finally:
        pub.close()
    assert not target.exists()


def test_half_open_connections_do_not_grow_threads(tmp_path):
    """200 clients that connect and send nothing: the server's threads stay capped
    (was one thread per connection: 220 threads), and once they go, scrapes work."""
    import socket
    import threading

    from dbnps.common.config import Config
    from dbnps.server.control.plane import ControlPlane
    from dbnps.server.metrics import MAX_CONNECTIONS

    cp = ControlPlane(
        Config(), job_id="flood", run_dir=tmp_path, metrics_port=0, log=lambda *a: None
    )
    cp.start()
    socks = []
    try:
        base = threading.active_count()
        host, port = cp.metrics_address.rsplit(":", 1)
        for _ in range(200):
            s = socket.create_connection((host, int(port)), timeout=5)
            socks.append(s)
        time.sleep(1.0)  # let the accept loop take every one
        grown = threading.active_count() - base
        print(f"\nthreads for 200 half-open connections: +{grown}")
        assert grown <= MAX_CONNECTIONS + 1, grown
        # one over the cap is told so at once, not left hanging
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 503"), "over the cap: no 503"
        s.close()
    finally:
        for s in socks:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://{cp.metrics_address}/metrics", timeout=5) as r:
                    assert r.status == 200 and b"dbnps_ready" in r.read()
                break
            except urllib.error.HTTPError as exc:  # 503 while the slots drain
                assert exc.code == 503 and time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(0.5)
        assert threading.active_count() - base <= 2  # every connection's thread ended
    finally:
        cp.close(grace_s=0)
