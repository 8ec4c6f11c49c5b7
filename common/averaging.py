"""Parameter averaging: a running average of the fine-tuning parameters (no MPI).

Polyak & Juditsky 1992; the exponential moving average of Polyak-style
averaging in e.g. Szegedy et al. 2016.  The server keeps the average beside
the live parameters: the workers train on the live ones, evaluations, the
`keep_best` selection and the saved model use the average.

Cheap on the server: the average does not take every update.  It takes a
sample of the parameters every `every` applied updates, with the weight the
per-update rule would give the n updates since the previous sample:

    ema     avg <- avg + (1 - decay^n) (p - avg)   (decay per update)
    polyak  avg <- avg + (p - avg) / k             (k-th sample: the plain mean)

With every = 1 "ema" is the textbook per-update EMA; with every = N it is
the EMA of every N-th iterate with decay^N, which differs from it by less
than the noise of N updates once the horizon 1 / (1 - decay) is >> N.  A
sample costs three passes over the vector (subtract, scale, add), so every =
10 adds about a tenth of that per update.  The first sample copies the
parameters.  `state` / `load_state` round-trip everything a checkpoint needs.
"""

from __future__ import annotations

import numpy as np

from dbnps.common.errors import ConfigError

KINDS = ("none", "ema", "polyak")


class ParamAverage:
    def __init__(self, size: int, kind: str, *, decay: float = 0.999, every: int = 1):
        if kind not in ("ema", "polyak"):
            raise ConfigError(f"unknown parameter average {kind!r} (none, ema, polyak)")
        self.kind, self.decay, self.every = kind, float(decay), int(every)
        self.avg = np.zeros(size, dtype=np.float32)
        self._tmp = np.empty(size, dtype=np.float32)
        self.count = 0  # samples folded in (0: no average yet)
        self.pending = 0  # updates applied since the last sample

    def reset(self) -> None:
        """Forget the average (a new fine-tuning phase)."""
        self.avg[...] = 0
        self.count = self.pending = 0

    @property
    def ready(self) -> bool:
        return self.count > 0

    def observe(self, params: np.ndarray, n_updates: int = 1) -> bool:
        """`n_updates` more were applied to `params`; True when this took a sample."""
        self.pending += n_updates
        if self.pending < self.every:
            return False
        self.fold(params)
        return True

    def fold(self, params: np.ndarray) -> None:
        """Take a sample of `params` now (weight from the updates since the last one)."""
        if self.count == 0:
            self.avg[...] = params
        else:
            w = self.weight(self.pending)
            t = self._tmp
            np.subtract(params, self.avg, out=t)
            t *= np.float32(w)
            self.avg += t
        self.count += 1
        self.pending = 0

    def weight(self, n: int) -> float:
        """The new sample's weight, `n` updates after the previous one."""
        if self.kind == "polyak":
            return 1.0 / (self.count + 1)
        return 1.0 - self.decay ** max(n, 1)

    def flush(self, params: np.ndarray) -> None:
        """Fold the updates since the last sample, if any (at the end of training)."""
        if self.pending > 0 or self.count == 0:
            self.fold(params)

    def state(self) -> tuple[np.ndarray, dict]:
        """(the average, its counters) for a checkpoint."""
        return self.avg, {"kind": self.kind, "count": self.count, "pending": self.pending}

    def load_state(self, avg: np.ndarray, meta: dict) -> None:
        self.avg[...] = avg
        self.count, self.pending = int(meta["count"]), int(meta["pending"])
