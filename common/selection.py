"""Which parameters a job saves: the last, the best evaluated, or the ones that met the target.

Plain logic, no MPI: the server offers every finished evaluation (accuracy on
the evaluation split and the snapshot of parameters it was computed from), and
at the end asks which parameters to write.  The rule:

* `[run] keep_best`: the snapshot with the highest accuracy on the validation
  split (config validation refuses keep_best without one, so the test set never
  chooses a model);
* else, when `[run] target_accuracy` stopped the job: the snapshot that reached
  the target, so the model a user gets is the one reported as reaching it;
* else the last parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Evaluated:
    accuracy: float  # on the evaluation split
    version: int  # parameter version the snapshot was taken at
    params: np.ndarray  # the snapshot itself (owned: nobody writes it afterwards)


@dataclass
class Choice:
    which: str  # "last", "best" or "target"
    params: np.ndarray
    version: int
    accuracy: float  # on the evaluation split (NaN: the last parameters were not evaluated)


class Selection:
    def __init__(self, *, keep_best: bool = False, target: float = 0.0):
        self.keep_best = keep_best
        self.target = target
        self.best: Evaluated | None = None
        self.reached: Evaluated | None = None  # the first evaluation at or above the target

    def offer(self, accuracy: float, version: int, params: np.ndarray) -> None:
        """One finished evaluation; `params` must not be written afterwards."""
        e = Evaluated(float(accuracy), int(version), params)
        if self.keep_best and (self.best is None or e.accuracy > self.best.accuracy):
            self.best = e
        if self.target > 0 and self.reached is None and e.accuracy >= self.target:
            self.reached = e

    @property
    def target_reached(self) -> bool:
        return self.reached is not None

    def choose(self, last: np.ndarray, version: int, accuracy: float = float("nan")) -> Choice:
        """The parameters to save, given the last ones (and their accuracy, if evaluated)."""
        if self.keep_best and self.best is not None and not accuracy > self.best.accuracy:
            b = self.best
            return Choice("best", b.params, b.version, b.accuracy)
        if not self.keep_best and self.reached is not None:
            r = self.reached
            return Choice("target", r.params, r.version, r.accuracy)
        which = "best" if self.keep_best and accuracy == accuracy else "last"
        return Choice(which, last, version, accuracy)
