"""rma.Windows across hosts: zeroed memory, exact one-sided ops (run by tests/test_multihost.py).

Rank 0 is a server, ranks 1.. are workers.  Round 1 creates the job's windows,
the server fills all of their memory with garbage, frees them, and round 2
creates them again: `Windows.zero` must leave every byte 0 as the workers see
it (Get from the server).  Then each worker Accumulates (SUM) its rank into
the parameters and Put/Get a pattern into its own push slot, inside the job's
passive epoch (completion by Flush); every value is checked exactly.  Prints `WINDOWS OK` on rank 0.
"""

from __future__ import annotations

import socket

import numpy as np
from mpi4py import MPI

from dbnps.common import rma

N = 300_000  # float32 parameters: > 1 MB, several osc_rdma pieces at the default buffer size


def main() -> None:
    comm = MPI.COMM_WORLD
    topo = rma.Topology.discover("server" if comm.rank == 0 else "worker")
    K = topo.n_workers
    hosts = comm.allgather(socket.gethostname())
    win = rma.Windows(topo, N)
    if topo.is_server:  # garbage everywhere, then a fresh set of windows
        for w in (win.pwin, win.swin, win.cwin):  # inside the job's epoch: store, then sync
            np.frombuffer(w.tomemory(), dtype=np.uint8).fill(0xA5)
            w.Sync()
    comm.Barrier()
    win.free()
    win = rma.Windows(topo, N)
    if not topo.is_server:
        me = topo.worker_index
        hdr = np.ones(win.hdr_words, dtype=np.int64)
        par = np.ones(N, dtype=np.float32)
        slots = np.ones(K * N, dtype=np.float32)
        cw = np.ones(2 * K * rma.MB_WORDS, dtype=np.int64)
        win.pwin.Get([hdr, MPI.INT64_T], 0, (0, hdr.size, MPI.INT64_T))
        win.pwin.Get([par, MPI.FLOAT], 0, (win.hdr_bytes, N, MPI.FLOAT))
        win.pwin.Flush(0)
        win.swin.Get([slots, MPI.FLOAT], 0, (0, slots.size, MPI.FLOAT))
        win.swin.Flush(0)
        win.cwin.Get([cw, MPI.INT64_T], 0, (0, cw.size, MPI.INT64_T))
        win.cwin.Flush(0)
        nonzero = int(np.count_nonzero(hdr) + np.count_nonzero(par))
        nonzero += int(np.count_nonzero(slots) + np.count_nonzero(cw))
        assert nonzero == 0, f"worker {me}: {nonzero} non-zero words after Windows()"
        inc = np.full(N, float(me + 1), dtype=np.float32)
        win.pwin.Accumulate([inc, MPI.FLOAT], 0, (win.hdr_bytes, N, MPI.FLOAT), MPI.SUM)
        win.pwin.Flush(0)
        pattern = np.arange(N, dtype=np.float32) * (me + 1)
        win.swin.Put([pattern, MPI.FLOAT], 0, (me * N, N, MPI.FLOAT))
        win.swin.Flush(0)
        back = np.zeros(N, dtype=np.float32)
        win.swin.Get([back, MPI.FLOAT], 0, (me * N, N, MPI.FLOAT))
        win.swin.Flush(0)
        assert np.array_equal(back, pattern), f"worker {me}: Put/Get round trip differs"
    comm.Barrier()
    if topo.is_server:
        ps = rma.PSServer(win)
        win.pwin.Sync()  # the workers' accumulates, visible to our loads
        want = K * (K + 1) / 2
        ok = bool(np.all(ps.params == want))
        assert ok, f"Accumulate(SUM): expected {want} everywhere"
        print(f"WINDOWS OK workers={K} hosts={','.join(hosts)}", flush=True)
    comm.Barrier()
    win.free()


if __name__ == "__main__":
    main()
