"""A job that cannot start ends every rank with one line: refused before launch, or together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import write_config

PSCTL = Path(sys.executable).parent / "psctl"


def psctl_run(cfg, tmp_path, *args, timeout=60):
    argv = [PSCTL, "run", "--config", cfg, "--run-dir", tmp_path / "run", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors and "Traceback" not in text, text
    return errors[0]


def test_a_shard_smaller_than_a_batch_is_refused_before_launch(tmp_path):
    cfg = write_config(
        tmp_path / "c.toml", {"model": {"sizes": [784, 16]}, "data": {"train_subset": 1}}
    )
    res = psctl_run(cfg, tmp_path, "--workers", "2")
    assert res.returncode == 2
    assert "fewer than one minibatch" in one_error_line(res.stderr)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_set_up_error_on_the_workers_ends_every_rank(tmp_path, job):
    """Past psctl's checks (raw mpiexec): the ranks agree before any window exists."""
    cfg = write_config(
        tmp_path / "c.toml",
        {"model": {"sizes": [784, 16]}, "data": {"train_subset": 150, "test_subset": 100}},
    )
    res = job(cfg, workers=2, timeout=60)  # 150 images / 2 workers = 75 < batch 100
    assert res.rc != 0
    assert "fewer than one minibatch" in one_error_line(res.output)
    assert sum(line.startswith("error:") for line in res.output.splitlines()) == 1


def test_a_network_too_big_for_memory_is_refused_with_the_estimate(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"model": {"sizes": [784, 2000000]}})
    res = psctl_run(cfg, tmp_path, "--workers", "2")
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "GiB" in line and "available" in line, line


def test_too_many_workers_for_memory_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"data": {"train_subset": 60000}})
    res = psctl_run(cfg, tmp_path, "--workers", "400")
    assert res.returncode == 2
    assert "400 workers" in one_error_line(res.stderr)


def test_memory_estimate_is_close_to_the_measured_full_job():
    from dbnps.common.config import from_dict
    from dbnps.common.resources import check_memory, estimate

    e = estimate(from_dict({}), workers=2, servers=1)
    # Measured on the full job: server 306 MB, worker 461 MB RSS.
    assert 250e6 < e.server_bytes < 400e6 and 350e6 < e.worker_bytes < 550e6
    check_memory(from_dict({}), 2, 1, available=2 << 30)  # fits in 2 GiB: no error
