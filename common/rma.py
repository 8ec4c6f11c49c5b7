"""The parameter-server protocol over MPI one-sided communication (RMA).

Everything that crosses a process boundary on the training path is in this
module: three windows per server rank, made with `MPI.Win.Allocate` (the
shared-memory `osc/sm` path; `Win.Create` on numpy memory was measured 100x
slower and stalls, see docs/architecture.md).  Workers allocate zero bytes.

The API has ps-lite's shape.  Worker side (`PSClient`): `pull`, `push`,
`wait`, plus `report` for the stats row.  Server side (`PSServer`): `poll`
returns the pending pushes, the server's update rule (the pluggable request
handle, see `dbnps.server.server`) applies them, `ack` completes them.

Two modes (`[ps] mode`).  "apply" (default): pushes land in per-worker slots
and the server validates and applies them.  "accumulate" (1 server rank):
a worker runs the update rule on its own gradients and `accumulate`s the
increment straight into the parameters (MPI_Accumulate SUM under the
exclusive lock), then writes the outcome to its mailbox so the server can
count it; there is no swin, and the server only keeps the books and the
phase schedule.

Window layout on server rank s, which owns the flat-vector shard [base_s, base_s + n_s)
(K workers, worker w = world rank S + w)::

  pwin  (disp_unit 1, bytes)       writers: server s (accumulate mode: workers too, exclusive lock)
  +---------+-------+---------+------+---------+------------------+---------------------+
  | VERSION | PHASE | SAMPLES | STOP | MEMBERS | DEAD[ceil(K/64)] | params float32[n_s] |
  +---------+-------+---------+------+---------+------------------+---------------------+
   int64 words, padded to an even count (PHASE..DEAD authoritative on rank 0):
   STOP 1 = workers leave now, 2 = every worker has left (servers leave);
   MEMBERS counts membership changes; DEAD is a bitmask of dead workers.

  swin  (disp_unit 4, float32)     writer of slot w: worker w  (0 bytes in accumulate mode)
  +----------------+----------------+-----+------------------+
  | slot 0 [n_s]   | slot 1 [n_s]   | ... | slot K-1 [n_s]   |   pushed gradients
  +----------------+----------------+-----+------------------+

  cwin  (disp_unit 8)
  +-----------------------------------------+----------------------------------------+
  | mailbox[K][8] int64                     | stats[K][8] float64 (rank 0 only)      |
  | PUSH_SEQ ACK_SEQ PULLED N_SAMPLES       | STEPS SAMPLES LOSS HEARTBEAT           |
  | PHASE RESULT LO HI                      | RATE PUSHES PULLS STATE                |
  +-----------------------------------------+----------------------------------------+

Consistency rules (MPI-4.1 §12.7; ../shared/ARCHITECTURE.md):

* Parameters: the server updates its shard and the header under
  `pwin.Lock(self, EXCLUSIVE)`; a worker's pull is one `pwin.Lock(s, SHARED)`
  epoch holding a Get of the header and a Get of the parameters, so a pull
  never sees a half-applied update and the version it reads is exactly the
  version of the values it reads.
* Accumulate mode: one `pwin.Lock(0, EXCLUSIVE)` epoch per push: Get
  VERSION/PHASE/SAMPLES, Flush, and only if the phase is the worker's and not
  yet complete and the push is within tau: Accumulate(SUM) the increment and
  Put VERSION+1, SAMPLES+n.  Pulls (shared lock) and the server's own writes
  (exclusive) exclude it, so reads never see half an increment.  The worker
  checks the increment is finite (one BLAS dot) before it sends anything.
* Push: worker w writes only slot w and only when its slot is free
  (ACK_SEQ == PUSH_SEQ).  It Puts the gradient (epoch closed: complete at the
  target), then atomically writes the metadata words, flushes, and atomically
  bumps PUSH_SEQ.  The server reads mailbox words with Get_accumulate(NO_OP),
  reads slot w only after seeing PUSH_SEQ > ACK_SEQ, and releases it by an
  atomic Accumulate(REPLACE) of ACK_SEQ.  Every mailbox word is accessed only
  with accumulate operations, so concurrent reads and writes are defined.
* Stats rows are written with Accumulate(REPLACE) and read with
  Get_accumulate(NO_OP): element-wise atomic, never torn words.

mpi4py does not keep origin/result buffers alive until the epoch closes, so
every buffer passed to an RMA call is held in a variable (usually a
preallocated attribute) until Unlock.  All buffers are float32 / int64 /
float64 exactly as the window expects; dtypes are checked at this boundary.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

# -- layout constants -------------------------------------------------------
VERSION, PHASE, SAMPLES, STOP, MEMBERS, DEAD = range(6)
STOP_WORKERS, STOP_ALL = 1, 2


def header_words(n_workers: int) -> int:
    """int64 words of the pwin header for K workers (even: params stay 16-byte aligned)."""
    n = DEAD + (n_workers + 63) // 64
    return n + (n % 2)


def dead_set(header: np.ndarray, n_workers: int) -> set[int]:
    """Worker indices marked dead in a header's DEAD bitmask."""
    out = set()
    for w in range(n_workers):
        if (int(header[DEAD + w // 64]) >> (w % 64)) & 1:
            out.add(w)
    return out


MB_WORDS = 8
PUSH_SEQ, ACK_SEQ, PULLED, N_SAMPLES, MB_PHASE, RESULT, LO, HI = range(MB_WORDS)

ST_WORDS = 8
STEPS, ST_SAMPLES, LOSS, HEARTBEAT, RATE, PUSHES, PULLS, STATE = range(ST_WORDS)
STATE_RUNNING, STATE_DONE = 1.0, 2.0

# RESULT codes written by the server for each push.
APPLIED, REJECTED_NONFINITE, REJECTED_STALE, REJECTED_PHASE = 1, 2, 3, 4
RESULT_NAMES = {
    APPLIED: "applied",
    REJECTED_NONFINITE: "nonfinite",
    REJECTED_STALE: "stale",
    REJECTED_PHASE: "phase",
}


class PSTimeout(RuntimeError):
    """A wait on the other side of the protocol exceeded its timeout."""


def shard_bounds(size: int, n_servers: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) shards of the flat vector, one per server."""
    edges = np.linspace(0, size, n_servers + 1).round().astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(n_servers)]


@dataclass
class Topology:
    """Who is who in COMM_WORLD: servers are ranks 0..S-1, workers S..S+K-1."""

    comm: MPI.Intracomm
    n_servers: int
    n_workers: int
    rank: int

    @property
    def is_server(self) -> bool:
        return self.rank < self.n_servers

    @property
    def worker_index(self) -> int:
        return self.rank - self.n_servers

    @classmethod
    def discover(cls, role: str, comm: MPI.Intracomm | None = None) -> Topology:
        """Collective: every rank states its role; servers must come first (MPMD order)."""
        comm = comm or MPI.COMM_WORLD
        roles = comm.allgather(role)
        n_servers = roles.count("server")
        if roles[:n_servers] != ["server"] * n_servers or n_servers == 0:
            raise RuntimeError(f"servers must be ranks 0..S-1 and S >= 1, got roles {roles}")
        return cls(comm, n_servers, len(roles) - n_servers, comm.Get_rank())


class Windows:
    """The three RMA windows of a job (collective creation and destruction)."""

    def __init__(self, topo: Topology, size: int, *, slots: bool = True):
        """`slots=False` (`[ps] mode = "accumulate"`): no push slots, workers
        Accumulate into the parameters instead."""
        if not slots and topo.n_servers != 1:  # increments are added on rank 0's shard only
            raise RuntimeError("accumulate mode needs exactly one server rank")
        self.topo = topo
        self.size = size
        self.bounds = shard_bounds(size, topo.n_servers)
        K = topo.n_workers
        n_s = self.bounds[topo.rank][1] - self.bounds[topo.rank][0] if topo.is_server else 0
        server = topo.is_server
        self.n_s = n_s
        comm = topo.comm
        self.hdr_words = header_words(K)
        self.hdr_bytes = 8 * self.hdr_words
        self.pwin = MPI.Win.Allocate(self.hdr_bytes + 4 * n_s if server else 0, 1, comm=comm)
        self.swin = MPI.Win.Allocate(4 * K * n_s if server and slots else 0, 4, comm=comm)
        self.cwin = MPI.Win.Allocate(8 * 2 * K * MB_WORDS if server else 0, 8, comm=comm)

        for w in (self.pwin, self.swin, self.cwin):
            w.Set_errhandler(MPI.ERRORS_RETURN)
        self.zero()

    def zero(self) -> None:
        """Collective: every rank zeroes its own memory of every window, then a barrier.

        MPI does not promise that `Win.Allocate` memory is zero, and the protocol
        reads zeros as "nothing yet" (PUSH_SEQ = ACK_SEQ = 0, heartbeat 0 = not
        seen, STOP 0): under the MPICH wheel a mailbox came up with garbage and a
        worker was "marked dead: no heartbeat for 1796314888s".  The stores go
        under the rank's own exclusive lock (the window's memory is written by
        RMA too) and the barrier orders them before any rank's first access.
        """
        me = self.topo.rank
        for w in (self.pwin, self.swin, self.cwin):
            mem = np.frombuffer(w.tomemory(), dtype=np.uint8)
            if mem.size:
                w.Lock(me, MPI.LOCK_EXCLUSIVE)
                mem.fill(0)
                w.Unlock(me)
        self.topo.comm.Barrier()

    def free(self) -> None:
        for w in (self.pwin, self.swin, self.cwin):
            w.Free()


def finalize(
    topo: Topology, windows: Windows, *, timeout_s: float = 120.0, delay_s: float = 0.0
) -> bool:
    """Collective end of a job that also works after a rank died (ULFM).

    `Agree` reports a process failure uniformly to every survivor; then the
    survivors acknowledge it, shrink the communicator and meet there.  Returns
    False when some rank had failed.  Without `--with-ft ulfm` a dead rank
    takes the whole job down before we get here, so the first branch is taken.

    A rank that dies *inside* this collective can leave the others waiting in
    it for ever (seen once in 10 random kills), and no MPI call here takes a
    timeout.  Everything worth keeping is written before this point (model,
    summary, checkpoints), so a timer ends the process with one line and exit
    status 4 after `timeout_s`.  `delay_s` is a test hook: a rank that is late.
    """
    who = f"rank {topo.rank}"
    timer = threading.Timer(timeout_s, _give_up, (who, timeout_s))
    timer.daemon = True
    timer.start()
    time.sleep(delay_s)
    comm = topo.comm
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    try:
        comm.Agree(1)
        healthy = True
    except MPI.Exception:
        comm.Ack_failed()
        comm.Agree(1)
        healthy = False
    (comm if healthy else comm.Shrink()).Barrier()
    windows.free()
    timer.cancel()
    return healthy


def _give_up(who: str, timeout_s: float) -> None:
    print(
        f"error: {who}: the job's collective exit did not complete within {timeout_s:.0f}s "
        f"(a rank died or hangs in it); leaving without it, results are already written",
        file=sys.stderr,
        flush=True,
    )
    os._exit(4)


# -- worker side ------------------------------------------------------------
@dataclass
class PullInfo:
    versions: np.ndarray  # int64[S]: version of each shard pulled
    phase: int
    samples: int  # samples applied so far in the phase (rank 0)
    stop: bool
    members: int  # membership changes so far (rank 0); compare to notice a dead worker
    dead: set[int]  # dead workers (rank 0)


class PSClient:
    """Worker-side endpoint: pull parameters, push gradients, wait for acks."""

    def __init__(self, win: Windows, *, timeout_s: float = 120.0):
        self.w = win
        self.topo = win.topo
        self.me = self.topo.worker_index
        self.timeout_s = timeout_s
        S = self.topo.n_servers
        self.seq = 0  # pushes issued by this worker (same on every server)
        self.versions = np.zeros(S, dtype=np.int64)
        self._hdr = np.zeros(win.hdr_words, dtype=np.int64)
        self._hdr3 = np.zeros(3, dtype=np.int64)  # VERSION PHASE SAMPLES (accumulate mode)
        self._meta = np.zeros(MB_WORDS - PULLED, dtype=np.int64)  # words PULLED..HI
        self._seq_buf = np.zeros(1, dtype=np.int64)
        self._one = np.zeros(1, dtype=np.int64)
        self._ack = np.zeros(1, dtype=np.int64)
        self._acks = [0] * S  # last ACK_SEQ seen per server
        self._pushed_at = 0.0  # monotonic time of the last push
        self._wait_ema = 0.0  # seconds from a push to its ack, smoothed
        self._stats = np.zeros(ST_WORDS, dtype=np.float64)
        self.bytes_pulled = 0
        self.bytes_pushed = 0

    def _parts(self, lo: int, hi: int):
        """(server, a, b) for every server shard intersecting [lo, hi)."""
        for s, (blo, bhi) in enumerate(self.w.bounds):
            a, b = max(lo, blo), min(hi, bhi)
            yield s, a, b, blo

    def header(self, server: int = 0) -> np.ndarray:
        """The header words of `server` (VERSION, PHASE, SAMPLES, STOP, MEMBERS, DEAD...)."""
        pwin, hdr = self.w.pwin, self._hdr
        pwin.Lock(server, MPI.LOCK_SHARED)
        pwin.Get([hdr, MPI.INT64_T], server, (0, hdr.size, MPI.INT64_T))
        pwin.Unlock(server)
        return hdr.copy()

    def pull(self, out: np.ndarray, lo: int, hi: int) -> PullInfo:
        """Copy parameters [lo, hi) into out[lo:hi]; one consistent snapshot per shard."""
        _check(out, np.float32, self.w.size)
        pwin, hdr = self.w.pwin, self._hdr
        hb = self.w.hdr_bytes
        info = None
        for s, a, b, blo in self._parts(lo, hi):
            pwin.Lock(s, MPI.LOCK_SHARED)
            pwin.Get([hdr, MPI.INT64_T], s, (0, hdr.size, MPI.INT64_T))
            if b > a:
                view = out[a:b]
                pwin.Get([view, MPI.FLOAT], s, (hb + 4 * (a - blo), b - a, MPI.FLOAT))
            pwin.Unlock(s)
            self.versions[s] = hdr[VERSION]
            self.bytes_pulled += 4 * max(b - a, 0)
            if s == 0:
                info = PullInfo(
                    self.versions,
                    int(hdr[PHASE]),
                    int(hdr[SAMPLES]),
                    bool(hdr[STOP]),
                    int(hdr[MEMBERS]),
                    dead_set(hdr, self.topo.n_workers),
                )
        info.versions = self.versions.copy()
        return info

    def acked(self, server: int) -> int:
        """ACK_SEQ of this worker's mailbox on `server` (atomic read)."""
        cwin = self.w.cwin
        cwin.Lock(server, MPI.LOCK_SHARED)
        cwin.Fetch_and_op(
            [self._one, MPI.INT64_T],
            [self._ack, MPI.INT64_T],
            server,
            self.me * MB_WORDS + ACK_SEQ,
            MPI.NO_OP,
        )
        cwin.Unlock(server)
        self._acks[server] = int(self._ack[0])
        return self._acks[server]

    def wait(self, ts: int | None = None) -> None:
        """Block until every server has consumed push number `ts` (default: the last).

        The server takes about the same time for every push of a phase, so we
        sleep through most of the last observed wait at once and then poll every
        ~50 us: the ack is noticed soon after it lands without spinning a core.
        """
        ts = self.seq if ts is None else ts
        if all(a >= ts for a in self._acks):
            return
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        first = True
        for s in range(self.topo.n_servers):
            while self.acked(s) < ts:
                if time.monotonic() > deadline:
                    raise PSTimeout(
                        f"server rank {s} did not take push {ts} "
                        f"within {self.timeout_s:.0f}s (is the server alive?)"
                    )
                if first:
                    first = False
                    ahead = 0.7 * self._wait_ema - (time.monotonic() - self._pushed_at)
                    if ahead > 1e-4:
                        time.sleep(ahead)
                        continue
                time.sleep(5e-5)
        self._wait_ema = 0.8 * self._wait_ema + 0.2 * (time.monotonic() - self._pushed_at)

    def accumulate(
        self,
        delta: np.ndarray,
        lo: int,
        hi: int,
        *,
        n_samples: int,
        phase: int,
        phase_samples: int,
        staleness_bound: int = 0,
    ) -> int:
        """`[ps] mode = "accumulate"`: add `delta` (= params[lo:hi] increment) on server 0.

        One exclusive-lock epoch: read VERSION/PHASE/SAMPLES, and only if the
        phase is still ours, not yet complete, and the push is within the
        staleness bound, MPI_Accumulate(SUM) the increment and advance VERSION
        and SAMPLES.  Pullers hold a shared lock, so they never see half of it;
        the update is complete at the target when this returns (read-your-writes
        without waiting for the server).  A non-finite delta is never sent.  The
        outcome goes to the mailbox like a push, so the server counts it.
        Returns the result code (APPLIED, REJECTED_*).
        """
        if delta.dtype != np.float32 or delta.shape != (hi - lo,):
            raise TypeError(f"delta must be float32[{hi - lo}], got {delta.dtype}{delta.shape}")
        self.wait(self.seq)  # the server has counted our previous push (mailbox is free)
        pwin, hdr = self.w.pwin, self._hdr3
        before = -1
        if not np.isfinite(np.dot(delta, delta)):
            result = REJECTED_NONFINITE
        else:
            pwin.Lock(0, MPI.LOCK_EXCLUSIVE)
            pwin.Get([hdr, MPI.INT64_T], 0, (0, 3, MPI.INT64_T))
            pwin.Flush(0)
            before = int(hdr[VERSION])
            if hdr[PHASE] != phase or hdr[SAMPLES] >= phase_samples:
                result = REJECTED_PHASE
            elif staleness_bound and before - self.versions[0] > staleness_bound:
                result = REJECTED_STALE
            else:
                disp = (self.w.hdr_bytes + 4 * lo, hi - lo, MPI.FLOAT)
                pwin.Accumulate([delta, MPI.FLOAT], 0, disp, MPI.SUM)
                hdr[VERSION] += 1
                hdr[SAMPLES] += n_samples
                pwin.Put([hdr, MPI.INT64_T], 0, (0, 3, MPI.INT64_T))
                self.bytes_pushed += 4 * (hi - lo)
                result = APPLIED
            pwin.Unlock(0)
        self._record(0, (self.versions[0], n_samples, phase, result, before, 0))
        self._pushed()
        return result

    def push(self, grad: np.ndarray, lo: int, hi: int, *, n_samples: int, phase: int) -> int:
        """Push grad[lo:hi] (pulled at `self.versions`) to every shard; returns its timestamp.

        Waits first for this worker's previous push to be taken (one slot per
        worker and server: natural back-pressure when the server falls behind).
        """
        _check(grad, np.float32, self.w.size)
        self.wait(self.seq)
        swin = self.w.swin
        n_s_all = [b - a for a, b in self.w.bounds]
        for s, a, b, blo in self._parts(lo, hi):
            if b > a:
                view = grad[a:b]
                swin.Lock(s, MPI.LOCK_SHARED)
                swin.Put([view, MPI.FLOAT], s, (self.me * n_s_all[s] + (a - blo), b - a, MPI.FLOAT))
                swin.Unlock(s)  # the gradient is complete at the target before the seq bump
                self.bytes_pushed += 4 * (b - a)
            off = (a - blo, b - blo) if b > a else (0, 0)  # an empty part is (0, 0)
            self._record(s, (self.versions[s], n_samples, phase, 0, *off))
        return self._pushed()

    def _record(self, s: int, words: tuple) -> None:
        """One epoch on server s: mailbox words PULLED..HI, flush, then PUSH_SEQ = seq + 1.

        Atomic writes; the words are complete at the target before the bump
        that makes the push visible.
        """
        meta, seq_buf, cwin = self._meta, self._seq_buf, self.w.cwin
        base = self.me * MB_WORDS
        meta[:] = words
        seq_buf[0] = self.seq + 1
        cwin.Lock(s, MPI.LOCK_SHARED)
        cwin.Accumulate(
            [meta, MPI.INT64_T], s, (base + PULLED, meta.size, MPI.INT64_T), MPI.REPLACE
        )
        cwin.Flush(s)
        cwin.Accumulate([seq_buf, MPI.INT64_T], s, (base + PUSH_SEQ, 1, MPI.INT64_T), MPI.REPLACE)
        cwin.Unlock(s)

    def _pushed(self) -> int:
        """Every server has the new push record: advance our sequence number."""
        self.seq += 1
        self._pushed_at = time.monotonic()
        return self.seq

    def last_results(self) -> list[int]:
        """RESULT word of this worker's last push on every server (after `wait`)."""
        out = []
        res = np.zeros(1, dtype=np.int64)
        cwin = self.w.cwin
        for s in range(self.topo.n_servers):
            cwin.Lock(s, MPI.LOCK_SHARED)
            cwin.Fetch_and_op(
                [self._one, MPI.INT64_T],
                [res, MPI.INT64_T],
                s,
                self.me * MB_WORDS + RESULT,
                MPI.NO_OP,
            )
            cwin.Unlock(s)
            out.append(int(res[0]))
        return out

    def report(self, **fields: float) -> None:
        """Write this worker's stats row on server rank 0 (atomic words)."""
        st = self._stats
        for name, value in fields.items():
            st[_STAT_INDEX[name]] = value
        st[HEARTBEAT] = time.time()
        cwin = self.w.cwin
        base = self.topo.n_workers * MB_WORDS + self.me * ST_WORDS
        cwin.Lock(0, MPI.LOCK_SHARED)
        cwin.Accumulate([st, MPI.DOUBLE], 0, (base, ST_WORDS, MPI.DOUBLE), MPI.REPLACE)
        cwin.Unlock(0)


_STAT_INDEX = {
    "steps": STEPS,
    "samples": ST_SAMPLES,
    "loss": LOSS,
    "rate": RATE,
    "pushes": PUSHES,
    "pulls": PULLS,
    "state": STATE,
}


# -- server side ------------------------------------------------------------
@dataclass
class Push:
    worker: int
    seq: int
    pulled_version: int
    n_samples: int
    phase: int
    lo: int  # offsets into this server's shard (accumulate mode: lo = VERSION it was added to)
    hi: int
    grad: np.ndarray | None  # view into the slot, valid until ack (None: accumulate mode)
    result: int = 0  # accumulate mode: the outcome the worker reached under the lock


class PSServer:
    """Server-side endpoint over this rank's windows (local memory + self-RMA)."""

    def __init__(self, win: Windows):
        self.w = win
        self.topo = win.topo
        self.me = self.topo.rank
        self.lo, self.hi = win.bounds[self.me]
        K, n_s = self.topo.n_workers, win.n_s
        pmem = np.frombuffer(win.pwin.tomemory(), dtype=np.uint8)
        self.header = pmem[: win.hdr_bytes].view(np.int64)
        self.params = pmem[win.hdr_bytes :].view(np.float32)
        smem = np.frombuffer(win.swin.tomemory(), dtype=np.float32)
        self.slots = smem.reshape(K, n_s) if smem.size else None  # None: accumulate mode
        self._mb = np.zeros((K, MB_WORDS), dtype=np.int64)
        self._mb_origin = np.zeros_like(self._mb)  # ignored by NO_OP; must not alias the result
        self._stats = np.zeros((K, ST_WORDS), dtype=np.float64)
        self._stats_origin = np.zeros_like(self._stats)
        self._word = np.zeros(1, dtype=np.int64)
        self._hdr_remote = np.zeros(win.hdr_words, dtype=np.int64)
        self._acked = np.zeros(K, dtype=np.int64)

    # parameters and header: writers hold the exclusive lock
    def lock_params(self) -> None:
        self.w.pwin.Lock(self.me, MPI.LOCK_EXCLUSIVE)

    def unlock_params(self) -> None:
        self.w.pwin.Unlock(self.me)

    def read_counters(self) -> tuple[int, int]:
        """(VERSION, SAMPLES) of this rank's header (accumulate mode: workers advance them)."""
        self.w.pwin.Lock(self.me, MPI.LOCK_SHARED)
        out = int(self.header[VERSION]), int(self.header[SAMPLES])
        self.w.pwin.Unlock(self.me)
        return out

    def poll(self) -> list[Push]:
        """Pending pushes (PUSH_SEQ > ACK_SEQ), oldest worker first."""
        cwin, mb = self.w.cwin, self._mb
        cwin.Lock(self.me, MPI.LOCK_SHARED)
        cwin.Get_accumulate(
            [self._mb_origin, MPI.INT64_T],
            [mb, MPI.INT64_T],
            self.me,
            (0, mb.size, MPI.INT64_T),
            MPI.NO_OP,
        )
        cwin.Unlock(self.me)
        pending = np.flatnonzero(mb[:, PUSH_SEQ] > self._acked)
        if pending.size == 0:
            return []
        if self.slots is not None:
            self.w.swin.Lock(self.me, MPI.LOCK_SHARED)
            self.w.swin.Sync()  # make the workers' completed Puts visible to our loads
            self.w.swin.Unlock(self.me)
        out = []
        for w in pending:
            row = mb[w]
            lo, hi = int(row[LO]), int(row[HI])
            out.append(
                Push(
                    worker=int(w),
                    seq=int(row[PUSH_SEQ]),
                    pulled_version=int(row[PULLED]),
                    n_samples=int(row[N_SAMPLES]),
                    phase=int(row[MB_PHASE]),
                    lo=lo,
                    hi=hi,
                    grad=self.slots[w, lo:hi] if self.slots is not None else None,
                    result=int(row[RESULT]),
                )
            )
        return out

    def ack(self, push: Push, result: int) -> None:
        """Record the outcome and free the worker's slot (atomic ACK_SEQ write)."""
        cwin, word = self.w.cwin, self._word
        base = push.worker * MB_WORDS
        cwin.Lock(self.me, MPI.LOCK_SHARED)
        word[0] = result
        cwin.Accumulate([word, MPI.INT64_T], self.me, (base + RESULT, 1, MPI.INT64_T), MPI.REPLACE)
        cwin.Flush(self.me)
        word[0] = push.seq
        cwin.Accumulate([word, MPI.INT64_T], self.me, (base + ACK_SEQ, 1, MPI.INT64_T), MPI.REPLACE)
        cwin.Unlock(self.me)
        self._acked[push.worker] = push.seq

    def read_stats(self) -> np.ndarray:
        """The workers' stats rows (rank 0), float64[K, ST_WORDS] snapshot."""
        cwin, st = self.w.cwin, self._stats
        base = self.topo.n_workers * MB_WORDS
        cwin.Lock(self.me, MPI.LOCK_SHARED)
        cwin.Get_accumulate(
            [self._stats_origin, MPI.DOUBLE],
            [st, MPI.DOUBLE],
            self.me,
            (base, st.size, MPI.DOUBLE),
            MPI.NO_OP,
        )
        cwin.Unlock(self.me)
        return st.copy()

    def remote_header(self, server: int) -> np.ndarray:
        """Header words of another server rank (followers read rank 0's phase/stop)."""
        pwin, hdr = self.w.pwin, self._hdr_remote
        pwin.Lock(server, MPI.LOCK_SHARED)
        pwin.Get([hdr, MPI.INT64_T], server, (0, hdr.size, MPI.INT64_T))
        pwin.Unlock(server)
        return hdr.copy()

    def gather_params(self, out: np.ndarray) -> None:
        """Copy the whole flat vector into `out` (rank 0: own shard + Gets from the others)."""
        _check(out, np.float32, self.w.size)
        pwin = self.w.pwin
        for s, (blo, bhi) in enumerate(self.w.bounds):
            view = out[blo:bhi]
            pwin.Lock(s, MPI.LOCK_SHARED)
            if s == self.me:
                view[...] = self.params
            elif bhi > blo:
                pwin.Get([view, MPI.FLOAT], s, (self.w.hdr_bytes, bhi - blo, MPI.FLOAT))
            pwin.Unlock(s)


def _check(arr: np.ndarray, dtype, size: int) -> None:
    if arr.dtype != dtype or arr.shape != (size,) or not arr.flags.c_contiguous:
        raise TypeError(
            f"RMA buffer must be contiguous {np.dtype(dtype)}[{size}], got {arr.dtype}{arr.shape}"
        )


# -- server ranks only: every shard's update-rule state, for complete checkpoints --
class ShardStates:
    """A window on the server ranks holding each shard's update-rule state arrays.

    Rank 0 writes the checkpoints; with S > 1 the followers' rule state (the
    momentum velocity, Adagrad's sums) lives only in the followers, so each
    server rank keeps its rule's arrays *in* this window (the rule's
    attributes are bound to views of it, no copy on the hot path) and rank 0
    reads them with Gets.  Created on a communicator of the server ranks only
    (`Create_group` is collective over the group, so the workers do nothing).

    Layout on server s (disp_unit 1)::

        SEQ FREEZE VERSION pad | arrays float32[n_arrays][n_s]

    Like the parameter window, no lock is ever held that another rank could
    wait for (one `Lock_all(MODE_NOCHECK)` epoch for the job):

    * a follower brackets every change of its shard (apply, reset) with
      `begin_write` / `end_write(version)`: SEQ odd, the numpy writes, VERSION,
      SEQ even; `begin_write` first waits (bounded) while FREEZE is set;
    * rank 0 `gather`s: FREEZE = 1 on every follower (no new write starts), wait
      until SEQ is even (the write under way is done), read the parameters
      (`read_params`, the protocol's own seqlock reads) and the arrays, read SEQ
      again: unchanged means parameters, state and version of each shard are
      one consistent snapshot; FREEZE = 0.  A follower that dies is not waited
      for beyond `timeout_s` (the checkpoint fails with one line, training goes on).
    """

    SEQ_W, FREEZE_W, VERSION_W = 0, 1, 2
    HDR_BYTES = 32

    def __init__(self, topo: Topology, bounds: list[tuple[int, int]], names: list[str]):
        S = topo.n_servers
        world = topo.comm.Get_group()
        servers = world.Incl(list(range(S)))
        self.comm = topo.comm.Create_group(servers)  # collective over the servers only
        servers.Free()
        world.Free()
        self.me, self.S = topo.rank, S
        self.bounds, self.names = bounds, list(names)
        n_s = bounds[self.me][1] - bounds[self.me][0]
        self.win = MPI.Win.Allocate(self.HDR_BYTES + 4 * len(names) * n_s, 1, comm=self.comm)
        self.win.Set_errhandler(MPI.ERRORS_RETURN)
        mem = np.frombuffer(self.win.tomemory(), dtype=np.uint8)
        self.win.Lock(self.me, MPI.LOCK_EXCLUSIVE)  # Allocate memory is not zero by contract
        mem.fill(0)
        self.win.Unlock(self.me)
        self.comm.Barrier()
        arrays = mem[self.HDR_BYTES :].view(np.float32).reshape(len(names), n_s)
        self.arrays = {name: arrays[i] for i, name in enumerate(names)}
        self._one = np.zeros(1, dtype=np.int64)  # origin of the atomics, alive until Flush
        self._res = np.zeros(1, dtype=np.int64)  # their result
        self._held: list[np.ndarray] = []  # Get targets, alive until their Flush
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._open = True

    def bind(self, rule) -> None:
        """Move `rule`'s state arrays into this window (same values; the rule then
        updates the window memory in place)."""
        for name, arr in rule.state().items():
            view = self.arrays[name]
            view[...] = arr
            setattr(rule, name, view)

    def barrier(self) -> None:
        self.comm.Barrier()

    # element-wise atomic words (Fetch_and_op / Accumulate REPLACE), completed by Flush
    def _read(self, target: int, word: int) -> int:
        self.win.Fetch_and_op(
            [self._one, MPI.INT64_T], [self._res, MPI.INT64_T], target, 8 * word, MPI.NO_OP
        )
        self.win.Flush(target)
        return int(self._res[0])

    def _add(self, target: int, word: int, value: int) -> None:
        self._one[0] = value
        self.win.Fetch_and_op(
            [self._one, MPI.INT64_T], [self._res, MPI.INT64_T], target, 8 * word, MPI.SUM
        )
        self.win.Flush(target)

    def _write(self, target: int, word: int, value: int) -> None:
        self._one[0] = value
        self.win.Accumulate(
            [self._one, MPI.INT64_T], target, (8 * word, 1, MPI.INT64_T), MPI.REPLACE
        )
        self.win.Flush(target)

    # -- follower side (any server rank; rank 0 too, harmlessly) --------------
    def begin_write(self, max_wait_s: float = 10.0) -> None:
        """Before changing this shard's params or state: wait while rank 0 reads, SEQ odd.

        The wait is bounded: rank 0 freezes for a few milliseconds, and a rank 0
        that died must not stop the follower; a late write only makes rank 0's
        read retry."""
        me = self.me
        if me != 0:
            t0 = time.monotonic()
            while self._read(me, self.FREEZE_W) and time.monotonic() - t0 < max_wait_s:
                time.sleep(2e-5)
        self._add(me, self.SEQ_W, 1)
        self.win.Sync()

    def end_write(self, version: int) -> None:
        self.win.Sync()  # the numpy stores before the words that publish them
        self._write(self.me, self.VERSION_W, version)
        self._add(self.me, self.SEQ_W, 1)

    # -- rank 0 -------------------------------------------------------------------
    def gather(
        self,
        out: dict[str, np.ndarray],
        versions: np.ndarray,
        read_params=None,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        """Rank 0: every follower's arrays into out[name][lo:hi] and its version into
        versions[s], consistent with what `read_params()` (called frozen) reads."""
        win = self.win
        followers = range(1, self.S)
        for s in followers:
            self._write(s, self.FREEZE_W, 1)
        try:
            t0 = time.monotonic()
            while True:
                seq1 = [self._read(s, self.SEQ_W) for s in followers]
                if all(q % 2 == 0 for q in seq1):
                    if read_params is not None:
                        read_params()
                    held = self._held = []
                    for s in followers:
                        lo, hi = self.bounds[s]
                        for i, name in enumerate(self.names):
                            view = out[name][lo:hi]
                            held.append(view)
                            disp = (self.HDR_BYTES + 4 * i * (hi - lo), hi - lo, MPI.FLOAT)
                            win.Get([view, MPI.FLOAT], s, disp)
                        win.Flush(s)
                        versions[s] = self._read(s, self.VERSION_W)
                    self._held = []
                    if [self._read(s, self.SEQ_W) for s in followers] == seq1:
                        return
                if time.monotonic() - t0 > timeout_s:
                    raise PSTimeout(
                        f"no consistent read of the follower server shards within {timeout_s:.0f}s "
                        "(is a server rank stuck or dead?)"
                    )
                time.sleep(1e-4)
        finally:
            for s in followers:
                self._write(s, self.FREEZE_W, 0)

    def free(self) -> None:
        """Collective over the server ranks (skip it after a failure, like Windows.free)."""
        if self._open:
            self._open = False
            self.win.Unlock_all()
        self.win.Free()
        self.comm.Free()
