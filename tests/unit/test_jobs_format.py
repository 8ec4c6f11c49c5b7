"""Status, checkpoint and run tables of dbnps.jobs.format, from known messages (no job)."""

from __future__ import annotations

import json
from pathlib import Path

from dbnps.jobs import format as fmt
from dbnps.v1 import control_pb2 as pb


def _status(**kw) -> pb.Status:
    msg = pb.Status(
        job_id="j1",
        ready=True,
        uptime_seconds=12.4,
        version=300,
        updates_applied=290,
        samples_per_second=12345.6,
        has_loss=True,
        loss=0.12345,
        has_test_accuracy=True,
        test_accuracy=0.9712,
        checkpoints=2,
        config=pb.ConfigSummary(
            sizes=[784, 32, 10],
            update_rule="momentum",
            n_servers=1,
            n_workers=2,
            config_json=json.dumps({"model": {"sizes": [784, 32, 10]}}),
        ),
        progress=pb.Progress(
            phase="finetune", phase_index=2, n_phases=3, epoch=1.5, phase_epochs=4, fraction=0.375
        ),
        staleness=pb.Staleness(mean=0.5, max=3, count=4, counts=[2, 2]),
        workers=[
            pb.WorkerStatus(
                worker=0,
                rank=1,
                state="running",
                steps=10,
                samples_per_second=6000,
                heartbeat_age_seconds=0.25,
                updates_applied=140,
                loss=0.1,
            ),
            pb.WorkerStatus(worker=1, rank=2, state="starting", heartbeat_age_seconds=-1),
        ],
        history_json=[json.dumps({"t": 1.0, "loss": 0.5})],
        **kw,
    )
    msg.updates_rejected["stale"] = 7
    msg.updates_rejected["phase"] = 1
    return msg


def test_status_text_of_a_known_status():
    lines = fmt.status_text(_status()).splitlines()
    assert lines[0] == (
        "job j1  running  up 12s  1 server(s), 2 worker(s)  net 784-32-10  rule momentum"
    )
    assert lines[1] == "phase finetune (3/3)  epoch 1.50/4 (37.5%)  version 300"
    assert lines[2] == (
        "updates applied 290, rejected 8 (phase 1, stale 7)  staleness mean 0.50 max 3"
    )
    assert lines[3] == (
        "throughput 12,346 samples/s  loss 0.1235  test accuracy 0.9712  checkpoints 2"
    )
    assert lines[5].split() == [
        "WORKER", "RANK", "STATE", "STEPS", "SAMPLES/S", "HEARTBEAT", "APPLIED", "REJECTED", "LOSS"
    ]  # fmt: skip
    assert lines[6].split() == ["0", "1", "running", "10", "6,000", "0.2s", "140", "0", "0.1000"]
    assert lines[7].split()[:6] == ["1", "2", "starting", "0", "0", "-"]  # no heartbeat yet
    assert len(lines) == 8


def test_status_text_after_a_resume_and_with_a_validation_split():
    msg = _status(restarts=1, resumed_from="/r/ckpt-9.npz", eval_split="validation",
                  has_eval_accuracy=True, eval_accuracy=0.95)  # fmt: skip
    text = fmt.status_text(msg)
    assert "  restarts 1  resumed from /r/ckpt-9.npz" in text.splitlines()[0]
    assert "updates applied 290  (since resume), rejected 8" in text
    assert "validation accuracy 0.9500  test accuracy 0.9712" in text


def test_status_text_while_starting_says_what_was_asked_for():
    msg = pb.Status(job_id="j2", uptime_seconds=3, config=pb.ConfigSummary(sizes=[784, 16]))
    text = fmt.status_text(msg, {"servers": 2, "workers": 4})
    assert text.splitlines() == [
        "job j2  starting  up 3s  2 server(s), 4 worker(s) requested  net 784-16  rule ",
        "waiting for every rank to join (RMA windows not ready yet)",
    ]
    assert "requested" not in fmt.status_text(msg)  # --address: no run record


def test_message_dict_is_structured_json_all_the_way_down():
    d = fmt.message_dict(_status())
    json.dumps(d)  # serialisable as it is
    assert d["config"]["resolved"] == {"model": {"sizes": [784, 32, 10]}}  # an object
    assert "config_json" not in d["config"] and "history_json" not in d
    assert d["history"] == [{"t": 1.0, "loss": 0.5}]
    assert d["version"] == "300"  # the proto3 JSON mapping: int64 as a string
    assert d["updates_rejected"] == {"stale": "7", "phase": "1"}
    assert d["metrics_address"] == "" and d["restarts"] == 0  # defaults present too
    assert [w["state"] for w in d["workers"]] == ["running", "starting"]


def test_message_dict_of_an_empty_config_text():
    d = fmt.message_dict(pb.Status(config=pb.ConfigSummary()))
    assert d["config"]["resolved"] is None and d["history"] == []


def test_checkpoints_text():
    infos = [
        fmt.message_dict(pb.CheckpointInfo(path="/r/ckpt-5.npz", version=5, phase="pretrain-1",
                                           size_bytes=1024, created_unix=0.0))
    ]  # fmt: skip
    header, row = fmt.checkpoints_text(infos, "job x").splitlines()
    assert header.split() == ["CREATED", "VERSION", "PHASE", "SIZE", "PATH"]
    assert row.split()[2:] == ["5", "pretrain-1", "1024", "/r/ckpt-5.npz"]
    assert fmt.checkpoints_text([], "job x") == (
        "no checkpoints yet (job x); `psctl checkpoint` writes one"
    )


def test_runs_text_stars_the_latest():
    rows = [
        {"job_id": "a", "state": "exited 0", "started": "s", "servers": 1, "workers": 2,
         "grpc": None, "latest": False},
        {"job_id": "b", "state": "running", "started": "t", "servers": 2, "workers": 4,
         "grpc": "127.0.0.1:5", "latest": True},
    ]  # fmt: skip
    lines = fmt.runs_text(rows, Path("/s")).splitlines()
    assert lines[1].split() == ["a", "exited", "0", "s", "1+2", "-"]
    assert lines[2].split() == ["*", "b", "running", "t", "2+4", "127.0.0.1:5"]
    assert fmt.runs_text([], Path("/s")) == "no runs in /s"
