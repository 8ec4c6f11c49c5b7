"""When a worker pushes and pulls: the talk's Algorithm 3 (n_fetch, n_push).

No MPI: `Worker._run` asks `step` after every local step whether to push
(and what: the gradient as is, or the sum of the last n_push steps'
gradients) and whether to pull.  Pretraining and fine-tuning have their own
cadence (`[ps] pretrain_n_fetch/pretrain_n_push`); a phase change starts a
new count, so a push never mixes two phases.
"""

from __future__ import annotations

import numpy as np


class Cadence:
    def __init__(self, n_fetch: int, n_push: int, acc: np.ndarray | None = None):
        """`acc`: the sum buffer (flat float32), needed when n_push > 1."""
        if n_push > 1 and acc is None:
            raise ValueError("n_push > 1 needs a buffer to sum the steps' gradients in")
        self.n_fetch, self.n_push, self.acc = n_fetch, n_push, acc
        self.steps = 0  # steps in this phase
        self.acc_steps = self.acc_samples = 0  # since the last push
        self.samples = 0  # samples in the buffer `step` last returned

    def step(self, grad: np.ndarray, lo: int, hi: int, n: int) -> np.ndarray | None:
        """Count a step whose gradient is grad[lo:hi] over `n` samples.

        Returns the flat buffer to push (its [lo, hi) is the gradient sum since
        the last push; `samples` says over how many samples) when a push is
        due, else None.  With n_push = 1 that is `grad` itself, no copy.
        """
        self.steps += 1
        self.acc_samples += n
        self.acc_steps += 1
        if self.n_push > 1:
            if self.acc_steps == 1:
                self.acc[lo:hi] = grad[lo:hi]
            else:
                self.acc[lo:hi] += grad[lo:hi]
        if self.acc_steps < self.n_push:
            return None
        self.samples, self.acc_steps, self.acc_samples = self.acc_samples, 0, 0
        return self.acc if self.n_push > 1 else grad

    @property
    def pull_due(self) -> bool:
        """A full pull of the phase's parameters after every n_fetch steps."""
        return self.steps % self.n_fetch == 0
