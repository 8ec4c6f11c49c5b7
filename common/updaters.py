"""Update rules: how a parameter vector absorbs a gradient.

The rule is the pluggable piece of the parameter server (ps-lite's request
handle): the server, and the single-process trainer, call `apply` with a slice
of the flat parameter vector and the gradient for that slice.  Each rule keeps
its own state (velocity, squared-gradient sum) for the slice it owns, in float32,
updated in place with no allocation on the hot path.

    SGD       p <- p - lr * g
    Momentum  v <- mu * v - lr * g ;  p <- p + v          (Hinton's RBM/DBN recipe)
    Adagrad   s <- s + g^2 ;         p <- p - lr * g / (sqrt(s) + eps)   (Downpour)

Momentum with a look-ahead c >= 0 (`[ps] lookahead`, the server's answer to
staleness): the vector kept, and pulled by the workers, is q = p + c v, the
point the parameters will have moved to after the updates that land while
a worker computes on it (DANA, Hakimi et al. 2019); c = 0 is plain momentum.

    v' = mu v - lr g ;  q' = q + (mu (1 + c) - c) v - (1 + c) lr g   (= p' + c v')

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

    def __init__(self, size: int):
        self.size = size

    def reset(self) -> None:
        """Forget optimizer state (at a phase change)."""

    def delta(self, g: np.ndarray, lr: float, momentum: float, lo: int = 0) -> np.ndarray:
        """The increment for gradient `g` (computed in g or in the rule's state; don't keep it).

        `lo` is g's offset in the rule's state.  Advances the state (velocity, sums).
        """
        raise NotImplementedError

    def apply(
        self, p: np.ndarray, g: np.ndarray, lr: float, momentum: float, lo: int = 0, lookahead=0.0
    ) -> None:
        """Update `p` in place from gradient `g`; `lo` is p's offset in the rule's state.

        `lookahead` (momentum only; config validation refuses it elsewhere) is c above."""
        p += self.delta(g, lr, momentum, lo)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for k, v in state.items():
            getattr(self, k)[...] = v


class SGD(UpdateRule):
    name = "sgd"

    def delta(self, g, lr, momentum, lo=0):
        g *= np.float32(-lr)
        return g


class Momentum(UpdateRule):
    name = "momentum"

    def __init__(self, size: int):
        super().__init__(size)
        self.v = np.zeros(size, dtype=np.float32)
        self._tmp: np.ndarray | None = None  # look-ahead scratch, made on first use

    def reset(self):
        self.v[...] = 0

    def delta(self, g, lr, momentum, lo=0):
        v = self.v[lo : lo + g.size]
        v *= np.float32(momentum)
        g *= np.float32(lr)
        v -= g
        return v

    def apply(self, p, g, lr, momentum, lo=0, lookahead=0.0):
        if not lookahead:
            return super().apply(p, g, lr, momentum, lo)
        c = float(lookahead)
        v = self.v[lo : lo + g.size]
        if self._tmp is None:
            self._tmp = np.empty(self.size, dtype=np.float32)
        t = self._tmp[: g.size]
        g *= np.float32(lr)
        np.multiply(v, np.float32(momentum * (1 + c) - c), out=t)
        p += t
        v *= np.float32(momentum)
        v -= g
        g *= np.float32(1 + c)
        p -= g
        return None

    def state(self):
        return {"v": self.v}


def lookahead_steps(momentum: float, tau: float) -> float:
    """How far ahead, in velocities, the parameters are after tau more momentum updates.

    With the velocity decaying by mu per update and no new gradient, tau updates
    move p by v (mu + mu^2 + ... + mu^tau) = v mu (1 - mu^tau) / (1 - mu); tau is
    the running mean staleness, so a fractional tau is taken as it is.
    """
    tau = max(float(tau), 0.0)
    if momentum >= 1.0 - 1e-9:
        return tau
    return momentum * (1.0 - momentum**tau) / (1.0 - momentum)


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
