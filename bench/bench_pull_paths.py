"""Across hosts: which way of moving the parameters to a worker gets near the raw TCP rate.

    python bench/bench_pull_paths.py [--rounds 3] [--reps 12] [--paths a,b] [--mca k=v ...] [--out F]

Needs root and `ip` (tests/netns.py makes 2 hosts as network namespaces).
Raw mpi4py, no dbnps protocol code: rank 0 (host h1) is the server holding
the 784-500-500-2000-10 model (6.67 MB) in a `Win.Allocate` window and runs
the server's loop shape (an MPI call every 0.1 ms); rank 1 (host h2) is the
worker.  One window epoch for the job (`Lock_all(MODE_NOCHECK)` + Flush, as
common/rma.py).  Every rep times each path once, in turn, so the paths share
the box's noise; rounds alternate a raw Python socket (6.67 MB + 1-byte ack,
same veth link) and the MPI run: A B A B.

Paths (the worker's side of one 6.67 MB transfer):

- `get`        Get of the whole vector + Flush (what `PSClient.pull` does);
- `get-4x`     4 Gets of a quarter each, then one Flush;
- `getacc`     Get_accumulate(NO_OP) of the whole vector + Flush;
- `put`        Put of the whole vector + Flush (what `PSClient.push` does);
- `srv-put`    the worker asks (atomic write of a request word on the
               server), the server's loop sees it and Puts the vector into
               the worker's receive window, Flushes, and writes a done word
               on the worker (atomic); the worker polls its done word.
               Pull as a Put by the server;
- `rget-4x`    4 Rgets of a quarter each, then Waitall;
- `msg-pull`   the worker posts two Irecvs (header words, then the vector
               straight into its buffer) and sends a one-word request; the
               server's loop sees the request (Iprobe), copies its header +
               vector into a snapshot buffer (so it may go on applying
               pushes) and Isends both from it (two-sided, ob1 over
               btl/tcp): pull as a message;
- `send-push`  the worker `Send`s the vector, the server `Recv`s it into a
               slot and answers with a one-word ack: push as a message.

Also the bytes each path puts on the wire (the worker's eth0 rx + tx
counters, /proc/net/dev inside its namespace), per byte of payload.

`msg-pull` and `send-push` are two-sided: the mission keeps point-to-point
messages off the parameter path, so they are here as the yardstick of what
the same Open MPI moves over the same link, not as candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_MODEL = 1_666_794  # float32 parameters of 784-500-500-2000-10 (6.67 MB)
PATHS = ("get", "get-4x", "rget-4x", "getacc", "put", "srv-put", "msg-pull", "send-push")
# pull+push pairs reported per rep: (pull path, push path)
COMBOS = (("get", "put"), ("msg-pull", "put"), ("msg-pull", "send-push"))
TAG_STOP, TAG_REQ, TAG_DATA, TAG_PUSH, TAG_ACK = 7, 8, 9, 10, 11


def wire_bytes() -> np.ndarray:
    """(rx, tx) bytes of eth0 in this process's network namespace."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            f = rest.split()
            return np.array([int(f[0]), int(f[8])])
    return np.zeros(2, dtype=np.int64)


