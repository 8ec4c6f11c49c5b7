"""Job configuration: one TOML file holds the architecture and every hyper-parameter.

Unknown sections or keys, wrong types and out-of-range values are rejected
with one line naming the key (`ConfigError`), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbnps.common.errors import ConfigError


@dataclass
class ModelConfig:
    sizes: list[int] = field(default_factory=lambda: [784, 500, 500, 2000])
    classes: int = 10


@dataclass
class DataConfig:
    dir: str = ""  # empty: --data-dir, then $DBNPS_DATA, then the vendored copy
    train_subset: int = 0  # 0: all 60 000 training images
    test_subset: int = 0  # 0: all 10 000 test images
    # Training images held out for model selection (the last N of the training
    # set, after train_subset): evaluations during training use them, never the
    # test set, and no worker trains on them.  0: none; evaluations use the test set.
    validation: int = 0
    # Check every file against the directory's SHA256SUMS, or MNIST's known digests.
    # false: load unverified data (an explicit opt-out, e.g. a data set of one's own).
    verify: bool = True


@dataclass
class PretrainConfig:
    epochs: float = 10.0  # per RBM layer
    batch_size: int = 100
    lr: float = 0.1
    momentum_start: float = 0.5
    momentum_final: float = 0.9
    momentum_switch_epoch: float = 5.0
    weight_decay: float = 0.0002
    cd_k: int = 1
    persistent: bool = False


@dataclass
class FinetuneConfig:
    epochs: float = 50.0
    batch_size: int = 100
    lr: float = 0.1
    lr_decay: float = 1.0  # lr multiplied by this each epoch
    momentum_start: float = 0.5
    momentum_final: float = 0.9
    momentum_switch_epoch: float = 5.0
    weight_decay: float = 0.0
    dropout: float = 0.0  # hidden-unit drop probability
    input_dropout: float = 0.0
    warmup_epochs: float = 0.0  # softmax-only epochs before the whole stack
    # Max-norm: after each update every unit's incoming weight vector is scaled to
    # L2 norm <= max_norm (Srivastava et al. 2014, c = 3-4 with dropout). 0: off.
    max_norm: float = 0.0
    # The last anneal_epochs of fine-tuning: the lr (after lr_decay) falls linearly
    # to 0 at the end of the phase. 0: off.
    anneal_epochs: float = 0.0
    # Each fine-tuning image is moved by a random (dy, dx) in [-shift_pixels,
    # shift_pixels]^2 pixels, zero fill (common/augment.py). 0: off.
    shift_pixels: int = 0


@dataclass
class PSConfig:
    update_rule: str = "momentum"  # sgd | momentum | adagrad
    # apply: the server validates and applies each push with the rule (default).
    # accumulate: a worker runs the rule on its own gradients and MPI_Accumulates
    # the increment into the server's window itself (1 server rank only).
    mode: str = "apply"
    # Accumulate mode with the momentum rule: "matched" sets each worker's own lr and
    # momentum so that the K workers' velocities together act as the server's one
    # (common.schedule.fractional_step with w = K); "local": the schedule's values as they are.
    accumulate_momentum: str = "matched"
    n_fetch: int = 1  # pull every n_fetch steps
    n_push: int = 1  # push the sum of n_push gradients
    pretrain_n_fetch: int = 0  # n_fetch while pretraining; 0: same as n_fetch
    pretrain_n_push: int = 0  # n_push while pretraining; 0: same as n_push
    staleness_bound: int = 0  # tau; 0: unbounded. A push staler than tau is dropped
    # Warm start (DistBelief): the first solo_epochs of fine-tuning, and the first
    # pretrain_solo_epochs of each RBM, are trained by one worker (the lowest live
    # one) on the whole training set while the others wait; then all K on their shards.
    # "auto" (pretrain_solo_epochs only): every pretraining epoch alone above
    # WARM_START_ABOVE workers when they share the batch, else none.  `pretrain_solo(K)`.
    solo_epochs: float = 0.0
    pretrain_solo_epochs: float | str = "auto"
    # The K training workers share the configured batch: each step is batch_size / K
    # samples and the server counts a push of n samples as n / batch_size of a step
    # (momentum mu^w, lr scaled to keep lr / (1 - mu) per sample): K pushes ~ one step.
    # "auto": from SHARE_BATCH_FROM workers on, in apply mode (whole batches are K
    # batches stale, which broke momentum SGD from K = 3 in docs/benchmarks.md's
    # study); "on" (TOML true) / "off" (false): always / never.  `shares_batch(K)`.
    split_batch: str = "auto"
    # "inverse": each push's gradient is weighted 1/max(tau, 1) in the server's sum
    # (staleness-aware lr, Zhang et al. IJCAI 2016); "compensate": the momentum (and,
    # past 1/(1 - momentum) effective workers, the lr) is lowered by the asynchrony's
    # implicit momentum at the running mean staleness (server/handle.compensate);
    # "none": every push weighs 1 and the schedule's lr and momentum apply as they are;
    # "auto": "compensate" when the batch is shared, else "none".  `staleness_rule(K)`.
    staleness_lr: str = "auto"
    sync: bool = False  # wait for each push to be applied before the next pull (exactness)
    adagrad_eps: float = 1e-6
    step_timeout_s: float = 120.0  # every wait on the server gives up after this
    heartbeat_timeout_s: float = 30.0  # a worker silent this long is marked dead
    exit_timeout_s: float = 60.0  # a rank stuck this long in the end-of-job collective leaves
    # Divergence: this many pushes in a row rejected as non-finite (no update applied
    # between them) end the job with exit status 5 instead of spinning for ever.
    max_nonfinite_in_a_row: int = 100
    # Parameter averaging of fine-tuning on the server (dbnps.common.averaging):
    # evaluations, keep_best and the saved model use the average, the workers go on
    # training the live parameters. "ema" (decay per update), "polyak" (the plain
    # mean) or "none"; a sample every average_every updates from fine-tune epoch
    # average_start_epoch. One server rank.
    average: str = "none"
    average_decay: float = 0.999
    average_every: int = 10
    average_start_epoch: float = 0.0
    # Each evaluation of the average also evaluates the live parameters (logged beside
    # it): a second forward pass over the evaluation split on the server's core.
    average_eval_live: bool = True

    def shares_batch(self, n_workers: int) -> bool:
        """Do `n_workers` training workers share the batch (`split_batch` resolved)?"""
        if self.split_batch == "auto":
            return self.mode == "apply" and n_workers >= SHARE_BATCH_FROM
        return self.split_batch == "on"

    def pretrain_solo(self, n_workers: int, pretrain_epochs: float) -> float:
        """Epochs of each RBM one worker trains alone (`pretrain_solo_epochs` resolved)."""
        if self.pretrain_solo_epochs != "auto":
            return float(self.pretrain_solo_epochs)
        many = n_workers > WARM_START_ABOVE and self.shares_batch(n_workers)
        return pretrain_epochs if many else 0.0

    def staleness_rule(self, n_workers: int) -> str:
        """The server's staleness rule for `n_workers` workers (`staleness_lr` resolved)."""
        if self.staleness_lr == "auto":
            return "compensate" if self.shares_batch(n_workers) else "none"
        return self.staleness_lr

    def every(self, *, pretraining: bool) -> tuple[int, int]:
        """(n_fetch, n_push) of a pretraining or a fine-tuning phase."""
        if pretraining:
            return (self.pretrain_n_fetch or self.n_fetch, self.pretrain_n_push or self.n_push)
        return self.n_fetch, self.n_push


