"""Single-process trainer: PreTrainDBN then FineTuneDBN with one `StepGradient`.

This is the reference the parameter server must reproduce: with one worker and
synchronous pushes it draws the same seeds (`init rng = default_rng(seed)`,
step rng of worker w = ``default_rng([seed, 1, w])``), applies the same update
rule to the same phase range with the same (lr, momentum) schedule, and so ends
with bit-identical parameters.

Per phase: reset the update rule, `begin_phase`, then steps until the phase
has seen ``epochs * n_train`` samples (fractional epochs allowed; the last step
may overshoot by less than one minibatch).  Each step::

    lo, hi = layout.phase_range(phase)
    lr, mom = hyper(cfg, phase, L, epoch)          # epoch = samples seen / n_train
    loss, n = sg.step(params, grad, epoch=epoch)
    rule.apply(params.flat[lo:hi], grad.flat[lo:hi], lr, mom, lo)
    if fine-tuning and [finetune] max_norm > 0:
        apply_max_norm(layout, params.flat[lo:hi], lo, phase, max_norm)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dbnps.common.config import Config
from dbnps.common.constraints import apply_max_norm
from dbnps.common.dbn import accuracy
from dbnps.common.errors import UserError
from dbnps.common.job import apply_subsets, initial_params, layout_of, step_rng
from dbnps.common.layout import Params
from dbnps.common.schedule import hyper, phase_samples
from dbnps.common.selection import Selection
from dbnps.common.steps import StepGradient
from dbnps.common.updaters import make_rule

EpochCallback = Callable[[dict[str, Any], Params], Any]


def train_local(
    cfg: Config,
    data: Any,
    *,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    on_epoch: EpochCallback | None = None,
    init: np.ndarray | None = None,
) -> tuple[Params, list[dict[str, Any]]]:
    """Pretrain every RBM, then fine-tune, in this process; returns (params, history).

    `data` has X_train, y_train, X_test, y_test (`dbnps.common.mnist.MNIST`).
    `history` holds one record per epoch (and one at each phase end): phase,
    epoch (float), loss (mean recon error or cross-entropy over the epoch),
    test_acc (fine-tuning, every [run] eval_every_epochs; else None), steps,
    elapsed_s (wall) and cpu_s (process CPU time, all threads).  `on_epoch(record, params)` is called after each record; a true
    return value stops training (e.g. a time-to-accuracy benchmark).
    [run] max_steps > 0 caps the total number of steps.
    `init` (a flat float32 vector of the layout) replaces the seeded initial
    parameters: with `[pretrain] epochs = 0` several fine-tuning variants start
    from one saved pretraining instead of repeating it.
    """
    layout = layout_of(cfg)
    L = layout.n_layers
    d = apply_subsets(cfg, data)
    X, y, X_test, y_test = d.X_train, d.y_train, d.X_test, d.y_test
    # Evaluations during training: the validation split if the config holds one out.
    split = "val" if len(d.y_val) else "test"
    X_eval, y_eval = (d.X_val, d.y_val) if split == "val" else (X_test, y_test)
    selection = Selection(keep_best=cfg.run.keep_best, target=cfg.run.target_accuracy)
    n_train = len(X)
    if init is None:
        params = layout.views(initial_params(cfg, layout, X))
    else:
        if init.shape != (layout.size,):
            raise UserError(
                f"initial parameters hold {init.size} floats, the layout {layout!r} needs "
                f"{layout.size}"
            )
        params = layout.views(np.array(init, dtype=np.float32))
    grad = layout.zeros()
    sg = StepGradient(layout, cfg, X, y, step_rng(cfg.run.seed, 0))
    rule = make_rule(cfg.ps.update_rule, layout.size, adagrad_eps=cfg.ps.adagrad_eps)
    history: list[dict[str, Any]] = []
    total_steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    use_tqdm_write = progress and log is print

    def emit(msg: str) -> None:
        if use_tqdm_write:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            log(msg)

    log_layout = (
        f"{layout!r}: {n_train} training / {len(d.y_val)} validation / {len(X_test)} test images"
    )
    emit(log_layout)
    stop = False
    for phase in range(L + 1):
        target = phase_samples(cfg, phase, L, n_train)
        if target <= 0 or stop:
            continue
        name = layout.phase_name(phase)
        rule.reset()
        t_phase = time.perf_counter()
        sg.begin_phase(phase, params)
        lo, hi = layout.phase_range(phase)
        p_sl, g_sl = params.flat[lo:hi], grad.flat[lo:hi]
        finetune = phase == L
        max_norm = cfg.finetune.max_norm if finetune else 0.0
        eval_every = cfg.run.eval_every_epochs
        bar = _bar(progress, target, name)
        done = 0
        loss_sum, loss_n = 0.0, 0
        while done < target:
            if cfg.run.max_steps and total_steps >= cfg.run.max_steps:
                stop = True
                break
            epoch = done / n_train
            lr, mom = hyper(cfg, phase, L, epoch)
            loss, n = sg.step(params, grad, epoch=epoch)
            rule.apply(p_sl, g_sl, lr, mom, lo)
            if max_norm:
                apply_max_norm(layout, p_sl, lo, phase, max_norm)
            if not math.isfinite(loss):
                raise UserError(
                    f"training diverged in {name} at epoch {epoch:.2f} (loss {loss}); "
                    f"lower the learning rate"
                )
            prev, done = done, done + n
            total_steps += 1
            loss_sum += loss * n
            loss_n += n
            if bar is not None:
                bar.update(n)
            crossed = int(done // n_train) > int(prev // n_train)
            if not (crossed or done >= target):
                continue
            ep = done / n_train
            acc = None
            if finetune and (
                done >= target or int(ep / eval_every) > int((prev / n_train) / eval_every)
            ):
                acc = accuracy(params, X_eval, y_eval)
                if selection.keep_best or selection.target > 0:
                    selection.offer(acc, total_steps, params.flat.copy())
            rec = {
                "phase": name,
                "phase_index": phase,
                "epoch": round(ep, 6),
                "loss": loss_sum / loss_n,
                f"{split}_acc": acc,
                "lr": lr,
                "momentum": mom,
                "steps": total_steps,
                "elapsed_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,  # all threads: robust to a busy machine
            }
            history.append(rec)
            what = "loss" if finetune else "recon"
            msg = f"[{name}] epoch {ep:6.2f}  {what} {rec['loss']:.5f}"
            if acc is not None:
                msg += f"  {split} acc {100 * acc:.2f}%"
            msg += f"  lr {lr:.4g} mom {mom:.2f}  {rec['elapsed_s']:.1f}s (cpu {rec['cpu_s']:.0f}s)"
            emit(msg)
            loss_sum, loss_n = 0.0, 0
            if on_epoch is not None and on_epoch(rec, params):
                stop = True
                break
            if finetune and selection.target_reached:
                emit(f"[{name}] target accuracy {selection.target} reached ({split} {acc:.4f})")
                stop = True
                break
        if bar is not None:
            bar.close()
        emit(f"[{name}] done: {done / n_train:.2f} epochs in {time.perf_counter() - t_phase:.1f}s")
        if stop:
            break
    choice = selection.choose(params.flat, total_steps)
    if choice.which != "last":
        emit(
            f"keeping the {choice.which} parameters (step {choice.version}, {split} acc "
            f"{100 * choice.accuracy:.2f}%)"
        )
        params.flat[...] = choice.params
    return params, history


def _bar(progress: bool, total: int, name: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="img", unit_scale=True, leave=False, file=sys.stderr)