def mpi_program(reps: int, paths: list[str]) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    N = N_MODEL
    # rank 0: the parameters; rank 1: the receive window for srv-put
    pwin = MPI.Win.Allocate(4 * N, 4, comm=comm)
    # one int64 word per rank: rank 0's request counter, rank 1's done counter
    cwin = MPI.Win.Allocate(8, 8, comm=comm)
    for w in (pwin, cwin):
        w.Lock(rank, MPI.LOCK_EXCLUSIVE)
        np.frombuffer(w.tomemory(), dtype=np.uint8).fill(0)
        w.Unlock(rank)
    comm.Barrier()
    for w in (pwin, cwin):
        w.Lock_all(MPI.MODE_NOCHECK)
    mine = np.frombuffer(pwin.tomemory(), dtype=np.float32)
    one = np.ones(1, dtype=np.int64)
    res = np.zeros(1, dtype=np.int64)
    val = np.zeros(1, dtype=np.int64)

    def read_word(target: int) -> int:
        cwin.Fetch_and_op([one, MPI.INT64_T], [res, MPI.INT64_T], target, 0, MPI.NO_OP)
        cwin.Flush(target)
        return int(res[0])

    def write_word(target: int, v: int) -> None:
        val[0] = v
        cwin.Accumulate([val, MPI.INT64_T], target, (0, 1, MPI.INT64_T), MPI.REPLACE)
        cwin.Flush(target)

    if rank == 0:
        mine[:] = np.arange(N, dtype=np.float32)
        slot = np.zeros(N, dtype=np.float32)
        header = np.arange(16, dtype=np.int64)  # stands for the pwin header words
        snap_hdr, snap = np.zeros_like(header), np.zeros_like(mine)
        sending: list = []  # Isends of the snapshot in flight
        req_word = np.zeros(1, dtype=np.int64)
        st = MPI.Status()
        served = 0
        while not comm.Iprobe(source=1, tag=TAG_STOP):
            if sending and MPI.Request.Testall(sending):
                sending = []
            while comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQ, status=st):
                src = st.Get_source()
                comm.Recv([req_word, MPI.INT64_T], source=src, tag=TAG_REQ)
                if sending:  # the snapshot is still being sent: finish first
                    MPI.Request.Waitall(sending)
                np.copyto(snap_hdr, header)
                np.copyto(snap, mine)
                sending = [
                    comm.Isend([snap_hdr, MPI.INT64_T], dest=src, tag=TAG_DATA),
                    comm.Isend([snap, MPI.FLOAT], dest=src, tag=TAG_DATA),
                ]
            if comm.Iprobe(source=1, tag=TAG_PUSH):
                comm.Recv([slot, MPI.FLOAT], source=1, tag=TAG_PUSH)
                comm.send(int(slot[-1]), dest=1, tag=TAG_ACK)
            want = read_word(0)  # the server's poll of its own mailbox word
            if want > served:
                pwin.Put([mine, MPI.FLOAT], 1, (0, N, MPI.FLOAT))
                pwin.Flush(1)  # the vector is complete at the worker before the done word
                served = want
                write_word(1, served)
            else:
                time.sleep(1e-4)  # the server's idle back-off
        comm.recv(source=1, tag=TAG_STOP)
    else:
        buf = np.zeros(N, dtype=np.float32)
        recv = np.frombuffer(pwin.tomemory(), dtype=np.float32)
        expect = np.arange(N, dtype=np.float32)
        q = N // 4
        state = {"asked": 0}

        def get():
            pwin.Get([buf, MPI.FLOAT], 0, (0, N, MPI.FLOAT))
            pwin.Flush(0)

        def get4():
            for i in range(4):
                hi = N if i == 3 else (i + 1) * q
                pwin.Get([buf[i * q : hi], MPI.FLOAT], 0, (i * q, hi - i * q, MPI.FLOAT))
            pwin.Flush(0)

        def getacc():
            pwin.Get_accumulate([buf, MPI.FLOAT], [buf, MPI.FLOAT], 0, (0, N, MPI.FLOAT), MPI.NO_OP)
            pwin.Flush(0)

        def put():  # the same values the server holds, so the other paths still check
            pwin.Put([expect, MPI.FLOAT], 0, (0, N, MPI.FLOAT))
            pwin.Flush(0)

        def srv_put():
            state["asked"] += 1
            write_word(0, state["asked"])
            while read_word(1) < state["asked"]:
                pass  # the Fetch_and_op on ourself also drives progress (the Put lands)
            pwin.Sync()
            buf[:] = recv

        hdr_in = np.zeros(16, dtype=np.int64)
        req_word = np.ones(1, dtype=np.int64)

        def rget4():
            reqs = []
            for i in range(4):
                hi = N if i == 3 else (i + 1) * q
                reqs.append(
                    pwin.Rget([buf[i * q : hi], MPI.FLOAT], 0, (i * q, hi - i * q, MPI.FLOAT))
                )
            MPI.Request.Waitall(reqs)

        def msg_pull():
            reqs = [
                comm.Irecv([hdr_in, MPI.INT64_T], source=0, tag=TAG_DATA),
                comm.Irecv([buf, MPI.FLOAT], source=0, tag=TAG_DATA),
            ]
            comm.Send([req_word, MPI.INT64_T], dest=0, tag=TAG_REQ)
            MPI.Request.Waitall(reqs)
            if hdr_in[5] != 5:
                raise SystemExit("msg-pull: wrong header")

        def send_push():
            comm.Send([expect, MPI.FLOAT], dest=0, tag=TAG_PUSH)
            if comm.recv(source=0, tag=TAG_ACK) != int(expect[-1]):
                raise SystemExit("send-push: wrong ack")

        fns = {
            "send-push": send_push,
            "get": get,
            "get-4x": get4,
            "getacc": getacc,
            "put": put,
            "srv-put": srv_put,
            "rget-4x": rget4,
            "msg-pull": msg_pull,
        }
        times = {p: [] for p in paths}
        wire = {p: [] for p in paths}
        for rep in range(reps + 1):  # rep 0 warms every path up
            for p in paths:
                buf.fill(-1)
                b0 = wire_bytes()
                t0 = time.perf_counter()
                fns[p]()
                dt = time.perf_counter() - t0
                db = wire_bytes() - b0
                if p not in ("put", "send-push") and not np.array_equal(buf, expect):
                    raise SystemExit(f"{p}: wrong values")
                if rep:
                    times[p].append(dt)
                    wire[p].append(db)
        comm.send(None, dest=0, tag=TAG_STOP)
        combos = {}
        for a, b in COMBOS:
            if a in times and b in times:
                pp = [8 * N / (x + y) / 1e9 for x, y in zip(times[a], times[b], strict=True)]
                combos[f"{a}+{b}"] = statistics.median(pp)
        out = {
            "combos_GBps": combos,
        }
        out |= {
            p: {
                "median_s": statistics.median(times[p]),
                "GBps": 4 * N / statistics.median(times[p]) / 1e9,
                "wire_per_byte": statistics.median(int(w.sum()) for w in wire[p]) / (4 * N),
                "rx_per_byte": statistics.median(int(w[0]) for w in wire[p]) / (4 * N),
                "tx_per_byte": statistics.median(int(w[1]) for w in wire[p]) / (4 * N),
                "seconds": times[p],
            }
            for p in paths
        }
        print("RESULT " + json.dumps(out), flush=True)
    for w in (pwin, cwin):
        w.Unlock_all()
    comm.Barrier()
    pwin.Free()
    cwin.Free()


