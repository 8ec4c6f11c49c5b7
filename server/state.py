"""Live state of a parameter-server rank, read by status RPCs and metrics at request time.

The training loop owns and mutates this object; readers (gRPC handlers,
Prometheus collectors, the log line) only read it, so there is one copy of
every number: version, phase and samples are read from the rank's header
words (`words`, the window memory the workers pull from), the workers' rows
and liveness from `members` (`dbnps.common.membership`).  Plain Python ints/floats and small numpy arrays: a reader on
another thread may see a value one update old, never a torn one that matters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dbnps.common.membership import Membership
from dbnps.common.protocol import (
    LOSS,
    PULLS,
    PUSHES,
    RATE,
    ST_SAMPLES,
    STEPS,
    Header,
    header_words,
)

# Staleness histogram bucket upper bounds (in parameter versions), Prometheus-style.
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServerState:
    n_workers: int
    n_servers: int
    phase_names: list[str]
    start_time: float = field(default_factory=time.time)
    words: np.ndarray | None = None  # int64 header words (default: private zeros, for tests)
    heartbeat_timeout_s: float = float("inf")
    phase_samples: int = 0  # samples the current phase lasts
    n_train: int = 0
    applied_total: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    apply_seconds: float = 0.0  # inside the update rule
    busy_seconds: float = 0.0  # in handle(): validate, sum, apply, ack
    # CPU seconds (thread CPU time) of the main loop ("loop"), of which serving
    # pushes ("serve") and bookkeeping ("book"), and of the evaluation thread
    # ("eval"): what is left of the loop is waiting (mailbox looks, sleeps)
    looks: int = 0  # times the loop looked at the mailboxes (idle or not)
    forecast: dict[str, int] = field(default_factory=dict)  # pushes seen early/due/late
    cpu: dict[str, float] = field(
        default_factory=lambda: {"loop": 0.0, "serve": 0.0, "book": 0.0, "eval": 0.0}
    )
    first_apply: float = 0.0  # wall time of the first and last applied batch (ingest rate)
    last_apply: float = 0.0
    staleness_counts: np.ndarray = field(
        default_factory=lambda: np.zeros(len(STALENESS_BUCKETS) + 1, dtype=np.int64)
    )
    staleness_sum: int = 0
    staleness_max: int = 0
    eval_split: str = "test"  # what evaluations during training use: "validation" or "test"
    eval_accuracy: float = float("nan")  # the last evaluation, on eval_split
    test_accuracy: float = float("nan")  # the last test-set accuracy (eval_split test, or the end)
    saved: dict = field(default_factory=dict)  # what finish() wrote: which, version, accuracies
    done: bool = False  # every worker has left
    stopped: bool = False  # ended by a stop request, not by the schedule
    stopped_in: str = ""  # the phase a stop request came in
    nonfinite_in_a_row: int = 0  # pushes rejected as non-finite since the last applied one
    diverged: str = ""  # why the job was ended as diverged ("" if it was not)
    history: list[dict] = field(default_factory=list)
    # per worker (index = worker number, world rank = n_servers + index)
    worker_applied: np.ndarray = field(init=False)
    worker_rejected: np.ndarray = field(init=False)
    members: Membership = field(init=False)

    def __post_init__(self) -> None:
        K = self.n_workers
        if self.words is None:
            self.words = np.zeros(header_words(K), dtype=np.int64)
        self.header = Header(self.words, K)
        self.worker_applied = np.zeros(K, dtype=np.int64)
        self.worker_rejected = np.zeros(K, dtype=np.int64)
        self.members = Membership(K, self.heartbeat_timeout_s, self.start_time)

    # the header's words: the one copy (pulls read the same memory)
    version = property(lambda self: self.header.version)
    phase = property(lambda self: self.header.phase)
    samples_in_phase = property(lambda self: self.header.samples)

    # the workers' stats rows (float64[K, ST_WORDS], read from the window) and liveness
    worker_stats = property(lambda self: self.members.stats)
    worker_alive = property(lambda self: self.members.alive)
    heartbeat_age = property(lambda self: self.members.heartbeat_age)
    loss = property(lambda self: self.members.loss)  # mean over the workers that stepped

    @property
    def phase_name(self) -> str:
        return self.phase_names[min(self.phase, len(self.phase_names) - 1)]

    @property
    def epoch(self) -> float:
        """Epochs completed in the current phase (all workers together)."""
        return self.samples_in_phase / self.n_train if self.n_train else 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def staleness_count(self) -> int:
        return int(self.staleness_counts.sum())

    @property
    def ingest_rate(self) -> float:
        """Updates applied per second between the first and the last applied batch."""
        span = self.last_apply - self.first_apply
        return self.applied_total / span if span > 0 else 0.0

    def record_staleness(self, s: int) -> None:
        self.staleness_counts[np.searchsorted(STALENESS_BUCKETS, s)] += 1
        self.staleness_sum += s
        self.staleness_max = max(self.staleness_max, s)

    def cpu_seconds(self) -> dict[str, float]:
        """This rank's CPU by role: serve, book, wait (the loop's rest), eval, the process."""
        c = self.cpu
        return {
            "serve": round(c["serve"], 3),
            "book": round(c["book"], 3),
            "wait": round(max(c["loop"] - c["serve"] - c["book"], 0.0), 3),
            "eval": round(c["eval"], 3),
            "process": round(time.process_time(), 3),  # all threads, start-up included
        }

    def summary(self) -> dict:
        """A JSON-ready snapshot (written at the end of a run, and for `status --json`)."""
        n = self.staleness_count
        return {
            "phase": self.phase_name,
            "version": self.version,
            "applied": self.applied_total,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in,
            "apply_seconds": round(self.apply_seconds, 6),
            "busy_seconds": round(self.busy_seconds, 6),
            "cpu_seconds": self.cpu_seconds(),
            "mailbox_looks": self.looks,
            "push_forecast": dict(self.forecast),
            "ingest_updates_per_s": self.ingest_rate,
            "capacity_updates_per_s": self.applied_total / self.busy_seconds
            if self.busy_seconds
            else 0.0,
            "staleness": {
                "buckets": list(STALENESS_BUCKETS),
                "counts": self.staleness_counts.tolist(),
                "mean": self.staleness_sum / n if n else 0.0,
                "max": self.staleness_max,
            },
            "test_accuracy": self.test_accuracy,
            "eval_split": self.eval_split,
            "eval_accuracy": self.eval_accuracy,
            "saved": self.saved,
            "stopped_in": self.stopped_in,
            "diverged": self.diverged,
            "dead_workers": [int(w) for w in np.flatnonzero(~self.worker_alive)],
            "loss": self.loss,
            "wall_s": round(time.time() - self.start_time, 3),
            "workers": [
                {
                    "worker": w,
                    "rank": self.n_servers + w,
                    "applied": int(self.worker_applied[w]),
                    "rejected": int(self.worker_rejected[w]),
                    "steps": int(self.worker_stats[w, STEPS]),
                    "samples": int(self.worker_stats[w, ST_SAMPLES]),
                    "loss": float(self.worker_stats[w, LOSS]),
                    "samples_per_s": float(self.worker_stats[w, RATE]),
                    "pushes": int(self.worker_stats[w, PUSHES]),
                    "pulls": int(self.worker_stats[w, PULLS]),
                    "alive": bool(self.worker_alive[w]),
                    "state": self.members.state(w),
                    "heartbeat_age_s": round(float(self.heartbeat_age[w]), 3),
                }
                for w in range(self.n_workers)
            ],
            "history": self.history,
        }
