"""Checkpoints: one self-verifying `.npz` file per checkpoint, written atomically.

A checkpoint is complete: the whole flat parameter vector and the whole
update-rule state (every server shard's, gathered by rank 0 through the RMA
windows), the schedule counters (phase, samples into the phase, version of
every shard), the fine-tune evaluation position, the resolved config, and
one SHA256 digest over all of it (the manifest, `meta`, included).  Layout
of `<run_dir>/checkpoints/ckpt-<version>.npz`::

    params        float32[n_params]     the flat vector (see dbnps.common.layout)
    rule.<name>   float32[n_params]     update-rule state over the flat vector (every shard)
    meta          uint8[...]            UTF-8 JSON manifest: counters, config, shard bounds
    sha256        uint8[64]             hex digest over every entry above

The rule state covers the flat vector, not one shard, so a job may resume
with another number of server ranks: each rank takes its own slice.

What the server hands over is a `JobState`, built by
`ParameterServer.checkpoint_state` on rank 0's main thread (it calls MPI);
`snapshot` turns it into a `Snapshot` (arrays + manifest) and
`CheckpointStore.write` does the disk work (tmp file, fsync, rename, fsync of
the directory) on any thread.  Only the newest `keep` files are kept.

Atomic-write protocol: write `.ckpt-<v>.npz.<pid>.<tid>.tmp` in the same
directory, flush and fsync it, `rename` it over `ckpt-<v>.npz`, fsync the
directory.  A crash before the rename leaves only a dot-tmp file, which no
reader ever opens (`paths` matches `ckpt-<digits>.npz` only) and the next
writer deletes (`clean_partial`); a crash after it leaves a complete file.
Files are created 0600: a checkpoint holds the model and the config.

Loading checks the file twice: the digest (a damaged file: truncated, a
flipped byte) and then the meaning (`validate`: the manifest's types, phase
and samples in range for its own config, version >= 0, rule-state names,
shapes and dtypes matching the rule, finite parameters and state), so a
forged file with a recomputed digest is refused too, with one line naming
the file and what is wrong.  `find_resumable` skips any refused file with
one warning line and takes the newest good one.

Held exactly: parameters, update-rule state, phase, samples into the phase,
every shard's version, the evaluation position (`next_eval`) and the last
accuracies.  Not held: the workers' minibatch RNG streams (they restart from
`[run] seed`) and, in `[ps] mode = "accumulate"`, the update-rule state,
which lives in each worker (its own velocity over its own gradients, never
in a window the server can read); it restarts at zero on resume, as at a
phase change (`meta["rule_state"]` says so; tests/test_checkpoint.py).

Periodic checkpoints (`[run] checkpoint_every_s`, `checkpoint_every_updates`)
are taken by rank 0 in its main loop through `Periodic`: the snapshot on the
main thread, the disk work on one background thread.

Test hooks: `DBNPS_TEST_CRASH_BEFORE_RENAME=N` SIGKILLs the writing process on
its N-th write, after the fsync of the tmp file and before the rename.
`DBNPS_TEST_SNAPSHOT_AFTER_RESUME=DIR`: a resumed server writes what its
windows hold right after the restore, before any worker pulls, into DIR
(`after_resume_hook`), so a test can compare it with the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dbnps.common.errors import DataError, UserError

FORMAT = "dbnps-checkpoint/2"
FORMAT_V1 = "dbnps-checkpoint/1"  # rank 0's shard of the rule state only (still read)
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_PARTIAL = re.compile(r"^\.ckpt-\d+\.npz\..*\.tmp$")
CRASH_ENV = "DBNPS_TEST_CRASH_BEFORE_RENAME"
AFTER_RESUME_ENV = "DBNPS_TEST_SNAPSHOT_AFTER_RESUME"
RULE_STATE = {"sgd": (), "momentum": ("v",), "adagrad": ("s",)}  # names each rule keeps
RULE_STATE_SERVER = "server"
RULE_STATE_WORKERS = "workers (accumulate mode: not saved, restarts at zero)"
_writes_in_process = 0  # for the crash hook


@dataclass
class JobState:
    """What a checkpoint holds, built by the server (`ParameterServer.checkpoint_state`)."""

    params: np.ndarray  # float32[n_params], every shard
    rule_name: str
    rule_state: dict[str, np.ndarray]  # name -> float32[n_params], every shard ({} if not kept)
    rule_state_kept: str  # RULE_STATE_SERVER or RULE_STATE_WORKERS
    version: int  # rank 0's
    shard_versions: list[int]
    shard_bounds: list[tuple[int, int]]
    phase: int
    phase_names: list[str]
    samples_in_phase: int
    phase_samples: int
    n_train: int
    n_workers: int
    applied: int
    rejected: dict[str, int]
    stopped: bool
    next_eval: float
    test_accuracy: float
    eval_accuracy: float
    config: dict
    seed: int
    extra: dict = field(default_factory=dict)
    # [ps] average: the parameter average (float32[n_params]); its counters go in
    # extra["average"].  None: the job keeps no average.
    average: np.ndarray | None = None


@dataclass
class Snapshot:
    params: np.ndarray
    rule_state: dict[str, np.ndarray]
    meta: dict
    average: np.ndarray | None = None


@dataclass
class CheckpointInfo:
    path: Path
    version: int
    phase: str
    size_bytes: int
    created_unix: float
    sha256: str
    duration_s: float = 0.0

    def message(self):
        """The control plane's `dbnps.v1.CheckpointInfo` of it (RPC replies, psctl)."""
        from dbnps.v1 import control_pb2 as pb

        return pb.CheckpointInfo(
            path=str(self.path),
            version=self.version,
            phase=self.phase,
            size_bytes=self.size_bytes,
            created_unix=self.created_unix,
            sha256=self.sha256,
        )


