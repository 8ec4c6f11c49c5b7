"""The checkpoint file: its entries, digest and manifest, and what a file must be to load.

Layout of `<run_dir>/checkpoints/ckpt-<version>.npz`::

    params        float32[n_params]     the flat vector (see dbnps.common.layout)
    rule.<name>   float32[n_params]     update-rule state over the flat vector (every shard)
    meta          uint8[...]            UTF-8 JSON manifest: counters, config, shard bounds
    sha256        uint8[64]             hex digest over every entry above

The rule state covers the flat vector, not one shard, so a job may resume
with another number of server ranks: each rank takes its own slice.

Loading checks the file twice: the digest (a damaged file: truncated, a
flipped byte) and then the meaning (`validate`: the manifest's types, phase
and samples in range for its own config, version >= 0, rule-state names,
shapes and dtypes matching the rule, finite parameters and state), so a
forged file with a recomputed digest is refused too, with one line naming
the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbnps.common.errors import DataError, UserError

FORMAT = "dbnps-checkpoint/2"
FORMAT_V1 = "dbnps-checkpoint/1"  # rank 0's shard of the rule state only (still read)
RULE_STATE = {"sgd": (), "momentum": ("v",), "adagrad": ("s",)}  # names each rule keeps
RULE_STATE_SERVER = "server"
RULE_STATE_WORKERS = "workers (accumulate mode: not saved, restarts at zero)"


@dataclass
class Snapshot:
    """A checkpoint's contents in memory: what `encode` writes and a load returns."""

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


def encode(snap: Snapshot) -> tuple[dict[str, np.ndarray], str]:
    """The `.npz` entries of `snap` and their digest (the file's `sha256` entry)."""
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
    return entries, digest


def _digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    h.update(b"meta\n")
    h.update(meta_bytes)
    return h.hexdigest()


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
