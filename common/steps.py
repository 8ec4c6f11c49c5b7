"""One minibatch gradient of the current phase: the unit both trainers repeat.

The single-process trainer (`dbnps.common.trainer`) and every parameter-server
worker drive a `StepGradient` the same way::

    sg = StepGradient(layout, cfg, X_local, y_local, rng)
    sg.begin_phase(phase, params)          # at each phase change
    loss, n = sg.step(params, grad, epoch=e)   # then apply grad[lo:hi] somewhere

Minibatches.  Each pass over the local data (n rows) draws
``perm = rng.permutation(n)`` and walks it in chunks of ``b = min(batch_size, n)``
rows; the last partial chunk (n mod b rows) is dropped, and a fresh permutation
is drawn when fewer than b rows remain.  Every step therefore has exactly b
samples and the workspaces are allocated once per phase.

Randomness.  All of it comes from ``self.rng`` in a fixed order: the
permutation (when a pass starts), then the step's own draws (CD sampling, or
dropout masks).  Two StepGradients built with the same seed, data and config
produce bit-identical gradient sequences when given identical parameters; the
exactness test of the parameter server relies on this.  Bit-identity also needs
the same BLAS thread count in both processes: OpenBLAS splits a GEMM's sums
differently for 1 and 2 threads, so results then differ in the last bits.
"""

from __future__ import annotations

import math

import numpy as np

from dbnps.common.augment import Shifter
from dbnps.common.config import Config
from dbnps.common.dbn import BackpropWorkspace, backprop_gradient, propagate
from dbnps.common.layout import Layout, Params
from dbnps.common.rbm import RBMWorkspace, cd_gradient
from dbnps.common.schedule import batch_size


class StepGradient:
    """Computes one minibatch gradient for the current phase from local data (a worker's shard or the full set)."""

    def __init__(
        self,
        layout: Layout,
        cfg: Config,
        X: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
    ):
        if X.ndim != 2 or X.shape[1] != layout.sizes[0]:
            raise ValueError(f"X must be (n, {layout.sizes[0]}), got {X.shape}")
        if len(y) != len(X):
            raise ValueError(f"{len(X)} images but {len(y)} labels")
        if len(X) == 0:
            raise ValueError("no training data")
        self.layout = layout
        self.cfg = cfg
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.y = np.ascontiguousarray(y)
        self.rng = rng
        # `[ps] split_batch`: this many workers share the phase's batch (each step has
        # batch_size / split samples, at least 1); 1: the configured batch.
        self.split = 1
        self.phase = -1
        self.batch = 0
        self._data: np.ndarray | None = None
        self._perm: np.ndarray | None = None
        self._pos = 0
        self._ws: RBMWorkspace | BackpropWorkspace | None = None
        self._shift: Shifter | None = None  # [finetune] shift_pixels

    @property
    def n(self) -> int:
        return len(self.X)

    def steps_per_pass(self) -> int:
        """Minibatches in one pass over the local data (partial chunk dropped)."""
        return self.n // self.batch if self.batch else 0

    def begin_phase(self, phase: int, params: Params) -> None:
        """Prepare phase `phase` with `params` (the lower layers are frozen from here on).

        Pretraining phase l: the data of RBM l, propagate(params, X, l), is
        computed once.  Fine-tuning: the raw X.  Resets the minibatch cursor
        (the next step draws a new permutation) and allocates the workspace.
        """
        L = self.layout.n_layers
        if not 0 <= phase <= L:
            raise ValueError(f"phase {phase} has no gradient (phases 0..{L})")
        self.phase = phase
        self.batch = min(max(1, round(batch_size(self.cfg, phase, L) / self.split)), self.n)
        self._perm = None
        self._pos = 0
        self._data = None  # free the previous phase's data before building the next
        self._ws = None
        if phase < L:
            self._data = np.ascontiguousarray(propagate(params, self.X, phase))
            nv, nh = self.layout.sizes[phase], self.layout.sizes[phase + 1]
            self._ws = RBMWorkspace(self.batch, nv, nh, persistent=self.cfg.pretrain.persistent)
        else:
            self._data = self.X
            self._ws = BackpropWorkspace(self.layout.sizes, self.layout.n_classes, self.batch)
            self._ybatch = np.empty(self.batch, dtype=self.y.dtype)
            s = self.cfg.finetune.shift_pixels
            side = math.isqrt(self.layout.sizes[0])
            self._shift = Shifter(self.batch, side, s) if s else None

    def _next_indices(self) -> np.ndarray:
        if self._perm is None or self._pos + self.batch > self.n:
            self._perm = self.rng.permutation(self.n)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch]
        self._pos += self.batch
        return idx

    def step(self, params: Params, grad: Params, *, epoch: float) -> tuple[float, int]:
        """Gradient of the next minibatch of the current phase into `grad`.

        Every element of ``layout.phase_range(phase)`` of grad.flat is written
        (zeros where the phase has no gradient: visible biases in fine-tuning,
        the whole stack during the softmax-only warm-up); elements outside it are
        untouched.  `epoch` is the number of epochs completed in this phase
        (global, float): fine-tuning trains only the softmax layer while
        ``epoch < cfg.finetune.warmup_epochs``.

        Returns (reconstruction error or cross-entropy loss, samples used).
        """
        if self._ws is None:
            raise RuntimeError("step() before begin_phase()")
        idx = self._next_indices()
        L = self.layout.n_layers
        if self.phase < L:
            ws = self._ws
            np.take(self._data, idx, axis=0, out=ws.v0)
            pc = self.cfg.pretrain
            err = cd_gradient(
                params,
                self.phase,
                ws.v0,
                self.rng,
                k=pc.cd_k,
                weight_decay=pc.weight_decay,
                grad=grad,
                ws=ws,
            )
            return err, self.batch
        ws = self._ws
        np.take(self._data, idx, axis=0, out=ws.x)
        np.take(self.y, idx, out=self._ybatch)
        if self._shift is not None:
            self._shift(ws.x, self.rng)
        fc = self.cfg.finetune
        loss = backprop_gradient(
            params,
            ws.x,
            self._ybatch,
            self.rng,
            grad=grad,
            ws=ws,
            weight_decay=fc.weight_decay,
            dropout=fc.dropout,
            input_dropout=fc.input_dropout,
            softmax_only=epoch < fc.warmup_epochs,
        )
        return loss, self.batch
