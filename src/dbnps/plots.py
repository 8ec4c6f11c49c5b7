"""Figures of a training run and of a model: learning curves, first-layer filters, samples.

Used by `psctl plot` (and `dbnps.scaling` for its save helper).  matplotlib is
imported lazily with the Agg backend (no display needed), so importing this
module is cheap.

Where a run's history comes from (`load_history`):

- a run folder: its ``summary.json`` (written by the server), else its ``model.npz``;
- a ``.json`` file: a server summary (``{"history": [...]}``);
- a model file: ``meta["summary"]["history"]`` (server) or ``meta["history"]``
  (`psctl train --local`).

Server records carry ``t`` (s since the server started), ``phase``, ``epoch``,
``loss`` (the workers' latest minibatch loss: reconstruction error while
pretraining, cross-entropy while fine-tuning) and, in fine-tuning,
``test_accuracy``.  Local-trainer records carry ``elapsed_s``, ``phase``,
``epoch``, ``loss`` (mean over the epoch) and ``test_acc``.  Both are mapped to
one shape: ``{t, phase, epoch, loss, acc}``.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from dbnps.common.errors import DataError

SIDE = 28  # MNIST images are 28 x 28


# -- files -------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path}: {msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a run summary (not a JSON object)")
    return data


def _norm_records(raw: Any, source: Path) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise DataError(f"{source}: the training history is not a list of records")
    out = []
    for r in raw:
        t = r.get("t", r.get("elapsed_s"))
        acc = r.get("test_accuracy", r.get("test_acc"))
        if t is None or "phase" not in r:
            raise DataError(f"{source}: a history record lacks its time or phase: {r}")

        def num(x: Any) -> float:
            return float(x) if isinstance(x, int | float) else float("nan")

        out.append(
            {
                "t": num(t),
                "phase": str(r["phase"]),
                "epoch": num(r.get("epoch")),
                "loss": num(r.get("loss")),
                "acc": num(acc),
            }
        )
    return out


def load_history(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, info) of a run folder, a summary JSON or a model file (see module doc).

    `info` has ``source`` (the file read), ``trainer`` ("server" or "local"),
    ``final_acc`` and ``final_t`` (NaN when unknown) and ``config`` (a dict,
    possibly empty).  Raises DataError with one line for anything unusable.
    """
    from dbnps.common.model import load_model

    path = Path(path)
    if path.is_dir():
        if (path / "summary.json").is_file():
            path = path / "summary.json"
        elif (path / "model.npz").is_file():
            path = path / "model.npz"
        else:
            raise DataError(f"{path} holds neither summary.json nor model.npz")
    elif not path.exists():
        raise DataError(f"not found: {path}")
    cfg: dict[str, Any] = {}
    if path.suffix == ".json":
        summary = _read_json(path)
        if "history" not in summary:
            raise DataError(f"{path} is not a run summary (no history)")
        raw, trainer = summary["history"], "server"
        final_acc, final_t = summary.get("test_accuracy"), summary.get("wall_s")
        model = path.with_name("model.npz")
        if model.is_file():
            try:
                cfg = load_model(model)[2]
            except DataError:
                cfg = {}
    else:
        _, _, cfg, meta = load_model(path)
        if isinstance(meta.get("summary"), dict) and "history" in meta["summary"]:
            summary = meta["summary"]
            raw, trainer = summary["history"], "server"
            final_acc, final_t = summary.get("test_accuracy"), summary.get("wall_s")
        elif "history" in meta:
            raw, trainer = meta["history"], "local"
            final_acc, final_t = meta.get("test_acc"), meta.get("wall_s")
        else:
            raise DataError(f"model file {path} holds no training history")
    records = _norm_records(raw, path)
    if not records:
        raise DataError(f"{path}: the training history is empty")

    def num(x: Any) -> float:
        return float(x) if isinstance(x, int | float) else float("nan")

    info = {
        "source": path,
        "trainer": trainer,
        "final_acc": num(final_acc),
        "final_t": num(final_t),
        "config": cfg if isinstance(cfg, dict) else {},
    }
    return records, info


# -- matplotlib ----------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as PNG to `out` (folders created) and close it; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    pyplot().close(fig)
    return out


