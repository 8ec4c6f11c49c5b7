"""A trained model on disk: one .npz holding the flat parameters and the config.

Arrays in the file (all plain, loaded with allow_pickle=False)::

    params   float32[layout.size]  the flat vector (see dbnps.common.layout)
    sizes    int64[L+1]            layer sizes, input first
    classes  int64[]               number of classes
    config   str (JSON)            the job config as a dict
    meta     str (JSON)            free-form facts: accuracy, wall time, ...

Written atomically: to a temporary file in the same folder, fsync'ed, renamed
over the target, then the folder fsync'ed, so a crash leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dbnps.common.errors import ConfigError, DataError
from dbnps.common.layout import DTYPE, Layout, Params

FORMAT = "dbnps-model-1"


def save_model(
    path: str | Path,
    layout: Layout,
    params_flat: np.ndarray,
    cfg: Any,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the model to `path` atomically; returns the path."""
    path = Path(path)
    flat = np.ascontiguousarray(params_flat, dtype=DTYPE)
    if flat.shape != (layout.size,):
        raise ValueError(f"params has {flat.size} floats, layout {layout!r} needs {layout.size}")
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    buf = io.BytesIO()
    np.savez(
        buf,
        format=np.array(FORMAT),
        params=flat,
        sizes=np.array(layout.sizes, dtype=np.int64),
        classes=np.array(layout.n_classes, dtype=np.int64),
        config=np.array(json.dumps(cfg_dict, sort_keys=True)),
        meta=np.array(json.dumps(meta or {}, sort_keys=True, default=str)),
    )
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def load_model(path: str | Path) -> tuple[Layout, Params, dict[str, Any], dict[str, Any]]:
    """(layout, params, config dict, meta) from a file written by `save_model`.

    A missing, truncated or corrupt file, or one of another kind, raises
    DataError with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z.files else ""
            if fmt != FORMAT:
                raise DataError(f"{path} is not a dbnps model file (format {fmt or 'missing'!r})")
            flat = np.array(z["params"], dtype=DTYPE)
            sizes = [int(s) for s in z["sizes"]]
            classes = int(z["classes"])
            cfg = json.loads(str(z["config"]))
            meta = json.loads(str(z["meta"]))
    except DataError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        zipfile.BadZipFile,
        json.JSONDecodeError,
    ) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"model file {path} is corrupt or truncated: {msg}") from None
    try:
        layout = Layout(sizes, classes)
    except ConfigError as exc:
        raise DataError(f"model file {path} has an invalid architecture: {exc}") from None
    if flat.shape != (layout.size,):
        raise DataError(
            f"model file {path} is corrupt: {flat.size} parameters, {layout!r} needs {layout.size}"
        )
    if not np.all(np.isfinite(flat)):
        raise DataError(f"model file {path} holds non-finite parameters")
    return layout, layout.views(flat), cfg, meta
