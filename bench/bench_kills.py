"""Random-time SIGKILLs of one worker: does any job hang?  (issue 14's kill benchmark)

Each trial starts a real job (1 server + 3 workers, ULFM, configs written
here), SIGKILLs one worker rank, chosen at random, at a random moment between
launch and the job's expected end, and waits at most `--timeout` seconds.
Recorded per trial: the moment of the kill, the phase the server was in, the
exit status, whether the job hung (timed out), the heartbeat age at which the
server declared the worker dead (detection time), the applied updates, and
the final accuracy.  Results: bench/results/kills.json and kills.md.

    python bench/bench_kills.py --trials 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dbnps.common.config import dump_toml
from dbnps.common.launcher import mpi_env
from dbnps.common.mnist import resolve_data_dir
from dbnps.jobs.launch import job_argv

RESULTS = Path(__file__).resolve().parent / "results"
CFG = {
    "model": {"sizes": [784, 64, 64]},
    "data": {"train_subset": 10000, "test_subset": 1000},
    "pretrain": {"epochs": 3.0, "batch_size": 50},
    "finetune": {"epochs": 30.0, "batch_size": 50},
    "ps": {"heartbeat_timeout_s": 2.0, "step_timeout_s": 30.0, "exit_timeout_s": 15.0},
    "run": {"eval_every_epochs": 2.0, "log_every_s": 0.2},
}


def worker_pids(mpiexec: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in mpiexec.children(recursive=True):
        try:
            if p.cmdline()[1:3] == ["-m", "dbnps.worker"]:
                out.append(p)
        except psutil.Error:
            continue
    return out


def trial(tmp: Path, i: int, horizon: float, timeout: float, rng: random.Random) -> dict:
    run_dir = tmp / f"t{i:02d}"
    run_dir.mkdir(parents=True)
    cfg = run_dir / "job.toml"
    cfg.write_text(dump_toml(CFG))
    argv = job_argv(cfg, 3, 1, resolve_data_dir(None), run_dir)
    log = (run_dir / "job.log").open("w")
    t0 = time.monotonic()
    # A kill inside MPI_Init leaves the others there: common/boot.py bounds it.
    env = {**mpi_env(), "DBNPS_STARTUP_TIMEOUT_S": "30"}
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    kill_at = rng.uniform(0.3, horizon)
    victim, killed_at = None, None
    mp = psutil.Process(proc.pid)
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        now = time.monotonic() - t0
        if victim is None and now >= kill_at:
            ranks = worker_pids(mp)
            if ranks:
                victim = rng.randrange(len(ranks))
                try:
                    ranks[victim].kill()
                    killed_at = now
                except psutil.Error:
                    victim = None
            elif now > kill_at + 5:
                break  # the workers are gone already: the job ended before the kill
        time.sleep(0.01)
    hung = proc.poll() is None
    if hung:
        for p in [mp, *mp.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
    rc = proc.wait()
    wall = time.monotonic() - t0
    log.close()
    text = (run_dir / "job.log").read_text(errors="replace").replace("\x00", "")
    detect = [float(x) for x in re.findall(r"marked dead: no heartbeat for ([0-9.]+)s", text)]
    phases = re.findall(r"\[server\] phase (\S+) starts", text)
    summary = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "trial": i,
        "kill_at_s": round(killed_at, 2) if killed_at is not None else None,
        "killed": killed_at is not None,
        "phase_at_end": phases[-1] if phases else "",
        "rc": rc,
        "hung": hung,
        "wall_s": round(wall, 2),
        "detected_after_s": detect[0] if detect else None,
        "dead_workers": summary.get("dead_workers"),
        "applied": summary.get("applied"),
        "test_accuracy": summary.get("test_accuracy"),
        "errors": [line for line in text.splitlines() if line.startswith("error:")][:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/dbnps-bench-kills"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = args.tmp / time.strftime("%Y%m%d-%H%M%S")
    # An uninterrupted run sets the horizon (kills land anywhere from launch to its end).
    base = trial(tmp, 0, 1e9, args.timeout, random.Random(1))
    horizon = base["wall_s"]
    print(f"baseline: {horizon:.1f}s, accuracy {base['test_accuracy']}", flush=True)
    rows = []
    for i in range(1, args.trials + 1):
        r = trial(tmp, i, horizon, args.timeout, rng)
        rows.append(r)
        print(json.dumps(r), flush=True)
    killed = [r for r in rows if r["killed"]]
    out = {
        "config": CFG,
        "baseline": base,
        "trials": rows,
        "kills": len(killed),
        "hangs": sum(r["hung"] for r in rows),
        "rc0": sum(r["rc"] == 0 for r in killed),
        "detected_after_s_median": sorted(
            r["detected_after_s"] for r in killed if r["detected_after_s"] is not None
        )[len(killed) // 2 : len(killed) // 2 + 1],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kills.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Random-time worker kills ({len(killed)} kills, 1 server + 3 workers, 784-64-64-10)",
        "",
        f"Baseline (no kill): {horizon:.1f} s, test accuracy {base['test_accuracy']}.",
        f"**Hangs: {out['hangs']}**; finished rc 0: {out['rc0']} of {len(killed)}.",
        "",
        "| trial | kill at (s) | rc | hung | detected after (s) | dead | applied | accuracy | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial']} | {r['kill_at_s']} | {r['rc']} | {r['hung']} | "
            f"{r['detected_after_s']} | {r['dead_workers']} | {r['applied']} | "
            f"{r['test_accuracy']} | {r['wall_s']} |"
        )
    (RESULTS / "kills.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if out["hangs"] else 0)


if __name__ == "__main__":
    main()
