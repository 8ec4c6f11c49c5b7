"""Jobs across hosts: real mpiexec, real TCP, 3 hosts emulated as network namespaces.

Server rank(s) and workers on different hosts use Open MPI's `osc/rdma` over
`btl/tcp` instead of the shared-memory `osc/sm` every other test exercises
(tests/netns.py explains the emulation).  Marked `multihost`; they run in
`make test` and need root and `ip`: without them they FAIL and say why
(`pytest -m multihost` runs only these).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import netns
import numpy as np
import pytest
from conftest import SMALL, JobResult, assert_exact, exactness_case, write_config

from dbnps.common import launcher
from dbnps.common.config import load
from dbnps.common.job import initial_params, layout_of, load_data

pytestmark = pytest.mark.multihost

PSCTL = str(Path(sys.executable).parent / "psctl")
ZERO_PROGRAM = Path(__file__).parent / "mpi_programs" / "windows_zero.py"


@pytest.fixture(scope="module")
def hosts():
    """Hosts h1, h2, h3 for the whole module; torn down even when a test fails."""
    why = netns.requirements_error()
    if why is not None:
        pytest.fail(f"cannot emulate hosts: {why}", pytrace=False)
    h = netns.create_hosts(3)
    try:
        yield h
    finally:
        h.teardown()


def env_for(hosts: netns.Hosts) -> dict[str, str]:
    return hosts.env(launcher.mpi_env())


def run_placed(
    hosts: netns.Hosts,
    config: Path,
    run_dir: Path,
    spec: str,
    *,
    workers: int,
    servers: int = 1,
    worker_args: tuple[str, ...] = (),
    timeout: float = 120,
) -> JobResult:
    """A job with its ranks placed by `--hosts spec`, built by the same code as `psctl run`."""
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    placement = launcher.placement_from_options(servers, workers, hosts=spec)
    argv = job_argv(
        config, workers, servers, resolve_data_dir(None), run_dir, worker_args, placement=placement
    )
    proc = subprocess.run(argv, env=env_for(hosts), capture_output=True, text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


def final_params(run_dir: Path) -> np.ndarray:
    from dbnps.common.model import load_model

    _, params, _, _ = load_model(run_dir / "model.npz")
    return params.flat


def test_windows_are_zeroed_and_one_sided_ops_exact_across_hosts(hosts):
    """Garbage left in the server's windows is gone after `rma.Windows`; Accumulate, Put
    and Get of 1.2 MB between 3 hosts are exact."""
    argv = launcher.spmd_argv(3, [str(ZERO_PROGRAM)], hosts=["h1", "h2", "h3"])
    proc = subprocess.run(argv, env=env_for(hosts), capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WINDOWS OK workers=2 hosts=h1,h2,h3" in proc.stdout, out


@pytest.mark.parametrize("mode", ["apply", "accumulate"])
def test_exactness_server_and_worker_on_two_hosts(tmp_path, hosts, mode):
    """Server on h1, worker on h2, sync pushes, SGD: the single-process trainer's parameters."""
    cfg_path, local, init = exactness_case(tmp_path, mode)
    res = run_placed(hosts, cfg_path, tmp_path / "run", "h1:1,h2:1", workers=1)
    assert_exact(res, local, init)


def test_conservation_two_workers_on_two_hosts(tmp_path, hosts):
    """Every push of 2 workers (h2, h3) is counted once and its gradient applied exactly once."""
    cfg_path = write_config(
        tmp_path / "syn.toml",
        {
            **SMALL,
            "pretrain": {"epochs": 0.0},
            "finetune": {"epochs": 1000.0, "lr": 0.1, "momentum_start": 0.0, "momentum_final": 0.0},
            "ps": {"update_rule": "sgd"},
            "run": {"max_steps": 20},
        },
    )
    res = run_placed(
        hosts,
        cfg_path,
        tmp_path / "run",
        "h1:1,h2:1,h3:1",
        workers=2,
        worker_args=("--inject-synthetic-grad", "0.001"),
    )
    assert res.rc == 0, res.output
    s = res.summary
    for w in s["workers"]:
        assert w["pushes"] == 20 and w["pushes"] == w["applied"] + w["rejected"]
    assert s["applied"] + sum(s["rejected"].values()) == 40
    cfg = load(cfg_path)
    init = initial_params(cfg, layout_of(cfg), load_data(cfg).X_train).astype(np.float64)
    total = sum(w["applied"] * 0.001 * (w["worker"] + 1) for w in s["workers"])
    np.testing.assert_allclose(
        final_params(res.run_dir), init - cfg.finetune.lr * total, rtol=0, atol=2e-5
    )


