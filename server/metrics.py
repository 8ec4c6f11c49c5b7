"""Prometheus `/metrics` of a job, served by parameter-server rank 0.

One custom collector reads the live `ServerState` (through the control
plane) at scrape time, so every number has exactly one source.  The registry
is private to the job (no process/GC metrics from the default registry mixed
in).  Names: prefix `dbnps_`, base units (seconds, bytes), `_total` on
counters; `promtool check metrics` accepts the output (tests/test_metrics.py).

Counts are those of server rank 0: with several server ranks, pushed bytes and
apply time cover rank 0's shard; versions and updates are the same on every rank.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from dbnps.common import protocol as rma  # the words only: metrics never import MPI
from dbnps.common.errors import UserError
from dbnps.server.state import STALENESS_BUCKETS

REJECT_REASONS = tuple(n for n in rma.RESULT_NAMES.values() if n != "applied")


class JobCollector(Collector):
    """Reads the control plane's live state on every scrape."""

    def __init__(self, control):
        self.control = control

    def describe(self):
        return []  # unchecked collector: names are fixed, no collect() at registration

    def collect(self):
        cp = self.control
        cfg = cp.cfg
        info = InfoMetricFamily("dbnps_job", "The job and its configuration.")
        info.add_metric(
            [],
            {
                "job_id": cp.job_id,
                "sizes": "-".join(str(s) for s in cfg.model.sizes),
                "update_rule": cfg.ps.update_rule,
                "servers": str(cp.n_servers),
                "workers": str(cp.n_workers),
            },
        )
        yield info
        yield GaugeMetricFamily(
            "dbnps_start_time_seconds", "Start of the server (Unix time).", value=cp.start_time
        )
        yield GaugeMetricFamily(
            "dbnps_ready",
            "1 while the job trains (windows ready, not stopping).",
            value=float(cp.state is not None and not cp.stopping),
        )
        yield from _checkpoint_metrics(cp)
        st = cp.state
        if st is None:
            return
        phase = GaugeMetricFamily(
            "dbnps_phase", "1 for the current training phase, 0 for the others.", labels=["phase"]
        )
        for i, name in enumerate(st.phase_names):
            phase.add_metric([name], float(i == st.phase))
        yield phase
        yield GaugeMetricFamily(
            "dbnps_phase_index",
            "Current phase number (pretrain layers, fine-tune, done).",
            value=st.phase,
        )
        yield GaugeMetricFamily(
            "dbnps_phase_epochs", "Epochs completed in the current phase.", value=st.epoch
        )
        yield GaugeMetricFamily(
            "dbnps_phase_progress_ratio",
            "Fraction of the current phase done.",
            value=min(st.samples_in_phase / st.phase_samples, 1.0) if st.phase_samples else 0.0,
        )
        yield GaugeMetricFamily(
            "dbnps_parameter_version", "Parameter version (updates applied).", value=st.version
        )
        yield CounterMetricFamily(
            "dbnps_updates_applied", "Pushed updates applied.", value=st.applied_total
        )
        rej = CounterMetricFamily(
            "dbnps_updates_rejected", "Pushed updates rejected, by reason.", labels=["reason"]
        )
        rejected = dict(st.rejected)
        for reason in sorted({*REJECT_REASONS, *rejected}):
            rej.add_metric([reason], rejected.get(reason, 0))
        yield rej
        yield CounterMetricFamily(
            "dbnps_pushes",
            "Pushes received by server rank 0 (applied + rejected).",
            value=st.applied_total + sum(rejected.values()),
        )
        yield CounterMetricFamily(
            "dbnps_pushed_bytes", "Gradient bytes taken by server rank 0.", value=st.bytes_in
        )
        yield CounterMetricFamily(
            "dbnps_apply_seconds",
            "Time server rank 0 spent applying updates.",
            value=st.apply_seconds,
        )
        cpu = CounterMetricFamily(
            "dbnps_server_cpu_seconds",
            "CPU time of server rank 0 by role: serve (validate, sum, apply, ack), book "
            "(bookkeeping), wait (looking for pushes), eval (the evaluation thread).",
            labels=["role"],
        )
        for role, seconds in st.cpu_seconds().items():
            if role != "process":  # process_cpu_seconds_total (the default collector) has it
                cpu.add_metric([role], seconds)
        yield cpu
        counts = st.staleness_counts.copy()
        cum, buckets = 0, []
        for bound, c in zip(STALENESS_BUCKETS, counts[:-1], strict=True):
            cum += int(c)
            buckets.append((str(float(bound)), cum))
        cum += int(counts[-1])
        buckets.append(("+Inf", cum))
        yield HistogramMetricFamily(
            "dbnps_update_staleness",
            "Staleness of applied updates, in parameter versions.",
            buckets=buckets,
            sum_value=st.staleness_sum,
        )
        yield GaugeMetricFamily(
            "dbnps_update_staleness_max", "Largest staleness applied.", value=st.staleness_max
        )
        if st.loss == st.loss:
            yield GaugeMetricFamily("dbnps_loss", "Mean of the workers' last loss.", value=st.loss)
        if st.test_accuracy == st.test_accuracy:
            yield GaugeMetricFamily(
                "dbnps_test_accuracy_ratio", "Last test-set accuracy.", value=st.test_accuracy
            )
        if st.eval_accuracy == st.eval_accuracy:
            g = GaugeMetricFamily(
                "dbnps_eval_accuracy_ratio",
                "Last accuracy on the split evaluations use during training.",
                labels=["split"],
            )
            g.add_metric([st.eval_split], st.eval_accuracy)
            yield g
        yield from _worker_metrics(st)


