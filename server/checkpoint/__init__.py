"""Checkpoints: one self-verifying `.npz` file per checkpoint, written atomically.

One module per role, imported downward only:

* `snapshot`: `JobState`, what the server hands over (built by
  `ParameterServer.checkpoint_state` on rank 0's main thread, which calls
  MPI), and `snapshot`, which turns it into a `format.Snapshot` on any thread.
* `format`: the file: its entries, the digest, the manifest and the checks a
  file must pass to be loaded (`load_checkpoint`, `validate`).
* `store`: a folder of them: the atomic write, list, prune, clean-up of a
  crashed writer's tmp file, and `find_resumable`.
* `periodic`: rank 0's checkpoints every N seconds or updates.

A checkpoint is complete: the whole flat parameter vector and the whole
update-rule state (every server shard's, gathered by rank 0 through the RMA
windows), the schedule counters (phase, samples into the phase, version of
every shard), the fine-tune evaluation position, the resolved config, and
one SHA256 digest over all of it (the manifest, `meta`, included).

Held exactly: parameters, update-rule state, phase, samples into the phase,
every shard's version, the evaluation position (`next_eval`) and the last
accuracies.  Not held: the workers' minibatch RNG streams (they restart from
`[run] seed`) and, in `[ps] mode = "accumulate"`, the update-rule state,
which lives in each worker (its own velocity over its own gradients, never
in a window the server can read); it restarts at zero on resume, as at a
phase change (`meta["rule_state"]` says so; tests/test_checkpoint.py).

Test hooks: `DBNPS_TEST_CRASH_BEFORE_RENAME=N` (store) SIGKILLs the writing
process on its N-th write, after the fsync of the tmp file and before the
rename.  `DBNPS_TEST_SNAPSHOT_AFTER_RESUME=DIR` (snapshot): a resumed server
writes what its windows hold right after the restore, before any worker
pulls, into DIR, so a test can compare it with the checkpoint.
"""
