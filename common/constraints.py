"""Max-norm constraint on the incoming weights of every unit (Srivastava et al. 2014).

After each update, every column j of a weight matrix W (n_in, n_out) -- the
weights *into* unit j of the layer above -- is scaled down to L2 norm <= c if it
is longer.  With dropout this bounds the weights however large the learning rate
and momentum, which is what lets dropout nets use the high lr and 0.95-0.99
momentum the paper's 0.92% MNIST error needs.

The single-process trainer calls `apply_max_norm` on the whole phase range; a
parameter-server shard calls it on its own slice, so a weight matrix must lie
entirely inside one slice (or outside it): a column's norm needs all its rows.
No MPI here: tested in-process.
"""

from __future__ import annotations

import math

import numpy as np

from dbnps.common.layout import Layout


def weight_matrices(layout: Layout, phase: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, (n_in, n_out)) of the weight matrices phase `phase` trains.

    Pretraining phase l: its RBM's W_l.  Fine-tuning: every W_l and W_out.
    Biases are never constrained (the paper bounds weight vectors only).
    """
    sizes, L = layout.sizes, layout.n_layers
    if 0 <= phase < L:
        return [(f"W{phase}", (sizes[phase], sizes[phase + 1]))]
    if phase == L:
        mats = [(f"W{l}", (sizes[l], sizes[l + 1])) for l in range(L)]
        return [*mats, ("W_out", (sizes[-1], layout.n_classes))]
    return []


def apply_max_norm(layout: Layout, flat_slice: np.ndarray, lo: int, phase: int, c: float) -> None:
    """In place: scale each column j of every weight matrix of `phase` that lies in
    flat_slice (= the flat parameter vector's elements [lo, lo + flat_slice.size)) so that
    its L2 norm (the incoming weights of unit j) is at most c. A weight matrix only partly
    inside the slice raises ValueError."""
    if not (c > 0 and math.isfinite(c)):
        # c = 0 would zero every weight: the config's "0 = off" is the caller's test.
        raise ValueError(f"max-norm bound must be a finite number > 0, got {c}")
    if flat_slice.ndim != 1:
        raise ValueError(f"flat_slice must be 1-D, got shape {flat_slice.shape}")
    hi = lo + flat_slice.size
    inside = []
    for name, shape in weight_matrices(layout, phase):
        a, b = layout.slice_of(name)
        if b <= lo or a >= hi:
            continue  # another shard's matrix
        if a < lo or b > hi:
            # Checked before any write, so a refused call leaves the slice as it was.
            raise ValueError(
                f"{name} [{a}, {b}) is only partly inside the slice [{lo}, {hi}): "
                "max-norm needs whole columns"
            )
        inside.append((a, b, shape))
    for a, b, shape in inside:
        W = flat_slice[a - lo : b - lo].reshape(shape)  # a view: scaling writes through
        norms = np.sqrt(np.einsum("ij,ij->j", W, W))
        over = norms > c
        if over.any():
            scale = np.ones(shape[1], dtype=W.dtype)
            scale[over] = (c / norms[over]).astype(W.dtype)
            W *= scale