@dataclass
class _Stats:
    written: int = 0
    seconds_total: float = 0.0
    last_duration_s: float = 0.0
    last_time: float = 0.0
    last: CheckpointInfo | None = None


def snapshot(
    js: JobState, *, job_id: str = "", note: str = "", stop_phase: int | None = None
) -> Snapshot:
    """Arrays and manifest of a checkpoint of `js` (any thread: no MPI here)."""
    phase = js.phase if stop_phase is None else stop_phase
    done = len(js.phase_names) - 1
    meta = {
        "format": FORMAT,
        "job_id": job_id,
        "note": note,
        "created_unix": time.time(),
        "version": int(js.version),
        "shard_versions": [int(v) for v in js.shard_versions],
        "phase": int(phase),
        "phase_name": js.phase_names[min(phase, done)],
        # A job that reached `done` has no samples left in any phase.
        "samples_in_phase": int(js.samples_in_phase) if phase < done else 0,
        "phase_samples": int(js.phase_samples),
        "n_train": int(js.n_train),
        "applied": int(js.applied),
        "rejected": {str(k): int(v) for k, v in js.rejected.items()},
        "stopped": bool(js.stopped),
        "update_rule": js.rule_name,
        "rule_state": js.rule_state_kept,
        "shard_bounds": [[int(a), int(b)] for a, b in js.shard_bounds],
        "n_params": int(js.params.size),
        "n_workers": int(js.n_workers),
        "next_eval": float(js.next_eval),  # fine-tune evaluation schedule position (epochs)
        "test_accuracy": float(js.test_accuracy),
        "eval_accuracy": float(js.eval_accuracy),
        "seeds": {"run.seed": int(js.seed), "workers": "default_rng([seed, 1, worker])"},
        "config": js.config,
        **js.extra,
    }
    return Snapshot(js.params, dict(js.rule_state), meta, js.average)


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
        if snap.average is not None:
            arrays["average"] = snap.average
        meta_bytes = json.dumps(snap.meta, sort_keys=True, default=float).encode()
        digest = _digest(arrays, meta_bytes)
        entries = {
            **arrays,
            "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
            "sha256": np.frombuffer(digest.encode(), dtype=np.uint8),
        }
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
    except ValueError as exc:  # UnicodeDecodeError too
        raise DataError(f"{path}: corrupt checkpoint metadata") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: checkpoint metadata is a {type(meta).__name__}, not an object")
    return arrays, meta, digest, meta_bytes


def info_of(path: Path) -> CheckpointInfo:
    """Describe a checkpoint file (reads its metadata only; does not verify the digest)."""
    _, meta, digest, _ = _read(path, header_only=True)
    try:
        return CheckpointInfo(
            path=Path(path),
            version=int(meta.get("version", -1)),
            phase=str(meta.get("phase_name", "")),
            size_bytes=Path(path).stat().st_size,
            created_unix=float(meta.get("created_unix", 0.0)),
            sha256=digest,
        )
    except (TypeError, ValueError) as exc:  # a forged manifest: not listed, never a traceback
        raise DataError(f"{path}: unusable checkpoint metadata ({exc})") from None