# -- learning curves ---------------------------------------------------------
def _layer_label(phase: str, sizes: list[int] | None) -> str:
    layer = int(phase.split("-", 1)[1])
    if sizes and layer < len(sizes):
        return f"RBM {layer} ({sizes[layer - 1]}→{sizes[layer]})"
    return f"RBM {layer}"


def curves_figure(records: list[dict[str, Any]], info: dict[str, Any], title: str = ""):
    """Three panels vs wall time: pretraining recon error per layer, fine-tune loss, accuracy."""
    plt = pyplot()
    sizes = info.get("config", {}).get("model", {}).get("sizes")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    ax_pre, ax_ft, ax_acc = axes
    t_label = "wall time since training started (s)"

    # phase ends: the last record of a phase followed by a record of another phase
    ends = [(a["t"], a["phase"]) for a, b in pairwise(records) if a["phase"] != b["phase"]]
    how = "latest minibatch, mean over workers" if info["trainer"] == "server" else "epoch mean"

    pre = sorted({r["phase"] for r in records if r["phase"].startswith("pretrain-")})
    for ph in pre:
        rs = [r for r in records if r["phase"] == ph and math.isfinite(r["loss"])]
        ax_pre.plot(
            [r["t"] for r in rs],
            [r["loss"] for r in rs],
            "o-",
            ms=3,
            label=_layer_label(ph, sizes),
        )
    ax_pre.set_title(f"Pretraining: reconstruction error per RBM\n({how})", fontsize=10)
    ax_pre.set_ylabel("reconstruction error (MSE per visible unit)")
    if pre:
        ax_pre.legend(title="layer")
    else:
        ax_pre.text(0.5, 0.5, "no pretraining in this run", ha="center", transform=ax_pre.transAxes)

    ft = [r for r in records if r["phase"] == "finetune" and math.isfinite(r["loss"])]
    if ft:
        ax_ft.plot([r["t"] for r in ft], [r["loss"] for r in ft], "o-", ms=3, color="C3",
                   label="training cross-entropy")  # fmt: skip
        ax_ft.legend(loc="upper right")
    else:
        ax_ft.text(0.5, 0.5, "no fine-tuning in this run", ha="center", transform=ax_ft.transAxes)
    ax_ft.set_title(f"Fine-tuning: training loss\n({how})", fontsize=10)
    ax_ft.set_ylabel("cross-entropy (nats per image)")

    acc = [r for r in records if math.isfinite(r["acc"])]
    if acc:
        ax_acc.plot([r["t"] for r in acc], [100 * r["acc"] for r in acc], "o-", ms=3, color="C2",
                    label="test accuracy (periodic evaluation)")  # fmt: skip
        if math.isfinite(info.get("final_acc", math.nan)):
            t_end = info["final_t"] if math.isfinite(info["final_t"]) else acc[-1]["t"]
            ax_acc.plot([t_end], [100 * info["final_acc"]], "*", ms=12, color="C1",
                        label=f"final: {100 * info['final_acc']:.2f}%")  # fmt: skip
        target = info.get("config", {}).get("run", {}).get("target_accuracy", 0) or 0
        if target > 0:
            ax_acc.axhline(100 * target, ls="--", color="gray", label=f"target {100 * target:g}%")
        ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(0.5, 0.5, "no test evaluation in this run", ha="center",
                    transform=ax_acc.transAxes)  # fmt: skip
    ax_acc.set_title("Test accuracy\n(held-out test images)", fontsize=10)
    ax_acc.set_ylabel("test accuracy (%)")

    for ax in axes:
        ax.set_xlabel(t_label)
        ax.grid(alpha=0.3)
        for t_end, ph in ends:
            ax.axvline(t_end, color="gray", lw=0.8, ls=":")
            ax.text(t_end, 0.98, f" {ph} ends", rotation=90, va="top", ha="right", fontsize=7,
                    color="gray", transform=ax.get_xaxis_transform())  # fmt: skip
    arch = f" {'-'.join(map(str, sizes))}-10" if sizes else ""
    fig.suptitle(
        title or f"DBN{arch} training ({info['trainer']} trainer): {info['source']}", fontsize=11
    )
    return fig