def run_mpi(hosts, reps: int, paths: list[str], mca: list[tuple[str, str]]) -> dict:
    from dbnps.common import launcher

    argv = launcher.spmd_argv(2, [__file__, "mpi", str(reps), ",".join(paths)], hosts=["h1", "h2"])
    for k, v in mca:
        argv[2:2] = ["--mca", k, v]
    env = hosts.env(launcher.mpi_env())
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"mpi run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main_bench(args) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    import bench_hosts
    import netns

    why = netns.requirements_error()
    if why:
        raise SystemExit(f"error: {why}")
    mca = []
    for kv in args.mca:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"error: --mca {kv!r}: expected key=value")
        mca.append((k, v))
    paths = args.paths.split(",")
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise SystemExit(f"error: unknown path(s) {bad}; choose from {','.join(PATHS)}")
    hosts = netns.create_hosts(2)
    rounds = []
    try:
        for r in range(args.rounds):
            raw = bench_hosts.raw_socket(hosts)
            mpi = run_mpi(hosts, args.reps, paths, mca)
            combos = mpi.pop("combos_GBps")
            row = {"round": r, "raw_GBps": raw["GBps"], "paths": mpi, "combos_GBps": combos}
            rounds.append(row)
            print(
                f"round {r}: raw {raw['GBps']:.2f} GB/s  "
                + "  ".join(
                    f"{p} {mpi[p]['GBps']:.2f} (rx {mpi[p]['rx_per_byte']:.2f} tx {mpi[p]['tx_per_byte']:.2f})"
                    for p in paths
                ),
                flush=True,
            )
    finally:
        hosts.teardown()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "mca": mca,
        "reps": args.reps,
        "n_floats": N_MODEL,
        "rounds": rounds,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))


def summary(res: dict) -> str:
    med = statistics.median
    paths = list(res["rounds"][0]["paths"])
    lines = [
        f"{res['when']}, MCA {res['mca'] or 'launcher defaults'}, {len(res['rounds'])} rounds",
        "| path | GB/s (median of rounds) | / raw socket, same round (median, range) | wire bytes per byte |",
        "|---|---|---|---|",
    ]
    for p in paths:
        gb = [r["paths"][p]["GBps"] for r in res["rounds"]]
        ratio = [r["paths"][p]["GBps"] / r["raw_GBps"] for r in res["rounds"]]
        wire = med(r["paths"][p]["wire_per_byte"] for r in res["rounds"])
        lines.append(
            f"| {p} | {med(gb):.2f} | {med(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) "
            f"| {wire:.2f} |"
        )
    raw = [r["raw_GBps"] for r in res["rounds"]]
    lines.append(f"| raw socket | {med(raw):.2f} | 1 | |")
    for c in res["rounds"][0]["combos_GBps"]:
        gb = [r["combos_GBps"][c] for r in res["rounds"]]
        ratio = [r["combos_GBps"][c] / r["raw_GBps"] for r in res["rounds"]]
        lines.append(
            f"| pull+push {c} | {med(gb):.2f} | **{med(ratio):.2f}** "
            f"({min(ratio):.2f}-{max(ratio):.2f}) | |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "mpi":
        mpi_program(int(sys.argv[2]), sys.argv[3].split(","))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--mca", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="")
    main_bench(p.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
