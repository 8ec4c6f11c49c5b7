"""The DBN as a whole: greedy-layer propagation, fine-tuning backprop, prediction.

A DBN with sizes (n0, ..., nL) is a stack of L RBMs.  Pretraining phase l
(Algorithm 2, PreTrainDBN) trains RBM l on the data pushed through the frozen
RBMs 0..l-1 (`propagate`).  Fine-tuning (Algorithm 3, FineTuneDBN) treats the
stack as a feed-forward sigmoid network, adds a softmax layer (W_out, b_out) and
minimises the cross-entropy with backprop (`backprop_gradient`)::

    a_0 = x                         (times an input-dropout mask / keep_in)
    a_l = sigm(a_{l-1} W_l + hb_l)  (times a dropout mask / keep),  l = 1..L
    q   = softmax(a_L W_out + b_out)
    loss = -mean log q[y]

Dropout is "inverted" (Srivastava et al. 2014): kept units are scaled by
1/keep during training, so prediction uses the weights unchanged.  The 1/keep
rides on the sigmoid's last passes (`sigmoid_(x, scale)`) and the mask is a
boolean drawn from 16-bit uniforms (four per 64-bit word of the generator):
drawing float32 uniforms was 5% of a fine-tuning step.

Visible biases take no part in fine-tuning: their gradient is zero.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.layout import Layout, Params
from dbnps.common.rbm import hidden_probs, sigmoid_


def init_params(layout: Layout, rng: np.random.Generator, X_train: np.ndarray) -> Params:
    """Hinton's initialisation, then vb of RBM 0 = log(p / (1 - p)) of pixel means.

    W ~ N(0, 0.01^2), zero hidden biases (`Layout.init`); the first visible
    biases make the RBM's initial reconstruction the mean image (practical
    guide, section 8).  Means are clipped to [0.001, 0.999] (border pixels are
    always 0).
    """
    p = layout.init(rng)
    pm = np.asarray(X_train, dtype=np.float64).mean(axis=0)
    np.clip(pm, 1e-3, 1 - 1e-3, out=pm)
    p.vb[0][...] = np.log(pm / (1 - pm)).astype(p.flat.dtype)
    return p


def propagate(p: Params, X: np.ndarray, upto: int, *, batch: int = 10_000) -> np.ndarray:
    """X pushed through RBMs 0..upto-1 with hidden probabilities (mean-field).

    The result is the training data of RBM `upto`, shape (n, sizes[upto]).  For
    upto = 0 it is X itself (not a copy).  Works in row blocks of `batch` so the
    temporaries stay bounded; allocates the output once per layer.
    """
    out = X
    for l in range(upto):
        W, hb = p.W[l], p.hb[l]
        nxt = np.empty((X.shape[0], W.shape[1]), dtype=W.dtype)
        for i in range(0, X.shape[0], batch):
            hidden_probs(out[i : i + batch], W, hb, out=nxt[i : i + batch])
        out = nxt
    return out


class BackpropWorkspace:
    """Preallocated buffers for fine-tuning a DBN of `sizes` at one batch size.

    ``x`` (B, n0) is where a caller gathers a minibatch (saves a copy).
    """

    def __init__(
        self,
        sizes: tuple[int, ...] | list[int],
        n_classes: int,
        batch: int,
        *,
        dtype: np.dtype | type = np.float32,
    ):
        self.sizes = tuple(sizes)
        self.batch = B = int(batch)
        self.dtype = np.dtype(dtype)
        L = len(sizes) - 1
        self.x = np.empty((B, sizes[0]), dtype=self.dtype)
        self.xd = np.empty((B, sizes[0]), dtype=self.dtype)  # input after dropout
        self.xmask = np.empty((B, sizes[0]), dtype=bool)
        self.a = [np.empty((B, n), dtype=self.dtype) for n in sizes[1:]]  # activations
        self.g = [np.empty((B, n), dtype=self.dtype) for n in sizes[1:]]  # dloss/da, delta
        self.t = [np.empty((B, n), dtype=self.dtype) for n in sizes[1:]]  # sigm'
        self.m = [np.empty((B, n), dtype=bool) for n in sizes[1:]]  # dropout masks
        self.z = np.empty((B, n_classes), dtype=self.dtype)  # logits -> dloss/dlogits
        self.rowmax = np.empty(B, dtype=self.dtype)
        self.rowsum = np.empty(B, dtype=self.dtype)
        self.ones = np.ones(B, dtype=self.dtype)
        self.rows = np.arange(B)
        self._wd: dict[tuple[int, int], np.ndarray] = {}
        self.n_layers = L

    def wd_buffer(self, shape: tuple[int, int]) -> np.ndarray:
        """Scratch for weight_decay * W (allocated on first use, then reused)."""
        buf = self._wd.get(shape)
        if buf is None:
            buf = self._wd[shape] = np.empty(shape, dtype=self.dtype)
        return buf


def _dropout_(a: np.ndarray, drop: float, rng: np.random.Generator, mask: np.ndarray) -> None:
    """In place a <- a * m, m ~ Bernoulli(1 - drop) (the caller scales a by 1/keep).

    m = [u >= round(drop * 2^16)] with u 16-bit uniforms, four per 64-bit word
    of `rng`'s bit generator (ceil(a.size / 4) words): P(m = 1) is 1 - drop to
    within 2^-17.  `mask` is a boolean scratch array of a's shape.
    """
    words = rng.bit_generator.random_raw((a.size + 3) // 4)
    u = words.view(np.uint16)[: a.size].reshape(a.shape)
    np.greater_equal(u, np.uint16(round(drop * 65536)), out=mask)
    np.multiply(a, mask, out=a)


def _add_weight_decay(gW: np.ndarray, W: np.ndarray, wd: float, ws: BackpropWorkspace) -> None:
    if wd:
        buf = ws.wd_buffer(W.shape)
        np.multiply(W, W.dtype.type(wd), out=buf)
        gW += buf


def backprop_gradient(
    p: Params,
    X: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    grad: Params,
    ws: BackpropWorkspace,
    weight_decay: float = 0.0,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    softmax_only: bool = False,
) -> float:
    """Descent gradient of the mean cross-entropy on minibatch (X, y); returns the loss.

    Writes, averaged over the batch, grad.W[l], grad.hb[l], grad.W_out, grad.b_out
    (+ weight_decay * W for every weight matrix); grad.vb[l] = 0.  With
    `softmax_only` (warm-up: the pretrained stack frozen) only W_out and b_out
    are computed and every other element of `grad` is zero.

    Derivatives (B = batch size, keep = 1 - dropout)::

        dlogits = (q - onehot(y)) / B
        dW_out  = a_L^T dlogits,            db_out = sum_rows dlogits
        delta_l = (dloss/da_l) * a_l * (1 - keep * a_l)
                  (with a_l the post-dropout activation this equals
                   mask/keep * sigm'(z_l); 0 where the unit was dropped)
        dW_l    = a_{l-1}^T delta_l,        dhb_l = sum_rows delta_l
        dloss/da_{l-1} = delta_l W_l^T

    Random draws, in order: input-dropout mask (ceil(B * n0 / 4) 64-bit words)
    if input_dropout > 0, then one mask per hidden layer (ceil(B * n_l / 4)) if
    dropout > 0.
    Loss is computed with the dropout masks applied (the training objective).
    """
    L = ws.n_layers
    B = ws.batch
    f = ws.dtype.type
    if X.shape != ws.x.shape:
        raise ValueError(f"batch shape {X.shape} != workspace {ws.x.shape}")

    # Forward.
    a_in = X
    if input_dropout > 0:
        np.multiply(X, f(1.0 / (1.0 - input_dropout)), out=ws.xd)
        _dropout_(ws.xd, input_dropout, rng, ws.xmask)
        a_in = ws.xd
    inputs = [a_in]
    for l in range(L):
        a = ws.a[l]
        np.dot(inputs[-1], p.W[l], out=a)
        a += p.hb[l]
        sigmoid_(a, 1.0 / (1.0 - dropout))  # a_l / keep: inverted dropout's scale
        if dropout > 0:
            _dropout_(a, dropout, rng, ws.m[l])
        inputs.append(a)
    aL = inputs[-1]
    z = ws.z
    np.dot(aL, p.W_out, out=z)
    z += p.b_out
    np.max(z, axis=1, out=ws.rowmax)
    z -= ws.rowmax[:, None]
    zy = z[ws.rows, y]
    np.exp(z, out=z)
    np.sum(z, axis=1, out=ws.rowsum)
    loss = float(np.mean(np.log(ws.rowsum) - zy))

    # dloss/dlogits = (softmax - onehot) / B.
    z /= ws.rowsum[:, None]
    z[ws.rows, y] -= f(1)
    z *= f(1.0 / B)
    np.dot(aL.T, z, out=grad.W_out)
    _add_weight_decay(grad.W_out, p.W_out, weight_decay, ws)
    np.dot(ws.ones, z, out=grad.b_out)
    for vb in grad.vb:
        vb[...] = 0
    if softmax_only:
        for l in range(L):
            grad.W[l][...] = 0
            grad.hb[l][...] = 0
        return loss

    # Backward through the sigmoid layers.
    keep = f(1.0 - dropout)
    g = ws.g[L - 1]
    np.dot(z, p.W_out.T, out=g)
    for l in range(L - 1, -1, -1):
        a, t = ws.a[l], ws.t[l]
        np.multiply(a, -keep, out=t)
        t += f(1)
        t *= a
        g *= t
        np.dot(inputs[l].T, g, out=grad.W[l])
        _add_weight_decay(grad.W[l], p.W[l], weight_decay, ws)
        np.dot(ws.ones, g, out=grad.hb[l])
        if l > 0:
            np.dot(g, p.W[l].T, out=ws.g[l - 1])
            g = ws.g[l - 1]
    return loss


def predict(p: Params, X: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class with the largest softmax output for each row of X (no dropout)."""
    L = len(p.W)
    out = np.empty(X.shape[0], dtype=np.int64)
    for i in range(0, X.shape[0], batch):
        a = X[i : i + batch]
        for l in range(L):
            h = np.empty((a.shape[0], p.W[l].shape[1]), dtype=p.W[l].dtype)
            a = hidden_probs(a, p.W[l], p.hb[l], out=h)
        z = np.dot(a, p.W_out)
        z += p.b_out
        out[i : i + batch] = np.argmax(z, axis=1)
    return out


def accuracy(p: Params, X: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Fraction of rows of X whose predicted class equals y."""
    if X.shape[0] == 0:
        return float("nan")
    return float(np.mean(predict(p, X, batch) == y))
