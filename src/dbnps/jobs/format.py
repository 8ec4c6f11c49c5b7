"""Text and JSON for people and scripts: status, checkpoints, runs, a finished run's outcome.

Pure functions of their inputs (a proto message, dicts), so they are tested
in-process with known values (tests/unit/test_jobs_format.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dbnps.common.errors import UserError

if TYPE_CHECKING:
    from dbnps.jobs.resume import Resumed


def message_dict(msg) -> dict:
    """`msg` in the proto3 JSON mapping (what grpcurl prints: int64 as strings), every field
    present, with the fields that carry JSON text (`config.config_json`, `history_json`)
    parsed into objects, so `--json` output is JSON all the way down."""
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    cfg = out.get("config")
    if isinstance(cfg, dict) and "config_json" in cfg:
        text = cfg.pop("config_json")
        cfg["resolved"] = json.loads(text) if text else None
    if "history_json" in out:
        out["history"] = [json.loads(h) for h in out.pop("history_json")]
    return out


def status_text(msg, run_info: dict | None = None) -> str:
    """`psctl status`: a GetStatusResponse as a header and one row per worker.

    `run_info` (job.json) says how many ranks were asked for, shown while the
    job is still starting and the server knows no phase or worker yet."""
    p = msg.progress
    rej = dict(msg.updates_rejected)
    net = "-".join(map(str, msg.config.sizes))
    if not msg.ready and not msg.stopping and p.n_phases == 0:
        # Rank 0 serves before the windows exist: nothing to say about phases or workers
        # yet, except what the run asked for.
        info = run_info or {}
        asked = (
            f"  {info['servers']} server(s), {info['workers']} worker(s) requested"
            if info.get("workers")
            else ""
        )
        return (
            f"job {msg.job_id}  starting  up {msg.uptime_seconds:.0f}s{asked}"
            f"  net {net}  rule {msg.config.update_rule}\n"
            "waiting for every rank to join (RMA windows not ready yet)"
        )
    # updates_applied counts this server process; version carries on over a resume/restart.
    since = "  (since resume)" if msg.resumed_from or msg.restarts else ""
    state = "stopping" if msg.stopping else "running" if msg.ready else "starting"
    lines = [
        f"job {msg.job_id}  {state}  up {msg.uptime_seconds:.0f}s  {msg.config.n_servers} "
        f"server(s), {msg.config.n_workers} worker(s)  net {net}  rule {msg.config.update_rule}"
        + (f"  restarts {msg.restarts}" if msg.restarts else "")
        + (f"  resumed from {msg.resumed_from}" if msg.resumed_from else ""),
        f"phase {p.phase} ({p.phase_index + 1}/{p.n_phases})  epoch {p.epoch:.2f}/"
        f"{p.phase_epochs:g} ({100 * p.fraction:.1f}%)  version {msg.version}",
        f"updates applied {msg.updates_applied}{since}, rejected {sum(rej.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) + ")" if rej else "")
        + f"  staleness mean {msg.staleness.mean:.2f} max {msg.staleness.max}",
        f"throughput {msg.samples_per_second:,.0f} samples/s  loss "
        + (f"{msg.loss:.4f}" if msg.has_loss else "-")
        + (
            f"  validation accuracy {msg.eval_accuracy:.4f}"
            if msg.eval_split == "validation" and msg.has_eval_accuracy
            else ""
        )
        + "  test accuracy "
        + (f"{msg.test_accuracy:.4f}" if msg.has_test_accuracy else "-")
        + f"  checkpoints {msg.checkpoints}",
        "",
        f"{'WORKER':>6} {'RANK':>4} {'STATE':<8} {'STEPS':>9} {'SAMPLES/S':>11} "
        f"{'HEARTBEAT':>9} {'APPLIED':>8} {'REJECTED':>8} {'LOSS':>8}",
    ]
    for w in msg.workers:
        beat = f"{w.heartbeat_age_seconds:.1f}s" if w.heartbeat_age_seconds >= 0 else "-"
        lines.append(
            f"{w.worker:>6} {w.rank:>4} {w.state:<8} {w.steps:>9} {w.samples_per_second:>11,.0f} "
            f"{beat:>9} {w.updates_applied:>8} {w.updates_rejected:>8} {w.loss:>8.4f}"
        )
    return "\n".join(lines)


def checkpoints_text(infos: list[dict], who: str) -> str:
    """`psctl checkpoints`: CheckpointInfo records (`message_dict` form) as a table."""
    if not infos:
        return f"no checkpoints yet ({who}); `psctl checkpoint` writes one"
    lines = [f"{'CREATED':<19}  {'VERSION':>9}  {'PHASE':<11} {'SIZE':>10}  PATH"]
    for c in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(c["created_unix"])))
        lines.append(
            f"{when}  {int(c['version']):>9}  {c['phase']:<11} {int(c['size_bytes']):>10}  "
            f"{c['path']}"
        )
    return "\n".join(lines)


def checkpoint_line(reply) -> str:
    """`psctl checkpoint`: the CheckpointResponse in one line."""
    c = reply.checkpoint
    return (
        f"{c.path}  (version {c.version}, phase {c.phase}, {c.size_bytes} bytes, "
        f"{reply.duration_seconds:.3f}s)"
    )


def runs_text(rows: list[dict], where: Path) -> str:
    """`psctl list`: `registry.run_rows` as a table, the latest run starred."""
    if not rows:
        return f"no runs in {where}"
    lines = [f"  {'JOB ID':<24} {'STATE':<10} {'STARTED':<25} {'S+K':<5} GRPC"]
    for r in rows:
        mark = "*" if r["latest"] else " "
        sk = f"{r['servers']}+{r['workers']}"
        lines.append(
            f"{mark} {r['job_id']:<24} {r['state']:<10} {r['started']:<25} {sk:<5} {r['grpc'] or '-'}"
        )
    return "\n".join(lines)


def started_text(info: dict, resumed: Resumed | None) -> str:
    """`psctl start`: where the new job is and how to reach it (job.json `info`)."""
    lines = [
        f"psctl: started job {info['job_id']} ({info['servers']} server + "
        f"{info['workers']} workers)",
        f"  run dir  {info['run_dir']}",
        f"  gRPC     {info['grpc']}  (token: {info['token_file']})",
    ]
    if info["metrics"]:
        lines.append(
            f"  metrics  http://{info['metrics']}/metrics  (target {info['prometheus_target']})"
        )
    lines.append(f"  log      {info['log']}")
    if resumed is not None:
        m = resumed.meta
        lines.append(f"  resumed  {resumed.path} (phase {m['phase_name']}, version {m['version']})")
    lines.append("  next     psctl status | psctl logs -f | psctl checkpoint | psctl stop")
    return "\n".join(lines)


def outcome(summary_path: Path) -> str:
    """`psctl run`: what the job saved, how it scored, and what the server applied."""
    try:
        s = json.loads(Path(summary_path).read_text())
    except (OSError, ValueError) as exc:  # mpiexec said 0 but the server wrote no summary
        raise UserError(f"the job ended without a summary ({summary_path}: {exc})") from None
    saved = s.get("saved") or {}
    acc = s["test_accuracy"]
    score = f"test accuracy {acc:.4f}" if acc == acc else "not fine-tuned (no test accuracy)"
    val = saved.get("eval_accuracy", float("nan"))
    if saved.get("eval_split") == "validation" and val == val:
        score += f", validation {val:.4f}"
    which = {"last": "last", "best": "best on validation", "target": "target-reaching"}
    how = which.get(saved.get("which", "last"), "last")
    if saved.get("averaged"):  # [ps] average
        how += " averaged"
    return (
        f"{score}; saved the {how} parameters (version {saved.get('version', s['version'])}) "
        f"to {Path(summary_path).parent / 'model.npz'}; "
        f"{s['applied']} updates applied, {sum(s['rejected'].values())} rejected"
    )
