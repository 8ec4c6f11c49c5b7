"""Worker rank: a DBN replica running the Downpour loop on its shard of MNIST.

The talk's Algorithm 4, worker half::

    pull parameters                      (every n_fetch steps; MPI_Get)
    compute a gradient on the next minibatch of the shard  (CD-k or backprop)
    add it to the local accumulator
    push the accumulated gradient        (every n_push steps; MPI_Put + atomics)

The phase (pretrain layer l, fine-tune, done) is read from the server header
on every pull; at a phase change the worker pulls the whole vector (the lower
layers it will propagate through are final) and restarts its minibatch walk.

Warm start (`[ps] solo_epochs`, `pretrain_solo_epochs`; DistBelief's
"warmstarting"): until the phase has applied that many epochs of samples, the
lowest live worker trains alone on the whole training set and the others wait
(heartbeats only), then every worker trains on its shard.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from dbnps.common import rma
from dbnps.common.config import Config
from dbnps.common.job import step_rng
from dbnps.common.layout import Layout
from dbnps.common.membership import live_shard, solo_worker
from dbnps.common.protocol import MEMBERS, PHASE, SAMPLES, STATE_DONE, STATE_RUNNING, STOP
from dbnps.common.schedule import fractional_step, hyper, phase_samples, solo_samples
from dbnps.common.updaters import make_rule
from dbnps.common.wakeup import tighten_timer_slack
from dbnps.worker.cadence import Cadence


@dataclass
class Faults:
    """Test hooks that make a worker misbehave on purpose (real processes, real windows)."""

    synthetic_grad: float | None = None  # push grad = value * (worker + 1) instead of DBN math
    nan_worker: int = -1  # this worker pushes NaN in every `nan_every`-th push
    nan_every: int = 1
    sleep_worker: int = -1  # this worker sleeps `sleep_s` per step (a laggard)
    sleep_s: float = 0.0
    step_s: float = 0.0  # every worker sleeps this per step: compute emulated off-CPU (benchmarks)
    die_worker: int = -1  # this worker SIGKILLs itself after `die_after` steps (or pulls/pushes)
    die_after: int = 0
    # where it dies: "step" (between steps), "pull" / "push" (inside that RMA exchange),
    # "startup" (windows made, before the first heartbeat), "finalize" (inside the exit)
    die_in: str = "step"
    slow_phase_s: float = 0.0  # every phase's local set-up takes this much longer
    finalize_delay_worker: int = -1  # this worker enters the end-of-job collective late
    finalize_delay_s: float = 0.0


@dataclass
class Counts:
    """What this worker has done, for its stats row on the server."""

    steps: int = 0
    samples: int = 0
    pushes: int = 0
    pulls: int = 0
    loss: float = float("nan")
    rate: float = 0.0  # samples/s, over the last >= 0.5 s
    _t: float = field(default_factory=time.monotonic)
    _s: int = 0

    def tick_rate(self) -> None:
        now = time.monotonic()
        if now - self._t > 0.5:
            self.rate = (self.samples - self._s) / (now - self._t)
            self._t, self._s = now, self.samples

    def fields(self, rate: float | None = None) -> dict[str, float]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "loss": self.loss,
            "rate": self.rate if rate is None else rate,
            "pushes": self.pushes,
            "pulls": self.pulls,
        }


class Profile:
    """Seconds per part of the Downpour step, per phase (printed when DBNPS_PROFILE=1)."""

    PARTS = ("step", "push", "wait", "pull")

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}

    def phase(self, name: str) -> dict[str, float]:
        return self.phases.setdefault(name, dict.fromkeys((*self.PARTS, "steps"), 0.0))

    def print(self, who: str) -> None:
        for name, p in self.phases.items():
            n = max(p["steps"], 1)
            parts = "  ".join(f"{k} {1e3 * p[k] / n:.2f}" for k in self.PARTS)
            total = sum(p[k] for k in self.PARTS)
            print(f"{who} {name} ms/step: {parts}  ({n:.0f} steps, {total:.1f}s)", flush=True)


class Worker:
    def __init__(
        self,
        cfg: Config,
        topo: rma.Topology,
        layout: Layout,
        X: np.ndarray,
        y: np.ndarray,
        *,
        faults: Faults | None = None,
    ):
        """`X`, `y`: the whole training set; this worker trains on its shard of the live workers."""
        self.cfg, self.topo, self.layout = cfg, topo, layout
        self.X_all, self.y_all = X, y
        # Synthetic pushers carry no images; the schedule still counts the configured set.
        self.n_train = len(y) if len(y) else (cfg.data.train_subset or 60000)
        self.me = topo.worker_index
        self.members = 0
        self.live = topo.n_workers  # workers training now (our shard is 1 of them)
        self._announce = self.me == 0  # log the matched accumulate rule at the next push
        self._steps = 0
        self.faults = faults or Faults()
        accumulate = cfg.ps.mode == "accumulate"  # we run the update rule ourselves
        self.win = rma.Windows(topo, layout.size, slots=not accumulate)
        self.client = rma.PSClient(self.win, timeout_s=cfg.ps.step_timeout_s)
        self._arm_kill_hooks()
        self.params = layout.zeros()
        self.grad = layout.zeros()
        sums_steps = cfg.ps.n_push > 1 or cfg.ps.pretrain_n_push > 1
        self.acc = layout.zeros().flat if sums_steps else None  # Cadence's sum buffer
        self.rule = (  # accumulate mode only
            make_rule(cfg.ps.update_rule, layout.size, adagrad_eps=cfg.ps.adagrad_eps)
            if accumulate
            else None
        )
        self.rng = step_rng(cfg.run.seed, self.me)  # the single process is worker 0
        self.sampler = None
        self._solo = None  # (phase, StepGradient over the whole set) while we train alone
        if self.faults.synthetic_grad is None:
            self._reshard(set())
        topo.comm.Barrier()  # the server has initialised its parameters
        self.client.report(state=STATE_RUNNING)  # first heartbeat

    def _arm_kill_hooks(self) -> None:
        """Test hooks: SIGKILL this worker at a chosen point of the protocol."""
        f = self.faults
        if f.die_worker != self.me or f.die_in == "step":
            return
        if f.die_in == "startup":
            _die()
        calls = [0]

        def maybe_die() -> None:
            calls[0] += 1
            if calls[0] > f.die_after:
                _die()

        if f.die_in in ("pull", "push"):
            setattr(self.client, f"in_{f.die_in}", maybe_die)

    def _reshard(self, dead: set[int]) -> bool:
        """Train on shard `position` of the live workers; False if we are the dead one."""
        from dbnps.common.mnist import shard
        from dbnps.common.steps import StepGradient

        part = live_shard(self.me, dead, self.topo.n_workers)
        if part is None:
            return False
        if part[1] != self.live:  # a death: the first live worker says its rule again
            self._announce = part[0] == 0
        self.live = part[1]
        if self.faults.synthetic_grad is None:
            X, y = shard(self.X_all, self.y_all, *part)
            self.sampler = StepGradient(self.layout, self.cfg, X, y, self.rng)
            if self.cfg.ps.shares_batch(self.topo.n_workers):  # the live workers share the batch
                self.sampler.split = part[1]
        return True

    def _step(self, phase: int, epoch: float, sampler) -> tuple[float, int]:
        f = self.faults
        if f.sleep_worker == self.me and f.sleep_s:
            time.sleep(f.sleep_s)
        if f.step_s:
            time.sleep(f.step_s)
        if f.die_worker == self.me and f.die_in == "step" and self._steps >= f.die_after:
            _die()
        self._steps += 1
        if sampler is not None:
            return sampler.step(self.params, self.grad, epoch=epoch)
        lo, hi = self.layout.phase_range(phase)
        self.grad.flat[lo:hi] = np.float32(f.synthetic_grad * (self.me + 1))
        return 0.0, self.cfg.finetune.batch_size

    def _watchdog(self) -> None:
        """Leave if the loop stops moving: an MPI call can block forever on a dead server.

        (An operation on a dead target's window, across hosts, may never complete;
        MPI has no timeout for it.)  Local work — a phase's set-up that propagates
        the shard through the lower layers, a step — is not waiting on the
        server: the clock restarts when it ends (`_local`).
        """
        limit = self.cfg.ps.step_timeout_s
        while not self._finished:
            time.sleep(min(0.5, limit / 4))
            idle = time.monotonic() - self._progress
            if idle > limit and not self._finished and not self._local:
                print(
                    f"error: worker {self.me}: no progress for {idle:.0f}s; "
                    f"the parameter server is gone or stuck",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)

    def _local_begin_phase(self, phase: int, sampler=None) -> None:
        """The sampler's phase set-up: local work the watchdog must not count as waiting."""
        self._local = True
        try:
            time.sleep(self.faults.slow_phase_s)
            (sampler or self.sampler).begin_phase(phase, self.params)
        finally:
            self._local = False
            self._progress = time.monotonic()

    def _solo_sampler(self, phase: int):
        """The whole training set's sampler for our warm start in `phase` (None: synthetic)."""
        if self.sampler is None:
            return None
        if self._solo is None or self._solo[0] != phase:
            from dbnps.common.steps import StepGradient

            self._solo = None  # free the last phase's propagated data first
            sg = StepGradient(self.layout, self.cfg, self.X_all, self.y_all, self.rng)
            self._local_begin_phase(phase, sg)
            self._solo = (phase, sg)
        return self._solo[1]

    def _wait_solo(self, phase: int, until: int, lo: int, hi: int, counts) -> rma.PullInfo:
        """Another worker trains alone: wait (heartbeats only) until the phase has
        `until` samples, changes, stops, or the membership changes; then pull."""
        client = self.client
        beat = 0.0
        while True:
            hdr = client.header(0)
            if (
                hdr[PHASE] != phase
                or hdr[SAMPLES] >= until
                or hdr[STOP]
                or hdr[MEMBERS] != self.members
            ):
                break
            now = time.monotonic()
            self._progress = now  # waiting on purpose, not stuck
            if now - beat > 1.0:
                client.report(**counts.fields(rate=0.0), state=STATE_RUNNING)
                beat = now
            time.sleep(0.1)
        counts.pulls += 1
        return client.pull(self.params.flat, lo, hi)

    def run(self) -> None:
        self._finished = self._local = False
        self._progress = time.monotonic()
        threading.Thread(target=self._watchdog, daemon=True, name="watchdog").start()
        try:
            self._run()
        finally:
            self._finished = True

    def _run(self) -> None:
        """The Downpour loop: step, push when due, pull when due, follow the server's phase."""
        layout, client = self.layout, self.client
        tighten_timer_slack()  # the ack wait's 50 us polls are 50 us, not 100
        counts = Counts()
        profile = Profile()
        info = client.pull(self.params.flat, 0, layout.size)
        phase, cadence, prof, solo_n = -1, Cadence(1, 1), {}, 0  # set at the first phase
        while True:
            if info.members != self.members and not self._follow_membership(info, phase):
                break  # we were presumed dead (silent too long): our shard is taken
            if info.phase != phase:
                info = self._enter_phase(info, phase, counts)
                if info is None:
                    break  # done
                phase = info.phase
                cadence = Cadence(*self.cfg.ps.every(pretraining=phase < layout.n_layers), self.acc)
                prof = profile.phase(layout.phase_name(phase))
                solo_n = solo_samples(
                    self.cfg, phase, layout.n_layers, self.n_train, self.topo.n_workers
                )
            lo, hi = layout.phase_range(phase)
            sampler = self.sampler
            if info.samples < solo_n and self.topo.n_workers > 1:  # warm start: one trains alone
                if self.me != solo_worker(self.topo.n_workers, info.dead):
                    info = self._wait_solo(phase, solo_n, lo, hi, counts)
                    continue
                sampler = self._solo_sampler(phase)
            elif self._solo is not None:
                self._solo = None  # the warm start is over: our shard from here on
            self._progress = time.monotonic()
            t0 = time.perf_counter()
            counts.loss, n = self._step(phase, info.samples / max(self.n_train, 1), sampler)
            prof["step"] += time.perf_counter() - t0
            prof["steps"] += 1
            counts.steps += 1
            counts.samples += n
            out = cadence.step(self.grad.flat, lo, hi, n)  # due: the gradient (sum) to push
            if out is not None:
                self._send(out, lo, hi, cadence.samples, phase, info.samples, counts, prof)
            if self.cfg.run.max_steps and counts.steps >= self.cfg.run.max_steps:
                break
            info = self._refresh(info, cadence.pull_due, phase, lo, hi, counts, prof)
        client.wait()  # our last push has been taken (applied or rejected) before we leave
        if os.environ.get("DBNPS_PROFILE"):
            profile.print(f"[worker {self.me}]")
        client.report(**counts.fields(rate=0.0), state=STATE_DONE)

    def _follow_membership(self, info: rma.PullInfo, phase: int) -> bool:
        """The server marked a worker dead: take our part of its shard (False: we are out)."""
        self.members = info.members
        if not self._reshard(info.dead):
            return False
        if self.sampler is not None and phase == info.phase:
            self._local_begin_phase(phase)
        return True

    def _enter_phase(self, info: rma.PullInfo, old: int, counts: Counts) -> rma.PullInfo | None:
        """The server moved to phase `info.phase`: the whole vector (the lower layers are
        final now), this phase's local set-up, a fresh update rule; None once it is done."""
        layout, client = self.layout, self.client
        if info.phase >= layout.done_phase:
            return None
        if old != -1:
            info = client.pull(self.params.flat, 0, layout.size)
            counts.pulls += 1
            if info.phase >= layout.done_phase:
                return None
        client.report(state=STATE_RUNNING)  # begin_phase can take a while
        if self.sampler is not None:
            self._local_begin_phase(info.phase)
        if self.rule is not None:
            self.rule.reset()  # as the server's rule does at a phase change
        return info

    def _send(self, out, lo: int, hi: int, n: int, phase: int, at: int, counts, prof) -> None:
        """Push the due gradient (accumulate mode: add our update rule's increment)."""
        client = self.client
        f = self.faults
        if f.nan_worker == self.me and (counts.pushes + 1) % f.nan_every == 0:
            out[lo] = np.float32("nan")
        t0 = time.perf_counter()
        if self.rule is not None:
            self._accumulate(out, lo, hi, n, phase, at)
        else:
            client.push(out, lo, hi, n_samples=n, phase=phase)
        prof["push"] += time.perf_counter() - t0
        counts.pushes += 1
        if self.cfg.ps.sync:
            client.wait()
        counts.tick_rate()
        client.report(**counts.fields(), state=STATE_RUNNING)

    def _refresh(self, info, pull_due: bool, phase: int, lo: int, hi: int, counts, prof):
        """Pull this phase's range when due; otherwise only look at the phase word."""
        client = self.client
        if pull_due:
            # Read your own writes: a pull that races our in-flight push would
            # hand us parameters without our last update (staleness >= 1 even
            # alone, which momentum turns into oscillation).  The wait is one
            # server check + apply (~1.3 ms for the full model) against a
            # ~12 ms step.
            t0 = time.perf_counter()
            if self.rule is None:  # accumulate mode: our update is in when push returns
                client.wait()
            t1 = time.perf_counter()
            info = client.pull(self.params.flat, lo, hi)
            prof["wait"] += t1 - t0
            prof["pull"] += time.perf_counter() - t1
            counts.pulls += 1
        elif int(client.header(0)[PHASE]) != phase:
            info = client.pull(self.params.flat, 0, self.layout.size)
            counts.pulls += 1
        return info

    def _accumulate(self, grad, lo: int, hi: int, n: int, phase: int, samples: int) -> None:
        """`[ps] mode = "accumulate"`: run the update rule here, add its increment on the server.

        lr and momentum follow the schedule at the epoch of the last pull, as
        the server's would at apply time, matched to the live workers
        (`[ps] accumulate_momentum`).  `grad` is scratch afterwards.
        """
        L = self.layout.n_layers
        lr, mom = hyper(self.cfg, phase, L, samples / max(self.n_train, 1))
        ps = self.cfg.ps
        if ps.update_rule == "momentum" and ps.accumulate_momentum == "matched":
            k = 1 if self._solo is not None else self.live  # a warm start trains alone
            lr, mom = fractional_step(lr, mom, k)
            if self._announce and k > 1:
                self._announce = False
                print(
                    f"[worker {self.me}] accumulate mode, {k} workers: each runs momentum "
                    f"mu^{k} at lr (1 - mu^{k}) / (1 - mu), as the server's one velocity "
                    f"(now {mom:.4g} at lr {lr:.4g})",
                    flush=True,
                )
        delta = self.rule.delta(grad[lo:hi], lr, mom, lo)
        self.client.accumulate(
            delta,
            lo,
            hi,
            n_samples=n,
            phase=phase,
            phase_samples=phase_samples(self.cfg, phase, L, self.n_train),
            staleness_bound=self.cfg.ps.staleness_bound,
        )

    def finish(self) -> None:
        """Collective exit matching the servers' `finish` (survives a dead rank under ULFM)."""
        rma.finalize(
            self.topo,
            self.win,
            timeout_s=self.cfg.ps.exit_timeout_s,
            delay_s=self.faults.finalize_delay_s
            if self.faults.finalize_delay_worker == self.me
            else 0,
            inside=_die
            if self.faults.die_worker == self.me and self.faults.die_in == "finalize"
            else None,
        )
        rma.finalize_mpi(f"rank {self.topo.rank}", timeout_s=self.cfg.ps.exit_timeout_s)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
