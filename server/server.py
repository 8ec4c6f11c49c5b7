"""Parameter-server rank: owns a shard of the flat parameter vector and applies pushes.

The talk's Algorithm 4, server half, as a short composition: the transport
(`dbnps.common.rma.PSServer`) hands the loop the pending pushes (`poll`), the
request handle (`dbnps.server.handle`, default `Aggregate`: validate, sum,
apply with the update rule) decides and applies them, the transport acks
them (`ack`).  One pass of the rule per batch of pending pushes, so ingest
stays cheap as the number of workers grows.  The phase schedule
(`dbnps.common.schedule.PhaseSchedule`) and membership
(`dbnps.common.membership`) are plain objects too; this module wires them to
the windows.  Rank 0 also decides the phase schedule
(pretrain layer 1..L -> fine-tune -> done) from samples applied, evaluates
test accuracy, and writes the model and a run summary at the end.

In `[ps] mode = "accumulate"` the workers apply their own increments
(`rma.PSClient.accumulate`); `count` then only records their outcomes, and
the phase schedule follows the SAMPLES word they advance.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dbnps.common import protocol as pr
from dbnps.common import rma
from dbnps.common.averaging import ParamAverage
from dbnps.common.config import Config
from dbnps.common.layout import Layout
from dbnps.common.schedule import PhaseSchedule, batch_size, hyper
from dbnps.common.selection import Selection
from dbnps.common.updaters import make_rule
from dbnps.common.wakeup import Wakeup, tighten_timer_slack
from dbnps.server.handle import Aggregate, RequestHandle, Shard
from dbnps.server.state import ServerState

MAX_HISTORY = 5000  # entries kept in the status/summary history (the oldest go first)
# The loop's bookkeeping (evaluation schedule, target stop, log, control-plane
# requests, checkpoints, membership) runs at most this often: every look at the
# mailboxes is a wake-up (~12-20 us of CPU here), and bookkeeping on each of them
# cost as much again.  Phase ends are decided in serve(), not here.
TICK_S = 5e-3
# When the ranks span nodes, the loop's longest sleep: Open MPI's one-sided path
# over TCP moves a worker's Get/Put/atomics only while the target is in an MPI
# call (common/wakeup.py), so every look is as close as inside a due window.
PROGRESS_S = 5e-5


class ParameterServer:
    def __init__(
        self,
        cfg: Config,
        topo: rma.Topology,
        layout: Layout,
        init_flat: np.ndarray,
        n_train: int,
        *,
        evaluate=None,
        evaluate_test=None,
        eval_split: str = "test",
        log=print,
        on_tick=None,
        resume: tuple[np.ndarray, dict, dict] | None = None,
        handle: RequestHandle | None = None,
    ):
        """`resume`: a verified checkpoint (params, rule state, meta) to continue from.

        `handle`: the request handle deciding on each batch of pushes (default
        `Aggregate` over the configured update rule; apply mode only)."""
        self.cfg = cfg
        self.topo = topo
        self.layout = layout
        self.log = log if topo.rank == 0 else (lambda *a, **k: None)
        # rank 0 only: callable(flat) -> accuracy on the evaluation split (validation if
        # the config holds one out, else test) and on the test set (the saved model's report)
        self.evaluate = evaluate
        self.evaluate_test = evaluate_test or evaluate
        self.selection = Selection(keep_best=cfg.run.keep_best, target=cfg.run.target_accuracy)
        self.on_tick = on_tick  # called from the main loop (control-plane requests)
        self.accumulate = cfg.ps.mode == "accumulate"  # workers add their own increments
        self.win = rma.Windows(topo, layout.size, slots=not self.accumulate)
        self.ps = rma.PSServer(self.win)
        self.ps.on_stuck = lambda _holder: self.refresh_workers()  # may mark the holder dead
        self.lo, self.hi = self.ps.lo, self.ps.hi
        names = [layout.phase_name(p) for p in range(layout.done_phase + 1)]
        self.state = ServerState(
            topo.n_workers,
            topo.n_servers,
            names,
            n_train=n_train,
            eval_split=eval_split,
            words=self.ps.header,  # version, phase, samples: the window's words, one copy
            heartbeat_timeout_s=cfg.ps.heartbeat_timeout_s,
        )
        self.schedule = PhaseSchedule(cfg, layout.n_layers, n_train)
        self.rule = make_rule(cfg.ps.update_rule, self.hi - self.lo, adagrad_eps=cfg.ps.adagrad_eps)
        # [ps] split_batch / staleness_lr as they resolve for this many workers ("auto")
        shared = cfg.ps.shares_batch(topo.n_workers)
        staleness_rule = cfg.ps.staleness_rule(topo.n_workers)
        self.handle = handle or Aggregate(
            self.rule,
            staleness_bound=cfg.ps.staleness_bound,
            staleness_lr=staleness_rule,
            split_batch=shared,
            constrain=self._max_norm if cfg.finetune.max_norm > 0 else None,
        )
        # [ps] average: a running average of the fine-tuning parameters (one server rank,
        # apply mode: checked when the job is prepared)
        self.average = None
        if cfg.ps.average != "none":
            self.average = ParamAverage(
                self.hi - self.lo,
                cfg.ps.average,
                decay=cfg.ps.average_decay,
                every=cfg.ps.average_every,
            )
        # S > 1: each shard's rule state lives in a window rank 0 reads for checkpoints
        self.shard_states = None
        if topo.n_servers > 1:
            self.shard_states = rma.ShardStates(topo, self.win.bounds, list(self.rule.state()))
            self.shard_states.bind(self.rule)
        self._flat = np.empty(layout.size, dtype=np.float32)  # rank 0 snapshot for eval
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="eval") if topo.rank == 0 else None
        self._eval: Future | None = None
        self._eval_of = None  # (history entry, version, snapshot) of the pending evaluation
        self._next_eval = cfg.run.eval_every_epochs
        self._live_acc = float("nan")  # with [ps] average: the live parameters' last accuracy
        self._last_log = time.time()
        self._last_refresh = 0.0
        self.wakeup: Wakeup | None = None  # the loop's push forecast (run() makes it)
        self.checkpointer = None  # rank 0: a checkpoint.periodic.Periodic, set by __main__
        self.progress_every_s = 0.0  # rank 0, > 0: print `[progress] {json}` lines for psctl
        self._last_progress = 0.0
        first, version, samples = self.schedule.first_from(0), 0, 0
        if resume is not None:
            init_flat, first, version, samples = self._restore(*resume)
        self.ps.begin_write()
        self.ps.params[:] = init_flat[self.lo : self.hi]
        self.ps.header[pr.PHASE] = first  # the other words are zero (Windows.zero)
        self.ps.header[pr.VERSION] = version
        self.ps.header[pr.SAMPLES] = samples
        self.ps.end_write()
        self.state.phase_samples = self.schedule.samples(first)
        self._shard_state_restored(resume)
        topo.comm.Barrier()  # parameters and phase are set before any worker pulls
        where = (
            "one node" if topo.one_node else f"several nodes (polls every {PROGRESS_S * 1e3:g} ms)"
        )
        self.log(
            f"[server] {layout!r}, {topo.n_workers} workers, {topo.n_servers} server(s), {where}"
        )
        if cfg.ps.mode == "apply" and topo.n_workers > 1:
            batch = "shared by the workers" if shared else "whole"
            said = f"batches {batch}, staleness rule {staleness_rule}"
            solo = cfg.ps.pretrain_solo(topo.n_workers, cfg.pretrain.epochs)
            if solo > 0:
                said += f"; one worker pretrains the first {solo:g} epochs of each RBM alone"
            self.log(f"[server] {said}")
        self.log(f"[server] phase {layout.phase_name(first)} starts")

    def _restore(self, params: np.ndarray, rule_state: dict, meta: dict):
        """Continue from a checkpoint: (params, phase, version, samples in phase).

        The checkpoint was validated when loaded (dbnps.server.checkpoint.format).  Its
        update-rule state covers the flat vector (format 2): this rank takes its
        shard, whatever the number of server ranks was.  Format 1 held rank 0's
        shard only (`rule_shard`); it is loaded where it fits.
        """
        if params.shape != (self.layout.size,) or params.dtype != np.float32:
            raise ValueError(
                f"checkpoint holds {params.dtype}{list(params.shape)} parameters, the layout "
                f"needs float32[{self.layout.size}]"
            )
        phase = self.schedule.first_from(int(meta["phase"]))
        same_phase = phase == int(meta["phase"])
        samples = int(meta["samples_in_phase"]) if same_phase else 0
        version = int(meta["version"])
        bounds = [tuple(b) for b in meta.get("shard_bounds", [])]
        versions = meta.get("shard_versions")
        if versions and bounds == [tuple(b) for b in self.win.bounds]:
            version = int(versions[self.topo.rank])  # each shard exactly where it was
        same_rule = meta.get("update_rule") == self.rule.name
        if meta.get("rule_state") == "server" and same_rule and rule_state:
            if same_phase:
                self.rule.load_state({k: v[self.lo : self.hi] for k, v in rule_state.items()})
        elif (
            same_phase
            and same_rule
            and list(meta.get("rule_shard", [])) == [self.lo, self.hi]
            and rule_state
        ):
            self.rule.load_state(rule_state)
        elif same_phase and self.accumulate and self.rule.state():
            self.log(
                "[server] accumulate mode: the workers' update-rule state is not in "
                "checkpoints; it restarts at zero, as at a phase change"
            )
        elif same_phase and self.rule.state():
            why = "other rule" if not same_rule else "not in the checkpoint"
            self.log(f"[server] update-rule state not restored ({why}): it restarts at zero")
        if same_phase:
            self._next_eval = float(meta.get("next_eval", self._next_eval))
        saved_avg = meta.get("average_params")  # attached by checkpoint.format.load_checkpoint
        if self.average is not None and same_phase and saved_avg is not None:
            if meta["average"]["kind"] == self.average.kind:
                self.average.load_state(saved_avg[self.lo : self.hi], meta["average"])
            else:
                self.log("[server] parameter average of another kind: it restarts")
        self.state.eval_accuracy = float(meta.get("eval_accuracy", float("nan")))
        self.state.test_accuracy = float(meta.get("test_accuracy", float("nan")))
        return params, phase, version, samples

    # -- phase schedule (rank 0 decides; followers copy) --------------------
    def _set_phase(self, phase: int) -> None:
        st = self.state
        self.ps.begin_write()
        self.ps.header[pr.PHASE] = phase
        self.ps.header[pr.SAMPLES] = 0
        self.ps.end_write()
        st.phase_samples = self.schedule.samples(phase)
        self._shard_write_begin()
        self.rule.reset()
        self._shard_write_end(st.version)
        if self.average is not None and phase == self.layout.finetune_phase:
            self.average.reset()
        self._next_eval = self.cfg.run.eval_every_epochs
        self.log(f"[server] phase {self.layout.phase_name(phase)} starts at version {st.version}")
        self._print_progress()

    def _end_phase(self) -> None:
        st = self.state
        if st.phase == self.layout.finetune_phase or st.phase < self.layout.n_layers:
            self._record(final_of_phase=True)
        self._set_phase(self.schedule.after(st.phase))

    def _follow_rank0(self) -> bool:
        """Copy rank 0's phase; True when rank 0 says every worker has left."""
        hdr = self.ps.remote_header(0)
        if int(hdr[pr.PHASE]) != self.state.phase:
            self._set_phase(int(hdr[pr.PHASE]))
        return int(hdr[pr.STOP]) == pr.STOP_ALL

    def request_stop(self) -> None:
        """Rank 0, main thread: publish phase `done` + STOP; workers leave at their next pull."""
        st = self.state
        st.stopped_in = st.phase_name
        self.ps.begin_write()
        self.ps.header[pr.PHASE] = self.layout.done_phase
        self.ps.header[pr.STOP] = pr.STOP_WORKERS
        self.ps.end_write()
        st.stopped = True
        self.log(f"[server] stop requested at version {st.version}")

    # -- the request handle's call ---------------------------------------------
    @contextlib.contextmanager
    def _writing(self):
        """The bracket around a change of the shard: seqlock (and ShardStates) odd, then even."""
        self._shard_write_begin()
        self.ps.begin_write()
        try:
            yield
        finally:
            self.ps.end_write()
            self._shard_write_end(self.state.version)

    def _shard_now(self) -> Shard:
        """This rank's shard as the request handle sees it: the phase's range, lr, momentum."""
        st = self.state
        plo, phi = self.layout.phase_range(st.phase)
        a, b = max(plo, self.lo) - self.lo, min(phi, self.hi) - self.lo
        lr, mom = hyper(self.cfg, st.phase, self.layout.n_layers, st.epoch)
        return Shard(
            params=self.ps.params,
            header=self.ps.header,
            phase_range=(a, b) if b > a else (0, 0),
            open=st.phase < self.layout.done_phase,
            lr=lr,
            momentum=mom,
            write=self._writing,
            batch=batch_size(self.cfg, st.phase, self.layout.n_layers),
        )

    def _max_norm(self, shard: Shard) -> None:
        """`[finetune] max_norm`: each unit's incoming weights to norm <= c after an update."""
        from dbnps.common.constraints import apply_max_norm

        if shard.phase == self.layout.finetune_phase:
            apply_max_norm(
                self.layout, shard.params, self.lo, shard.phase, self.cfg.finetune.max_norm
            )

    def serve(self, pushes: list[pr.Push]) -> None:
        """One batch: the request handle decides and applies, the books follow, every push is acked."""
        st = self.state
        if self.topo.rank != 0 and any(p.phase != st.phase for p in pushes):
            self._follow_rank0()
        t0 = time.perf_counter()
        averaging = self._averaging()  # before the handle: its last push may end the phase
        out = self.handle(pushes, self._shard_now())
        if out.applied:
            st.apply_seconds += time.perf_counter() - t0
            st.last_apply = time.time()
            st.first_apply = st.first_apply or st.last_apply
            st.applied_total += out.applied
            a, b = self._shard_now().phase_range
            st.bytes_in += 4 * (b - a) * out.applied
            for tau in out.staleness:
                st.record_staleness(tau)
            if self.topo.rank == 0 and self.schedule.over(st.phase, st.samples_in_phase):
                # Before the acks: a synchronous worker's next pull must see the new phase.
                self._end_phase()
        self._ack_all(pushes, out.results)
        if averaging and out.applied:  # after the acks: the workers do not wait for it
            self.average.observe(self.ps.params, out.applied)

    def _averaging(self) -> bool:
        """The next applied updates go into the parameter average ([ps] average_*)."""
        st = self.state
        return (
            self.average is not None
            and st.phase == self.layout.finetune_phase
            and st.epoch >= self.cfg.ps.average_start_epoch
        )

    def _eval_params(self, live: np.ndarray) -> np.ndarray:
        """What evaluations and the saved model use: the average once it holds a sample."""
        if self.average is not None and self.average.ready:
            return self.average.avg.copy()  # S = 1: the shard is the whole vector
        return live

    def _average_summary(self, live: np.ndarray | None) -> dict:
        """The average's counters, and the last live parameters' accuracy beside it."""
        _, counts = self.average.state()
        live_acc = float(self.evaluate(live)) if live is not None else None
        if live_acc is not None:
            self.log(
                f"[server] parameter average ({self.average.kind}, {counts['count']} samples); "
                f"the last live parameters: {self.state.eval_split} accuracy {live_acc:.4f}"
            )
        return {
            **counts,
            "decay": self.average.decay,
            "every": self.average.every,
            "start_epoch": self.cfg.ps.average_start_epoch,
            "live_eval_accuracy": live_acc,  # on the evaluation split
        }

    def _evaluate(self, params: np.ndarray, live: np.ndarray | None):
        """(accuracy of `params`, accuracy of the live parameters when they differ)."""
        acc = float(self._timed_evaluate(params))
        return acc, (float(self._timed_evaluate(live)) if live is not None else None)

    def _ack_all(self, pushes: list[pr.Push], results: dict[int, int]) -> None:
        st = self.state
        for p in pushes:
            res = results[p.worker]
            self.ps.ack(p, res)
            if res == pr.APPLIED:
                st.worker_applied[p.worker] += 1
                st.nonfinite_in_a_row = 0
            else:
                if res == pr.REJECTED_NONFINITE:
                    st.nonfinite_in_a_row += 1
                st.worker_rejected[p.worker] += 1
                name = pr.RESULT_NAMES[res]
                st.rejected[name] = st.rejected.get(name, 0) + 1
        if self.topo.rank == 0 and st.nonfinite_in_a_row >= self.cfg.ps.max_nonfinite_in_a_row:
            self._check_divergence()  # at the push that reached the limit, not a tick later

    # -- accumulate mode: workers applied their own increments --------------
    def _follow_header(self) -> None:
        """Rank 0: take VERSION and SAMPLES from the header the workers advance; end the phase."""
        st = self.state
        self.ps.see_remote_writes()
        if self.schedule.over(st.phase, st.samples_in_phase):
            self._end_phase()

    def count(self, pushes: list[pr.Push]) -> None:
        """Record what the workers did under the lock (staleness, results); ack every one.

        The phase is settled first, so a synchronous worker's next pull sees it.
        """
        st = self.state
        averaging = self._averaging()  # before the header: it may end the phase
        self._follow_header()
        applied = 0
        for p in pushes:
            if p.result == pr.APPLIED:
                applied += 1
                st.record_staleness(max(p.lo - p.pulled_version, 0))  # lo: version added to
                st.applied_total += 1
                plo, phi = self.layout.phase_range(p.phase)  # st.phase may have moved on
                st.bytes_in += 4 * (phi - plo)
                st.last_apply = time.time()
                st.first_apply = st.first_apply or st.last_apply
        self._ack_all(pushes, {p.worker: p.result for p in pushes})
        if averaging and applied:  # the window as the workers' accumulates left it
            self.average.observe(self.ps.params, applied)

    # -- evaluation and logging (rank 0) -----------------------------------
    def _record(
        self, *, evaluate: bool = True, final_of_phase: bool = False, wait: bool = False
    ) -> None:
        """Append a history entry and log it; in fine-tuning, start a test evaluation.

        `evaluate=False` (the periodic log line) only reports: evaluations run on
        the `eval_every_epochs` schedule and at phase ends, as in the local trainer,
        since each one costs rank 0 a forward pass over the test set.
        """
        st = self.state
        self.refresh_workers()
        entry = {
            "t": round(time.time() - st.start_time, 3),
            "phase": st.phase_name,
            "epoch": round(st.epoch, 4),
            "version": st.version,
            "loss": st.loss,
        }
        finetune = st.phase == self.layout.finetune_phase
        if finetune and self.evaluate is not None and (evaluate or final_of_phase or wait):
            sync = wait or final_of_phase
            self._collect_eval(block=sync)  # an older result never lands after a newer one
            if self._eval is None:
                self.ps.gather_params(self._flat)
                live = self._flat.copy()
                snap = self._eval_params(live)
                other = live if snap is not live and self.cfg.ps.average_eval_live else None
                self._eval = self._pool.submit(self._evaluate, snap, other)
                self._eval_of = (entry, st.version, snap)
                self._collect_eval(block=sync)
        st.history.append(entry)
        if len(st.history) > MAX_HISTORY:  # status and summaries stay small on long jobs
            del st.history[: len(st.history) - MAX_HISTORY]
        self._print_progress()
        rate = float(st.worker_stats[:, pr.RATE].sum())
        acc = (
            f"  {st.eval_split} acc {st.eval_accuracy:.4f}"
            if finetune and st.eval_accuracy == st.eval_accuracy
            else ""
        )
        if acc and self._live_acc == self._live_acc:
            acc += f" (average; live {self._live_acc:.4f})"
        self.log(
            f"[server] {st.phase_name} epoch {st.epoch:6.2f}  version {st.version}  "
            f"applied {st.applied_total} rejected {st.rejected_total}  "
            f"staleness mean {st.staleness_sum / max(st.staleness_count, 1):.2f}  "
            f"{rate:,.0f} samples/s  loss {st.loss:.4f}{acc}  t={entry['t']:.1f}s"
        )

    def _timed_evaluate(self, flat: np.ndarray) -> float:
        """The evaluation thread: `evaluate`, its CPU booked as `cpu["eval"]`."""
        c0 = time.thread_time()
        try:
            return self.evaluate(flat)
        finally:
            self.state.cpu["eval"] += time.thread_time() - c0

    def _collect_eval(self, block: bool = False) -> None:
        """Take the pending evaluation's result (waiting for it if `block`) and offer it."""
        if self._eval is None or not (block or self._eval.done()):
            return
        st = self.state
        acc, live_acc = self._eval.result()
        entry, version, snap = self._eval_of
        self._eval = self._eval_of = None
        st.eval_accuracy = acc
        if st.eval_split == "test":
            st.test_accuracy = acc
        entry[f"{st.eval_split}_accuracy"] = acc
        if live_acc is not None:  # acc is the average's
            entry[f"live_{st.eval_split}_accuracy"] = live_acc
            self._live_acc = live_acc
        self.selection.offer(acc, version, snap)
        self._print_progress()

    # -- main loop -----------------------------------------------------------
    def run(self) -> ServerState:
        """Serve until every worker is done or dead (rank 0 decides, followers copy).

        Between pushes the loop sleeps as `Wakeup` forecasts (until just before
        the next worker is due), so waiting costs little CPU without making
        the workers wait longer for their acks.  The loop's CPU is booked in
        `ServerState.cpu`: serving (validate, sum, apply, ack), bookkeeping
        (schedule, evaluations, log, control-plane requests, checkpoints; at most
        every TICK_S) and the rest, waiting (looking at the mailboxes, sleeping).
        """
        st = self.state
        tighten_timer_slack()  # a 50 us sleep is 50 us, not 100
        # Across hosts the workers' RMA moves only while this loop is in MPI: poll.
        progress = 0.0 if self.topo.one_node else PROGRESS_S
        make = Wakeup.for_records if self.accumulate else Wakeup
        wake = self.wakeup = make(self.topo.n_workers, progress_s=progress)
        st.forecast = wake.seen
        cpu_start, last_tick = time.thread_time(), 0.0
        while True:
            st.cpu["loop"] = time.thread_time() - cpu_start
            pushes = self.ps.poll()
            st.looks += 1
            if self.accumulate and not pushes:
                self._follow_header()  # a phase can end before its last record arrives
            if pushes:
                now = time.monotonic()
                for p in pushes:
                    wake.pushed(p.worker, now)
                t0, c0 = time.perf_counter(), time.thread_time()
                (self.count if self.accumulate else self.serve)(pushes)
                st.busy_seconds += time.perf_counter() - t0
                st.cpu["serve"] += time.thread_time() - c0
            else:
                time.sleep(wake.delay(time.monotonic()))
            if time.monotonic() - last_tick < TICK_S:
                continue  # only pushes and the mailboxes are urgent
            last_tick, c0 = time.monotonic(), time.thread_time()
            if self.topo.rank == 0:
                self._rank0_tick()
                self._maybe_checkpoint()
                if self._all_workers_left():
                    break
            elif time.time() - self._last_log > 0.05:
                self._last_log = time.time()
                if self._follow_rank0():
                    break
            if self.on_tick is not None:
                self.on_tick(self)
            st.cpu["book"] += time.thread_time() - c0
        st.cpu["loop"] = time.thread_time() - cpu_start
        if self.topo.rank == 0:
            self.ps.begin_write()
            self.ps.header[pr.STOP] = pr.STOP_ALL  # followers leave their loops
            self.ps.end_write()
        st.done = True
        return st

    # -- membership (rank 0): heartbeats in the stats region ---------------
    def refresh_workers(self) -> None:
        """Rank 0, main thread: read the stats rows; mark the silent workers dead."""
        dead = self.state.members.observe(self.ps.read_stats(), time.time())
        # Every dead holder's MUTEX first: begin_write waits for the mutex, and the
        # one holding it may be any of them (not the first in the list).
        for w, _ in dead:
            if self.ps.break_mutex(w):  # accumulate mode: it died inside its critical section
                self.log(f"[server] worker {w} died holding the parameter mutex; taken back")
        for w, why in dead:
            self._mark_dead(w, why)

    def _mark_dead(self, w: int, why: str) -> None:
        """Publish worker w as dead: survivors re-shard its data at their next pull."""
        self.ps.begin_write()
        pr.mark_dead(self.ps.header, w)
        self.ps.end_write()
        if self.wakeup is not None:
            self.wakeup.forget(w)
        self.log(
            f"[server] worker {w} (rank {self.topo.n_servers + w}) marked dead: {why}; "
            f"its shard is redistributed over {int(self.state.worker_alive.sum())} workers"
        )

    def _all_workers_left(self) -> bool:
        if time.time() - self._last_refresh < 0.1:
            return False
        self._last_refresh = time.time()
        self.refresh_workers()
        return self.state.members.all_left

    def _check_divergence(self) -> None:
        """Rank 0: a job whose pushes are all non-finite, or whose loss blew up, is over.

        Without this a diverged job runs for ever: every push is rejected, the
        version stays put, status says "running".  It ends with one `error:`
        line and exit status 5, which `--restart-on-failure` does not retry (a
        restart from the last checkpoint would diverge again the same way).
        """
        st = self.state
        if st.diverged or st.phase >= self.layout.done_phase:
            return
        limit = self.cfg.ps.max_nonfinite_in_a_row
        if st.nonfinite_in_a_row >= limit:
            why = f"{st.nonfinite_in_a_row} pushes in a row had non-finite gradients"
        else:
            if not st.members.stepped.any():
                return  # no loss computed yet
            loss, bound = st.loss, self.cfg.run.max_loss  # the mean over workers that stepped
            if not (loss > bound or loss != loss):
                return
            why = f"the workers' mean loss is {loss:.4g} (bound [run] max_loss = {bound:g})"
        st.diverged = f"training diverged in {st.phase_name} at version {st.version}: {why}"
        print(f"error: {st.diverged}; lower the learning rate", file=sys.stderr, flush=True)
        self.request_stop()

    def _rank0_tick(self) -> None:
        st = self.state
        self._check_divergence()
        if st.phase == self.layout.finetune_phase and st.epoch >= self._next_eval:
            self._next_eval += self.cfg.run.eval_every_epochs
            self._record()
            self._last_log = time.time()
        self._collect_eval()
        self._stop_at_target()
        if self.progress_every_s and time.time() - self._last_progress > self.progress_every_s:
            self._last_progress = time.time()
            self._print_progress()
        if time.time() - self._last_log > self.cfg.run.log_every_s:
            self._last_log = time.time()
            self._record(evaluate=False)

    def _print_progress(self) -> None:
        """One machine-readable line that `psctl run` turns into a progress bar."""
        if not self.progress_every_s:
            return
        st = self.state
        acc = st.eval_accuracy
        payload = {
            "phase": st.phase_name,
            "index": st.phase,
            "phases": self.layout.done_phase,
            "done": st.samples_in_phase,
            "total": st.phase_samples,
            "epoch": round(st.epoch, 3),
            "accuracy": acc if acc == acc else None,
            "split": st.eval_split,
        }
        self.log("[progress] " + json.dumps(payload), flush=True)

    def _maybe_checkpoint(self) -> None:
        """Rank 0, main thread: a periodic checkpoint when `[run] checkpoint_every_*` says so."""
        c = self.checkpointer
        if (
            c is not None
            and self.state.phase < self.layout.done_phase
            and c.due(self.state.version)
        ):
            c.take(self.checkpoint_state())

    def _stop_at_target(self) -> None:
        """[run] target_accuracy > 0: end fine-tuning once an evaluation reaches it (rank 0).

        Called from the main loop only, never from `_record`: inside `_end_phase`
        a stop would be followed by `_set_phase(done + 1)`.
        """
        st, sel = self.state, self.selection
        if sel.target_reached and st.phase == self.layout.finetune_phase and not st.stopped:
            r = sel.reached
            self.log(
                f"[server] target accuracy {sel.target} reached: {st.eval_split} accuracy "
                f"{r.accuracy:.4f} at version {r.version}"
            )
            self.request_stop()

    # -- complete checkpoints (every shard; see rma.ShardStates) ------------
    def _shard_write_begin(self) -> None:
        if self.shard_states is not None:
            self.shard_states.begin_write()

    def _shard_write_end(self, version: int) -> None:
        if self.shard_states is not None:
            self.shard_states.end_write(version)

    def _shard_state_restored(self, resume) -> None:
        """Publish this shard's version; test hook `DBNPS_TEST_SNAPSHOT_AFTER_RESUME`."""
        self._shard_write_begin()
        self._shard_write_end(self.state.version)
        if resume is not None:
            from dbnps.server.checkpoint.snapshot import after_resume_hook

            barrier = self.shard_states.barrier if self.shard_states is not None else None
            after_resume_hook(self.topo.rank, self.checkpoint_state, barrier)

    def checkpoint_state(self):
        """Rank 0, main thread: what a checkpoint holds, every shard's (a snapshot.JobState).

        Parameters through the protocol's reads; with S > 1 the followers' rule
        state and versions through `ShardStates.gather`, frozen together with
        the parameters so each shard's three agree.
        """
        from dbnps.server.checkpoint.format import RULE_STATE_SERVER, RULE_STATE_WORKERS
        from dbnps.server.checkpoint.snapshot import JobState

        st, size = self.state, self.layout.size
        params = np.empty(size, dtype=np.float32)
        # accumulate mode: the rule runs in the workers; the server's copy is unused
        names = [] if self.accumulate else list(self.rule.state())
        rule_state = {k: np.zeros(size, dtype=np.float32) for k in names}
        versions = np.zeros(self.topo.n_servers, dtype=np.int64)
        versions[0] = st.version

        def read_params():
            self.ps.gather_params(params)

        if self.shard_states is not None:
            self.shard_states.gather(rule_state, versions, read_params)
        else:
            read_params()
        own = self.rule.state()
        for k in names:
            rule_state[k][self.lo : self.hi] = own[k]
        average, extra = None, {}
        if self.average is not None:  # one server rank: its shard is the whole vector
            avg, counts = self.average.state()
            average, extra = avg.copy(), {"average": counts}
        return JobState(
            params=params,
            rule_name=self.rule.name,
            rule_state=rule_state,
            rule_state_kept=RULE_STATE_WORKERS if self.accumulate else RULE_STATE_SERVER,
            version=int(st.version),
            shard_versions=[int(v) for v in versions],
            shard_bounds=list(self.win.bounds),
            phase=int(st.phase),
            phase_names=list(st.phase_names),
            samples_in_phase=int(st.samples_in_phase),
            phase_samples=int(st.phase_samples),
            n_train=int(st.n_train),
            n_workers=int(st.n_workers),
            applied=int(st.applied_total),
            rejected=dict(st.rejected),
            stopped=bool(st.stopped),
            next_eval=float(self._next_eval),
            test_accuracy=float(st.test_accuracy),
            eval_accuracy=float(st.eval_accuracy),
            config=self.cfg.to_dict(),
            seed=int(self.cfg.run.seed),
            extra=extra,
            average=average,
        )

    def finish(self, out: Path | None = None, summary: Path | None = None) -> dict | None:
        """After every worker left: final evaluation, model and summary (rank 0), free windows."""
        result = None
        if self.topo.rank == 0:
            st = self.state
            st.members.stats = self.ps.read_stats()  # the workers' final rows
            self._collect_eval(block=True)
            self.ps.gather_params(self._flat)
            # Fine-tuned: the schedule ran through it, or a stop came during it (a stop
            # moves the phase to done; the classifier of a job stopped while
            # pretraining is untrained and gets no accuracy).
            finetune_name = self.layout.phase_name(self.layout.finetune_phase)
            stopped_before = st.stopped and st.stopped_in != finetune_name
            trained = (
                self.evaluate is not None
                and st.phase >= self.layout.finetune_phase
                and not stopped_before
                and not st.diverged  # its parameters are no model worth a number
            )
            live = self._flat
            if self.average is not None and trained:
                self.average.flush(self.ps.params)  # the updates since its last sample
            last = self._eval_params(live)
            last_acc = float(self.evaluate(last)) if trained else float("nan")
            choice = self.selection.choose(last, st.version, last_acc)
            st.eval_accuracy = choice.accuracy
            if trained:
                same = st.eval_split == "test" and choice.accuracy == choice.accuracy
                st.test_accuracy = choice.accuracy if same else self.evaluate_test(choice.params)
            st.saved = {
                "which": choice.which,
                "averaged": self.average is not None,  # [ps] average: the average was saved
                "version": choice.version,
                "eval_split": st.eval_split,
                "eval_accuracy": choice.accuracy,
                "test_accuracy": st.test_accuracy,
            }
            result = st.summary()
            if self.average is not None:
                result["average"] = self._average_summary(live if trained else None)
            if out is not None and st.diverged:
                self.log(f"no model written: {st.diverged}")
            elif out is not None:
                from dbnps.common.model import save_model

                save_model(out, self.layout, choice.params, self.cfg, {"summary": result})
            if summary is not None:
                tmp = Path(str(summary) + ".tmp")
                tmp.write_text(json.dumps(result, indent=1, default=float))
                tmp.replace(summary)
            if stopped_before:
                self.log(f"stopped in {st.stopped_in}: not fine-tuned, no test accuracy")
            if trained:
                how = {"last": "last", "best": "best on validation", "target": "at target"}
                val = (
                    f", validation accuracy {choice.accuracy:.4f}"
                    if st.eval_split == "validation"
                    else ""
                )
                averaged = " averaged" if self.average is not None else ""
                self.log(
                    f"saved model: {how[choice.which]}{averaged} parameters "
                    f"(version {choice.version})"
                    f"{val}, final test accuracy: {st.test_accuracy:.4f}"
                )
            self._pool.shutdown()
        # Rank 0 has read every shard and written the results by now.
        healthy = rma.finalize(self.topo, self.win, timeout_s=self.cfg.ps.exit_timeout_s)
        if healthy and self.shard_states is not None:
            self.shard_states.free()  # collective over the servers: not after a failure
        if not healthy:
            self.log("[server] a rank had failed; the survivors finished without it")
        rma.finalize_mpi(f"rank {self.topo.rank}", timeout_s=self.cfg.ps.exit_timeout_s)
        return result
