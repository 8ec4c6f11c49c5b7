"""The words of the parameter-server protocol, with no MPI in them.

Everything here is plain numpy: the meaning of each window word, the result
codes, a push as the server sees it, and typed views over the words the
server state, status RPC and metrics read.  The RMA transport
(`dbnps.common.rma`) owns where these words live in the windows and moves
them; the protocol's logic (`dbnps.server.handle`, `dbnps.common.membership`,
`dbnps.common.schedule`, `dbnps.worker.cadence`) reads and decides on them.
Tests of that logic run in-process, without mpiexec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# -- header words (int64, at the start of each server rank's parameter window) --
VERSION, PHASE, SAMPLES, STOP, MEMBERS, SEQ, MUTEX, DEAD = range(8)
STOP_WORKERS, STOP_ALL = 1, 2  # STOP word: workers leave now / every worker has left

# -- mailbox words (int64, one row of MB_WORDS per worker) --
MB_WORDS = 8
PUSH_SEQ, ACK_SEQ, PULLED, N_SAMPLES, MB_PHASE, RESULT, LO, HI = range(MB_WORDS)

# -- stats words (float64, one row of ST_WORDS per worker, on rank 0) --
ST_WORDS = 8
STEPS, ST_SAMPLES, LOSS, HEARTBEAT, RATE, PUSHES, PULLS, STATE = range(ST_WORDS)
STATE_RUNNING, STATE_DONE = 1.0, 2.0  # STATE word; 0 = not reported yet

# -- RESULT codes written by the server for each push --
APPLIED, REJECTED_NONFINITE, REJECTED_STALE, REJECTED_PHASE = 1, 2, 3, 4
RESULT_NAMES = {
    APPLIED: "applied",
    REJECTED_NONFINITE: "nonfinite",
    REJECTED_STALE: "stale",
    REJECTED_PHASE: "phase",
}


def header_words(n_workers: int) -> int:
    """int64 words of the header for K workers (even: the parameters stay 16-byte aligned)."""
    n = DEAD + (n_workers + 63) // 64
    return n + (n % 2)


def dead_set(header: np.ndarray, n_workers: int) -> set[int]:
    """Worker indices marked dead in a header's DEAD bitmask."""
    return {w for w in range(n_workers) if (int(header[DEAD + w // 64]) >> (w % 64)) & 1}


def mark_dead(header: np.ndarray, worker: int) -> None:
    """Set `worker`'s bit in the DEAD bitmask and count the membership change."""
    header[DEAD + worker // 64] |= np.int64(1) << np.int64(worker % 64)
    header[MEMBERS] += 1


@dataclass
class Push:
    """One pending push, as the server's request handle sees it."""

    worker: int
    seq: int
    pulled_version: int  # the shard version the gradient was computed at
    n_samples: int
    phase: int
    lo: int  # offsets into this server's shard (accumulate mode: lo = VERSION it was added to)
    hi: int
    grad: np.ndarray | None  # view into the slot, valid until ack (None: accumulate mode)
    result: int = 0  # accumulate mode: the outcome the worker reached under the mutex


class Header:
    """Typed view over a rank's header words: the one copy of version, phase and samples.

    The server's state, its status RPC and its metrics all read these
    properties; the loop writes them (between the transport's
    `begin_write`/`end_write`, so pulls never see half of a change).
    """

    def __init__(self, words: np.ndarray, n_workers: int):
        self.words = words
        self.n_workers = n_workers

    version = property(lambda self: int(self.words[VERSION]))
    phase = property(lambda self: int(self.words[PHASE]))
    samples = property(lambda self: int(self.words[SAMPLES]))
    stop = property(lambda self: int(self.words[STOP]))
    members = property(lambda self: int(self.words[MEMBERS]))

    @property
    def dead(self) -> set[int]:
        return dead_set(self.words, self.n_workers)