def _checkpoint_metrics(cp):
    s = cp.store.stats
    yield SummaryMetricFamily(
        "dbnps_checkpoint_duration_seconds",
        "Checkpoints written and the time they took.",
        count_value=s.written,
        sum_value=s.seconds_total,
    )
    yield GaugeMetricFamily(
        "dbnps_checkpoints_retained", "Checkpoint files kept.", value=cp.store.count()
    )
    if s.last_time:
        yield GaugeMetricFamily(
            "dbnps_checkpoint_last_time_seconds",
            "When the last checkpoint was written (Unix time).",
            value=s.last_time,
        )


def _worker_metrics(st):
    labels = ["worker", "rank"]
    rate = GaugeMetricFamily(
        "dbnps_worker_samples_per_second", "Worker training throughput.", labels=labels
    )
    age = GaugeMetricFamily(
        "dbnps_worker_heartbeat_age_seconds",
        "Seconds since the worker's last report.",
        labels=labels,
    )
    up = GaugeMetricFamily(
        "dbnps_worker_up",
        "1 while the worker is expected to train (starting or running).",
        labels=labels,
    )
    steps = CounterMetricFamily("dbnps_worker_steps", "Worker minibatch steps.", labels=labels)
    samples = CounterMetricFamily("dbnps_worker_samples", "Worker training samples.", labels=labels)
    applied = CounterMetricFamily(
        "dbnps_worker_updates_applied", "Worker's pushes applied.", labels=labels
    )
    rejected = CounterMetricFamily(
        "dbnps_worker_updates_rejected", "Worker's pushes rejected.", labels=labels
    )
    stats = st.worker_stats
    now = time.time()
    for w in range(st.n_workers):
        lv = [str(w), str(st.n_servers + w)]
        row = stats[w]
        beat = float(row[rma.HEARTBEAT])
        rate.add_metric(lv, float(row[rma.RATE]))
        if beat > 0:
            age.add_metric(lv, now - beat)
        up.add_metric(lv, float(st.members.up(w)))  # the one rule: starting or running
        steps.add_metric(lv, float(row[rma.STEPS]))
        samples.add_metric(lv, float(row[rma.ST_SAMPLES]))
        applied.add_metric(lv, int(st.worker_applied[w]))
        rejected.add_metric(lv, int(st.worker_rejected[w]))
    yield from (rate, age, up, steps, samples, applied, rejected)
    yield GaugeMetricFamily(
        "dbnps_samples_per_second",
        "Training throughput of all workers.",
        value=float(stats[:, rma.RATE].sum()),
    )


MAX_CONNECTIONS = 16  # concurrent /metrics connections; more are refused at once
CONNECTION_TIMEOUT_S = 5.0  # a client silent this long loses its connection (and thread)


def _capped_server_class(family):
    """prometheus-client's thread-per-connection WSGI server, with a cap.

    Its server starts one thread per accepted connection with no bound and no
    timeout: 200 half-open connections made 220 threads.  Here at most
    MAX_CONNECTIONS are served at once (a scrape takes milliseconds; Prometheus
    uses one connection per target); one more is answered `503` and closed
    without a thread, and each connection's socket times out after
    CONNECTION_TIMEOUT_S, so silent clients give their slot back.
    """
    from prometheus_client.exposition import ThreadingWSGIServer

    class CappedServer(ThreadingWSGIServer):
        address_family = family
        _slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        refused = 0
        # socketserver listens with a backlog of 5: a burst of connections beyond it
        # had its SYNs dropped and retried for seconds; refusing fast needs them accepted
        request_queue_size = 128

        def handle_error(self, request, client_address):
            pass  # a client that timed out or went away: expected, not worth a traceback

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                type(self).refused += 1
                try:
                    request.settimeout(1.0)
                    request.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            request.settimeout(CONNECTION_TIMEOUT_S)
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

    return CappedServer


def start_metrics_server(control, bind: str, port: int):
    """Serve /metrics on bind:port (0: any free port). Returns (httpd, actual port)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import _get_best_family, _SilentHandler

    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(control))
    try:
        family, addr = _get_best_family(bind, port)
        httpd = make_server(
            addr,
            port,
            make_wsgi_app(registry),
            _capped_server_class(family),
            handler_class=_SilentHandler,
        )
    except OSError as exc:
        raise UserError(
            f"cannot serve metrics on {bind}:{port} (in use?): {exc.strerror or exc}"
        ) from exc
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd, httpd.server_port
