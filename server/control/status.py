"""The `dbnps.v1.Status` message of a job, read from the live `ServerState` (gRPC threads)."""

from __future__ import annotations

import json
import time

from dbnps.common import protocol as pr  # the words only: no MPI in the control plane
from dbnps.server.state import STALENESS_BUCKETS
from dbnps.v1 import control_pb2 as pb


def status_message(plane, include_history: bool = False) -> pb.Status:
    """The `Status` reply of a control plane: its own fields, and once attached the
    live `ServerState` (read where the loop writes it, never a copy)."""
    cfg = plane.cfg
    st = plane.state
    msg = pb.Status(
        job_id=plane.job_id,
        ready=st is not None and not plane.stopping,
        stopping=plane.stopping,
        metrics_address=plane.metrics_address,
        uptime_seconds=time.time() - plane.start_time,
        checkpoints=plane.store.count(),
        restarts=plane.restarts,
        resumed_from=plane.resumed_from,
    )
    c = msg.config
    c.sizes.extend(cfg.model.sizes)
    c.classes = cfg.model.classes
    c.update_rule = cfg.ps.update_rule
    c.n_fetch, c.n_push = cfg.ps.n_fetch, cfg.ps.n_push
    c.staleness_bound, c.sync = cfg.ps.staleness_bound, cfg.ps.sync
    c.pretrain_epochs, c.finetune_epochs = cfg.pretrain.epochs, cfg.finetune.epochs
    c.n_servers, c.n_workers = plane.n_servers, plane.n_workers
    c.config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    if st is None:
        msg.phase = msg.progress.phase = "starting"
        return msg
    ps = plane.ps
    c.train_samples = st.n_train
    c.n_params = ps.layout.size
    msg.phase = st.phase_name
    p = msg.progress
    p.phase, p.phase_index = st.phase_name, st.phase
    p.n_phases = ps.layout.done_phase
    p.samples_in_phase, p.phase_samples = st.samples_in_phase, st.phase_samples
    p.epoch = st.epoch
    p.phase_epochs = st.phase_samples / st.n_train if st.n_train else 0.0
    p.fraction = min(st.samples_in_phase / st.phase_samples, 1.0) if st.phase_samples else 0.0
    msg.version = st.version
    msg.updates_applied = st.applied_total
    rejected = {name: 0 for name in pr.RESULT_NAMES.values() if name != "applied"}
    rejected.update(dict(st.rejected))
    msg.updates_rejected.update(rejected)
    msg.bytes_received = st.bytes_in
    counts = st.staleness_counts.copy()
    n = int(counts.sum())
    s = msg.staleness
    s.count, s.sum, s.max = n, st.staleness_sum, st.staleness_max
    s.mean = st.staleness_sum / n if n else 0.0
    s.bucket_upper_bounds.extend(STALENESS_BUCKETS)
    s.counts.extend(int(x) for x in counts)
    now = time.time()
    stats = st.worker_stats
    applied, rejected_w = st.worker_applied.copy(), st.worker_rejected.copy()
    for w in range(st.n_workers):
        row = stats[w]
        beat = float(row[pr.HEARTBEAT])
        age = now - beat if beat > 0 else -1.0
        state = st.members.state(w)  # the one liveness rule (dbnps.common.membership)
        alive = st.members.up(w)
        msg.workers.add(
            worker=w,
            rank=st.n_servers + w,
            state=state,
            alive=alive,
            steps=int(row[pr.STEPS]),
            samples=int(row[pr.ST_SAMPLES]),
            samples_per_second=float(row[pr.RATE]),
            heartbeat_age_seconds=age,
            loss=float(row[pr.LOSS]),
            pushes=int(row[pr.PUSHES]),
            pulls=int(row[pr.PULLS]),
            updates_applied=int(applied[w]),
            updates_rejected=int(rejected_w[w]),
        )
    msg.samples_per_second = float(stats[:, pr.RATE].sum())
    if st.loss == st.loss:
        msg.has_loss, msg.loss = True, st.loss
    if st.test_accuracy == st.test_accuracy:
        msg.has_test_accuracy, msg.test_accuracy = True, st.test_accuracy
    msg.eval_split = st.eval_split
    if st.eval_accuracy == st.eval_accuracy:
        msg.has_eval_accuracy, msg.eval_accuracy = True, st.eval_accuracy
    if include_history:
        msg.history_json.extend(json.dumps(e, default=float) for e in list(st.history))
    return msg
