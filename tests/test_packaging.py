"""The wheel carries MNIST and runs from any directory (what `pip install .` gives a user)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_holds_the_data_and_trains_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        [*pip, "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("dbnps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "SHA256SUMS"):
        assert f"dbnps/data/mnist/{f}" in names, f
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "tiny.toml").write_text(
        "[model]\nsizes = [784, 16]\n[data]\ntrain_subset = 500\ntest_subset = 100\n"
        "[pretrain]\nepochs = 1.0\n[finetune]\nepochs = 1.0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("DBNPS_DATA", None)
    code = "import sys; from dbnps.cli import main; sys.argv[0] = 'psctl'; main()"
    run = subprocess.run(
        [sys.executable, "-c", code, "train", "--local", "--config", "tiny.toml", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "test accuracy" in run.stdout and (work / "model.npz").exists()
    where = subprocess.run(
        [sys.executable, "-c", "from dbnps.common.mnist import resolve_data_dir as r; print(r())"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert Path(where.stdout.strip()) == site / "dbnps" / "data" / "mnist", where
