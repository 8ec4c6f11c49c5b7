"""Learning-rate and momentum as functions of the phase and of epochs into it.

Shared by the single-process trainer and the parameter server so both follow
the same recipe: momentum `momentum_start` until `momentum_switch_epoch`, then
`momentum_final` (Hinton 2006/2010: 0.5 -> 0.9); fine-tuning lr decays by
`lr_decay` per epoch and, over the last `anneal_epochs`, falls linearly to 0.
"""

from __future__ import annotations

from dbnps.common.config import Config


def hyper(cfg: Config, phase: int, n_layers: int, epoch: float) -> tuple[float, float]:
    """(lr, momentum) for `phase` at `epoch` (float, epochs completed in the phase)."""
    s = cfg.pretrain if phase < n_layers else cfg.finetune
    momentum = s.momentum_start if epoch < s.momentum_switch_epoch else s.momentum_final
    lr = s.lr
    if phase >= n_layers:
        f = cfg.finetune
        lr = s.lr * (f.lr_decay ** int(epoch))
        left = f.epochs - epoch
        if f.anneal_epochs > 0 and left < f.anneal_epochs:
            lr *= max(left, 0.0) / f.anneal_epochs
    return lr, momentum


def fractional_step(lr: float, momentum: float, w: float) -> tuple[float, float]:
    """(lr, momentum) that make an update worth `w` steps of momentum SGD.

    A push over n = w * batch samples (w < 1 when K workers share the batch,
    `[ps] split_batch`) is a fraction of a step: the velocity decays by
    mu^w, so that 1/w such updates forget as much as one step, and the lr is
    lr (1 - mu^w) / (1 - mu), so that the steady step for a gradient weighted
    by w, lr' w g / (1 - mu^w), is w times the step's lr g / (1 - mu): the
    same progress per sample as one worker taking whole steps.  w = 1 gives
    (lr, mu) back; mu = 0 gives (lr, 0).

    w = K > 1 is `[ps] mode = "accumulate"` with `accumulate_momentum =
    "matched"`: each of K workers keeps its own velocity, which decays only at
    its own pushes, one in every K, so each push of its own stands for K of
    the server's.  A gradient's effect, summed over each stretch of K pushes,
    is then the server's single velocity's exactly.
    """
    decay = momentum**w
    return lr * (1.0 - decay) / (1.0 - momentum) if momentum > 0 else lr, decay


def phase_epochs(cfg: Config, phase: int, n_layers: int) -> float:
    """Length of `phase` in epochs (passes over the training set, all workers together)."""
    if phase < n_layers:
        return cfg.pretrain.epochs
    if phase == n_layers:
        return cfg.finetune.epochs
    return 0.0


def phase_samples(cfg: Config, phase: int, n_layers: int, n_train: int) -> int:
    """Samples to apply before `phase` ends: its epochs x the training-set size.

    The one rule the single-process trainer, the server (apply mode) and the
    workers (accumulate mode) all end a phase by.
    """
    return round(phase_epochs(cfg, phase, n_layers) * n_train)


def solo_samples(cfg: Config, phase: int, n_layers: int, n_train: int, n_workers: int) -> int:
    """Samples at the start of `phase` that one of `n_workers` trains alone (the warm start).

    `[ps] pretrain_solo_epochs` (resolved for n_workers) for an RBM, `[ps]
    solo_epochs` for fine-tuning, at most the whole phase; 0: every worker
    trains from the first sample.
    """
    if phase < n_layers:
        solo = cfg.ps.pretrain_solo(n_workers, cfg.pretrain.epochs)
    else:
        solo = cfg.ps.solo_epochs
    return round(min(solo, phase_epochs(cfg, phase, n_layers)) * n_train)


def batch_size(cfg: Config, phase: int, n_layers: int) -> int:
    return cfg.pretrain.batch_size if phase < n_layers else cfg.finetune.batch_size


class PhaseSchedule:
    """The phase sequence pretrain-1 .. pretrain-L -> finetune -> done, by samples applied.

    Rank 0 of the server decides with it when a phase is over; a phase of 0
    epochs (e.g. `[pretrain] epochs = 0`) is skipped.  No MPI: tested in-process.
    """

    def __init__(self, cfg: Config, n_layers: int, n_train: int):
        self.cfg, self.n_layers, self.n_train = cfg, n_layers, n_train
        self.done_phase = n_layers + 1

    def samples(self, phase: int) -> int:
        """Samples `phase` lasts (0 for done)."""
        return phase_samples(self.cfg, phase, self.n_layers, self.n_train)

    def first_from(self, phase: int) -> int:
        """`phase`, or the first later one that lasts > 0 samples (done at the latest)."""
        while phase < self.done_phase and self.samples(phase) == 0:
            phase += 1
        return min(phase, self.done_phase)

    def over(self, phase: int, samples: int) -> bool:
        """`samples` applied in `phase` complete it."""
        return phase < self.done_phase and samples >= self.samples(phase)

    def after(self, phase: int) -> int:
        """The phase that follows a completed `phase`."""
        return self.first_from(phase + 1)
