"""Across hosts vs one host: the RMA path over TCP, measured on emulated hosts.

    python bench/bench_hosts.py all [--rounds 2] [--out bench/results/hosts]

Needs root and `ip`: it creates 3 hosts as network namespaces on a bridge
(tests/netns.py, the multi-host tests' harness) and measures, in one run:

1. **raw TCP**: a Python socket streaming 6.67 MB messages (the
   784-500-500-2000-10 model) from h2 to h1 over the same veth link;
2. **RMA**, 2 ranks, the target holding a 6.67 MB `Win.Allocate` window:
   pull (shared Lock + Get + Unlock), push (shared Lock + Put + Unlock),
   Accumulate(SUM) under an exclusive lock, and an atomic (Fetch_and_op
   NO_OP) round trip, (i) both ranks on one host (`osc/sm`) and (ii) on h1 and
   h2 (`osc/rdma` over `btl/tcp`, with the launcher's multi-host settings).
   The target runs the server's loop shape (`poll`: an MPI call every 0.1
   ms, as the server's idle back-off), or calls MPI without sleeping
   (`spin`), or computes in numpy between MPI calls (`busy`: 50 ms chunks),
   or does that with a progress thread (`busy-thread`: Iprobe + 1 ms sleep);
3. **training**, the same K = 2 workers placed (a) on the server's host,
   (b) on one other host, (c) over two other hosts, plus (c) in accumulate
   mode and with n_fetch = n_push = 2; rounds alternate the placements
   (a b c ... a b c), every job reports samples/s and time to its target.

Results: `<out>.json` and `<out>.md` (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_MODEL = 1_666_794  # float32 parameters of 784-500-500-2000-10 (6.67 MB)


# -- 1. raw socket --------------------------------------------------------------
def sock_recv(port: int, nbytes: int, reps: int) -> None:
    """Receiver (runs inside a host's namespace): read reps x nbytes, answer one byte each."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for _ in range(reps):
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], nbytes - got)
            if n == 0:
                raise SystemExit("sender left early")
            got += n
        conn.sendall(b"k")
    conn.close()


