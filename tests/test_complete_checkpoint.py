"""Complete checkpoints: every server shard's parameters *and* update-rule state.

A real job with S = 2 server ranks and momentum writes periodic checkpoints;
a second job resumes from one of them with the test hook
`DBNPS_TEST_SNAPSHOT_AFTER_RESUME`, which makes rank 0 read its windows back
(parameters, every shard's velocity and version, through the same RMA path
as every checkpoint) right after the restore and before any worker pulls.
The two must be equal bit for bit: resume is exact in parameters, optimizer
state, phase, samples and evaluation position.
"""

from __future__ import annotations

import os

import numpy as np
from conftest import write_config
from jobctl import run_mpi_job

from dbnps.server.checkpoint.format import RULE_STATE_SERVER, load_checkpoint
from dbnps.server.checkpoint.snapshot import AFTER_RESUME_ENV

CFG = {
    "model": {"sizes": [784, 48, 32]},
    "data": {"train_subset": 1200, "test_subset": 300},
    "pretrain": {"epochs": 1.0},
    # long enough for several checkpoints in fine-tuning, with momentum 0.9 after epoch 1
    "finetune": {"epochs": 6.0, "lr": 0.3, "momentum_switch_epoch": 1.0},
    "ps": {"update_rule": "momentum", "step_timeout_s": 10.0},
    "run": {"checkpoint_every_updates": 25, "eval_every_epochs": 2.0},
}


def test_two_shard_resume_restores_every_shards_momentum_exactly(tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", CFG)
    first = run_mpi_job(cfg, tmp_path / "first", servers=2, extra=("--keep-checkpoints", "50"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    ckpts = sorted(
        (tmp_path / "first" / "checkpoints").glob("ckpt-*.npz"), key=lambda p: int(p.stem[5:])
    )
    # a fine-tuning checkpoint past the momentum switch: both shards' velocities are live
    picked = None
    for p in ckpts:
        params, rule, meta = load_checkpoint(p)
        if meta["phase_name"] == "finetune" and meta["samples_in_phase"] > 1200:
            picked = p
            break
    assert picked is not None, [p.name for p in ckpts]
    assert meta["rule_state"] == RULE_STATE_SERVER and len(meta["shard_versions"]) == 2
    (lo0, hi0), (lo1, hi1) = meta["shard_bounds"]
    v = rule["v"]
    assert v.shape == params.shape == (meta["n_params"],)
    # before: only rank 0's shard was saved; the follower's velocity restarted at zero
    assert np.count_nonzero(v[lo1:hi1]) > 0.5 * (hi1 - lo1), "follower velocity not saved"
    assert np.count_nonzero(v[lo0:hi0]) > 0.5 * (hi0 - lo0)

    after = tmp_path / "after"
    env = dict(os.environ, **{AFTER_RESUME_ENV: str(after)})
    second = run_mpi_job(
        cfg, tmp_path / "second", servers=2, extra=("--resume", str(picked)), env=env
    )
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    [back] = after.glob("ckpt-*.npz")
    params2, rule2, meta2 = load_checkpoint(back)
    np.testing.assert_array_equal(params2, params)
    assert set(rule2) == {"v"}
    np.testing.assert_array_equal(rule2["v"], v)
    for key in ("version", "shard_versions", "phase", "samples_in_phase", "next_eval"):
        assert meta2[key] == meta[key], (key, meta2[key], meta[key])
    assert "not restored" not in second.stdout + second.stderr


def test_resume_with_another_server_count_takes_each_ranks_slice(tmp_path):
    """The rule state covers the flat vector, so S = 2 -> S = 1 keeps all of it."""
    cfg = write_config(
        tmp_path / "cfg.toml", {**CFG, "finetune": {**CFG["finetune"], "epochs": 2.0}}
    )
    first = run_mpi_job(cfg, tmp_path / "first", servers=2, extra=("--keep-checkpoints", "50"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    picked = max(
        (tmp_path / "first" / "checkpoints").glob("ckpt-*.npz"), key=lambda p: int(p.stem[5:])
    )
    params, rule, meta = load_checkpoint(picked)
    after = tmp_path / "after"
    env = dict(os.environ, **{AFTER_RESUME_ENV: str(after)})
    second = run_mpi_job(
        cfg, tmp_path / "second", servers=1, extra=("--resume", str(picked)), env=env
    )
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    [back] = after.glob("ckpt-*.npz")
    params2, rule2, meta2 = load_checkpoint(back)
    np.testing.assert_array_equal(params2, params)
    if meta["phase"] == meta2["phase"]:
        np.testing.assert_array_equal(rule2["v"], rule["v"])
    assert meta2["shard_versions"] == [meta["version"]]


def test_accumulate_mode_says_the_workers_rule_state_is_not_saved(tmp_path):
    """Accumulate mode: the rule runs in each worker (its own velocity over its own
    gradients, in worker memory no window exposes), so a checkpoint cannot hold it:
    the manifest says so, no arrays pretend otherwise, and a resume says it restarts."""
    from dbnps.server.checkpoint.format import RULE_STATE_WORKERS

    sections = {
        **CFG,
        "finetune": {**CFG["finetune"], "epochs": 3.0},
        "ps": {**CFG["ps"], "mode": "accumulate"},
    }
    cfg = write_config(tmp_path / "cfg.toml", sections)
    first = run_mpi_job(cfg, tmp_path / "first", servers=1, extra=("--keep-checkpoints", "50"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    ckpts = sorted(
        (tmp_path / "first" / "checkpoints").glob("ckpt-*.npz"), key=lambda p: int(p.stem[5:])
    )
    picked = next(p for p in ckpts if load_checkpoint(p)[2]["phase_name"] == "finetune")
    _, rule, meta = load_checkpoint(picked)
    assert meta["rule_state"] == RULE_STATE_WORKERS and rule == {}
    second = run_mpi_job(cfg, tmp_path / "second", servers=1, extra=("--resume", str(picked)))
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "accumulate mode: the workers' update-rule state is not in checkpoints" in out
