"""Checkpoints never tear: corrupt files are detected and skipped; a crash mid-write loads nothing.

The unit tests write real checkpoint files; the crash test kills a real
server process (SIGKILL from the writer itself, between fsync and rename)
and resumes a real job from what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config
from jobctl import job_env, psctl

from dbnps.common.config import Config, load, to_toml
from dbnps.common.errors import DataError
from dbnps.server.checkpoint import (
    CRASH_ENV,
    FORMAT,
    CheckpointStore,
    Snapshot,
    find_resumable,
    load_checkpoint,
)

TINY = {
    "model": {"sizes": [784, 64, 64]},
    "data": {"train_subset": 2000, "test_subset": 500},
    "pretrain": {"epochs": 1.0},
    "finetune": {"epochs": 4.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
    "ps": {"step_timeout_s": 3.0},
    "run": {"checkpoint_every_updates": 15, "eval_every_epochs": 2.0},
}


def _snap(version: int, n: int = 1000) -> Snapshot:
    rng = np.random.default_rng(version)
    meta = {
        "format": FORMAT,
        "created_unix": 0.0,
        "version": version,
        "phase": 2,
        "phase_name": "finetune",
        "samples_in_phase": 10 * version,
        "config": Config().to_dict(),
    }
    return Snapshot(rng.standard_normal(n).astype(np.float32), {"v": np.ones(n, np.float32)}, meta)


def _store(tmp_path: Path, versions=(10, 20, 30)) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=5)
    for v in versions:
        store.write(_snap(v))
    return store


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_truncate, lambda p: _flip(p, p.stat().st_size // 3)])
def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning(tmp_path, damage):
    store = _store(tmp_path)
    newest = store.paths()[-1]
    damage(newest)
    with pytest.raises(DataError):
        load_checkpoint(newest)
    warnings = []
    path, (params, _, meta) = find_resumable(tmp_path / "run", warn=warnings.append)
    assert path.name == "ckpt-20.npz" and meta["version"] == 20
    np.testing.assert_array_equal(params, _snap(20).params)
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert str(newest) in warnings[0] and "\n" not in warnings[0]


def test_a_flipped_byte_the_zip_crc_misses_is_caught_by_the_sha256(tmp_path):
    store = _store(tmp_path, versions=(10,))
    path = store.paths()[0]
    # Rewrite the archive with one changed parameter: zip CRCs are recomputed, the digest is not.
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["params"][7] += 1
    with open(path, "wb") as f:
        np.savez(f, **entries)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_checkpoint(path)


def test_no_good_checkpoint_is_one_clear_error(tmp_path):
    store = _store(tmp_path, versions=(10, 20))
    for p in store.paths():
        _truncate(p)
    with pytest.raises(DataError, match=r"every checkpoint in .* is corrupt"):
        find_resumable(tmp_path / "run", warn=lambda m: None)
    # The CLI says it in one `error:` line (after one warning per bad file) and starts nothing.
    env = job_env(tmp_path / "state")
    res = psctl("start", "--resume", str(tmp_path / "run"), env=env)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "state" / "runs").exists() or not any(
        (tmp_path / "state" / "runs").iterdir()
    )
    # An explicit file that is bad is refused, never loaded.
    res = psctl("start", "--resume", str(store.paths()[-1]), env=env)
    assert res.returncode != 0 and res.stderr.startswith("error: cannot resume"), res.stderr


def test_tmp_files_are_never_candidates_and_are_cleaned(tmp_path):
    store = _store(tmp_path, versions=(10,))
    partial = store.dir / ".ckpt-20.npz.123.456.tmp"
    partial.write_bytes(b"half a zip")
    assert [p.name for p in store.paths()] == ["ckpt-10.npz"]
    assert find_resumable(store.dir, warn=lambda m: None)[0].name == "ckpt-10.npz"
    assert store.clean_partial() == [partial] and not partial.exists()


def test_config_round_trips_through_toml(tmp_path):
    cfg = load(write_config(tmp_path / "c.toml", TINY))
    (tmp_path / "back.toml").write_text(to_toml(cfg))
    assert load(tmp_path / "back.toml") == cfg


def test_kill_during_a_checkpoint_write_then_resume_from_the_previous_good_one(tmp_path):
    """The writer SIGKILLs its own server between fsync and rename (3rd checkpoint).

    Left behind: two good checkpoints and a tmp file.  We also flip a byte in
    the newest good one: the resumed job must skip it with a warning, ignore
    and delete the tmp file, start from the oldest, and finish the schedule.
    """
    cfg = write_config(tmp_path / "tiny.toml", TINY)
    env = dict(os.environ, **{CRASH_ENV: "3"})
    first = _run(cfg, tmp_path / "run", env=env)
    assert first.returncode != 0, first.stdout[-3000:]
    assert "error: worker" in first.stderr  # the workers noticed the dead server and left
    ckdir = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckdir.iterdir())
    good = [n for n in names if n.startswith("ckpt-")]
    partial = [n for n in names if n.endswith(".tmp")]
    assert len(good) == 2 and len(partial) == 1, names
    for n in good:
        load_checkpoint(ckdir / n)  # both complete and verified
    versions = sorted(int(n[5:-4]) for n in good)
    newest = ckdir / f"ckpt-{versions[1]}.npz"
    _flip(newest, newest.stat().st_size // 2)

    res = _run(
        cfg, tmp_path / "run", env=dict(os.environ), extra=("--resume", str(tmp_path / "run"))
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"warning: skipping corrupt checkpoint {newest}" in out
    assert f"resuming from {ckdir / f'ckpt-{versions[0]}.npz'}" in out
    assert f"removed a partial checkpoint left by a crashed writer: {partial[0]}" in out
    assert not (ckdir / partial[0]).exists()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["phase"] == "done" and s["version"] > versions[1]


def _run(cfg: Path, run_dir: Path, *, env: dict, extra=()) -> subprocess.CompletedProcess:
    from dbnps.cli.run import job_argv
    from dbnps.common.launcher import mpi_env
    from dbnps.common.mnist import resolve_data_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(cfg, 2, 1, resolve_data_dir(None), run_dir, extra_server_args=tuple(extra))
    return subprocess.run(
        argv, env=mpi_env(env), capture_output=True, text=True, timeout=90, errors="replace"
    )
