"""Rank 0's periodic checkpoints (`[run] checkpoint_every_s`, `checkpoint_every_updates`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from dbnps.server.checkpoint.format import Snapshot
from dbnps.server.checkpoint.snapshot import JobState, snapshot
from dbnps.server.checkpoint.store import CheckpointStore


class Periodic:
    """Rank 0's periodic checkpoints (`[run] checkpoint_every_s` / `checkpoint_every_updates`).

    `due` and `take` run on the main thread inside `ParameterServer.run`; the
    file is written on one background thread, and a new snapshot is not taken
    while the previous write is still going (the loop never waits on a disk).
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        every_s: float = 0.0,
        every_updates: int = 0,
        job_id: str = "",
        log=print,
    ):
        self.store = store
        self.every_s = every_s
        self.every_updates = every_updates
        self.job_id = job_id
        self.log = log
        self.last_version = -1
        self.last_time = time.monotonic()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        self._pending = None
        for p in store.clean_partial():
            log(f"[checkpoint] removed a partial checkpoint left by a crashed writer: {p.name}")

    @property
    def enabled(self) -> bool:
        return self.every_s > 0 or self.every_updates > 0

    def start(self, version: int) -> None:
        """The version the run starts from (0, or the resumed one): no checkpoint of it."""
        self.last_version = version
        self.last_time = time.monotonic()

    def due(self, version: int) -> bool:
        if not self.enabled or version <= self.last_version:
            return False
        if self._pending is not None and not self._pending.done():
            return False
        if self.every_updates and version - self.last_version >= self.every_updates:
            return True
        return bool(self.every_s) and time.monotonic() - self.last_time >= self.every_s

    def take(self, state: JobState) -> None:
        """Write `state` (the server's `checkpoint_state()`) in the background."""
        snap = snapshot(state, job_id=self.job_id, note="periodic")
        self.last_version = int(snap.meta["version"])
        self.last_time = time.monotonic()
        self._pending = self._pool.submit(self._write, snap)

    def _write(self, snap: Snapshot) -> None:
        try:
            info = self.store.write(snap)
        except Exception as exc:  # a full disk must not stop training; say so
            self.log(f"[checkpoint] periodic checkpoint failed: {exc}")
        else:
            self.log(f"[checkpoint] {info.path.name} (version {info.version}, {info.phase})")

    def close(self) -> None:
        """Wait for the write in flight (at the end of the run)."""
        self._pool.shutdown(wait=True)