def sock_send(addr: str, port: int, nbytes: int, reps: int) -> None:
    """Sender: one message at a time and its ack, like a push; prints seconds per message."""
    s = socket.create_connection((addr, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = bytes(nbytes)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.sendall(data)
        if s.recv(1) != b"k":
            raise SystemExit("no ack")
        times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": times}), flush=True)


def netns_exec(hosts, host: str) -> list[str]:
    return ["ip", "netns", "exec", hosts.namespaces[host]]


def raw_socket(hosts, reps: int = 20) -> dict:
    py = sys.executable
    port = 47123
    recv = subprocess.Popen(
        [
            *netns_exec(hosts, "h1"),
            py,
            __file__,
            "sock-recv",
            str(port),
            str(4 * N_MODEL),
            str(reps),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout.readline().strip() == "ready"
    out = subprocess.run(
        [
            *netns_exec(hosts, "h2"),
            py,
            __file__,
            "sock-send",
            hosts.addresses["h1"],
            str(port),
            str(4 * N_MODEL),
            str(reps),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    recv.wait(timeout=30)
    secs = json.loads(out.stdout)["seconds"][2:]  # first two: TCP slow start
    med = statistics.median(secs)
    return {"median_s": med, "GBps": 4 * N_MODEL / med / 1e9, "reps": len(secs)}


# -- 2. RMA ---------------------------------------------------------------------
def rma_program(mode: str, reps: int) -> None:
    """2 ranks under mpiexec: rank 0 is the target, rank 1 measures."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    N = N_MODEL
    win = MPI.Win.Allocate(4 * N if rank == 0 else 0, 4, comm=comm)
    if rank == 0:
        win.Lock(0, MPI.LOCK_EXCLUSIVE)
        np.frombuffer(win.tomemory(), dtype=np.float32).fill(0)
        win.Unlock(0)
    comm.Barrier()
    if rank == 0:
        stop = threading.Event()
        if mode == "busy-thread":

            def progress() -> None:  # Iprobe drives Open MPI's progress engine
                while not stop.is_set():
                    comm.Iprobe(source=1, tag=7)
                    time.sleep(1e-3)

            th = threading.Thread(target=progress, daemon=True)
            th.start()
        a = np.random.default_rng(0).random((400, 400), dtype=np.float32)
        while not comm.Iprobe(source=1, tag=7):
            if mode == "poll":
                time.sleep(1e-4)
            elif mode == "spin":
                pass
            else:  # ~50 ms of numpy without an MPI call, then one
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 0.05:
                    a = a @ a
                    a /= np.abs(a).max() + 1
        stop.set()
        comm.recv(source=1, tag=7)
        comm.send(MPI.Query_thread(), dest=1, tag=8)
    else:
        buf = np.ones(N, dtype=np.float32)
        one = np.zeros(1, dtype=np.int32)
        res = np.zeros(1, dtype=np.int32)

        def timed(fn, n):
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return statistics.median(out[1:])  # the first one warms up

        def pull():
            win.Lock(0, MPI.LOCK_SHARED)
            win.Get([buf, MPI.FLOAT], 0)
            win.Unlock(0)

        def push():
            win.Lock(0, MPI.LOCK_SHARED)
            win.Put([buf, MPI.FLOAT], 0)
            win.Unlock(0)

        def acc():
            win.Lock(0, MPI.LOCK_EXCLUSIVE)
            win.Accumulate([buf, MPI.FLOAT], 0, op=MPI.SUM)
            win.Unlock(0)

        def atomic():
            win.Lock(0, MPI.LOCK_SHARED)
            win.Fetch_and_op([one, MPI.INT], [res, MPI.INT], 0, 0, MPI.NO_OP)
            win.Unlock(0)

        out = {"mode": mode}
        if mode in ("poll", "spin"):
            out["pull_s"] = timed(pull, reps)
            out["push_s"] = timed(push, reps)
            out["accumulate_s"] = timed(acc, reps)
            out["atomic_s"] = timed(atomic, 5 * reps)
        else:  # the progress question: how long does one op wait while the target computes
            out["atomic_s"] = timed(atomic, reps)
            out["pull_s"] = timed(pull, reps)
        comm.send(None, dest=0, tag=7)
        out["thread_level_multiple"] = comm.recv(source=0, tag=8) == MPI.THREAD_MULTIPLE
        print("RESULT " + json.dumps(out), flush=True)
    comm.Barrier()
    win.Free()


def run_rma(hosts, where: str, mode: str, reps: int, extra_env: dict | None = None) -> dict:
    from dbnps.common import launcher

    placed = ["h1", "h2"] if where == "across" else None
    argv = launcher.spmd_argv(2, [__file__, "rma", mode, str(reps)], hosts=placed)
    env = hosts.env(launcher.mpi_env()) if placed else launcher.mpi_env()
    env.update(extra_env or {})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"rma {where} {mode} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    r = json.loads(line[7:])
    nb = 4 * N_MODEL
    for op in ("pull", "push", "accumulate"):
        if f"{op}_s" in r:
            r[f"{op}_GBps"] = nb / r[f"{op}_s"] / 1e9
    if "push_s" in r:
        r["pull_push_GBps"] = 2 * nb / (r["pull_s"] + r["push_s"]) / 1e9
    r["where"] = where
    return r


# -- 3. training placements -----------------------------------------------------
PLACEMENTS = {
    "a: workers on the server's host": ("h1:3", {}),
    "b: workers on one other host": ("h1:1,h2:2", {}),
    "c: workers on two other hosts": ("h1:1,h2:1,h3:1", {}),
    "c, accumulate mode": ("h1:1,h2:1,h3:1", {"mode": "accumulate"}),
    "c, n_fetch = n_push = 2": ("h1:1,h2:1,h3:1", {"n_fetch": 2, "n_push": 2}),
}


def job_config(path: Path, ps: dict, target: float) -> Path:
    """configs/small.toml's job (784-64-64-10, 5000 images) stopping at `target`."""
    import tomllib

    from dbnps.common.config import dump_toml

    cfg = tomllib.loads((REPO / "configs" / "small.toml").read_text())
    cfg["ps"] = {**cfg.get("ps", {}), **ps}
    cfg["run"] = {**cfg.get("run", {}), "target_accuracy": target, "eval_every_epochs": 0.5}
    path.write_text(dump_toml(cfg))
    return path


def run_job(hosts, spec: str, ps: dict, target: float, tmp: Path, tag: str) -> dict:
    from dbnps.common import launcher
    from dbnps.common.mnist import resolve_data_dir
    from dbnps.jobs.launch import job_argv

    run_dir = tmp / tag
    run_dir.mkdir(parents=True)
    cfg = job_config(tmp / f"{tag}.toml", ps, target)
    placement = launcher.placement_from_options(1, 2, hosts=spec)
    argv = job_argv(cfg, 2, 1, resolve_data_dir(None), run_dir, placement=placement)
    t0 = time.monotonic()
    proc = subprocess.run(
        argv, env=hosts.env(launcher.mpi_env()), capture_output=True, text=True, timeout=600
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"job {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    reached = next(
        (h["t"] for h in s["history"] if h.get("test_accuracy", 0) >= target), float("nan")
    )
    samples = sum(w.get("samples", 0) for w in s["workers"])
    return {
        "placement": spec,
        "ps": ps,
        "wall_s": wall,
        "train_s": s["wall_s"],
        "time_to_target_s": reached,
        "test_accuracy": s["test_accuracy"],
        "samples_per_s": samples / s["wall_s"] if s["wall_s"] else float("nan"),
        "applied": s["applied"],
    }


# -- driver ---------------------------------------------------------------------
def main_all(args) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import netns

    why = netns.requirements_error()
    if why:
        raise SystemExit(f"error: {why}")
    hosts = netns.create_hosts(3)
    results: dict = {"when": time.strftime("%Y-%m-%d %H:%M"), "n_floats": N_MODEL}
    try:
        results["raw_socket"] = [raw_socket(hosts) for _ in range(args.rounds)]
        rma = []
        for _ in range(args.rounds):  # alternate one host / across hosts, poll / spin
            rma.append(run_rma(hosts, "one host", "poll", args.reps))
            rma.append(run_rma(hosts, "across", "poll", args.reps))
            rma.append(run_rma(hosts, "across", "spin", args.reps))
        for mode in ("busy", "busy-thread"):
            rma.append(run_rma(hosts, "across", mode, 6))
        results["rma"] = rma
        jobs = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for name, (spec, ps) in PLACEMENTS.items():
                    tag = f"r{r}-{len(jobs)}"
                    row = run_job(hosts, spec, ps, args.target, Path(tmp), tag)
                    row["name"] = name
                    jobs.append(row)
                    print(json.dumps(row), flush=True)
        results["jobs"] = jobs
    finally:
        hosts.teardown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, args.target))
    print(markdown(results, args.target))


def markdown(res: dict, target: float) -> str:
    med = statistics.median
    raw = med(r["GBps"] for r in res["raw_socket"])
    lines = [
        f"Measured {res['when']} on 3 emulated hosts (network namespaces, veth + bridge), "
        f"2 cores shared; {4 * res['n_floats'] / 1e6:.2f} MB per transfer; medians.",
        "",
        "| path | pull GB/s | push GB/s | pull+push GB/s | Accumulate GB/s | atomic µs |",
        "|---|---|---|---|---|---|",
    ]
    for where, mode in (("one host", "poll"), ("across", "poll"), ("across", "spin")):
        rows = [r for r in res["rma"] if r["where"] == where and r["mode"] == mode]
        lines.append(
            f"| RMA, {where}, target {mode} | {med(r['pull_GBps'] for r in rows):.2f} | "
            f"{med(r['push_GBps'] for r in rows):.2f} | "
            f"{med(r['pull_push_GBps'] for r in rows):.2f} | "
            f"{med(r['accumulate_GBps'] for r in rows):.2f} | "
            f"{1e6 * med(r['atomic_s'] for r in rows):.0f} |"
        )
    lines.append(f"| raw Python socket, same link | | | {raw:.2f} | | |")
    lines.append("")
    for mode in ("poll", "spin"):
        across = [r for r in res["rma"] if r["where"] == "across" and r["mode"] == mode]
        ratio = med(r["pull_push_GBps"] for r in across) / raw
        lines.append(f"Across hosts, target {mode}: pull+push / raw socket = **{ratio:.2f}**.  ")
    lines.append("")
    lines += [
        "| target (server) while the worker waits | atomic ms | pull ms |",
        "|---|---|---|",
    ]
    for r in res["rma"]:
        if r["where"] == "across" and r["mode"] in ("busy", "busy-thread"):
            lines.append(f"| {r['mode']} | {1e3 * r['atomic_s']:.2f} | {1e3 * r['pull_s']:.1f} |")
    lines += [
        "",
        f"Training, configs/small.toml (784-64-64-10), K = 2, target accuracy {target}:",
        "",
        "| placement | samples/s | time to target s | final accuracy | runs |",
        "|---|---|---|---|---|",
    ]
    for name in PLACEMENTS:
        rows = [j for j in res["jobs"] if j["name"] == name]
        lines.append(
            f"| {name} | {med(j['samples_per_s'] for j in rows):,.0f} | "
            f"{med(j['time_to_target_s'] for j in rows):.1f} | "
            f"{med(j['test_accuracy'] for j in rows):.4f} | {len(rows)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "sock-recv":
        sock_recv(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "sock-send":
        sock_send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "rma":
        rma_program(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["all"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "hosts"))
    main_all(p.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
