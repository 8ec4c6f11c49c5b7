"""The server's idle loop, A B A B: rank 0's CPU and the workers' ack waits.

    python bench/bench_wakeup.py ROUNDS CONFIG BASELINE_PSCTL [OUT.json]

Each round runs `psctl run --workers 2` of CONFIG with BASELINE_PSCTL (another
checkout's venv, e.g. the commit before a change) and with this checkout's
psctl; per run: rank 0's CPU share of a core (psutil, user + system over its
life), its CPU split (summary cpu_seconds), mailbox looks, and the workers'
mean ack wait per phase (DBNPS_PROFILE=1).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROUNDS, CONFIG, BASE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
OUT = sys.argv[4] if len(sys.argv) > 4 else "bench/results/wakeup-ab.json"
arms = {"baseline": (BASE, {}), "this": (str(Path(sys.executable).with_name("psctl")), {})}
res = {k: [] for k in arms}
for r in range(ROUNDS):
    for name, (psctl, env) in arms.items():
        rd = f"/tmp/dbnps-wakeup-{name}-{r}"
        subprocess.run(["rm", "-rf", rd])
        e = dict(os.environ, DBNPS_PROFILE="1", **env)
        p = subprocess.Popen(
            [psctl, "run", "--config", CONFIG, "--workers", "2", "--run-dir", rd, "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=e,
        )
        root = psutil.Process(p.pid)
        srv = {}
        while p.poll() is None:
            try:
                for q in root.children(recursive=True):
                    if "dbnps.server" in q.cmdline():
                        ct = q.cpu_times()
                        srv = {"cpu": ct.user + ct.system, "life": time.time() - q.create_time()}
            except psutil.Error:
                pass
            time.sleep(0.2)
        out = p.stdout.read()
        waits = {}
        for m in re.finditer(
            r"\[worker (\d)\] (\S+) ms/step: step ([\d.]+)\s+push ([\d.]+)\s+wait ([\d.]+)\s+pull ([\d.]+)",
            out,
        ):
            waits.setdefault(m.group(2), []).append(float(m.group(5)))
        s = json.loads(Path(f"{rd}/summary.json").read_text())
        row = {
            "server_cpu_share": srv["cpu"] / srv["life"],
            "wall": s["wall_s"],
            "split": s.get("cpu_seconds"),
            "looks": s.get("mailbox_looks"),
            "wait_ft": statistics.mean(waits["finetune"]),
            "wait_p3": statistics.mean(waits["pretrain-3"]),
            "wait_p2": statistics.mean(waits["pretrain-2"]),
        }
        res[name].append(row)
        print(
            r,
            name,
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
            flush=True,
        )
Path(OUT).write_text(json.dumps(res, indent=1) + "\n")