def load_checkpoint(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(params, rule_state, meta) of a checkpoint, after verifying its digest and meaning.

    A checkpoint of a job with `[ps] average` holds the average too: it comes back
    as `meta["average_params"]` (float32[n_params], beside its counters in
    `meta["average"]`), so the callers' shape stays (params, rule_state, meta).
    """
    arrays, meta, digest, meta_bytes = _read(Path(path))
    if meta.get("format") not in (FORMAT, FORMAT_V1):
        raise DataError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if _digest(arrays, meta_bytes) != digest:
        raise DataError(f"{path}: checksum mismatch (the file is corrupt)")
    params = arrays.pop("params")
    average = arrays.pop("average", None)
    rule = {k.removeprefix("rule."): v for k, v in arrays.items() if k.startswith("rule.")}
    unknown = sorted(k for k in arrays if not k.startswith("rule."))
    if unknown:
        raise DataError(f"{path}: unknown entries {unknown}")
    validate(path, params, rule, meta)
    _validate_average(path, average, meta, params.size)
    if average is not None:
        meta["average_params"] = average
    return params, rule, meta


def _validate_average(path, average: np.ndarray | None, meta: dict, n: int) -> None:
    """The parameter average and its counters come together and make sense."""
    counts = meta.get("average")
    if average is None and counts is None:
        return
    if average is None or not isinstance(counts, dict):
        raise DataError(f"{path}: a parameter average needs both its array and its counters")
    if average.dtype != np.float32 or average.shape != (n,):
        raise DataError(
            f"{path}: the parameter average must be float32[{n}], "
            f"got {average.dtype}{list(average.shape)}"
        )
    if not np.isfinite(np.dot(average, average)):
        raise DataError(f"{path}: the parameter average holds NaN or Inf values")
    if counts.get("kind") not in ("ema", "polyak") or not all(
        type(counts.get(k)) is int and counts[k] >= 0 for k in ("count", "pending")
    ):
        raise DataError(f"{path}: metadata 'average' is not a valid average, got {_show(counts)}")


def validate(path, params: np.ndarray, rule: dict[str, np.ndarray], meta: dict) -> None:
    """Refuse a checkpoint whose contents make no sense, whatever its digest says.

    Every check raises DataError("<path>: <what is wrong>"): one line that
    names the file, the key and the value.  The ranges come from the
    checkpoint's own config (its network and schedule), which must itself be
    a valid config.
    """
    from dbnps.common.config import from_dict
    from dbnps.common.layout import Layout
    from dbnps.common.schedule import phase_samples

    def bad(what: str):
        raise DataError(f"{path}: {what}")

    def get(key: str, kinds, what: str):
        if key not in meta:
            bad(f"metadata has no {key!r}")
        v = meta[key]
        # bool is an int in Python: a `true` where a count belongs is refused too
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in _tuple(kinds)):
            bad(f"metadata {key!r} must be {what}, got {_show(v)}")
        return v

    def integer(key: str, lo: int | None = None, hi: int | None = None) -> int:
        v = get(key, int, "an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            bad(f"metadata {key!r} = {v} is out of range (must be {rng})")
        return v

    def number(key: str, default=None) -> float:
        if key not in meta and default is not None:
            return default
        return float(get(key, (int, float), "a number"))

    get("format", str, "a string")
    raw_cfg = get("config", dict, "the job's config (a table)")
    try:
        cfg = from_dict(raw_cfg)
        layout = Layout(cfg.model.sizes, cfg.model.classes)
    except UserError as exc:
        bad(f"its config is invalid: {exc}")
    for key in ("note", "job_id", "phase_name", "update_rule"):
        if key in meta or key in ("phase_name", "update_rule"):
            get(key, str, "a string")
    get("stopped", bool, "true or false")
    created = number("created_unix", 0.0)
    if not math.isfinite(created):
        bad(f"metadata 'created_unix' must be finite, got {created}")
    version = integer("version", 0)
    done = layout.done_phase
    phase = integer("phase", 0, done)
    if meta["phase_name"] != layout.phase_name(phase):
        bad(
            f"metadata 'phase_name' {meta['phase_name']!r} does not match phase {phase} "
            f"({layout.phase_name(phase)!r} for its {len(layout.sizes) - 1}-layer network)"
        )
    n_train = integer("n_train", 1)
    samples = integer("samples_in_phase", 0)
    if phase < done:
        total = phase_samples(cfg, phase, layout.n_layers, n_train)
        if samples > total:
            bad(
                f"metadata 'samples_in_phase' = {samples} is beyond the phase "
                f"({layout.phase_name(phase)} lasts {total} samples)"
            )
    if "applied" in meta:
        integer("applied", 0)
    if "rejected" in meta:
        rej = get("rejected", dict, "a table of counts")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in rej.values()):
            bad(f"metadata 'rejected' must hold counts, got {_show(rej)}")
    next_eval = number("next_eval", cfg.run.eval_every_epochs)
    if not (math.isfinite(next_eval) and next_eval > 0):
        bad(f"metadata 'next_eval' must be a finite number of epochs > 0, got {next_eval}")
    for key in ("test_accuracy", "eval_accuracy"):
        acc = number(key, float("nan"))
        if acc == acc and not 0.0 <= acc <= 1.0:
            bad(f"metadata {key!r} = {acc} is not an accuracy (NaN or in [0, 1])")
    n = layout.size
    if "n_params" in meta and integer("n_params", 1) != n:
        bad(f"metadata 'n_params' = {meta['n_params']} but its network has {n} parameters")
    if params.dtype != np.float32 or params.shape != (n,):
        bad(
            f"params must be float32[{n}] for its {'-'.join(map(str, layout.sizes))} network, "
            f"got {params.dtype}{list(params.shape)}"
        )
    if not np.isfinite(np.dot(params, params)):  # one BLAS pass; NaN/Inf (or overflow)
        bad("params hold NaN or Inf values (a diverged job's state is not resumable)")
    bounds = get("shard_bounds", list, "a list of [lo, hi] shards")
    if not (
        bounds
        and all(
            isinstance(b, list) and len(b) == 2 and all(type(x) is int for x in b) for b in bounds
        )
        and bounds[0][0] == 0
        and bounds[-1][1] == n
        and all(a < b for a, b in bounds)
        and all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    ):
        bad(
            f"metadata 'shard_bounds' must cut [0, {n}) into contiguous shards, got {_show(bounds)}"
        )
    rule_name = meta["update_rule"]
    if rule_name not in RULE_STATE:
        bad(f"unknown update rule {rule_name!r} (sgd, momentum, adagrad)")
    if meta["format"] == FORMAT_V1:
        shard = meta.get("rule_shard")
        if (
            not (isinstance(shard, list) and len(shard) == 2 and all(type(x) is int for x in shard))
            or not 0 <= shard[0] < shard[1] <= n
        ):
            bad(f"metadata 'rule_shard' must be [lo, hi] within [0, {n}), got {_show(shard)}")
        state_len = shard[1] - shard[0]
    else:
        kept = get("rule_state", str, "a string")
        if kept not in (RULE_STATE_SERVER, RULE_STATE_WORKERS):
            bad(f"metadata 'rule_state' {kept!r} is neither {RULE_STATE_SERVER!r} nor workers")
        versions = get("shard_versions", list, "a list of versions, one per shard")
        if len(versions) != len(bounds) or not all(type(v) is int and v >= 0 for v in versions):
            bad(
                f"metadata 'shard_versions' must be {len(bounds)} integers >= 0, "
                f"got {_show(versions)}"
            )
        if versions[0] != version:
            bad(f"metadata 'shard_versions' starts at {versions[0]}, 'version' is {version}")
        state_len = n
        if kept == RULE_STATE_WORKERS:
            if rule:
                bad(f"holds rule state {sorted(rule)} although it says {kept!r}")
            return
    want = set(RULE_STATE[rule_name])
    if set(rule) != want:
        bad(f"update rule {rule_name!r} keeps state {sorted(want)}, the file holds {sorted(rule)}")
    for name, arr in rule.items():
        if arr.dtype != np.float32 or arr.shape != (state_len,):
            bad(
                f"rule state {name!r} must be float32[{state_len}], "
                f"got {arr.dtype}{list(arr.shape)}"
            )
        if not np.isfinite(np.dot(arr, arr)):
            bad(f"rule state {name!r} holds NaN or Inf values")
        if rule_name == "adagrad" and arr.size and float(arr.min()) < 0:
            bad(f"rule state {name!r} (a sum of squares) holds negative values")


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _show(v) -> str:
    """A value for an error line: its type and a bounded repr."""
    r = repr(v)
    return f"{type(v).__name__} {r[:60] + '...' if len(r) > 60 else r}"


def after_resume_hook(rank: int, job_state, barrier=None) -> None:
    """Test hook (`DBNPS_TEST_SNAPSHOT_AFTER_RESUME=DIR`): right after a resume, before
    any worker pulls, rank 0 writes what the windows hold now (`job_state()`, the
    same JobState every checkpoint is made of) into DIR.  Every server rank calls
    it; `barrier` (S > 1) waits until every shard is restored."""
    folder = os.environ.get(AFTER_RESUME_ENV)
    if not folder:
        return
    if barrier is not None:
        barrier()
    if rank == 0:
        store = CheckpointStore(Path(folder), keep=1)
        store.write(snapshot(job_state(), note="after resume"))


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
