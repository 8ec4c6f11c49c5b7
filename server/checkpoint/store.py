"""The checkpoints of one folder: atomic write, list, prune, and which one to resume from.

Atomic-write protocol: write `.ckpt-<v>.npz.<pid>.<tid>.tmp` in the same
directory, flush and fsync it, `rename` it over `ckpt-<v>.npz`, fsync the
directory.  A crash before the rename leaves only a dot-tmp file, which no
reader ever opens (`paths` matches `ckpt-<digits>.npz` only) and the next
writer deletes (`clean_partial`); a crash after it leaves a complete file.
Files are created 0600: a checkpoint holds the model and the config.  Only
the newest `keep` files are kept.

`find_resumable` skips any file `format.load_checkpoint` refuses, with one
warning line, and takes the newest good one.

Test hook: `DBNPS_TEST_CRASH_BEFORE_RENAME=N` SIGKILLs the writing process on
its N-th write, after the fsync of the tmp file and before the rename.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbnps.common.errors import DataError
from dbnps.server.checkpoint.format import (
    CheckpointInfo,
    Snapshot,
    encode,
    info_of,
    load_checkpoint,
)

_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_PARTIAL = re.compile(r"^\.ckpt-\d+\.npz\..*\.tmp$")
CRASH_ENV = "DBNPS_TEST_CRASH_BEFORE_RENAME"
_writes_in_process = 0  # for the crash hook


@dataclass
class _Stats:
    written: int = 0
    seconds_total: float = 0.0
    last_duration_s: float = 0.0
    last_time: float = 0.0
    last: CheckpointInfo | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The checkpoints of one run directory; thread-safe."""

    def __init__(self, directory: Path, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.dir = Path(directory)
        self.keep = keep
        self.stats = _Stats()
        self._lock = threading.Lock()

    def write(self, snap: Snapshot) -> CheckpointInfo:
        t0 = time.perf_counter()
        entries, digest = encode(snap)
        with self._lock:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            final = self.dir / f"ckpt-{int(snap.meta['version'])}.npz"
            tmp = self.dir / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                # 0600 like the token: a checkpoint holds the model and the config.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **entries)
                    f.flush()
                    os.fsync(f.fileno())
                _maybe_crash()
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.dir)
            size = final.stat().st_size
            # After the stat: a snapshot older than `keep` newer ones (an RPC's, written
            # after the periodic writer's) is pruned at once, and stat-ing it then failed.
            self._prune()
            dt = time.perf_counter() - t0
            info = CheckpointInfo(
                path=final,
                version=int(snap.meta["version"]),
                phase=str(snap.meta["phase_name"]),
                size_bytes=size,
                created_unix=float(snap.meta["created_unix"]),
                sha256=digest,
                duration_s=dt,
            )
            s = self.stats
            s.written += 1
            s.seconds_total += dt
            s.last_duration_s = dt
            s.last_time = time.time()
            s.last = info
        return info

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest (lowest version) first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def clean_partial(self) -> list[Path]:
        """Delete tmp files left by a writer that died before its rename; returns them.

        Call only when no other process writes this directory (a new server does,
        before its first checkpoint)."""
        if not self.dir.is_dir():
            return []
        gone = []
        for p in self.dir.iterdir():
            if _PARTIAL.match(p.name):
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone

    def count(self) -> int:
        return len(self.paths())

    def _prune(self) -> None:
        for p in self.paths()[: -self.keep]:
            p.unlink(missing_ok=True)

    def list(self) -> list[CheckpointInfo]:
        out = []
        for p in self.paths():
            try:
                out.append(info_of(p))
            except (OSError, DataError):
                continue  # pruned or replaced while listing, or not ours
        return out


def _maybe_crash() -> None:
    """Test hook: SIGKILL ourselves between the fsync and the rename (see module doc)."""
    global _writes_in_process
    _writes_in_process += 1
    n = os.environ.get(CRASH_ENV, "")
    if n.isdigit() and int(n) == _writes_in_process:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(path: Path) -> Path:
    """The checkpoints folder meant by `path`: a run dir (with checkpoints/) or the folder."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def find_resumable(
    path: Path, warn=print, *, quarantine: bool = False
) -> tuple[Path, tuple[np.ndarray, dict, dict]]:
    """The checkpoint to resume from and its verified contents.

    `path` is a checkpoint file (it must be good), a run directory or a
    checkpoints folder (the newest good file in it; every newer corrupt one is
    reported by `warn` in one line and skipped).  Raises DataError when there
    is nothing good to resume from.  `quarantine` renames each corrupt file to
    `<name>.corrupt`, for a run that goes on writing into this folder (its
    new, lower versions must not sort below a corrupt file nor be pruned for it).
    """
    path = Path(path)
    if path.is_file():
        try:
            return path, load_checkpoint(path)
        except DataError as exc:
            raise DataError(
                f"cannot resume: {exc} (give its run directory to take the newest good one)"
            ) from None
    if not path.is_dir():
        raise DataError(f"cannot resume: no such checkpoint file or directory: {path}")
    folder = checkpoint_dir(path)
    files = CheckpointStore(folder).paths()
    if not files:
        raise DataError(f"cannot resume: no checkpoints in {folder}")
    bad = []
    for p in reversed(files):
        try:
            loaded = load_checkpoint(p)
        except DataError as exc:
            bad.append(p.name)
            why = str(exc).removeprefix(f"{p}: ")
            if quarantine:
                try:
                    p.rename(p.with_name(p.name + ".corrupt"))
                    why += f"; renamed to {p.name}.corrupt"
                except OSError as err:  # a read-only folder: skip it all the same
                    why += f"; could not rename it ({err.strerror or err})"
            warn(f"warning: skipping corrupt checkpoint {p}: {why}")
            continue
        return p, loaded
    raise DataError(
        f"cannot resume: every checkpoint in {folder} is corrupt ({', '.join(reversed(bad))})"
    )
