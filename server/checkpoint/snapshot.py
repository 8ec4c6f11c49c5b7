"""What a checkpoint is taken from: the server's `JobState`, and the `Snapshot` made of it.

The server never hands itself over: `ParameterServer.checkpoint_state` (rank
0, main thread: it calls MPI) builds a `JobState` with every field a
checkpoint holds, and everything after that (`snapshot`, the store's disk
work) runs on any thread from that object alone.

Test hook: `DBNPS_TEST_SNAPSHOT_AFTER_RESUME=DIR` (`after_resume_hook`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dbnps.server.checkpoint.format import FORMAT, Snapshot
from dbnps.server.checkpoint.store import CheckpointStore

AFTER_RESUME_ENV = "DBNPS_TEST_SNAPSHOT_AFTER_RESUME"


@dataclass
class JobState:
    """What a checkpoint holds, built by the server (`ParameterServer.checkpoint_state`)."""

    params: np.ndarray  # float32[n_params], every shard
    rule_name: str
    rule_state: dict[str, np.ndarray]  # name -> float32[n_params], every shard ({} if not kept)
    rule_state_kept: str  # RULE_STATE_SERVER or RULE_STATE_WORKERS
    version: int  # rank 0's
    shard_versions: list[int]
    shard_bounds: list[tuple[int, int]]
    phase: int
    phase_names: list[str]
    samples_in_phase: int
    phase_samples: int
    n_train: int
    n_workers: int
    applied: int
    rejected: dict[str, int]
    stopped: bool
    next_eval: float
    test_accuracy: float
    eval_accuracy: float
    config: dict
    seed: int
    extra: dict = field(default_factory=dict)
    # [ps] average: the parameter average (float32[n_params]); its counters go in
    # extra["average"].  None: the job keeps no average.
    average: np.ndarray | None = None


def snapshot(
    js: JobState, *, job_id: str = "", note: str = "", stop_phase: int | None = None
) -> Snapshot:
    """Arrays and manifest of a checkpoint of `js` (any thread: no MPI here)."""
    phase = js.phase if stop_phase is None else stop_phase
    done = len(js.phase_names) - 1
    meta = {
        "format": FORMAT,
        "job_id": job_id,
        "note": note,
        "created_unix": time.time(),
        "version": int(js.version),
        "shard_versions": [int(v) for v in js.shard_versions],
        "phase": int(phase),
        "phase_name": js.phase_names[min(phase, done)],
        # A job that reached `done` has no samples left in any phase.
        "samples_in_phase": int(js.samples_in_phase) if phase < done else 0,
        "phase_samples": int(js.phase_samples),
        "n_train": int(js.n_train),
        "applied": int(js.applied),
        "rejected": {str(k): int(v) for k, v in js.rejected.items()},
        "stopped": bool(js.stopped),
        "update_rule": js.rule_name,
        "rule_state": js.rule_state_kept,
        "shard_bounds": [[int(a), int(b)] for a, b in js.shard_bounds],
        "n_params": int(js.params.size),
        "n_workers": int(js.n_workers),
        "next_eval": float(js.next_eval),  # fine-tune evaluation schedule position (epochs)
        "test_accuracy": float(js.test_accuracy),
        "eval_accuracy": float(js.eval_accuracy),
        "seeds": {"run.seed": int(js.seed), "workers": "default_rng([seed, 1, worker])"},
        "config": js.config,
        **js.extra,
    }
    return Snapshot(js.params, dict(js.rule_state), meta, js.average)


def after_resume_hook(rank: int, job_state, barrier=None) -> None:
    """Test hook (`DBNPS_TEST_SNAPSHOT_AFTER_RESUME=DIR`): right after a resume, before
    any worker pulls, rank 0 writes what the windows hold now (`job_state()`, the
    same JobState every checkpoint is made of) into DIR.  Every server rank calls
    it; `barrier` (S > 1) waits until every shard is restored."""
    folder = os.environ.get(AFTER_RESUME_ENV)
    if not folder:
        return
    if barrier is not None:
        barrier()
    if rank == 0:
        store = CheckpointStore(Path(folder), keep=1)
        store.write(snapshot(job_state(), note="after resume"))
