"""Parameter-server rank: owns a shard of the flat parameter vector and applies pushes.

The talk's Algorithm 4, server half: workers' gradients arrive in their
mailbox slots (see `dbnps.common.rma`); this loop validates each push
(phase, staleness bound tau, finite values), sums the accepted ones, and
applies the sum with the pluggable update rule (`dbnps.common.updaters`):
one pass of the rule per batch of pending pushes, so ingest stays cheap as
the number of workers grows.  Rank 0 also decides the phase schedule
(pretrain layer 1..L -> fine-tune -> done) from samples applied, evaluates
test accuracy, and writes the model and a run summary at the end.

In `[ps] mode = "accumulate"` the workers apply their own increments
(`rma.PSClient.accumulate`); `count` then only records their outcomes, and
the phase schedule follows the SAMPLES word they advance.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dbnps.common import rma
from dbnps.common.config import Config
from dbnps.common.layout import Layout
from dbnps.common.schedule import hyper, phase_samples
from dbnps.common.selection import Selection
from dbnps.common.updaters import make_rule
from dbnps.server.state import ServerState

MAX_HISTORY = 5000  # entries kept in the status/summary history (the oldest go first)


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
    ):
        """`resume`: a verified checkpoint (params, rule state, meta) to continue from."""
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
            topo.n_workers, topo.n_servers, names, n_train=n_train, eval_split=eval_split
        )
        self.rule = make_rule(cfg.ps.update_rule, self.hi - self.lo, adagrad_eps=cfg.ps.adagrad_eps)
        # S > 1: each shard's rule state lives in a window rank 0 reads for checkpoints
        self.shard_states = None
        if topo.n_servers > 1:
            self.shard_states = rma.ShardStates(topo, self.win.bounds, list(self.rule.state()))
            self.shard_states.bind(self.rule)
        self._agg = np.empty(self.hi - self.lo, dtype=np.float32)
        self._flat = np.empty(layout.size, dtype=np.float32)  # rank 0 snapshot for eval
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="eval") if topo.rank == 0 else None
        self._eval: Future | None = None
        self._eval_of = None  # (history entry, version, snapshot) of the pending evaluation
        self._next_eval = cfg.run.eval_every_epochs
        self._last_log = time.time()
        self._last_refresh = 0.0
        self.checkpointer = None  # rank 0: a checkpoint.Periodic, set by dbnps.server.__main__
        self.progress_every_s = 0.0  # rank 0, > 0: print `[progress] {json}` lines for psctl
        self._last_progress = 0.0
        first, version, samples = self._next_nonempty_phase(0), 0, 0
        if resume is not None:
            init_flat, first, version, samples = self._restore(*resume)
        self.ps.begin_write()
        self.ps.params[:] = init_flat[self.lo : self.hi]
        self.ps.header[rma.PHASE] = first  # the other words are zero (Windows.zero)
        self.ps.header[rma.VERSION] = version
        self.ps.header[rma.SAMPLES] = samples
        self.ps.end_write()
        self.state.phase, self.state.phase_samples = first, self._phase_samples(first)
        self.state.version, self.state.samples_in_phase = version, samples
        self._shard_state_restored(resume)
        topo.comm.Barrier()  # parameters and phase are set before any worker pulls
        self.log(f"[server] {layout!r}, {topo.n_workers} workers, {topo.n_servers} server(s)")
        self.log(f"[server] phase {layout.phase_name(first)} starts")

    def _restore(self, params: np.ndarray, rule_state: dict, meta: dict):
        """Continue from a checkpoint: (params, phase, version, samples in phase).

        The checkpoint was validated when loaded (dbnps.server.checkpoint).  Its
        update-rule state covers the flat vector (format 2): this rank takes its
        shard, whatever the number of server ranks was.  Format 1 held rank 0's
        shard only (`rule_shard`); it is loaded where it fits.
        """
        if params.shape != (self.layout.size,) or params.dtype != np.float32:
            raise ValueError(
                f"checkpoint holds {params.dtype}{list(params.shape)} parameters, the layout "
                f"needs float32[{self.layout.size}]"
            )
        phase = self._next_nonempty_phase(int(meta["phase"]))
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
        self.state.eval_accuracy = float(meta.get("eval_accuracy", float("nan")))
        self.state.test_accuracy = float(meta.get("test_accuracy", float("nan")))
        return params, phase, version, samples

    # -- phase schedule (rank 0 decides; followers copy) --------------------
    def _phase_samples(self, phase: int) -> int:
        return phase_samples(self.cfg, phase, self.layout.n_layers, self.state.n_train)

    def _next_nonempty_phase(self, phase: int) -> int:
        """`phase`, or the first later one that lasts > 0 samples (e.g. pretrain epochs = 0)."""
        while phase < self.layout.done_phase and self._phase_samples(phase) == 0:
            phase += 1
        return phase

    def _set_phase(self, phase: int) -> None:
        st = self.state
        self.ps.begin_write()
        self.ps.header[rma.PHASE] = phase
        self.ps.header[rma.SAMPLES] = 0
        self.ps.end_write()
        st.phase, st.samples_in_phase = phase, 0
        st.phase_samples = self._phase_samples(phase)
        self._shard_write_begin()
        self.rule.reset()
        self._shard_write_end(st.version)
        self._next_eval = self.cfg.run.eval_every_epochs
        self.log(f"[server] phase {self.layout.phase_name(phase)} starts at version {st.version}")
        self._print_progress()

    def _end_phase(self) -> None:
        st = self.state
        if st.phase == self.layout.finetune_phase or st.phase < self.layout.n_layers:
            self._record(final_of_phase=True)
        self._set_phase(self._next_nonempty_phase(st.phase + 1))

    def _follow_rank0(self) -> bool:
        """Copy rank 0's phase; True when rank 0 says every worker has left."""
        hdr = self.ps.remote_header(0)
        if int(hdr[rma.PHASE]) != self.state.phase:
            self._set_phase(int(hdr[rma.PHASE]))
        return int(hdr[rma.STOP]) == rma.STOP_ALL

    def request_stop(self) -> None:
        """Rank 0, main thread: publish phase `done` + STOP; workers leave at their next pull."""
        st = self.state
        self.ps.begin_write()
        self.ps.header[rma.PHASE] = self.layout.done_phase
        self.ps.header[rma.STOP] = 1
        self.ps.end_write()
        st.stopped_in = st.phase_name
        st.phase = self.layout.done_phase
        st.stopped = True
        self.log(f"[server] stop requested at version {st.version}")

    # -- the request handle --------------------------------------------------
    def handle(self, pushes: list[rma.Push]) -> None:
        """Validate, aggregate and apply a batch of pushes; ack every one."""
        st, cfg = self.state, self.cfg
        if self.topo.rank != 0 and any(p.phase != st.phase for p in pushes):
            self._follow_rank0()
        plo, phi = self.layout.phase_range(st.phase)
        a, b = max(plo, self.lo) - self.lo, min(phi, self.hi) - self.lo
        a, b = (a, b) if b > a else (0, 0)
        results: dict[int, int] = {}
        candidates: list[rma.Push] = []
        for p in pushes:
            staleness = st.version - p.pulled_version
            if p.phase != st.phase or st.phase >= self.layout.done_phase or (p.lo, p.hi) != (a, b):
                results[p.worker] = rma.REJECTED_PHASE
            elif cfg.ps.staleness_bound and staleness > cfg.ps.staleness_bound:
                results[p.worker] = rma.REJECTED_STALE
            else:
                candidates.append(p)
        t0 = time.perf_counter()
        accepted, agg = self._sum_finite(candidates, a, b)
        ok = {p.worker for p in accepted}
        for p in candidates:
            if p.worker in ok:
                results[p.worker] = rma.APPLIED
                st.record_staleness(max(st.version - p.pulled_version, 0))
            else:
                results[p.worker] = rma.REJECTED_NONFINITE
        if accepted:
            lr, mom = hyper(cfg, st.phase, self.layout.n_layers, st.epoch)
            n = sum(p.n_samples for p in accepted)
            self._shard_write_begin()
            self.ps.begin_write()
            self.rule.apply(self.ps.params[a:b], agg, lr, mom, a)  # agg is scratch afterwards
            self.ps.header[rma.VERSION] += len(accepted)
            if self.topo.rank == 0:
                self.ps.header[rma.SAMPLES] += n
            self.ps.end_write()
            self._shard_write_end(st.version + len(accepted))
            st.apply_seconds += time.perf_counter() - t0
            st.last_apply = time.time()
            st.first_apply = st.first_apply or st.last_apply
            st.version += len(accepted)
            st.applied_total += len(accepted)
            st.samples_in_phase += n
            st.bytes_in += 4 * (b - a) * len(accepted)
            if self.topo.rank == 0 and st.samples_in_phase >= st.phase_samples:
                # Before the acks: a synchronous worker's next pull must see the new phase.
                self._end_phase()
        self._ack_all(pushes, results)

    def _ack_all(self, pushes: list[rma.Push], results: dict[int, int]) -> None:
        st = self.state
        for p in pushes:
            res = results[p.worker]
            self.ps.ack(p, res)
            if res == rma.APPLIED:
                st.worker_applied[p.worker] += 1
                st.nonfinite_in_a_row = 0
            else:
                if res == rma.REJECTED_NONFINITE:
                    st.nonfinite_in_a_row += 1
                st.worker_rejected[p.worker] += 1
                name = rma.RESULT_NAMES[res]
                st.rejected[name] = st.rejected.get(name, 0) + 1

    # -- accumulate mode: workers applied their own increments --------------
    def _follow_header(self) -> None:
        """Rank 0: take VERSION and SAMPLES from the header the workers advance; end the phase."""
        st = self.state
        version, samples = self.ps.read_counters()
        st.version, st.samples_in_phase = version, samples
        if st.phase < self.layout.done_phase and samples >= st.phase_samples:
            self._end_phase()

    def count(self, pushes: list[rma.Push]) -> None:
        """Record what the workers did under the lock (staleness, results); ack every one.

        The phase is settled first, so a synchronous worker's next pull sees it.
        """
        st = self.state
        self._follow_header()
        for p in pushes:
            if p.result == rma.APPLIED:
                st.record_staleness(max(p.lo - p.pulled_version, 0))  # lo: version added to
                st.applied_total += 1
                plo, phi = self.layout.phase_range(p.phase)  # st.phase may have moved on
                st.bytes_in += 4 * (phi - plo)
                st.last_apply = time.time()
                st.first_apply = st.first_apply or st.last_apply
        self._ack_all(pushes, {p.worker: p.result for p in pushes})

    def _sum_finite(
        self, pushes: list[rma.Push], a: int, b: int
    ) -> tuple[list[rma.Push], np.ndarray]:
        """The pushes whose values are all finite, and their sum (a scratch buffer).

        `np.dot(g, g)` is one BLAS read pass and is non-finite iff some element is
        NaN/Inf (or the norm overflows float32, refused as well).  With several
        pushes we check the sum once and look at single pushes only if it is bad.
        A lone push is summed in place: its slot is scratch until we ack it.
        """

        def finite(g: np.ndarray) -> bool:
            return bool(np.isfinite(np.dot(g, g)))

        if not pushes:
            return [], self._agg[:0]
        if b <= a:  # this shard holds nothing of the phase: nothing to check or sum
            return list(pushes), self._agg[:0]
        if len(pushes) == 1:
            g = pushes[0].grad
            return (list(pushes), g) if finite(g) else ([], g)
        agg = self._agg[a:b]
        np.copyto(agg, pushes[0].grad)
        for p in pushes[1:]:
            agg += p.grad
        if finite(agg):
            return list(pushes), agg
        good = [p for p in pushes if finite(p.grad)]
        if good:
            np.copyto(agg, good[0].grad)
            for p in good[1:]:
                agg += p.grad
        return good, agg

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
                self._eval = self._pool.submit(self.evaluate, snap := self._flat.copy())
                self._eval_of = (entry, st.version, snap)
                self._collect_eval(block=sync)
        st.history.append(entry)
        if len(st.history) > MAX_HISTORY:  # status and summaries stay small on long jobs
            del st.history[: len(st.history) - MAX_HISTORY]
        self._print_progress()
        rate = float(st.worker_stats[:, rma.RATE].sum())
        acc = (
            f"  {st.eval_split} acc {st.eval_accuracy:.4f}"
            if finetune and st.eval_accuracy == st.eval_accuracy
            else ""
        )
        self.log(
            f"[server] {st.phase_name} epoch {st.epoch:6.2f}  version {st.version}  "
            f"applied {st.applied_total} rejected {st.rejected_total}  "
            f"staleness mean {st.staleness_sum / max(st.staleness_count, 1):.2f}  "
            f"{rate:,.0f} samples/s  loss {st.loss:.4f}{acc}  t={entry['t']:.1f}s"
        )

    def _collect_eval(self, block: bool = False) -> None:
        """Take the pending evaluation's result (waiting for it if `block`) and offer it."""
        if self._eval is None or not (block or self._eval.done()):
            return
        st = self.state
        acc = float(self._eval.result())
        entry, version, snap = self._eval_of
        self._eval = self._eval_of = None
        st.eval_accuracy = acc
        if st.eval_split == "test":
            st.test_accuracy = acc
        entry[f"{st.eval_split}_accuracy"] = acc
        self.selection.offer(acc, version, snap)
        self._print_progress()

    # -- main loop -----------------------------------------------------------
    def run(self) -> ServerState:
        """Serve until every worker is done or dead (rank 0 decides, followers copy)."""
        st = self.state
        pause = 1e-5
        while True:
            pushes = self.ps.poll()
            if self.accumulate and not pushes:
                self._follow_header()  # a phase can end before its last record arrives
            if pushes:
                t0 = time.perf_counter()
                (self.count if self.accumulate else self.handle)(pushes)
                st.busy_seconds += time.perf_counter() - t0
                pause = 1e-5
            else:
                time.sleep(pause)
                pause = min(pause * 2, 2e-4)  # <= 0.2 ms late to a push, ~10% of a core
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
        if self.topo.rank == 0:
            self.ps.begin_write()
            self.ps.header[rma.STOP] = rma.STOP_ALL  # followers leave their loops
            self.ps.end_write()
        st.done = True
        return st

    # -- membership (rank 0): heartbeats in the stats region ---------------
    def refresh_workers(self) -> None:
        """Rank 0, main thread: read the stats rows; update loss, heartbeat ages, liveness."""
        st = self.state
        st.worker_stats = self.ps.read_stats()  # one reference swap for readers on other threads
        seen = st.worker_stats[:, rma.HEARTBEAT] > 0
        if seen.any():
            st.loss = float(np.mean(st.worker_stats[seen, rma.LOSS]))
        now = time.time()
        beat = st.worker_stats[:, rma.HEARTBEAT]
        # A worker that has not reported yet counts from the server's start.
        st.heartbeat_age = now - np.where(beat > 0, beat, st.start_time)
        timeout = self.cfg.ps.heartbeat_timeout_s
        for w in range(self.topo.n_workers):
            done = st.worker_stats[w, rma.STATE] == rma.STATE_DONE
            if st.worker_alive[w] and not done and st.heartbeat_age[w] > timeout:
                self._mark_dead(w, f"no heartbeat for {st.heartbeat_age[w]:.0f}s")

    def _mark_dead(self, w: int, why: str) -> None:
        """Publish worker w as dead: survivors re-shard its data at their next pull."""
        st = self.state
        st.worker_alive[w] = False
        if self.ps.break_mutex(w):  # accumulate mode: it died inside its critical section
            self.log(f"[server] worker {w} died holding the parameter mutex; taken back")
        self.ps.begin_write()
        self.ps.header[rma.DEAD + w // 64] |= np.int64(1) << np.int64(w % 64)
        self.ps.header[rma.MEMBERS] += 1
        self.ps.end_write()
        self.log(
            f"[server] worker {w} (rank {self.topo.n_servers + w}) marked dead: {why}; "
            f"its shard is redistributed over {int(st.worker_alive.sum())} workers"
        )

    def _all_workers_left(self) -> bool:
        if time.time() - self._last_refresh < 0.1:
            return False
        self._last_refresh = time.time()
        self.refresh_workers()
        st = self.state
        done = st.worker_stats[:, rma.STATE] == rma.STATE_DONE
        return bool(np.all(done | ~st.worker_alive))

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
            stats = st.worker_stats
            stepped = stats[:, rma.STEPS] > 0  # a loss was computed and reported
            loss = float(np.mean(stats[stepped, rma.LOSS])) if stepped.any() else 0.0
            bound = self.cfg.run.max_loss
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
            c.take(self)

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
            from dbnps.server.checkpoint import after_resume_hook

            after_resume_hook(self)

    def checkpoint_state(self):
        """Rank 0, main thread: what a checkpoint holds, every shard's (a checkpoint.JobState).

        Parameters through the protocol's reads; with S > 1 the followers' rule
        state and versions through `ShardStates.gather`, frozen together with
        the parameters so each shard's three agree.
        """
        from dbnps.server.checkpoint import RULE_STATE_SERVER, RULE_STATE_WORKERS, JobState

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
        )

    def finish(self, out: Path | None = None, summary: Path | None = None) -> dict | None:
        """After every worker left: final evaluation, model and summary (rank 0), free windows."""
        result = None
        if self.topo.rank == 0:
            st = self.state
            st.worker_stats = self.ps.read_stats()
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
            last_acc = float(self.evaluate(self._flat)) if trained else float("nan")
            choice = self.selection.choose(self._flat, st.version, last_acc)
            st.eval_accuracy = choice.accuracy
            if trained:
                same = st.eval_split == "test" and choice.accuracy == choice.accuracy
                st.test_accuracy = choice.accuracy if same else self.evaluate_test(choice.params)
            st.saved = {
                "which": choice.which,
                "version": choice.version,
                "eval_split": st.eval_split,
                "eval_accuracy": choice.accuracy,
                "test_accuracy": st.test_accuracy,
            }
            result = st.summary()
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
                self.log(
                    f"saved model: {how[choice.which]} parameters (version {choice.version})"
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
