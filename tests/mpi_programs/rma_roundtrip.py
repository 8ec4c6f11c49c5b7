"""Passive-target RMA round trip on real MNIST shards (run by tests/test_rma_roundtrip.py).

Rank 0 owns an `MPI.Win.Allocate` window of N float32 set to arange(N). Ranks 1
and 2 each load their MNIST shard and `Accumulate` a vector filled with their
shard size, then read the window back with `Get_accumulate(op=NO_OP)`. Rank 0
checks the window equals arange(N) + 60000 exactly and prints the result line.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from mpi4py import MPI

from dbnps.common.mnist import load_mnist, shard

N = 1000
N_TRAIN = 60000


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 3:
        raise SystemExit(f"rma_roundtrip needs exactly 3 ranks, got {size}")
    itemsize = np.dtype(np.float32).itemsize
    win = MPI.Win.Allocate(N * itemsize if rank == 0 else 0, itemsize, comm=comm)
    base = np.arange(N, dtype=np.float32)
    ok = True
    detail = ""
    if rank == 0:
        local = np.frombuffer(win.tomemory(), dtype=np.float32, count=N)
        win.Lock(0)
        local[:] = base
        win.Unlock(0)
    comm.Barrier()
    if rank != 0:
        data = load_mnist()
        X_s, y_s = shard(data.X_train, data.y_train, rank - 1, size - 1)
        assert X_s.dtype == np.float32 and X_s.shape == (len(y_s), 784)
        contribution = np.full(N, float(len(y_s)), dtype=np.float32)
        readback = np.empty(N, dtype=np.float32)
        noop_origin = np.zeros(N, dtype=np.float32)
        win.Lock(0, MPI.LOCK_SHARED)
        win.Accumulate(contribution, 0, target=(0, N, MPI.FLOAT), op=MPI.SUM)
        win.Unlock(0)
        win.Lock(0, MPI.LOCK_SHARED)
        win.Get_accumulate(noop_origin, readback, 0, target=(0, N, MPI.FLOAT), op=MPI.NO_OP)
        win.Unlock(0)
        # Our own update is complete; the other worker's may or may not be in yet.
        delta = readback - base
        ok = bool(np.all((delta == len(y_s)) | (delta == N_TRAIN)))
        detail = f"rank {rank}: shard {len(y_s)}, readback delta {np.unique(delta).tolist()}"
        del contribution, readback, noop_origin
    comm.Barrier()
    result_line = ""
    if rank == 0:
        win.Lock(0)
        final = local.copy()
        win.Unlock(0)
        expected = base + np.float32(N_TRAIN)
        ok = bool(np.array_equal(final, expected)) and final.dtype == np.float32
        result_line = (
            f"RMA_ROUNDTRIP {'OK' if ok else 'FAIL'} n={N} "
            f"min_delta={float((final - base).min()):.1f} max_delta={float((final - base).max()):.1f}"
        )
    oks = comm.gather(ok, root=0)
    details = comm.gather(detail, root=0)
    win.Free()
    if rank == 0:
        for d in details[1:]:
            print(d, flush=True)
        if not all(oks):
            result_line = result_line.replace("RMA_ROUNDTRIP OK", "RMA_ROUNDTRIP FAIL")
        print(result_line, flush=True)
    all_ok = comm.bcast(all(oks) if rank == 0 else None, root=0)
    return 0 if all_ok else 1


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
    sys.exit(code)
