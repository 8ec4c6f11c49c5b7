"""Checkpoints: one self-verifying `.npz` file per checkpoint, written atomically.

A checkpoint holds the whole flat parameter vector (rank 0 gathers it from
every server shard), the update rule's state, the schedule counters (phase,
samples into the phase, version), the resolved config and a SHA256 digest of
all of that.  Layout of `<run_dir>/checkpoints/ckpt-<version>.npz`::

    params        float32[n_params]     the flat vector (see dbnps.common.layout)
    rule.<name>   float32[...]          update-rule state of server rank 0's shard
    meta          uint8[...]            UTF-8 JSON: counters, config, shard bounds
    sha256        uint8[64]             hex digest over every entry above

Taking a checkpoint has two halves: `snapshot` copies what is needed out of
the live windows and must run on the main thread (it calls MPI); `write`
does the disk work (tmp file, fsync, rename, fsync of the directory) and may
run on any thread.  Only the newest `keep` files are kept.

Atomic-write protocol: write `.ckpt-<v>.npz.<pid>.<tid>.tmp` in the same
directory, flush and fsync it, `rename` it over `ckpt-<v>.npz`, fsync the
directory.  A crash before the rename leaves only a dot-tmp file, which no
reader ever opens (`paths` matches `ckpt-<digits>.npz` only) and the next
writer deletes (`clean_partial`); a crash after it leaves a complete file.
A file damaged later (truncated, a flipped byte) fails its zip CRC or its
SHA256 when loaded: `find_resumable` then skips it with one warning line
and takes the newest good one.

What a checkpoint holds is everything the server needs to continue exactly
(`ParameterServer(resume=...)`): parameters, update-rule state, phase,
samples into the phase, parameter version, the fine-tune evaluation
position, the config and the seeds.  Not held: the workers' minibatch RNG
streams (they restart from `[run] seed`) and, with several server ranks,
the update-rule state of the follower shards (only rank 0's shard is saved,
`meta["rule_shard"]` says which; the others restart at zero as after a
phase change).

Periodic checkpoints (`[run] checkpoint_every_s`, `checkpoint_every_updates`)
are taken by rank 0 in its main loop through `Periodic`: the snapshot on the
main thread, the disk work on one background thread.

Test hook: `DBNPS_TEST_CRASH_BEFORE_RENAME=N` SIGKILLs the writing process on
its N-th write, after the fsync of the tmp file and before the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbnps.common.errors import DataError

FORMAT = "dbnps-checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_PARTIAL = re.compile(r"^\.ckpt-\d+\.npz\..*\.tmp$")
CRASH_ENV = "DBNPS_TEST_CRASH_BEFORE_RENAME"
_writes_in_process = 0  # for the crash hook


@dataclass
class Snapshot:
    params: np.ndarray
    rule_state: dict[str, np.ndarray]
    meta: dict


@dataclass
class CheckpointInfo:
    path: Path
    version: int
    phase: str
    size_bytes: int
    created_unix: float
    sha256: str
    duration_s: float = 0.0


@dataclass
class _Stats:
    written: int = 0
    seconds_total: float = 0.0
    last_duration_s: float = 0.0
    last_time: float = 0.0
    last: CheckpointInfo | None = None


def snapshot(ps, *, job_id: str = "", note: str = "", stop_phase: int | None = None) -> Snapshot:
    """Copy parameters, rule state and counters out of a ParameterServer (main thread only)."""
    st = ps.state
    params = np.empty(ps.layout.size, dtype=np.float32)
    ps.ps.gather_params(params)
    rule_state = {k: np.array(v, copy=True) for k, v in ps.rule.state().items()}
    phase = st.phase if stop_phase is None else stop_phase
    meta = {
        "format": FORMAT,
        "job_id": job_id,
        "note": note,
        "created_unix": time.time(),
        "version": int(st.version),
        "phase": int(phase),
        "phase_name": st.phase_names[min(phase, len(st.phase_names) - 1)],
        "samples_in_phase": int(st.samples_in_phase),
        "phase_samples": int(st.phase_samples),
        "n_train": int(st.n_train),
        "applied": int(st.applied_total),
        "rejected": dict(st.rejected),
        "stopped": bool(st.stopped),
        "update_rule": ps.rule.name,
        "rule_shard": [int(ps.lo), int(ps.hi)],
        "shard_bounds": [list(b) for b in ps.win.bounds],
        "n_params": int(ps.layout.size),
        "n_workers": int(st.n_workers),
        "next_eval": float(ps._next_eval),  # fine-tune evaluation schedule position (epochs)
        "test_accuracy": float(st.test_accuracy),
        "eval_accuracy": float(st.eval_accuracy),
        "seeds": {"run.seed": int(ps.cfg.run.seed), "workers": "default_rng([seed, 1, worker])"},
        "config": ps.cfg.to_dict(),
    }
    return Snapshot(params, rule_state, meta)


def _digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    h.update(b"meta\n")
    h.update(meta_bytes)
    return h.hexdigest()


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
        arrays = {"params": snap.params}
        arrays.update({f"rule.{k}": v for k, v in snap.rule_state.items()})
        meta_bytes = json.dumps(snap.meta, sort_keys=True, default=float).encode()
        digest = _digest(arrays, meta_bytes)
        entries = {
            **arrays,
            "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
            "sha256": np.frombuffer(digest.encode(), dtype=np.uint8),
        }
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            final = self.dir / f"ckpt-{int(snap.meta['version'])}.npz"
            tmp = self.dir / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    np.savez(f, **entries)
                    f.flush()
                    os.fsync(f.fileno())
                _maybe_crash()
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.dir)
            self._prune()
            dt = time.perf_counter() - t0
            info = CheckpointInfo(
                path=final,
                version=int(snap.meta["version"]),
                phase=str(snap.meta["phase_name"]),
                size_bytes=final.stat().st_size,
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


def _read(
    path: Path, *, header_only: bool = False
) -> tuple[dict[str, np.ndarray], dict, str, bytes]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files or "sha256" not in z.files or "params" not in z.files:
                raise DataError(f"{path}: not a dbnps checkpoint (missing entries)")
            names = ["meta", "sha256"] if header_only else z.files
            arrays = {k: z[k] for k in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable checkpoint ({exc})") from exc
    meta_bytes = arrays.pop("meta").tobytes()
    digest = arrays.pop("sha256").tobytes().decode("ascii", "replace")
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:
        raise DataError(f"{path}: corrupt checkpoint metadata") from exc
    return arrays, meta, digest, meta_bytes


def info_of(path: Path) -> CheckpointInfo:
    """Describe a checkpoint file (reads its metadata only; does not verify the digest)."""
    _, meta, digest, _ = _read(path, header_only=True)
    return CheckpointInfo(
        path=Path(path),
        version=int(meta.get("version", -1)),
        phase=str(meta.get("phase_name", "")),
        size_bytes=Path(path).stat().st_size,
        created_unix=float(meta.get("created_unix", 0.0)),
        sha256=digest,
    )


def load_checkpoint(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(params, rule_state, meta) of a checkpoint, after verifying its SHA256 digest."""
    arrays, meta, digest, meta_bytes = _read(Path(path))
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if _digest(arrays, meta_bytes) != digest:
        raise DataError(f"{path}: checksum mismatch (the file is corrupt)")
    params = arrays.pop("params")
    rule = {k.removeprefix("rule."): v for k, v in arrays.items() if k.startswith("rule.")}
    return params, rule, meta


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
                p.rename(p.with_name(p.name + ".corrupt"))
                why += f"; renamed to {p.name}.corrupt"
            warn(f"warning: skipping corrupt checkpoint {p}: {why}")
            continue
        return p, loaded
    raise DataError(
        f"cannot resume: every checkpoint in {folder} is corrupt ({', '.join(reversed(bad))})"
    )


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
        from concurrent.futures import ThreadPoolExecutor

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

    def take(self, ps) -> None:
        snap = snapshot(ps, job_id=self.job_id, note="periodic")
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