def test_psctl_run_across_three_hosts_reaches_88_percent(tmp_path, hosts):
    """`psctl run --hosts h1:1,h2:1,h3:1`: configs/small.toml (784-64-64-10) end to end.

    Measured: 0.90-0.92 in 9 s (the same job on one host: ~0.91 in 3 s).  The server
    must know its workers are on other nodes and keep polling (server.PROGRESS_S):
    sleeping as on one node made this job take 75 s."""
    proc = subprocess.run(
        [
            PSCTL,
            "run",
            "--config",
            str(Path(__file__).parents[1] / "configs" / "small.toml"),
            "--workers",
            "2",
            "--hosts",
            "h1:1,h2:1,h3:1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env=env_for(hosts),
        capture_output=True,
        text=True,
        timeout=300,  # a liveness bound, not a speed target (83 s seen on a loaded box)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on hosts h1,h2,h3" in proc.stderr
    assert "several nodes (polls every" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["phase"] == "done"
    assert summary["test_accuracy"] >= 0.88, summary["test_accuracy"]
    assert all(w["applied"] > 0 for w in summary["workers"])


def _start(hosts, tmp_path, spec: str, workers: int, worker_args: tuple[str, ...] = ()):
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    cfg = write_config(
        tmp_path / "die.toml",
        {
            "model": {"sizes": [784, 64, 64]},
            "data": {"train_subset": 5000, "test_subset": 1000},
            "pretrain": {"epochs": 1.0},
            "finetune": {"epochs": 10.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
            # Detection here is PRRTE's (a lost daemon), not heartbeats: a short
            # timeout would only mark slow workers dead on a loaded machine.
            "ps": {"heartbeat_timeout_s": 30.0},
            "run": {"eval_every_epochs": 2.0},
        },
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    placement = launcher.placement_from_options(1, workers, hosts=spec)
    argv = job_argv(
        cfg, workers, 1, resolve_data_dir(None), run_dir, worker_args, placement=placement
    )
    proc = subprocess.Popen(
        argv, env=env_for(hosts), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 90
    while not any("finetune epoch" in line for line in lines):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    return proc, lines, run_dir


def test_whole_worker_host_down_ends_the_job_without_hanging(tmp_path, hosts):
    """Every process in h3's namespace (its `prted` daemon too) is SIGKILLed.

    PRRTE 3.0 (the Open MPI 5.0 wheel) treats a lost daemon as fatal even under
    `--with-ft ulfm` (errmgr_dvm aborts on a daemon's COMM_FAILED), so the job
    cannot finish on the survivors; what we guarantee is that it ends at once,
    non-zero, naming the host, so `psctl start --restart-on-failure` can act.
    """
    proc, lines, run_dir = _start(hosts, tmp_path, "h1:1,h2:1,h3:1", workers=2)
    try:
        assert hosts.kill_host("h3"), "nothing was running on h3"
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    # Ended (within the 60 s wait) rather than hanging.  Its status is not to be
    # trusted: PRRTE 3.0 printed "lost communication with a remote daemon ... will
    # terminate the job" and then exited 0 in one CI run.  What tells a caller it
    # failed is the missing summary (psctl run says so in one line; see below).
    assert "lost communication with a remote daemon" in out or rc != 0, out[-4000:]
    print(f"job ended {waited:.1f}s after the host went down")
    assert "h3" in out, out[-4000:]
    assert not (run_dir / "summary.json").exists()
    for h in hosts.names:  # nothing of the job is left on any host
        deadline = time.monotonic() + 10
        while hosts.pids(h) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hosts.pids(h), (h, hosts.pids(h))
