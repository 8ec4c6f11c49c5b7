"""The one flat float32 layout of a DBN's parameters, and the training phases.

Every parameter lives in one contiguous float32 vector; named views slice it.
The parameter server stores, shards and updates exactly this vector, and the
gradient functions write into a vector of the same layout, so the hot path
moves one contiguous buffer and never packs or unpacks.

For sizes (n0, n1, ..., nL) and C classes::

    offset 0
    | W1 n0*n1 | hb1 n1 | vb1 n0 | W2 n1*n2 | hb2 n2 | vb2 n1 | ... | Wout nL*C | bout C |
    '-------- RBM 1 -----------' '-------- RBM 2 -----------'       '--- softmax ----'

`W_l` is row-major (n_{l-1}, n_l): visible units index rows.  Each RBM's block
is contiguous, so pretraining layer l touches one slice ("phase range"); the
fine-tuning phase uses the whole vector (visible biases then get zero gradient).

Phases are numbered 0..L-1 (pretrain layer l+1), L (fine-tune), L+1 (done).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dbnps.common.errors import ConfigError

DTYPE = np.float32


@dataclass
class Params:
    """Named views into one flat float32 vector (no copies)."""

    flat: np.ndarray
    W: list[np.ndarray]
    hb: list[np.ndarray]
    vb: list[np.ndarray]
    W_out: np.ndarray
    b_out: np.ndarray


class Layout:
    """Sizes and offsets of every tensor of a DBN with `sizes` and `n_classes`."""

    def __init__(self, sizes: tuple[int, ...] | list[int], n_classes: int = 10):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or any(s < 1 for s in sizes) or n_classes < 2:
            raise ConfigError(
                f"layer sizes must be >= 2 positive integers and classes >= 2, "
                f"got sizes={list(sizes)} classes={n_classes}"
            )
        self.sizes = sizes
        self.n_classes = int(n_classes)
        self.n_layers = len(sizes) - 1
        self._slices: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        off = 0

        def add(name: str, shape: tuple[int, ...]) -> None:
            nonlocal off
            n = int(np.prod(shape))
            self._slices[name] = (off, off + n, shape)
            off += n

        self._rbm_ranges: list[tuple[int, int]] = []
        for l in range(self.n_layers):
            start = off
            nv, nh = sizes[l], sizes[l + 1]
            add(f"W{l}", (nv, nh))
            add(f"hb{l}", (nh,))
            add(f"vb{l}", (nv,))
            self._rbm_ranges.append((start, off))
        add("W_out", (sizes[-1], self.n_classes))
        add("b_out", (self.n_classes,))
        self.size = off

    # -- phases -----------------------------------------------------------
    @property
    def finetune_phase(self) -> int:
        return self.n_layers

    @property
    def done_phase(self) -> int:
        return self.n_layers + 1

    def phase_name(self, phase: int) -> str:
        if phase < self.n_layers:
            return f"pretrain-{phase + 1}"
        return "finetune" if phase == self.n_layers else "done"

    def phase_range(self, phase: int) -> tuple[int, int]:
        """[lo, hi) of the flat vector that phase `phase` trains."""
        if phase < self.n_layers:
            return self._rbm_ranges[phase]
        if phase == self.n_layers:
            return 0, self.size
        return 0, 0

    # -- views ------------------------------------------------------------
    def slice_of(self, name: str) -> tuple[int, int]:
        lo, hi, _ = self._slices[name]
        return lo, hi

    def views(self, flat: np.ndarray) -> Params:
        """Named views of `flat` (float32, C-contiguous, length `size`)."""
        if flat.dtype != DTYPE or flat.shape != (self.size,) or not flat.flags.c_contiguous:
            raise ValueError(
                f"expected contiguous float32[{self.size}], got {flat.dtype}{list(flat.shape)}"
            )

        def v(name: str) -> np.ndarray:
            lo, hi, shape = self._slices[name]
            return flat[lo:hi].reshape(shape)

        L = self.n_layers
        return Params(
            flat=flat,
            W=[v(f"W{l}") for l in range(L)],
            hb=[v(f"hb{l}") for l in range(L)],
            vb=[v(f"vb{l}") for l in range(L)],
            W_out=v("W_out"),
            b_out=v("b_out"),
        )

    def zeros(self) -> Params:
        return self.views(np.zeros(self.size, dtype=DTYPE))

    def init(self, rng: np.random.Generator) -> Params:
        """Hinton's init: W ~ N(0, 0.01^2), zero biases; softmax W ~ N(0, 0.01^2)."""
        p = self.zeros()
        for W in p.W:
            W[...] = rng.standard_normal(W.shape, dtype=DTYPE) * DTYPE(0.01)
        p.W_out[...] = rng.standard_normal(p.W_out.shape, dtype=DTYPE) * DTYPE(0.01)
        return p

    def __repr__(self) -> str:
        return f"Layout({'-'.join(map(str, self.sizes))}-{self.n_classes}, {self.size} floats)"
