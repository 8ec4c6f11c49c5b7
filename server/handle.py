"""The server's request handle: what a server rank does with a batch of pushes.

ps-lite's shape: the server loop (`dbnps.server.server`) takes the pending
pushes from the transport and hands them to a handle, which decides each
push's result and changes the shard; the loop then acks them.  A handle is
any callable `(pushes, shard) -> Outcome`; `Aggregate` is the default
(Downpour SGD with validation), and a user can plug in another rule without
touching the loop or the transport.  No MPI here: tests call handles on
numpy arrays.

`Aggregate`, for a batch of pushes against the shard at version v:

1. validate each push: its phase is the shard's and covers the phase's range
   (else REJECTED_PHASE); its staleness tau = v - pulled_version is within
   `staleness_bound` (else REJECTED_STALE);
2. sum the finite ones (a non-finite gradient is REJECTED_NONFINITE, the
   others still count), each weighted 1/max(tau, 1) under
   `staleness_lr = "inverse"` (Zhang et al., IJCAI 2016: a stale gradient's
   step shrinks with its staleness), else weight 1;
3. apply the sum once with the update rule (`dbnps.common.updaters`) and
   advance VERSION by the pushes and SAMPLES by their samples, together
   inside `shard.write()` (the transport's seqlock bracket).  Under
   `staleness_lr = "compensate"` the rule gets the momentum and lr of
   `compensate` at the running mean staleness instead of the schedule's.
   Under `[ps] split_batch` each push of n samples weighs n / batch in the
   sum and the rule gets `fractional_step`'s lr and momentum for the batch's
   w = samples / batch steps (K pushes of batch / K samples ~ one step), and
   `compensate` counts tau in whole steps (tau x n / batch), not in pushes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dbnps.common.protocol import (
    APPLIED,
    PHASE,
    REJECTED_NONFINITE,
    REJECTED_PHASE,
    REJECTED_STALE,
    SAMPLES,
    VERSION,
    Push,
)
from dbnps.common.schedule import fractional_step


@dataclass
class Shard:
    """What a handle sees of this server rank at the moment it is called."""

    params: np.ndarray  # float32: this rank's shard of the flat vector (the window's memory)
    header: np.ndarray  # int64: this rank's header words (VERSION, PHASE, SAMPLES, ...)
    phase_range: tuple[int, int]  # [a, b) of the phase's parameters inside the shard
    open: bool  # False once training is over (phase done): every push is refused
    lr: float
    momentum: float
    write: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    batch: int = 0  # the phase's configured batch (samples of one whole step)

    @property
    def version(self) -> int:
        return int(self.header[VERSION])

    @property
    def phase(self) -> int:
        return int(self.header[PHASE])


@dataclass
class Outcome:
    """A handle's decision: a result per push, and what was applied."""

    results: dict[int, int] = field(default_factory=dict)  # worker -> APPLIED / REJECTED_*
    applied: int = 0  # pushes applied (the version advances by this)
    samples: int = 0  # their samples
    staleness: list[int] = field(default_factory=list)  # tau of each applied push


class RequestHandle(Protocol):
    def __call__(self, pushes: list[Push], shard: Shard) -> Outcome: ...


def compensate(lr: float, momentum: float, k_eff: float) -> tuple[float, float]:
    """The (lr, momentum) that give momentum SGD its configured step under asynchrony.

    Asynchrony begets momentum (Mitliagkas et al. 2016): with updates that are
    on average tau stale, the K_eff = 1 + tau replicas add an implicit momentum
    mu_a = 1 - 1/K_eff, and the two combine as 1 - mu_total = (1 - mu')(1 - mu_a).
    Keeping 1 - mu_total = 1 - mu (and with it the effective step lr/(1 - mu))
    gives mu' = 1 - K_eff (1 - mu).  Once that is below 0 (K_eff > 1/(1 - mu)),
    mu' = 0 and the lr shrinks instead: lr' = lr / (K_eff (1 - mu)), so that
    lr' / (1 - mu_total) = lr / (1 - mu) still.  K_eff = 1 gives (lr, mu) back.
    """
    k_eff = max(k_eff, 1.0)
    mu = 1.0 - k_eff * (1.0 - momentum)
    if mu >= 0.0:
        return lr, mu
    return lr / (k_eff * (1.0 - momentum)), 0.0