# -- image grids ---------------------------------------------------------------
def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid for n tiles: cols = ceil(sqrt(n))."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def tile_grid(
    tiles: np.ndarray,
    *,
    normalise: bool,
    pad: int = 1,
    pad_value: float = 1.0,
    cols: int | None = None,
) -> np.ndarray:
    """A (rows*(h+pad)+pad, cols*(w+pad)+pad) float32 image of tiles (n, h, w) on a grid.

    With `normalise`, each tile is min-max scaled to [0, 1] on its own (a
    constant tile becomes 0.5); otherwise values are copied as they are.
    Unused grid cells and the `pad`-pixel separators hold `pad_value`.
    """
    tiles = np.asarray(tiles, dtype=np.float32)
    if tiles.ndim != 3 or tiles.shape[0] < 1:
        raise ValueError(f"tiles must be (n, h, w) with n >= 1, got {tiles.shape}")
    n, h, w = tiles.shape
    rows, c = grid_shape(n) if cols is None else (math.ceil(n / cols), cols)
    img = np.full((rows * (h + pad) + pad, c * (w + pad) + pad), pad_value, dtype=np.float32)
    for i, t in enumerate(tiles):
        if normalise:
            lo, hi = float(t.min()), float(t.max())
            t = (t - lo) / (hi - lo) if hi > lo else np.full_like(t, 0.5)
        r, k = divmod(i, c)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        img[y0 : y0 + h, x0 : x0 + w] = t
    return img


def filters_figure(W0: np.ndarray, n: int = 100, title: str = ""):
    """First-layer filters: columns of W0 (784, n_hid) as 28x28 tiles, each normalised."""
    plt = pyplot()
    n_vis, n_hid = W0.shape
    if n_vis != SIDE * SIDE:
        raise DataError(f"first layer has {n_vis} visible units, not {SIDE}x{SIDE} pixels")
    n = max(1, min(int(n), n_hid))
    tiles = W0[:, :n].T.reshape(n, SIDE, SIDE)
    img = tile_grid(tiles, normalise=True)
    rows, cols = grid_shape(n)
    side = min(10.0, max(4.0, 0.62 * cols + 1))
    fig, ax = plt.subplots(figsize=(side, side * rows / cols + 0.8), constrained_layout=True)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(
        title
        or f"Layer-1 filters: weights of hidden units 1–{n} of {n_hid} as 28×28 images\n"
        f"(each tile min–max scaled on its own: black = most negative, white = most positive)",
        fontsize=10,
    )
    return fig


def samples_figure(
    samples: np.ndarray,
    starts: np.ndarray | None,
    *,
    gibbs: int,
    top: tuple[int, int],
    label: int | None,
    init: str,
    title: str = "",
):
    """Side by side: the chain starts (images, if any) and the samples after `gibbs` steps."""
    plt = pyplot()
    n = samples.shape[0]
    rows, cols = grid_shape(n)
    panels = [("samples", samples)]
    if starts is not None:
        panels.insert(0, ("starts", starts))
    side = min(7.0, max(3.5, 0.55 * cols + 1))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(side * len(panels), side * rows / cols + 0.9),
        constrained_layout=True,
        squeeze=False,
    )
    for ax, (kind, imgs) in zip(axes[0], panels, strict=True):
        grid = tile_grid(np.asarray(imgs).reshape(n, SIDE, SIDE), normalise=False)
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        if kind == "starts":
            what = f"training images of class {label}" if label is not None else "training images"
            ax.set_title(f"chain starts: {what}\n(pixel intensity)", fontsize=10)
        else:
            ax.set_title(
                f"after {gibbs} Gibbs steps in the top RBM ({top[0]}–{top[1]})\n"
                f"+ down-pass (pixel probability P(v=1))",
                fontsize=10,
            )
    if label is not None:
        how = (
            f"conditioned on class {label} by initialisation "
            f"(chains start at images of {label}; no label units are clamped)"
        )
    elif init == "random":
        how = "unclamped, chains start from random binary states"
    else:
        how = "unclamped, chains start from random training images"
    fig.suptitle(title or f"DBN samples, {how}", fontsize=11)
    return fig
