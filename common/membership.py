"""Which workers are in the job: heartbeats, the dead set, and the one liveness rule.

No MPI: rank 0's loop hands `observe` the stats rows it read from its window
(each worker writes its row with a heartbeat time, `PSClient.report`) and
publishes the deaths it returns; the status RPC and the metrics ask `state`
and `up`, so they cannot disagree.  The survivors re-deal the training set
over the live workers with `live_shard`.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.protocol import (
    HEARTBEAT,
    LOSS,
    ST_WORDS,
    STATE,
    STATE_DONE,
    STATE_RUNNING,
    STEPS,
)


class Membership:
    def __init__(self, n_workers: int, timeout_s: float, start_time: float):
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        self.start_time = start_time
        self.stats = np.zeros((n_workers, ST_WORDS), dtype=np.float64)  # last rows read
        self.alive = np.ones(n_workers, dtype=bool)  # False once marked dead
        self.heartbeat_age = np.zeros(n_workers, dtype=np.float64)

    def observe(self, stats: np.ndarray, now: float) -> list[tuple[int, str]]:
        """Take new stats rows; returns the workers to mark dead now, with why.

        A worker that has not reported yet counts from the server's start, so a
        worker that never comes up is found as well.  A worker that has
        reported done is never dead.
        """
        self.stats = stats  # one reference swap: readers on other threads see old or new
        beat = stats[:, HEARTBEAT]
        self.heartbeat_age = now - np.where(beat > 0, beat, self.start_time)
        dead = []
        for w in range(self.n_workers):
            silent = self.heartbeat_age[w] > self.timeout_s
            if self.alive[w] and stats[w, STATE] != STATE_DONE and silent:
                self.alive[w] = False
                dead.append((w, f"no heartbeat for {self.heartbeat_age[w]:.0f}s"))
        return dead

    def state(self, w: int) -> str:
        """ "lost" (marked dead), "done", "running" or "starting" (not reported yet)."""
        if not self.alive[w]:
            return "lost"
        s = self.stats[w, STATE]
        return "done" if s == STATE_DONE else "running" if s == STATE_RUNNING else "starting"

    def up(self, w: int) -> bool:
        """Still expected to train: starting or running (not done, not lost)."""
        return self.state(w) in ("starting", "running")

    @property
    def all_left(self) -> bool:
        """Every worker is done or dead: the job is over."""
        return bool(np.all((self.stats[:, STATE] == STATE_DONE) | ~self.alive))

    @property
    def stepped(self) -> np.ndarray:
        """bool[K]: the workers that have taken a step (and so reported a loss)."""
        return self.stats[:, STEPS] > 0

    @property
    def loss(self) -> float:
        """Mean training loss over the workers that have taken a step (NaN before any).

        A worker that reports before its first step (a warm start's waiting
        workers) has no loss yet: its NaN word must not make the mean NaN."""
        stepped = self.stepped
        return float(np.mean(self.stats[stepped, LOSS])) if stepped.any() else float("nan")


def live_shard(me: int, dead: set[int], n_workers: int) -> tuple[int, int] | None:
    """(position, count) of worker `me` among the live workers, None if `me` is dead.

    Worker `me` trains on part `position` of `count` equal parts of the training
    set (`dbnps.common.mnist.shard`); when a worker dies the survivors' parts
    grow and together cover the whole set again.
    """
    live = [w for w in range(n_workers) if w not in dead]
    return (live.index(me), len(live)) if me in live else None


def solo_worker(n_workers: int, dead: set[int]) -> int | None:
    """The worker that trains alone during a warm start: the lowest live one (None: none left)."""
    return next((w for w in range(n_workers) if w not in dead), None)