class Aggregate:
    """Validate, sum and apply a batch of pushes with one pass of the update rule."""

    TAU_DECAY = 0.98  # the running mean staleness forgets over ~50 applied pushes

    def __init__(
        self,
        rule,
        *,
        staleness_bound: int = 0,
        staleness_lr: str = "none",
        constrain=None,
        split_batch: bool = False,
    ):
        """`constrain(shard)`: called after each apply, inside the write bracket (e.g.
        max-norm on the weights), so pulls only ever see constrained parameters."""
        self.rule = rule
        self.constrain = constrain
        self.staleness_bound = staleness_bound
        self.inverse = staleness_lr == "inverse"
        self.compensating = staleness_lr == "compensate"
        self.split_batch = split_batch
        self.tau_mean: float | None = None  # running mean staleness of the applied pushes
        self._agg = np.empty(rule.size, dtype=np.float32)

    def __call__(self, pushes: list[Push], shard: Shard) -> Outcome:
        out = Outcome()
        a, b = shard.phase_range
        candidates = []
        for p in pushes:
            tau = shard.version - p.pulled_version
            if not shard.open or p.phase != shard.phase or (p.lo, p.hi) != (a, b):
                out.results[p.worker] = REJECTED_PHASE
            elif self.staleness_bound and tau > self.staleness_bound:
                out.results[p.worker] = REJECTED_STALE
            else:
                candidates.append(p)
        if not candidates:
            return out
        # One finiteness check of the sum; single pushes are looked at only if it is bad.
        accepted = candidates
        per = shard.batch if self.split_batch else 0  # a push weighs n_samples / per
        agg, scale = self.sum(accepted, shard.version, a, b, per)
        if b > a and not finite(agg):
            accepted = [p for p in candidates if finite(p.grad)]
            if accepted:
                agg, scale = self.sum(accepted, shard.version, a, b, per)
        ok = {p.worker for p in accepted}
        for p in candidates:
            out.results[p.worker] = APPLIED if p.worker in ok else REJECTED_NONFINITE
        if not accepted:
            return out
        out.applied = len(accepted)
        out.samples = sum(p.n_samples for p in accepted)
        out.staleness = [max(shard.version - p.pulled_version, 0) for p in accepted]
        lr, mom = shard.lr, shard.momentum
        if per and out.samples != per:  # (a whole step's samples: the schedule as it is)
            lr, mom = fractional_step(lr, mom, out.samples / per)
        if self.compensating:
            taus = out.staleness
            if per:  # tau in whole steps: a push of n samples is n / per of a step
                taus = [t * p.n_samples / per for t, p in zip(taus, accepted, strict=True)]
            lr, mom = compensate(lr, mom, 1.0 + self._mean_staleness(taus))
        with shard.write():  # pulls see the parameters and their version change together
            self.rule.apply(shard.params[a:b], agg, lr * scale, mom, a)
            if self.constrain is not None:
                self.constrain(shard)
            shard.header[VERSION] += out.applied
            shard.header[SAMPLES] += out.samples
        return out

    def _mean_staleness(self, taus: list[float]) -> float:
        """Exponentially weighted mean of tau over the applied pushes (starts at the first)."""
        for tau in taus:
            if self.tau_mean is None:
                self.tau_mean = float(tau)
            else:
                self.tau_mean = self.TAU_DECAY * self.tau_mean + (1 - self.TAU_DECAY) * tau
        return self.tau_mean or 0.0

    def sum(
        self, pushes: list[Push], version: int, a: int, b: int, per: int = 0
    ) -> tuple[np.ndarray, float]:
        """(g, scale) with scale * g = sum_i w_i g_i over the pushes.

        w_i = 1 / max(tau_i, 1), tau_i = version - pulled_version_i, under
        `staleness_lr = "inverse"`, else 1; times n_samples_i / per when `per`
        (split_batch: the samples of one whole step).  For a rule linear in the
        gradient (SGD, momentum) the first weight is factored out into `scale`,
        which the caller folds into the lr: a lone push is used as it is (its
        slot is scratch until the ack) and pushes of equal weight are only
        added, one pass over the vector less than scaling them first.
        Otherwise (Adagrad squares the gradient) scale is 1.
        """
        if b <= a:  # this shard holds nothing of the phase
            return self._agg[:0], 1.0
        w = [1.0 / max(version - p.pulled_version, 1) if self.inverse else 1.0 for p in pushes]
        if per:
            w = [wi * p.n_samples / per for wi, p in zip(w, pushes, strict=True)]
        scale = w[0] if getattr(self.rule, "linear", False) else 1.0  # (a rule without the flag: 1)
        w = [wi / scale for wi in w]
        if len(pushes) == 1 and w[0] == 1.0:
            return pushes[0].grad, scale
        agg = self._agg[a:b]
        if len(pushes) > 1 and w[0] == w[1] == 1.0:
            np.add(pushes[0].grad, pushes[1].grad, out=agg)
            rest = 2
        else:
            np.multiply(pushes[0].grad, np.float32(w[0]), out=agg)
            rest = 1
        for p, wi in zip(pushes[rest:], w[rest:], strict=True):
            if wi == 1.0:
                agg += p.grad
            else:
                agg += np.float32(wi) * p.grad
        return agg, scale


def finite(g: np.ndarray) -> bool:
    """All elements finite: `dot(g, g)` is one BLAS read pass, non-finite iff some element
    is NaN/Inf (or the norm overflows float32, refused as well)."""
    return bool(np.isfinite(np.dot(g, g)))
