"""MPI program: time pull and push of the full flat vector through the real windows.

Run by bench/bench_ps.py under mpiexec with 2 ranks (1 server, 1 worker).  The
server only acks (no update rule), so this measures the parameter path alone;
the worker also times a numpy memcpy of the same size in the same run.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from mpi4py import MPI

from dbnps.common import rma
from dbnps.common.layout import Layout

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
layout = Layout([784, 500, 500, 2000], 10)
comm = MPI.COMM_WORLD
topo = rma.Topology(comm, 1, 1, comm.Get_rank())
win = rma.Windows(topo, layout.size)
comm.Barrier()
if topo.is_server:
    ps = rma.PSServer(win)
    req = comm.Ibarrier()
    while not req.Test():
        for p in ps.poll():
            ps.ack(p, rma.APPLIED)
else:
    client = rma.PSClient(win)
    buf = np.random.default_rng(0).random(layout.size, dtype=np.float32)
    dst = np.empty_like(buf)
    grad = np.ones(layout.size, dtype=np.float32)

    def best(fn):
        times = []
        for _ in range(REPS):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    memcpy = best(lambda: np.copyto(dst, buf))
    pull = best(lambda: client.pull(dst, 0, layout.size))

    def push():
        client.push(grad, 0, layout.size, n_samples=100, phase=0)
        client.wait()

    push_s = best(push)
    nbytes = 4 * layout.size
    print(
        "RESULT "
        + json.dumps(
            {
                "floats": layout.size,
                "bytes": nbytes,
                "memcpy_s": memcpy,
                "pull_s": pull,
                "push_s": push_s,
                "memcpy_GBps": nbytes / memcpy / 1e9,
                "pull_GBps": nbytes / pull / 1e9,
                "push_GBps": nbytes / push_s / 1e9,
                "pull_plus_push_GBps": 2 * nbytes / (pull + push_s) / 1e9,
            }
        ),
        flush=True,
    )
if not topo.is_server:
    comm.Ibarrier().Wait()  # matches the server's Ibarrier: it stops serving
comm.Barrier()
win.free()
