"""Bernoulli-Bernoulli RBM math on the views of one layer (Algorithm 1, RBMupdate).

Notation for one RBM with visible units v (n_vis) and hidden units h (n_hid),
weights W (n_vis, n_hid), hidden biases hb, visible biases vb::

    E(v, h)      = -v.vb - h.hb - v W h
    P(h=1 | v)   = sigm(v W + hb)
    P(v=1 | h)   = sigm(h W^T + vb)
    F(v)         = -v.vb - sum_j log(1 + exp(v W_j + hb_j))      (free energy)

Contrastive divergence (CD-k, Hinton 2002; practical guide, Hinton 2010):

    positive phase   h0 = P(h|v0)                (probabilities for the statistics)
                     s0 ~ Bernoulli(h0)          (binary states drive the chain)
    negative phase   for i in 1..k:  vi = P(v|s_{i-1}),  hi = P(h|vi),
                                     s_i ~ Bernoulli(hi) (not sampled for i = k)
    descent gradient dW  = (vk^T hk - v0^T h0) / B + weight_decay * W
                     dhb = mean(hk - h0),  dvb = mean(vk - v0)

so `p -= lr * grad` climbs the CD approximation of the log-likelihood.
Reconstructions vi are probabilities (the guide's recommendation).

Persistent CD (Tieleman 2008): the negative chain is not restarted at the data
but continued from the hidden states it ended in at the previous minibatch
(kept in the workspace).

Everything is float32 (the dtype of the parameters), computed in place in a
preallocated `RBMWorkspace`; one call performs no allocation of batch-sized or
weight-sized arrays.  The CD statistics are a single GEMM: the workspace stacks
``V = [v0; vk]`` and ``H = [-h0/B; hk/B]`` so that ``dW = V^T H`` lands directly
in the gradient view.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.layout import Params


def sigmoid_(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """In place x <- scale * sigm(x) = scale * (1 + tanh(x / 2)) / 2; returns x.

    The tanh form needs no overflow handling and is about 1.5x faster in numpy
    than exp + reciprocal (four cheap passes, one of them SIMD tanh).  `scale`
    costs nothing (it rides on the last two passes): inverted dropout's 1/keep
    is applied here instead of in a pass of its own.
    """
    f = x.dtype.type
    x *= f(0.5)
    np.tanh(x, out=x)
    x *= f(0.5 * scale)
    x += f(0.5 * scale)
    return x


def hidden_probs(v: np.ndarray, W: np.ndarray, hb: np.ndarray, out: np.ndarray) -> np.ndarray:
    """P(h=1 | v) = sigm(v W + hb), written into `out` (B, n_hid)."""
    np.dot(v, W, out=out)
    out += hb
    return sigmoid_(out)


def visible_probs(h: np.ndarray, W: np.ndarray, vb: np.ndarray, out: np.ndarray) -> np.ndarray:
    """P(v=1 | h) = sigm(h W^T + vb), written into `out` (B, n_vis)."""
    np.dot(h, W.T, out=out)
    out += vb
    return sigmoid_(out)


def sample_bernoulli(probs: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """out <- 1.0 where u < probs else 0.0, with u ~ U[0, 1) drawn from `rng`.

    Draws exactly `probs.size` float32 uniforms (`rng.random(..., out=out)`), so
    the sequence of draws is a fixed function of the call sequence.
    """
    rng.random(out.shape, dtype=out.dtype, out=out)
    np.less(out, probs, out=out)
    return out


def free_energy(v: np.ndarray, W: np.ndarray, hb: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """F(v) = -v.vb - sum_j log(1 + exp(v W_j + hb_j)), one value per row of v.

    p(v) = exp(-F(v)) / Z.  Not on the hot path (monitoring, tests): allocates.
    """
    x = np.dot(v, W) + hb
    return -np.dot(v, vb) - np.logaddexp(0, x).sum(axis=1)


class RBMWorkspace:
    """Preallocated buffers for one RBM layer and one batch size.

    ``V`` (2B, n_vis) holds [v0; vk]: ``v0`` is its first half, so a caller can
    gather a minibatch straight into ``ws.v0`` and save a copy.  ``H`` (2B,
    n_hid) holds [-h0/B; hk/B].  ``states`` holds the binary hidden states that
    drive the chain; with `persistent` it survives between calls (PCD).
    """

    def __init__(
        self,
        batch: int,
        n_vis: int,
        n_hid: int,
        *,
        persistent: bool = False,
        dtype: np.dtype | type = np.float32,
    ):
        self.batch, self.n_vis, self.n_hid = int(batch), int(n_vis), int(n_hid)
        self.dtype = np.dtype(dtype)
        B = self.batch
        self.V = np.empty((2 * B, n_vis), dtype=self.dtype)
        self.H = np.empty((2 * B, n_hid), dtype=self.dtype)
        self.v0, self.vk = self.V[:B], self.V[B:]
        self.h0, self.hk = self.H[:B], self.H[B:]
        self.states = np.empty((B, n_hid), dtype=self.dtype)
        self.diff = np.empty((B, n_vis), dtype=self.dtype)
        # Row weights for the bias gradients: dvb = s^T V with s = [-1/B; +1/B].
        self.signs = np.empty(2 * B, dtype=self.dtype)
        self.signs[:B] = -1.0 / B
        self.signs[B:] = 1.0 / B
        self.ones = np.ones(2 * B, dtype=self.dtype)
        self.wd = np.empty((n_vis, n_hid), dtype=self.dtype)
        self.persistent = bool(persistent)
        self.chain_ready = False  # PCD: `states` holds a chain to continue
        self.recon = np.empty((B, n_vis), dtype=self.dtype) if persistent else None


def cd_gradient(
    p: Params,
    layer: int,
    v0: np.ndarray,
    rng: np.random.Generator,
    *,
    k: int,
    weight_decay: float,
    grad: Params,
    ws: RBMWorkspace,
) -> float:
    """CD-k (or PCD-k) descent gradient of RBM `layer` on minibatch `v0` (B, n_vis).

    Writes, averaged over the batch (see the module docstring)::

        grad.W[layer]  = (vk^T hk - v0^T h0) / B + weight_decay * W
        grad.hb[layer] = mean(hk - h0)
        grad.vb[layer] = mean(vk - v0)

    Random draws, in order: k Bernoulli samples of the hidden layer for CD-k
    (B * n_hid uniforms each); for PCD the first sample comes from the data only
    on the first call, later calls continue the persistent chain.

    Returns the mean squared reconstruction error of the batch: for CD
    mean((v0 - P(v|s0))^2) (the first negative-phase visible probabilities);
    for PCD, whose chain is not a reconstruction, mean((v0 - P(v|h0))^2).
    """
    W, hb, vb = p.W[layer], p.hb[layer], p.vb[layer]
    B = ws.batch
    if v0.shape != ws.v0.shape:
        raise ValueError(f"batch shape {v0.shape} != workspace {ws.v0.shape}")
    if v0 is not ws.v0:
        np.copyto(ws.v0, v0)
    v0 = ws.v0

    # Positive phase: h0 = P(h|v0); states s0 ~ h0 drive the chain.
    h0 = hidden_probs(v0, W, hb, out=ws.h0)
    if ws.persistent:
        if not ws.chain_ready:
            sample_bernoulli(h0, rng, out=ws.states)
            ws.chain_ready = True
        # Reconstruction error is about the data, not the fantasy particles.
        # Deterministic (no draws): reconstruct from the hidden probabilities.
        visible_probs(h0, W, vb, out=ws.recon)
        np.subtract(ws.recon, v0, out=ws.diff)
    else:
        sample_bernoulli(h0, rng, out=ws.states)

    # Negative phase: k alternating Gibbs steps from the binary states.
    for i in range(k):
        visible_probs(ws.states, W, vb, out=ws.vk)
        hidden_probs(ws.vk, W, hb, out=ws.hk)
        if i == 0 and not ws.persistent:
            np.subtract(ws.vk, v0, out=ws.diff)
        if i < k - 1 or ws.persistent:
            sample_bernoulli(ws.hk, rng, out=ws.states)

    # Statistics: H = [-h0/B; hk/B];  dW = V^T H;  dhb = 1^T H;  dvb = s^T V.
    np.multiply(ws.h0, ws.dtype.type(-1.0 / B), out=ws.h0)
    np.multiply(ws.hk, ws.dtype.type(1.0 / B), out=ws.hk)
    gW = grad.W[layer]
    np.dot(ws.V.T, ws.H, out=gW)
    if weight_decay:
        np.multiply(W, ws.dtype.type(weight_decay), out=ws.wd)
        gW += ws.wd
    np.dot(ws.ones, ws.H, out=grad.hb[layer])
    np.dot(ws.signs, ws.V, out=grad.vb[layer])

    d = ws.diff.reshape(-1)
    return float(np.dot(d, d)) / d.size
