"""Checkpoints never tear: corrupt files are detected and skipped; a crash mid-write loads nothing.

The unit tests write real checkpoint files; the crash test kills a real
server process (SIGKILL from the writer itself, between fsync and rename)
and resumes a real job from what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config
from jobctl import job_env, psctl

from dbnps.common.config import load, to_toml
from dbnps.common.errors import DataError
from dbnps.server.checkpoint.format import RULE_STATE_SERVER, Snapshot, load_checkpoint
from dbnps.server.checkpoint.snapshot import JobState, snapshot
from dbnps.server.checkpoint.store import CRASH_ENV, CheckpointStore, find_resumable

TINY = {
    "model": {"sizes": [784, 64, 64]},
    "data": {"train_subset": 2000, "test_subset": 500},
    "pretrain": {"epochs": 1.0},
    "finetune": {"epochs": 4.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
    "ps": {"step_timeout_s": 3.0},
    "run": {"checkpoint_every_updates": 15, "eval_every_epochs": 2.0},
}


SMALL = {"model": {"sizes": [784, 16]}}  # 13514 parameters: small files, a real layout


def _job_state(version: int, *, rule: str = "momentum", servers: int = 1) -> JobState:
    """What a server hands the checkpointer, for a small network in fine-tuning."""
    from dbnps.common.config import from_dict
    from dbnps.common.job import layout_of

    cfg = from_dict({**SMALL, "ps": {"update_rule": rule}})
    layout = layout_of(cfg)
    n = layout.size
    rng = np.random.default_rng(version)
    names = {"sgd": [], "momentum": ["v"], "adagrad": ["s"]}[rule]
    return JobState(
        params=rng.standard_normal(n).astype(np.float32),
        rule_name=rule,
        rule_state={k: rng.random(n).astype(np.float32) for k in names},
        rule_state_kept=RULE_STATE_SERVER,
        version=version,
        shard_versions=[version] * servers,
        shard_bounds=_bounds(n, servers),
        phase=layout.finetune_phase,
        phase_names=[layout.phase_name(p) for p in range(layout.done_phase + 1)],
        samples_in_phase=10 * version,
        phase_samples=60000,
        n_train=60000,
        n_workers=2,
        applied=version,
        rejected={"stale": 1},
        stopped=False,
        next_eval=1.0,
        test_accuracy=float("nan"),
        eval_accuracy=0.5,
        config=cfg.to_dict(),
        seed=0,
    )


def _bounds(n: int, servers: int) -> list[tuple[int, int]]:
    """rma.shard_bounds without importing mpi4py into the test process."""
    edges = np.linspace(0, n, servers + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(servers)]


def _snap(version: int) -> Snapshot:
    return snapshot(_job_state(version))


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
    from dbnps.common.launcher import mpi_env
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = job_argv(cfg, 2, 1, resolve_data_dir(None), run_dir, extra_server_args=tuple(extra))
    return subprocess.run(
        argv, env=mpi_env(env), capture_output=True, text=True, timeout=90, errors="replace"
    )


# -- meaning, not only checksum: forged files with a recomputed digest ---------------
def _forge(path: Path, change) -> Path:
    """Write a well-checksummed checkpoint whose contents `change(arrays, meta)` altered."""
    from dbnps.server.checkpoint.format import _digest

    snap = _snap(40)
    arrays = {
        "params": snap.params.copy(),
        **{f"rule.{k}": v.copy() for k, v in snap.rule_state.items()},
    }
    meta = json.loads(json.dumps(snap.meta, default=float))
    out = change(arrays, meta)
    meta = out if isinstance(out, list) else meta  # a case may replace the whole manifest
    meta_bytes = json.dumps(meta).encode()
    entries = {
        **arrays,
        "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
        "sha256": np.frombuffer(_digest(arrays, meta_bytes).encode(), dtype=np.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    return path


def _set(key, value):
    def change(arrays, meta):
        meta[key] = value

    return change


def _array(name, fn):
    def change(arrays, meta):
        arrays[name] = fn(arrays[name])

    return change


def _nan_at(a):
    a = a.copy()
    a[3] = np.nan
    return a


# (case id, change, what the error line must say)
FORGED = [
    ("phase-negative", _set("phase", -1), "'phase' = -1 is out of range"),
    ("phase-too-big", _set("phase", 7), "'phase' = 7 is out of range"),
    ("phase-name", _set("phase_name", "pretrain-1"), "does not match phase 1"),
    ("version-negative", _set("version", -5), "'version' = -5 is out of range"),
    ("version-string", _set("version", "12"), "'version' must be an integer, got str"),
    ("version-bool", _set("version", True), "'version' must be an integer, got bool"),
    ("samples-beyond", _set("samples_in_phase", 10**9), "is beyond the phase"),
    ("samples-negative", _set("samples_in_phase", -1), "'samples_in_phase' = -1"),
    ("n-train-zero", _set("n_train", 0), "'n_train' = 0 is out of range"),
    ("config-string", _set("config", "not a config"), "'config' must be the job's config"),
    ("config-invalid", _set("config", {"model": {"sizes": "x"}}), "its config is invalid"),
    ("config-missing", lambda a, m: m.pop("config") is None, "metadata has no 'config'"),
    ("meta-list", lambda a, m: [1, 2], "metadata is a list, not an object"),
    ("stopped-string", _set("stopped", "yes"), "'stopped' must be true or false"),
    ("next-eval-zero", _set("next_eval", 0), "'next_eval' must be a finite number"),
    ("accuracy-3", _set("test_accuracy", 3.0), "'test_accuracy' = 3.0 is not an accuracy"),
    ("rule-unknown", _set("update_rule", "adam"), "unknown update rule 'adam'"),
    ("rule-other", _set("update_rule", "adagrad"), "keeps state ['s'], the file holds ['v']"),
    ("shard-bounds", _set("shard_bounds", [[0, 5], [7, 13514]]), "'shard_bounds' must cut"),
    ("shard-versions", _set("shard_versions", [40, 40]), "'shard_versions' must be 1 integers"),
    ("shard-version-0", _set("shard_versions", [39]), "'shard_versions' starts at 39"),
    ("n-params", _set("n_params", 5), "'n_params' = 5 but its network has 13514"),
    ("params-nan", _array("params", _nan_at), "params hold NaN or Inf"),
    ("params-2d", _array("params", lambda a: a[:13500].reshape(100, 135)), "got float32[100, 135]"),
    ("params-f64", _array("params", lambda a: a.astype(np.float64)), "got float64[13514]"),
    ("params-short", _array("params", lambda a: a[:-1]), "params must be float32[13514]"),
    (
        "rule-short",
        _array("rule.v", lambda a: a[:100]),
        "'v' must be float32[13514], got float32[100]",
    ),
    ("rule-f16", _array("rule.v", lambda a: a.astype(np.float16)), "got float16[13514]"),
    (
        "rule-inf",
        _array("rule.v", lambda a: a * np.float32(np.inf)),
        "rule state 'v' holds NaN or Inf",
    ),
    ("rule-missing", lambda a, m: a.pop("rule.v") is None, "the file holds []"),
    ("rule-extra", lambda a, m: a.update({"rule.s": a["rule.v"]}), "the file holds ['s', 'v']"),
    (
        "entry-unknown",
        lambda a, m: a.update({"extra": a["params"][:3]}),
        "unknown entries ['extra']",
    ),
]


@pytest.mark.parametrize("case,change,says", FORGED, ids=[c[0] for c in FORGED])
def test_a_forged_checkpoint_is_refused_with_one_line(tmp_path, case, change, says):
    path = _forge(tmp_path / "ckpt-40.npz", change)
    with pytest.raises(DataError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    assert says in msg, msg


def test_forged_checkpoints_through_psctl_one_error_line_each(tmp_path):
    """The CLI side of the matrix: `psctl start --resume FILE` for every forged file.

    One process runs them all (click's runner), so the matrix stays fast; each
    case must end in SystemExit != 0 with exactly one `error:` line naming the file
    and no traceback."""
    from click.testing import CliRunner

    from dbnps.cli import main

    env = job_env(tmp_path / "state")
    runner = CliRunner()
    for case, change, says in FORGED:
        path = _forge(tmp_path / case / "ckpt-40.npz", change)
        res = runner.invoke(main, ["start", "--resume", str(path)], env=env)
        err = res.stderr if hasattr(res, "stderr") else res.output
        lines = [x for x in err.splitlines() if x.strip()]
        assert res.exit_code not in (0, None), (case, err)
        assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), (
            case,
            repr(res.exception),
        )
        assert len(lines) == 1 and lines[0].startswith("error: cannot resume"), (case, err)
        assert str(path) in lines[0] and says in lines[0], (case, lines[0])
    assert not (tmp_path / "state" / "runs").exists()


def test_a_forged_newest_checkpoint_falls_back_to_the_older_good_one(tmp_path):
    store = _store(tmp_path, versions=(10, 20))
    forged = _forge(store.dir / "ckpt-30.npz", _set("phase", -1))
    warnings = []
    path, (_, _, meta) = find_resumable(tmp_path / "run", warn=warnings.append, quarantine=True)
    assert path.name == "ckpt-20.npz" and meta["version"] == 20
    assert len(warnings) == 1 and str(forged) in warnings[0] and "'phase' = -1" in warnings[0]
    assert (store.dir / "ckpt-30.npz.corrupt").exists()  # a restarting run renames it away


def test_checkpoints_lists_around_a_forged_manifest(tmp_path):
    store = _store(tmp_path, versions=(10,))
    _forge(store.dir / "ckpt-30.npz", _set("version", "x"))  # info_of used int() on it
    assert [i.version for i in store.list()] == [10]


def test_checkpoint_files_are_private(tmp_path):
    store = _store(tmp_path, versions=(10,))
    assert store.paths()[0].stat().st_mode & 0o777 == 0o600
    assert store.dir.stat().st_mode & 0o777 == 0o700


def test_a_full_disk_fails_the_periodic_checkpoint_and_training_goes_on(tmp_path):
    """The writer's files may not grow past 20 kB (RLIMIT_FSIZE: a real EFBIG from write,
    Python ignores SIGXFSZ), like a disk that fills up mid-write: the periodic write
    fails with one log line, no partial file is left, the older checkpoint is intact,
    and the caller (the training loop) is not interrupted."""
    store = _store(tmp_path, versions=(10,))
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_checkpoint import _job_state
from dbnps.server.checkpoint.periodic import Periodic
from dbnps.server.checkpoint.store import CheckpointStore
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
p = Periodic(CheckpointStore({str(store.dir)!r}), every_updates=1, log=print)
p.take(_job_state(20))
p.close()
print("still training")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "still training", res.stdout
    [fail] = [x for x in lines if "checkpoint failed" in x]
    assert "File too large" in fail, fail
    assert sorted(p.name for p in store.dir.iterdir()) == ["ckpt-10.npz"]
    load_checkpoint(store.dir / "ckpt-10.npz")


def test_an_rpc_checkpoint_racing_a_periodic_write(tmp_path):
    """Checkpoint RPCs (handler threads) and the periodic writer share one store: writes
    are serialized, pruning keeps the newest `keep`, every file left loads, no tmp file
    stays, even when two writers write the same version."""
    import threading

    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    errors = []

    def writer(versions):
        try:
            for v in versions:
                store.write(_snap(v))
        except Exception as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(range(10, 40, 2),)),  # "periodic"
        threading.Thread(target=writer, args=(range(11, 40, 3),)),  # "RPC", some same versions
        threading.Thread(target=writer, args=(range(10, 40, 2),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = sorted(p.name for p in store.dir.iterdir())
    assert names == ["ckpt-35.npz", "ckpt-36.npz", "ckpt-38.npz"], names  # the newest 3
    for p in store.paths():
        load_checkpoint(p)
