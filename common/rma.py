"""The parameter-server protocol over MPI one-sided communication (RMA).

Everything that crosses a process boundary on the training path is in this
module: three windows per server rank, made with `MPI.Win.Allocate` (the
shared-memory `osc/sm` path; `Win.Create` on numpy memory was measured 100x
slower and stalls, see docs/architecture.md).  Workers allocate zero bytes.

The API has ps-lite's shape.  Worker side (`PSClient`): `pull`, `push`,
`wait`, plus `report` for the stats row.  Server side (`PSServer`): `poll`
returns the pending pushes, the server's request handle (`dbnps.server.handle`,
no MPI in it) decides and applies them, `ack` completes them.  The words'
meaning is `dbnps.common.protocol`; this module owns where they live.

Two modes (`[ps] mode`).  "apply" (default): pushes land in per-worker slots
and the server validates and applies them.  "accumulate" (1 server rank):
a worker runs the update rule on its own gradients and `accumulate`s the
increment straight into the parameters (MPI_Accumulate SUM while it holds the
MUTEX word), then writes the outcome to its mailbox so the server can count
it; there is no swin, and the server only keeps the books and the phase
schedule.

Window layout on server rank s, which owns the flat-vector shard [base_s, base_s + n_s)
(K workers, worker w = world rank S + w)::

  pwin  (disp_unit 1, bytes)       writers: server s (accumulate mode: the MUTEX holder)
  +---------+-------+---------+------+---------+-----+-------+------------------+-----------------+
  | VERSION | PHASE | SAMPLES | STOP | MEMBERS | SEQ | MUTEX | DEAD[ceil(K/64)] | params f32[n_s] |
  +---------+-------+---------+------+---------+-----+-------+------------------+-----------------+
   int64 words, padded to an even count (PHASE..DEAD authoritative on rank 0):
   STOP 1 = workers leave now, 2 = every worker has left (servers leave);
   MEMBERS counts membership changes; DEAD is a bitmask of dead workers;
   SEQ is the seqlock word (odd while the header or parameters are being
   written); MUTEX is 0 or the id of the writer holding it (accumulate mode).

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

Epochs: no rank ever holds a lock another rank waits for.  Every rank opens
one passive-target epoch per window at start (`Lock_all(MODE_NOCHECK)`: no
lock is taken) and closes it at the end; operations complete with `Flush`.
A rank killed in the middle of a pull, a push or an accumulate therefore
leaves nothing behind that can block the server or another worker (with
per-operation `Lock`/`Unlock`, a worker killed inside its shared-lock pull
left that lock taken and the server's next exclusive lock waited for ever).

Consistency rules (MPI-4.1 §12.7; ../shared/ARCHITECTURE.md):

* Parameters (seqlock): a writer makes SEQ odd, writes the header words and
  parameters, makes SEQ even again (`Win_sync` between, so the stores are
  ordered).  A pull reads SEQ (atomic Fetch_and_op NO_OP), then the header
  (Get_accumulate NO_OP) and the parameters (Get), then SEQ again, with a
  Flush after each step; it keeps the values only if both SEQ reads are equal
  and even, else it reads again.  So a pull never keeps a half-applied update
  and the version it returns is exactly the version of its values; a reader
  can be killed at any point without the writer ever waiting for it.
* Accumulate mode: writers exclude each other through the MUTEX word
  (Compare_and_swap 0 -> id, release by Accumulate REPLACE 0); the holder
  reads VERSION/PHASE/SAMPLES and only if the phase is the worker's, not yet
  complete and the push within tau: SEQ odd, Accumulate(SUM) the increment,
  VERSION+1, SAMPLES+n, SEQ even.  A holder that dies is a dead worker: the
  server, which publishes the death, takes the MUTEX over and makes SEQ even
  (the increment may be partly added: a noisy step, not a stuck job).  The
  worker checks the increment is finite (one BLAS dot) before it sends
  anything.
* Push: worker w writes only slot w and only when its slot is free
  (ACK_SEQ == PUSH_SEQ).  It Puts the gradient and flushes (complete at the
  target), then atomically writes the metadata words, flushes, and atomically
  bumps PUSH_SEQ.  The server reads mailbox words with Get_accumulate(NO_OP),
  reads slot w only after seeing PUSH_SEQ > ACK_SEQ, and releases it by an
  atomic Accumulate(REPLACE) of ACK_SEQ.  Every mailbox word is accessed only
  with accumulate operations, so concurrent reads and writes are defined.
* Stats rows are written with Accumulate(REPLACE) and read with
  Get_accumulate(NO_OP): element-wise atomic, never torn words.

mpi4py does not keep origin/result buffers alive until the epoch closes, so
every buffer passed to an RMA call is held in a variable (usually a
preallocated attribute) until the Flush that completes it.  All buffers are float32 / int64 /
float64 exactly as the window expects; dtypes are checked at this boundary.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from dbnps.common.protocol import (  # the words' meaning; this module owns where they live
    ACK_SEQ,
    APPLIED,
    HEARTBEAT,
    HI,
    LO,
    LOSS,
    MB_PHASE,
    MB_WORDS,
    MEMBERS,
    MUTEX,
    N_SAMPLES,
    PHASE,
    PULLED,
    PULLS,
    PUSH_SEQ,
    PUSHES,
    RATE,
    REJECTED_NONFINITE,
    REJECTED_PHASE,
    REJECTED_STALE,
    RESULT,
    SAMPLES,
    SEQ,
    ST_SAMPLES,
    ST_WORDS,
    STATE,
    STEPS,
    STOP,
    VERSION,
    Push,
    dead_set,
    header_words,
)


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
    # Every rank on this rank's node (MPI_COMM_TYPE_SHARED): the windows are
    # shared memory (osc/sm) and a target needs no MPI calls for its RMA to progress.
    one_node: bool = True

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
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        one_node = comm.allreduce(node.Get_size() == comm.Get_size(), op=MPI.LAND)
        node.Free()
        return cls(comm, n_servers, len(roles) - n_servers, comm.Get_rank(), bool(one_node))


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
        for w in (self.pwin, self.swin, self.cwin):  # one epoch for the job, no lock held
            w.Lock_all(MPI.MODE_NOCHECK)
        self._open = True

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

    def free(self, *, collective: bool = True) -> None:
        """Close the job's epochs; `Win.Free` too unless a rank has failed.

        Free is collective and would wait for the dead rank: after a failure
        the windows are left to the process exit instead.
        """
        if not collective:
            return
        if self._open:
            self._open = False
            for w in (self.pwin, self.swin, self.cwin):
                w.Unlock_all()
        for w in (self.pwin, self.swin, self.cwin):
            w.Free()


def finalize(
    topo: Topology,
    windows: Windows,
    *,
    timeout_s: float = 120.0,
    delay_s: float = 0.0,
    inside=None,
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
    status 4 after `timeout_s`.  Test hooks: `delay_s`, a rank that is late;
    `inside()`, called between the agreement and the barrier (a rank that dies
    inside the collective exit).
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
    if inside is not None:
        inside()
    try:
        (comm if healthy else comm.Shrink()).Barrier()
    except MPI.Exception:  # a rank died inside the exit itself; the results are written
        healthy = False
    windows.free(collective=healthy)
    timer.cancel()
    return healthy


def finalize_mpi(who: str, timeout_s: float = 120.0) -> None:
    """MPI_Finalize, bounded: the last MPI call of a rank, after `finalize`.

    MPI_Finalize ends in a PMIx fence over every process of the job, the dead
    included; after a failure that fence was seen to wait for ever (all three
    survivors in ompi_mpi_finalize's wait loop, in about 1 run of 5).  Called
    at interpreter exit, as mpi4py does, nothing can bound it: Python threads
    are stopped by then, and mpi4py's `MPI.Finalize` holds the GIL.  So it is
    called here through ctypes, which releases the GIL while the timer waits;
    mpi4py's exit hook then sees MPI finalized and does nothing.
    """
    if MPI.Is_finalized():
        return
    timer = threading.Timer(timeout_s, _give_up, (f"{who} (MPI_Finalize)", timeout_s))
    timer.daemon = True
    timer.start()
    ctypes.CDLL(MPI.__file__).MPI_Finalize()  # the extension's handle resolves libmpi
    timer.cancel()


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


class _Words:
    """Atomic reads and writes of int64/float64 words of a window (inside the job's epoch)."""

    def __init__(self, win: MPI.Win, n: int, dtype=np.int64):
        self.win = win
        self.mpi_type = MPI.INT64_T if dtype == np.int64 else MPI.DOUBLE
        self.buf = np.zeros(n, dtype=dtype)  # result buffer, alive until the Flush
        self._origin = np.zeros(n, dtype=dtype)  # ignored by NO_OP; must not alias buf
        self._one = np.zeros(1, dtype=dtype)
        self._res = np.zeros(1, dtype=dtype)
        self._cmp = np.zeros(1, dtype=dtype)
        self._val = np.zeros(1, dtype=dtype)  # write1's origin, alive until its Flush

    def read(self, target: int, disp: int, n: int) -> np.ndarray:
        """n words from `disp` on `target`, element-wise atomic (Get_accumulate NO_OP)."""
        buf = self.buf[:n]
        self.win.Get_accumulate(
            [self._origin[:n], self.mpi_type],
            [buf, self.mpi_type],
            target,
            (disp, n, self.mpi_type),
            MPI.NO_OP,
        )
        self.win.Flush(target)
        return buf

    def read1(self, target: int, disp: int) -> int:
        self.win.Fetch_and_op(
            [self._one, self.mpi_type], [self._res, self.mpi_type], target, disp, MPI.NO_OP
        )
        self.win.Flush(target)
        return self._res[0].item()

    def write(self, target: int, disp: int, values: np.ndarray, *, flush: bool = True) -> None:
        """Element-wise atomic write (Accumulate REPLACE); `values` must stay alive until Flush."""
        self.win.Accumulate(
            [values, self.mpi_type], target, (disp, values.size, self.mpi_type), MPI.REPLACE
        )
        if flush:
            self.win.Flush(target)

    def write1(self, target: int, disp: int, value: int) -> None:
        """Element-wise atomic write of one word (Accumulate REPLACE), flushed."""
        self._val[0] = value
        self.write(target, disp, self._val)

    def add1(self, target: int, disp: int, value: int) -> int:
        """Atomic fetch-and-add of one word; returns the old value."""
        self._one[0] = value
        self.win.Fetch_and_op(
            [self._one, self.mpi_type], [self._res, self.mpi_type], target, disp, MPI.SUM
        )
        self.win.Flush(target)
        return self._res[0].item()

    def cas1(self, target: int, disp: int, compare: int, value: int) -> int:
        """Atomic compare-and-swap of one word; returns the old value."""
        self._one[0], self._cmp[0] = value, compare
        self.win.Compare_and_swap(
            [self._one, self.mpi_type],
            [self._cmp, self.mpi_type],
            [self._res, self.mpi_type],
            target,
            disp,
        )
        self.win.Flush(target)
        return self._res[0].item()


def _seqlock_read(words: _Words, target: int, read, *, timeout_s: float, what: str, beat=None):
    """`read()` of `target`'s header/parameters, kept only if SEQ was even and unchanged.

    Retried with back-off until it is; PSTimeout after `timeout_s`.  `words` is
    the target's pwin header words; `beat()` is called on every retry.
    """
    t0, pause = time.monotonic(), 1e-5
    while True:
        seq1 = words.read1(target, 8 * SEQ)
        if seq1 % 2 == 0:
            value = read()
            if words.read1(target, 8 * SEQ) == seq1:
                return value
        if time.monotonic() - t0 > timeout_s:
            raise PSTimeout(
                f"server rank {target}: {what} did not complete within {timeout_s:.0f}s "
                f"(is the server alive?)"
            )
        if beat is not None:
            beat()
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


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
        self._hwords = _Words(win.pwin, win.hdr_words)  # header words (pwin, bytes: disp in bytes)
        self._mwords = _Words(win.cwin, MB_WORDS)  # mailbox words
        self._meta = np.zeros(MB_WORDS - PULLED, dtype=np.int64)  # words PULLED..HI
        self._seq_buf = np.zeros(1, dtype=np.int64)
        self._acks = [0] * S  # last ACK_SEQ seen per server
        self._pushed_at = 0.0  # monotonic time of the last push
        self._wait_ema = 0.0  # seconds from a push to its ack, smoothed
        self._stats = np.zeros(ST_WORDS, dtype=np.float64)
        self._stats_words = _Words(win.cwin, ST_WORDS, np.float64)
        self.in_pull = None  # test hooks: called inside a pull / a push (kill tests)
        self.in_push = None

    def _parts(self, lo: int, hi: int):
        """(server, a, b) for every server shard intersecting [lo, hi)."""
        for s, (blo, bhi) in enumerate(self.w.bounds):
            a, b = max(lo, blo), min(hi, bhi)
            yield s, a, b, blo

    def header(self, server: int = 0) -> np.ndarray:
        """The header words of `server` (VERSION, PHASE, SAMPLES, STOP, MEMBERS, ...).

        Element-wise atomic; not a snapshot of all words together (see `pull`)."""
        return self._hwords.read(server, 0, self.w.hdr_words).copy()

    def _deadline_check(self, t0: float, what: str, server: int) -> None:
        if time.monotonic() - t0 > self.timeout_s:
            raise PSTimeout(
                f"server rank {server}: {what} did not complete within {self.timeout_s:.0f}s "
                f"(is the server alive?)"
            )

    def pull(self, out: np.ndarray, lo: int, hi: int) -> PullInfo:
        """Copy parameters [lo, hi) into out[lo:hi]; one consistent snapshot per shard."""
        _check(out, np.float32, self.w.size)
        hb = self.w.hdr_bytes
        info = None
        for s, a, b, blo in self._parts(lo, hi):
            hdr = self._read_consistent(s, out, a, b, hb + 4 * (a - blo))
            self.versions[s] = hdr[VERSION]
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

    def _read_consistent(self, s: int, out: np.ndarray, a: int, b: int, disp: int) -> np.ndarray:
        """Seqlock read of server s: header words and out[a:b]."""
        pwin, words = self.w.pwin, self._hwords
        view = out[a:b]  # alive until the Flush

        def read() -> np.ndarray:
            hdr = words.read(s, 0, self.w.hdr_words)  # flushed: complete
            if b > a:
                pwin.Get([view, MPI.FLOAT], s, (disp, b - a, MPI.FLOAT))
                if self.in_pull is not None:
                    self.in_pull()
                pwin.Flush(s)
            return hdr

        return _seqlock_read(
            words,
            s,
            read,
            timeout_s=self.timeout_s,
            what="a consistent parameter read",
            beat=self._beat,
        )

    def _beat(self) -> None:
        """While waiting on the server (an ack, the mutex, an odd SEQ): a heartbeat a second.

        The loop's own heartbeats stop while it waits; without these, a wait longer
        than `[ps] heartbeat_timeout_s` (a dead MUTEX holder's, a server paused
        by a checkpoint) got the waiting workers marked dead along with the culprit.
        """
        if time.time() - self._stats[HEARTBEAT] > 1.0:
            self.report()

    def acked(self, server: int) -> int:
        """ACK_SEQ of this worker's mailbox on `server` (atomic read)."""
        self._acks[server] = self._mwords.read1(server, self.me * MB_WORDS + ACK_SEQ)
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
                self._beat()
                time.sleep(5e-5)
        self._wait_ema = 0.8 * self._wait_ema + 0.2 * (time.monotonic() - self._pushed_at)

    def _acquire(self, server: int) -> None:
        """Take the MUTEX word of `server` (accumulate mode), spinning with back-off."""
        words, me = self._hwords, self.me + 1
        t0, pause = time.monotonic(), 1e-5
        while words.cas1(server, 8 * MUTEX, 0, me) != 0:
            self._deadline_check(t0, "the parameter mutex", server)
            self._beat()
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def _release(self, server: int) -> None:
        self._hwords.write1(server, 8 * MUTEX, 0)

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

        Under the MUTEX word: read VERSION/PHASE/SAMPLES, and only if the phase
        is still ours, not yet complete, and the push is within the staleness
        bound, make SEQ odd, MPI_Accumulate(SUM) the increment, advance VERSION
        and SAMPLES, make SEQ even.  Pullers' seqlock reads never keep half of
        it; the update is complete at the target when this returns
        (read-your-writes without waiting for the server).  A non-finite delta
        is never sent.  The outcome goes to the mailbox like a push, so the
        server counts it.  Returns the result code (APPLIED, REJECTED_*).
        """
        if delta.dtype != np.float32 or delta.shape != (hi - lo,):
            raise TypeError(f"delta must be float32[{hi - lo}], got {delta.dtype}{delta.shape}")
        self.wait(self.seq)  # the server has counted our previous push (mailbox is free)
        pwin, words = self.w.pwin, self._hwords
        before = -1
        if not np.isfinite(np.dot(delta, delta)):
            result = REJECTED_NONFINITE
        else:
            self._acquire(0)
            hdr = words.read(0, 0, 3).copy()  # VERSION PHASE SAMPLES
            before = int(hdr[VERSION])
            if hdr[PHASE] != phase or hdr[SAMPLES] >= phase_samples:
                result = REJECTED_PHASE
            elif staleness_bound and before - self.versions[0] > staleness_bound:
                result = REJECTED_STALE
            else:
                words.add1(0, 8 * SEQ, 1)  # odd: a write is under way
                disp = (self.w.hdr_bytes + 4 * lo, hi - lo, MPI.FLOAT)
                pwin.Accumulate([delta, MPI.FLOAT], 0, disp, MPI.SUM)
                pwin.Flush(0)
                if self.in_push is not None:  # kill tests: holding the MUTEX, SEQ odd
                    self.in_push()
                words.add1(0, 8 * VERSION, 1)
                words.add1(0, 8 * SAMPLES, n_samples)
                words.add1(0, 8 * SEQ, 1)  # even: complete
                result = APPLIED
            self._release(0)
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
                swin.Put([view, MPI.FLOAT], s, (self.me * n_s_all[s] + (a - blo), b - a, MPI.FLOAT))
                if self.in_push is not None:
                    self.in_push()
                swin.Flush(s)  # the gradient is complete at the target before the seq bump
            off = (a - blo, b - blo) if b > a else (0, 0)  # an empty part is (0, 0)
            self._record(s, (self.versions[s], n_samples, phase, 0, *off))
        return self._pushed()

    def _record(self, s: int, words: tuple) -> None:
        """Mailbox words PULLED..HI on server s, flush, then PUSH_SEQ = seq + 1.

        Atomic writes; the words are complete at the target before the bump
        that makes the push visible.
        """
        meta, seq_buf, mw = self._meta, self._seq_buf, self._mwords
        base = self.me * MB_WORDS
        meta[:] = words
        seq_buf[0] = self.seq + 1
        mw.write(s, base + PULLED, meta)
        mw.write(s, base + PUSH_SEQ, seq_buf)

    def _pushed(self) -> int:
        """Every server has the new push record: advance our sequence number."""
        self.seq += 1
        self._pushed_at = time.monotonic()
        return self.seq

    def report(self, **fields: float) -> None:
        """Write this worker's stats row on server rank 0 (atomic words)."""
        st = self._stats
        for name, value in fields.items():
            st[_STAT_INDEX[name]] = value
        st[HEARTBEAT] = time.time()
        base = self.topo.n_workers * MB_WORDS + self.me * ST_WORDS
        self._stats_words.write(0, base, st)


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
        self.accumulate_mode = self.slots is None
        self._mwords = _Words(win.cwin, K * MB_WORDS)
        self._swords = _Words(win.cwin, K * ST_WORDS, np.float64)
        self._hwords = _Words(win.pwin, win.hdr_words)
        self._acked = np.zeros(K, dtype=np.int64)
        # accumulate mode: called with the worker holding the MUTEX when a write has
        # waited for it over a second (the server checks that worker's heartbeat)
        self.on_stuck = None

    # parameters and header: one writer at a time, seqlock for the readers
    def begin_write(self) -> None:
        """Start changing this rank's header words or parameters (local stores follow).

        SEQ becomes odd, so pulls that overlap read again.  In accumulate mode
        the workers write too: take the MUTEX first (a worker that died holding
        it has been taken over by `break_mutex`).
        """
        if self.accumulate_mode:
            t0 = last = time.monotonic()
            pause = 1e-5
            while (holder := self._hwords.cas1(self.me, 8 * MUTEX, 0, SERVER_MUTEX_ID)) != 0:
                now = time.monotonic()
                if self.on_stuck is not None and now - last > 1.0 and holder != SERVER_MUTEX_ID:
                    last = now
                    self.on_stuck(int(holder) - 1)  # may find the holder dead: break_mutex
                if now - t0 > 600:
                    raise PSTimeout("the parameter mutex stayed taken for 600 s")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        w = self.w.pwin
        w.Sync()  # see what remote accumulates wrote before we store over it
        self.header[SEQ] += 1
        w.Sync()  # SEQ odd is visible before any of the stores that follow

    def end_write(self) -> None:
        w = self.w.pwin
        w.Sync()  # the stores are visible before SEQ says they are complete
        self.header[SEQ] += 1
        w.Sync()
        if self.accumulate_mode:
            self._hwords.write1(self.me, 8 * MUTEX, 0)

    def break_mutex(self, worker: int) -> bool:
        """Accumulate mode: take the MUTEX back from `worker`, which died holding it.

        Its increment may be partly added; SEQ is made even so pulls succeed again.
        Returns True if the worker held it.
        """
        if not self.accumulate_mode:
            return False
        if self._hwords.cas1(self.me, 8 * MUTEX, worker + 1, SERVER_MUTEX_ID) != worker + 1:
            return False
        w = self.w.pwin
        w.Sync()
        if self.header[SEQ] % 2:
            self.header[SEQ] += 1
        w.Sync()
        self._hwords.write1(self.me, 8 * MUTEX, 0)
        return True

    def see_remote_writes(self) -> None:
        """Make the workers' accumulates into this rank's header visible to our loads."""
        self.w.pwin.Sync()

    def poll(self) -> list[Push]:
        """Pending pushes (PUSH_SEQ > ACK_SEQ), oldest worker first."""
        K = self.topo.n_workers
        mb = self._mwords.read(self.me, 0, K * MB_WORDS).reshape(K, MB_WORDS)
        pending = np.flatnonzero(mb[:, PUSH_SEQ] > self._acked)
        if pending.size == 0:
            return []
        if self.slots is not None:
            self.w.swin.Sync()  # make the workers' completed Puts visible to our loads
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
        base = push.worker * MB_WORDS
        self._mwords.write1(self.me, base + RESULT, result)
        self._mwords.write1(self.me, base + ACK_SEQ, push.seq)
        self._acked[push.worker] = push.seq

    def read_stats(self) -> np.ndarray:
        """The workers' stats rows (rank 0), float64[K, ST_WORDS] snapshot."""
        K = self.topo.n_workers
        st = self._swords.read(self.me, K * MB_WORDS, K * ST_WORDS)
        return st.reshape(K, ST_WORDS).copy()

    def remote_header(self, server: int) -> np.ndarray:
        """Header words of another server rank (followers read rank 0's phase/stop)."""
        return self._hwords.read(server, 0, self.w.hdr_words).copy()

    def gather_params(self, out: np.ndarray) -> None:
        """Copy the whole flat vector into `out` (rank 0: own shard + seqlock reads of the others)."""
        _check(out, np.float32, self.w.size)
        pwin, words = self.w.pwin, self._hwords
        for s, (blo, bhi) in enumerate(self.w.bounds):
            view = out[blo:bhi]
            if s == self.me:
                if self.accumulate_mode:  # workers add into it: a consistent copy under the mutex
                    self.begin_write()
                    view[...] = self.params
                    self.end_write()
                else:  # we are the only writer of our shard
                    view[...] = self.params
                continue
            if bhi <= blo:
                continue

            def read(s=s, view=view, n=bhi - blo) -> None:
                pwin.Get([view, MPI.FLOAT], s, (self.w.hdr_bytes, n, MPI.FLOAT))
                pwin.Flush(s)

            _seqlock_read(words, s, read, timeout_s=600, what="a consistent shard read")


SERVER_MUTEX_ID = 1 << 40  # MUTEX value while a server holds it (workers use index + 1)


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
        self._words = _Words(self.win, 1)
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

    # header words by index (element-wise atomic, completed by Flush)
    def _read(self, target: int, word: int) -> int:
        return int(self._words.read1(target, 8 * word))

    def _add(self, target: int, word: int, value: int) -> None:
        self._words.add1(target, 8 * word, value)

    def _write(self, target: int, word: int, value: int) -> None:
        self._words.write1(target, 8 * word, value)

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
