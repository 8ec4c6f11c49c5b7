"""Update rules: how a parameter vector absorbs a gradient.

The rule is the pluggable piece of the parameter server (ps-lite's request
handle): the server, and the single-process trainer, call `apply` with a slice
of the flat parameter vector and the gradient for that slice.  Each rule keeps
its own state (velocity, squared-gradient sum) for the slice it owns, in float32,
updated in place with no allocation on the hot path.

    SGD       p <- p - lr * g
    Momentum  v <- mu * v - lr * g ;  p <- p + v          (Hinton's RBM/DBN recipe)
    Adagrad   s <- s + g^2 ;         p <- p - lr * g / (sqrt(s) + eps)   (Downpour)

`g` is overwritten (it is scratch once applied).  `delta` computes the
increment without touching `p` (p_new = p + delta): the server's `apply` is
`p += delta(g)`, and in `[ps] mode = "accumulate"` a worker sends `delta(g)`
to the server with MPI_Accumulate(SUM) instead.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.errors import ConfigError


class UpdateRule:
    name = "base"
    # apply(p, g, lr) == apply(p, g / c, lr * c): a weight on the gradient can ride on
    # the lr (the server's handle folds push weights into it, one pass less per push)
    linear = False

    def __init__(self, size: int):
        self.size = size

    def reset(self) -> None:
        """Forget optimizer state (at a phase change)."""

    def delta(self, g: np.ndarray, lr: float, momentum: float, lo: int = 0) -> np.ndarray:
        """The increment for gradient `g` (computed in g or in the rule's state; don't keep it).

        `lo` is g's offset in the rule's state.  Advances the state (velocity, sums).
        """
        raise NotImplementedError

    def apply(self, p: np.ndarray, g: np.ndarray, lr: float, momentum: float, lo: int = 0) -> None:
        """Update `p` in place from gradient `g`; `lo` is p's offset in the rule's state."""
        p += self.delta(g, lr, momentum, lo)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for k, v in state.items():
            getattr(self, k)[...] = v


class SGD(UpdateRule):
    name = "sgd"
    linear = True

    def delta(self, g, lr, momentum, lo=0):
        g *= np.float32(-lr)
        return g


class Momentum(UpdateRule):
    name = "momentum"
    linear = True

    def __init__(self, size: int):
        super().__init__(size)
        self.v = np.zeros(size, dtype=np.float32)

    def reset(self):
        self.v[...] = 0

    def delta(self, g, lr, momentum, lo=0):
        v = self.v[lo : lo + g.size]
        v *= np.float32(momentum)
        g *= np.float32(lr)
        v -= g
        return v

    def state(self):
        return {"v": self.v}


class Adagrad(UpdateRule):
    name = "adagrad"

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__(size)
        self.s = np.zeros(size, dtype=np.float32)
        self.eps = np.float32(eps)
        self._tmp = np.empty(size, dtype=np.float32)

    def reset(self):
        self.s[...] = 0

    def delta(self, g, lr, momentum, lo=0):
        s = self.s[lo : lo + g.size]
        t = self._tmp[: g.size]
        np.multiply(g, g, out=t)
        s += t
        np.sqrt(s, out=t)
        t += self.eps
        g /= t
        g *= np.float32(-lr)
        return g

    def state(self):
        return {"s": self.s}


def make_rule(name: str, size: int, *, adagrad_eps: float = 1e-6) -> UpdateRule:
    if name == "sgd":
        return SGD(size)
    if name == "momentum":
        return Momentum(size)
    if name == "adagrad":
        return Adagrad(size, adagrad_eps)
    raise ConfigError(f"unknown update rule {name!r} (sgd, momentum, adagrad)")
