"""Generating digits from a trained DBN: Gibbs sampling in the top RBM, then one down-pass.

A DBN with sizes (n0, ..., nL) is a generative model whose top two layers
(n_{L-1}, n_L) form an undirected RBM and whose lower layers are directed
sigmoid belief nets pointing down (Hinton, Osindero & Teh 2006).  A sample is
drawn by

1. running a Gibbs chain in the top RBM (RBM L-1, visible layer = the hidden
   units of RBM L-2)::

       h ~ Bernoulli(P(h | v)),   v ~ Bernoulli(P(v | h))      (k times)

   the last visible step keeps the probabilities P(v | h);
2. one deterministic down-pass through the lower RBMs' generative weights,
   ``v_{l} = P(v_l | v_{l+1}) = sigm(v_{l+1} W_l^T + vb_l)`` for l = L-2 .. 0,
   which gives pixel probabilities in [0, 1] (what is shown, as in the paper).

Where a chain starts:

- ``init="data"``: the mean-field up-pass (`dbn.propagate`) of training images
  (unclamped; the chain wanders away from its start as k grows);
- ``init="random"``: random binary states, P = 0.5 per unit;
- ``label=d``: the up-pass of training images of class d.  **This is
  conditioning by initialisation, not label clamping.**  Hinton et al. 2006
  join 10 softmax label units to the top RBM's visible layer and clamp them
  during the chain, so the chain samples p(image | label) exactly (at
  equilibrium).  Our DBN is pretrained without labels (the softmax is added for
  fine-tuning only), so the top RBM knows nothing of classes: a chain started
  at a "7" stays near the "7" mode only as long as it has not mixed, and with
  many Gibbs steps it may drift to any digit.

Everything is float32; all randomness comes from the `rng` argument, so the
same generator state gives the same samples.  The visible biases of RBM l >= 1
are trained during pretraining only (fine-tuning leaves them alone), so a
fine-tuned model still has a generative down-pass, but its recognition
weights have moved: samples from a fine-tuned model are usually blurrier than
from the pretrained stack.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.dbn import propagate
from dbnps.common.layout import DTYPE, Params
from dbnps.common.rbm import hidden_probs, sample_bernoulli, visible_probs

INITS = ("data", "random")


def top_start(
    p: Params,
    n: int,
    rng: np.random.Generator,
    *,
    init: str = "data",
    X: np.ndarray | None = None,
    y: np.ndarray | None = None,
    label: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(v, idx): n starting states of the top RBM's visible layer, and the images used.

    `idx` are the rows of X the chains start from (None for ``init="random"``).
    With `label`, rows are drawn from the images with ``y == label`` (whatever `init`).
    """
    L = len(p.W)
    n_top = p.W[L - 1].shape[0]
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "random" and label is None:
        v = np.empty((n, n_top), dtype=DTYPE)
        return sample_bernoulli(np.full((n, n_top), 0.5, dtype=DTYPE), rng, out=v), None
    if X is None or len(X) == 0:
        raise ValueError("init='data' and label need training images X")
    pool = np.arange(len(X))
    if label is not None:
        if y is None:
            raise ValueError("label needs the training labels y")
        pool = np.flatnonzero(np.asarray(y) == label)
        if pool.size == 0:
            raise ValueError(f"no training image has label {label}")
    idx = rng.choice(pool, size=n, replace=n > pool.size)
    v = propagate(p, np.ascontiguousarray(X[idx], dtype=DTYPE), L - 1)
    return np.array(v, dtype=DTYPE, copy=True), idx


def gibbs_top(p: Params, v: np.ndarray, rng: np.random.Generator, steps: int) -> np.ndarray:
    """`steps` Gibbs steps v -> h -> v in the top RBM, starting at `v` (n, n_top).

    Hidden and visible units are sampled (a proper Gibbs chain); the last
    visible step returns P(v | h) instead of a sample.  Zero steps return `v`
    unchanged (as a float32 copy).  Draws, per step: n * n_hid uniforms, then
    (except on the last step) n * n_top uniforms.
    """
    L = len(p.W)
    W, hb, vb = p.W[L - 1], p.hb[L - 1], p.vb[L - 1]
    v = np.array(v, dtype=DTYPE, copy=True)
    n = v.shape[0]
    hp = np.empty((n, W.shape[1]), dtype=DTYPE)
    hs = np.empty_like(hp)
    vs = np.empty_like(v)
    for i in range(int(steps)):
        hidden_probs(v, W, hb, out=hp)
        sample_bernoulli(hp, rng, out=hs)
        visible_probs(hs, W, vb, out=v)
        if i < steps - 1:
            sample_bernoulli(v, rng, out=vs)
            v, vs = vs, v
    return v


def down_pass(p: Params, v_top: np.ndarray) -> np.ndarray:
    """Pixel probabilities (n, n0) of top-RBM visible states: P(v_l | v_{l+1}) down to l = 0."""
    v = np.asarray(v_top, dtype=DTYPE)
    for l in range(len(p.W) - 2, -1, -1):
        out = np.empty((v.shape[0], p.W[l].shape[0]), dtype=DTYPE)
        v = visible_probs(v, p.W[l], p.vb[l], out=out)
    return v


def sample_digits(
    p: Params,
    n: int,
    rng: np.random.Generator,
    *,
    gibbs: int = 1000,
    init: str = "data",
    X: np.ndarray | None = None,
    y: np.ndarray | None = None,
    label: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples, idx): n images float32 (n, n0) in [0, 1] after `gibbs` steps, and their starts.

    See the module docstring for what `init` and `label` mean (label is
    conditioning by initialisation).  With a one-layer DBN the top RBM's
    visible layer is the pixels and there is no down-pass.
    """
    v, idx = top_start(p, n, rng, init=init, X=X, y=y, label=label)
    v = gibbs_top(p, v, rng, gibbs)
    out = down_pass(p, v)
    np.clip(out, 0.0, 1.0, out=out)  # sigm is in [0, 1] already; float rounding only
    return out, idx