@dataclass
class RunConfig:
    seed: int = 0
    eval_every_epochs: float = 1.0  # fine-tune test evaluation period
    max_steps: int = 0  # 0: no limit; else stop each worker after this many steps (tests)
    log_every_s: float = 5.0
    # 0: off; else fine-tuning stops once an evaluation (validation split if any, else
    # test set) reaches it, and the model saved is the one that reached it.
    target_accuracy: float = 0.0
    # A mean worker loss above this (or not finite) is divergence: exit status 5.
    # Chance-level cross-entropy is 2.3 and reconstruction errors are <= 784.
    max_loss: float = 1000.0
    keep_best: bool = False  # save the best-evaluated model, not the last (needs [data] validation)
    checkpoint_every_s: float = 0.0  # 0: off; else rank 0 checkpoints this often (wall seconds)
    checkpoint_every_updates: int = 0  # 0: off; else rank 0 checkpoints every this many versions


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


UPDATE_RULES = ("sgd", "momentum", "adagrad")
PS_MODES = ("apply", "accumulate")
ACCUMULATE_MOMENTUM = ("matched", "local")
# `[ps] split_batch = "auto"` shares the batch from this many workers on: measured, whole
# batches reach 98% validation at K = 1 and 2 and never at K = 3 (two seeds: best 91.9%
# and 90.4% in 8 epochs) or K = 4 (docs/benchmarks.md, "Statistical efficiency vs workers").
SHARE_BATCH_FROM = 3
# `[ps] pretrain_solo_epochs = "auto"` pretrains on one worker above this many workers
# sharing the batch: measured, K = 16 pretrained well on the shared batch for both seeds
# run and K = 32 for one of two (a third RBM at 5x the loss, 98% validation never
# reached); with every RBM pretrained alone K = 32 reached 98% for both
# (docs/benchmarks.md, "The default rule").  K = 17..31 were not measured.
WARM_START_ABOVE = 16
# Keys that take "on"/"off" and, as TOML booleans, true/false (older configs).
_ON_OFF_KEYS = {("ps", "split_batch")}
# Number keys that also take the string "auto" (resolved per job).
_AUTO_NUMBER_KEYS = {("ps", "pretrain_solo_epochs")}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"[{section}] {key}"
    if (section, key) in _ON_OFF_KEYS and isinstance(value, bool):
        return "on" if value else "off"
    if (section, key) in _AUTO_NUMBER_KEYS:
        if value == "auto":
            return value
        default = 0.0  # otherwise a number
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return list(value)
    raise AssertionError(f"unhandled default type for {where}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (e.g. parsed TOML)."""
    cfg = Config()
    for section, values in raw.items():
        if not hasattr(cfg, section):
            known = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ConfigError(f"unknown config section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        target = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"unknown config key [{section}] {key} (known: {', '.join(sorted(names))})"
                )
            setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    m = cfg.model
    _check(len(m.sizes) >= 2, f"[model] sizes needs an input and >= 1 hidden layer, got {m.sizes}")
    _check(all(s >= 1 for s in m.sizes), f"[model] sizes must be positive, got {m.sizes}")
    _check(
        m.sizes[0] == 784, f"[model] sizes[0] must be 784 (28x28 MNIST pixels), got {m.sizes[0]}"
    )
    _check(m.classes == 10, f"[model] classes must be 10 for MNIST, got {m.classes}")
    _check(cfg.data.train_subset >= 0, "[data] train_subset must be >= 0")
    _check(cfg.data.test_subset >= 0, "[data] test_subset must be >= 0")
    _check(cfg.data.validation >= 0, "[data] validation must be >= 0 (0: no validation split)")
    _check(
        not cfg.run.keep_best or cfg.data.validation > 0,
        "[run] keep_best needs [data] validation > 0: the best model is chosen on held-out "
        "training images, never on the test set",
    )
    for name in ("pretrain", "finetune"):
        s = getattr(cfg, name)
        _check(s.epochs >= 0, f"[{name}] epochs must be >= 0, got {s.epochs}")
        _check(s.batch_size >= 1, f"[{name}] batch_size must be >= 1, got {s.batch_size}")
        _check(s.lr > 0, f"[{name}] lr must be > 0, got {s.lr}")
        for key in ("momentum_start", "momentum_final"):
            v = getattr(s, key)
            _check(0 <= v < 1, f"[{name}] {key} must be in [0, 1), got {v}")
        _check(s.momentum_switch_epoch >= 0, f"[{name}] momentum_switch_epoch must be >= 0")
        _check(s.weight_decay >= 0, f"[{name}] weight_decay must be >= 0, got {s.weight_decay}")
    _check(cfg.pretrain.cd_k >= 1, f"[pretrain] cd_k must be >= 1, got {cfg.pretrain.cd_k}")
    f = cfg.finetune
    _check(0 < f.lr_decay <= 1, f"[finetune] lr_decay must be in (0, 1], got {f.lr_decay}")
    _check(0 <= f.dropout < 1, f"[finetune] dropout must be in [0, 1), got {f.dropout}")
    _check(
        0 <= f.input_dropout < 1,
        f"[finetune] input_dropout must be in [0, 1), got {f.input_dropout}",
    )
    _check(f.warmup_epochs >= 0, f"[finetune] warmup_epochs must be >= 0, got {f.warmup_epochs}")
    _check(f.max_norm >= 0, f"[finetune] max_norm must be >= 0 (0: off), got {f.max_norm}")
    _check(
        0 <= f.shift_pixels < 28,
        f"[finetune] shift_pixels must be in [0, 28) (28 x 28 images), got {f.shift_pixels}",
    )
    _check(
        0 <= f.anneal_epochs <= f.epochs,
        f"[finetune] anneal_epochs must be in [0, epochs], got {f.anneal_epochs}",
    )
    p = cfg.ps
    _check(
        p.update_rule in UPDATE_RULES,
        f"[ps] update_rule must be one of {', '.join(UPDATE_RULES)}, got {p.update_rule!r}",
    )
    _check(p.mode in PS_MODES, f"[ps] mode must be one of {', '.join(PS_MODES)}, got {p.mode!r}")
    _check(
        p.accumulate_momentum in ACCUMULATE_MOMENTUM,
        f"[ps] accumulate_momentum must be one of {', '.join(ACCUMULATE_MOMENTUM)}, "
        f"got {p.accumulate_momentum!r}",
    )
    _check(p.n_fetch >= 1, f"[ps] n_fetch must be >= 1, got {p.n_fetch}")
    _check(p.n_push >= 1, f"[ps] n_push must be >= 1, got {p.n_push}")
    for key in ("pretrain_n_fetch", "pretrain_n_push"):
        _check(getattr(p, key) >= 0, f"[ps] {key} must be >= 0 (0: as n_fetch/n_push)")
    _check(p.staleness_bound >= 0, f"[ps] staleness_bound must be >= 0, got {p.staleness_bound}")
    for key in ("solo_epochs", "pretrain_solo_epochs"):
        value = getattr(p, key)
        _check(value == "auto" or value >= 0, f"[ps] {key} must be >= 0 (0: no warm start)")
    _check(
        p.staleness_lr in ("auto", "none", "inverse", "compensate"),
        f"[ps] staleness_lr must be one of auto, none, inverse, compensate, got {p.staleness_lr!r}",
    )
    _check(
        p.staleness_lr in ("auto", "none") or p.mode == "apply",
        f'[ps] staleness_lr = "{p.staleness_lr}" needs mode = "apply" (the server applies '
        "the pushes)",
    )
    _check(
        p.average in ("none", "ema", "polyak"),
        f"[ps] average must be one of none, ema, polyak, got {p.average!r}",
    )
    _check(0 < p.average_decay < 1, f"[ps] average_decay must be in (0, 1), got {p.average_decay}")
    _check(p.average_every >= 1, f"[ps] average_every must be >= 1, got {p.average_every}")
    _check(
        p.average_start_epoch >= 0,
        f"[ps] average_start_epoch must be >= 0, got {p.average_start_epoch}",
    )
    _check(
        p.split_batch in ("auto", "on", "off"),
        f"[ps] split_batch must be auto, on (true) or off (false), got {p.split_batch!r}",
    )
    _check(
        p.split_batch != "on" or p.mode == "apply",
        '[ps] split_batch needs mode = "apply" (the server weighs each push by its samples)',
    )
    _check(p.adagrad_eps > 0, f"[ps] adagrad_eps must be > 0, got {p.adagrad_eps}")
    _check(p.step_timeout_s > 0, f"[ps] step_timeout_s must be > 0, got {p.step_timeout_s}")
    _check(
        p.heartbeat_timeout_s > 0,
        f"[ps] heartbeat_timeout_s must be > 0, got {p.heartbeat_timeout_s}",
    )
    _check(p.exit_timeout_s > 0, f"[ps] exit_timeout_s must be > 0, got {p.exit_timeout_s}")
    _check(p.max_nonfinite_in_a_row >= 1, "[ps] max_nonfinite_in_a_row must be >= 1")
    _check(cfg.run.max_loss > 0, f"[run] max_loss must be > 0, got {cfg.run.max_loss}")
    # An evaluation is a forward pass over the split on rank 0: more than 100 per
    # epoch would make the server an evaluator that also trains.
    _check(
        cfg.run.eval_every_epochs >= 0.01,
        f"[run] eval_every_epochs must be >= 0.01, got {cfg.run.eval_every_epochs}",
    )
    _check(
        cfg.run.log_every_s >= 0.01, f"[run] log_every_s must be >= 0.01, got {cfg.run.log_every_s}"
    )
    _check(0 <= cfg.run.seed < 2**63, f"[run] seed must be in [0, 2**63), got {cfg.run.seed}")
    _check(cfg.run.max_steps >= 0, "[run] max_steps must be >= 0")
    _check(
        0 <= cfg.run.target_accuracy <= 1,
        f"[run] target_accuracy must be in [0, 1] (0: off), got {cfg.run.target_accuracy}",
    )
    _check(
        cfg.run.checkpoint_every_s >= 0,
        f"[run] checkpoint_every_s must be >= 0 (0: off), got {cfg.run.checkpoint_every_s}",
    )
    _check(
        cfg.run.checkpoint_every_updates >= 0,
        "[run] checkpoint_every_updates must be >= 0 (0: off), "
        f"got {cfg.run.checkpoint_every_updates}",
    )


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """{section: {key: value}} as TOML (tomli_w: the writer paired with tomllib)."""
    import tomli_w

    return tomli_w.dumps(sections)


def to_toml(cfg: Config) -> str:
    """The config as TOML that `load` reads back to an equal Config (resume writes it)."""
    return dump_toml(cfg.to_dict())


def load(path: str | Path | None) -> Config:
    """Read a TOML config; None gives the defaults (the full 784-500-500-2000-10 recipe)."""
    if path is None:
        return from_dict({})
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    return from_dict(raw)
