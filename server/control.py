"""gRPC control plane of a job, served by parameter-server rank 0 beside the training loop.

Threads and MPI: the gRPC server runs in its own thread pool, but only the
main thread may call MPI.  Handlers therefore never touch the windows:

* `GetStatus` and the Prometheus collector read `ServerState` directly (the
  live object the loop mutates; never a copy).  The workers' stats rows live
  in the window; the server loop refreshes `state.worker_stats` every 0.1 s
  (`ParameterServer.refresh_workers`, also its liveness check).
* `Checkpoint` and `Stop` put a request on a queue and wait (with a timeout)
  for the main thread to execute it from `on_tick`, the hook
  `ParameterServer.run` calls on every loop iteration.  For a checkpoint the
  main thread only takes the snapshot (MPI gathers); the disk work happens
  back on the handler's thread.

Lifecycle (driven by `dbnps.server.__main__`)::

    cp = ControlPlane(...); cp.start()     # health NOT_SERVING, endpoints.json written
    ps = ParameterServer(..., on_tick=cp.on_tick); cp.attach(ps)    # SERVING
    ps.run()
    cp.after_run(ps)     # NOT_SERVING; pending requests served; final checkpoint if stopped
    ps.finish(...)
    cp.close()

Security: bound to 127.0.0.1 unless `bind` says otherwise; `Checkpoint` and
`Stop` need `authorization: Bearer <token>` metadata (UNAUTHENTICATED
otherwise; with no token configured they are refused); optional TLS.
Request bytes are decoded by the handlers themselves so that a malformed
request is INVALID_ARGUMENT, never an exception in the server.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from dbnps.common import protocol as pr  # the words only: no MPI in the control plane
from dbnps.common.config import Config
from dbnps.common.errors import UserError
from dbnps.runfiles import (
    STOP_MARKER,
    TOKEN_FILE,
    create_token,
    read_advertise,
    read_token,
    write_json_atomic,
)
from dbnps.server import checkpoint as ckpt
from dbnps.server.state import STALENESS_BUCKETS, ServerState
from dbnps.v1 import control_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Control"].full_name  # "dbnps.v1.Control"
MAX_NOTE = 256
MAX_TIMEOUT_S = 3600.0


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Request:
    kind: str  # "snapshot" | "stop"
    args: dict
    future: futures.Future


class _Health(health.HealthServicer):
    """grpcio-health-checking's servicer, plus `List`.

    The package's generated stubs (and so reflection) carry the newer
    health.proto with `List`, but its servicer does not implement it
    (grpc/grpc#41991): clients that ask get UNIMPLEMENTED.  This answers from
    the statuses `set` was given.
    """

    def __init__(self):
        super().__init__()
        self._statuses: dict[str, int] = {}

    def set(self, service, status):
        super().set(service, status)
        self._statuses[service] = status

    def List(self, request, context):
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in dict(self._statuses).items()
            }
        )


def _add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Server reflection as `grpc.reflection.v1` and `v1alpha` (grpcio-reflection: v1alpha only).

    Current grpcurl and Postman ask for v1 first.  The two protocols are the
    same messages under two package names (grpc-proto's v1/reflection.proto
    is v1alpha's, renamed), so one servicer answers both; v1's descriptor is
    v1alpha's file with the package renamed, so a client can describe v1 too.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileContainingSymbol(REFLECTION_V1)
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
        fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
        old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
        for msg in fdp.message_type:
            for field in msg.field:
                if field.type_name.startswith(old):  # scalar fields have none: leave unset
                    field.type_name = new + field.type_name[len(old) :]
        for svc in fdp.service:
            for m in svc.method:
                m.input_type = m.input_type.replace(old, new)
                m.output_type = m.output_type.replace(old, new)
        pool.Add(fdp)
    servicer = reflection.ReflectionServicer((*services, REFLECTION_V1, reflection.SERVICE_NAME))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in (REFLECTION_V1, reflection.SERVICE_NAME)
        )
    )


def host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def connect_host(bind: str, advertise: str | None = None) -> str:
    """The address clients use to reach a server bound to `bind`.

    A wildcard bind is reached at loopback from this host (single-host jobs, as
    before), or at `advertise` when the server runs on another host than the
    one psctl launched from (`psctl start --hosts ...` writes the placement's
    server host to the run dir's ADVERTISE_FILE): 127.0.0.1 there would point
    psctl at its own machine.
    """
    if bind in ("", "0.0.0.0", "::", "[::]") and advertise:
        return advertise
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "::1"
    return bind


class ControlPlane:
    def __init__(
        self,
        cfg: Config,
        *,
        job_id: str,
        run_dir: Path,
        bind: str = "127.0.0.1",
        grpc_port: int = 0,
        metrics_port: int | None = None,
        token: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        keep_checkpoints: int = 3,
        request_timeout_s: float = 60.0,
        n_servers: int = 1,
        n_workers: int = 0,
        advertise: str | None = None,
        log=print,
    ):
        self.cfg = cfg
        self.job_id = job_id
        self.run_dir = Path(run_dir)
        self.bind = bind
        # the host name clients elsewhere reach a wildcard bind by (None: loopback)
        self.advertise = advertise if advertise is not None else read_advertise(self.run_dir)
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self._token = token.encode() if token else None
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        self.request_timeout_s = request_timeout_s
        self.n_servers, self.n_workers = n_servers, n_workers
        self.log = log
        self.store = ckpt.CheckpointStore(self.run_dir / "checkpoints", keep=keep_checkpoints)
        self.ps = None
        self.state: ServerState | None = None  # the live state once attached
        self.start_time = time.time()
        self.stopping = False
        self.grpc_address = ""
        self.metrics_address = ""
        self._requests: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._stop_phase: int | None = None
        self._final: futures.Future = futures.Future()
        self._server: grpc.Server | None = None
        self._health = _Health()
        self._metrics_httpd = None
        self.restarts = 0  # times the supervisor relaunched this job (psctl --restart-on-failure)
        self.resumed_from = ""  # checkpoint this process continued from

    # -- lifecycle (main thread) --------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in self.store.clean_partial():
            self.log(f"[control] removed a partial checkpoint left by a crashed writer: {p.name}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        _add_reflection(server, (SERVICE, health.SERVICE_NAME))
        target = host_port(self.bind, self.grpc_port)
        try:
            if self.tls:
                cert, key = (p.read_bytes() for p in self.tls)
                creds = grpc.ssl_server_credentials([(key, cert)])
                port = server.add_secure_port(target, creds)
            else:
                port = server.add_insecure_port(target)
        except OSError as exc:
            raise UserError(f"cannot read TLS files: {exc}") from exc
        except RuntimeError:
            port = 0
        if not port:
            raise UserError(f"cannot listen on {target} for gRPC (address in use or not local)")
        server.start()
        self._server = server
        self.grpc_address = host_port(connect_host(self.bind, self.advertise), port)
        if self.metrics_port is not None:
            from dbnps.server.metrics import start_metrics_server

            self._metrics_httpd, mport = start_metrics_server(self, self.bind, self.metrics_port)
            self.metrics_address = host_port(connect_host(self.bind, self.advertise), mport)
        write_json_atomic(
            self.run_dir / "endpoints.json",
            {
                "job_id": self.job_id,
                "grpc": self.grpc_address,
                "metrics": self.metrics_address,
                "bind": self.bind,
                "tls": self.tls is not None,
                "pid": os.getpid(),
            },
        )
        # Where the sockets really are (bind), and, when that is a wildcard, the
        # address a client on this host uses (what endpoints.json and psctl use).
        msg = f"[control] gRPC listening on {host_port(self.bind or '0.0.0.0', port)}"
        if self.metrics_address:
            msg += f", metrics on http://{host_port(self.bind or '0.0.0.0', mport)}/metrics"
        if connect_host(self.bind, self.advertise) != self.bind:
            where = "advertised as" if self.advertise else "from this host:"
            msg += f" (all interfaces; {where} {self.grpc_address})"
        self.log(msg)

    def attach(self, ps) -> None:
        """The windows exist: status and mutating calls can be served."""
        self.ps = ps
        self.n_servers, self.n_workers = ps.topo.n_servers, ps.topo.n_workers
        ps.refresh_workers()
        self.state = ps.state
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def on_tick(self, ps) -> None:
        """Called by `ParameterServer.run` on every iteration: keep it cheap."""
        if self._requests:
            self._drain(ps)

    def after_run(self, ps) -> ckpt.CheckpointInfo | None:
        """Every worker has left; windows still exist.  Returns the final checkpoint, if any."""
        with self._lock:
            self._closed = True
        self.stopping = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        ps.refresh_workers()
        self._drain(ps)
        info = None
        if ps.state.stopped:
            try:
                info = self.store.write(
                    ckpt.snapshot(
                        ps.checkpoint_state(),
                        job_id=self.job_id,
                        note="stop",
                        stop_phase=self._stop_phase,
                    )
                )
                self.log(f"[control] final checkpoint {info.path}")
            except Exception as exc:  # the job still finishes; the Stop caller is told
                self._final.set_exception(exc)
                self.log(f"[control] final checkpoint failed: {exc}")
                return None
        self._final.set_result(info)
        return info

    def close(self, grace_s: float = 3.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
            self._server = None
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None

    # -- main-thread work ----------------------------------------------------
    def _drain(self, ps) -> None:
        while self._requests:
            req = self._requests.popleft()
            if not req.future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                if req.kind == "snapshot":
                    snap = ckpt.snapshot(ps.checkpoint_state(), job_id=self.job_id, **req.args)
                    req.future.set_result(snap)
                elif req.kind == "stop":
                    # Tells the supervisor a non-zero exit from here on is no failure to
                    # restart.  Written here, when the stop takes effect: written before
                    # the request was accepted, a refused Stop left it behind, and a
                    # later crash was taken for a requested stop (no restart).
                    (self.run_dir / STOP_MARKER).touch()
                    if not ps.state.stopped:
                        if ps.state.phase < ps.layout.done_phase:
                            self._stop_phase = ps.state.phase
                        ps.request_stop()
                    self.stopping = True
                    self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                    req.future.set_result(True)
                else:
                    raise ValueError(f"unknown request {req.kind!r}")
            except Exception as exc:  # never let a control request kill training
                req.future.set_exception(exc)

    def _submit(self, kind: str, timeout_s: float, **args):
        with self._lock:
            if self._closed and kind == "stop":
                (self.run_dir / STOP_MARKER).touch()  # accepted: the job is ending anyway
                return None  # the caller waits for the final checkpoint
            if self._closed or self.ps is None:
                state = "finishing" if self._closed else "starting (windows not ready)"
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"the job is {state}")
            req = _Request(kind, args, futures.Future())
            self._requests.append(req)
        try:
            return req.future.result(timeout=timeout_s)
        except futures.TimeoutError:
            req.future.cancel()
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"the training loop did not take the request within {timeout_s:.0f}s",
            ) from None

    def _set_health(self, status) -> None:
        self._health.set("", status)
        self._health.set(SERVICE, status)

    # -- RPC plumbing ----------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(fn, req_cls, resp_cls, mutating: bool):
            def handler(raw: bytes, context: grpc.ServicerContext):
                try:
                    if mutating:
                        self._authorize(context)
                    req = req_cls()
                    try:
                        req.ParseFromString(raw)
                    except (DecodeError, RuntimeError, ValueError) as exc:
                        raise RpcError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"
                        ) from None
                    return fn(req, context)
                except RpcError as exc:
                    code, msg = exc.code, exc.message
                except Exception as exc:
                    self.log(f"[control] {fn.__name__} failed: {exc!r}")
                    code, msg = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
                context.abort(code, msg)

            return grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=None, response_serializer=resp_cls.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetStatus": unary(self.get_status, pb.GetStatusRequest, pb.Status, False),
                "Checkpoint": unary(
                    self.checkpoint, pb.CheckpointRequest, pb.CheckpointReply, True
                ),
                "ListCheckpoints": unary(
                    self.list_checkpoints, pb.ListCheckpointsRequest, pb.ListCheckpointsReply, False
                ),
                "Stop": unary(self.stop, pb.StopRequest, pb.StopReply, True),
            },
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._token is None:
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this job has no token configured: mutating calls are disabled",
            )
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not values:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing authorization metadata")
        value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        scheme, _, presented = value.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self._token):
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid token")

    # -- RPCs (gRPC threads: no MPI here) -------------------------------------
    def get_status(self, req: pb.GetStatusRequest, context) -> pb.Status:
        return self.status_message(include_history=req.include_history)

    def checkpoint(self, req: pb.CheckpointRequest, context) -> pb.CheckpointReply:
        if len(req.note) > MAX_NOTE:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"note longer than {MAX_NOTE} characters"
            )
        t0 = time.perf_counter()
        snap = self._submit("snapshot", self.request_timeout_s, note=req.note)
        info = self.store.write(snap)
        self.log(f"[control] checkpoint {info.path} (version {info.version})")
        return pb.CheckpointReply(
            checkpoint=info.message(), duration_seconds=time.perf_counter() - t0
        )

    def list_checkpoints(self, req: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsReply:
        if req.limit < 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0")
        infos = self.store.list()
        if req.limit:
            infos = infos[-req.limit :]
        return pb.ListCheckpointsReply(checkpoints=[i.message() for i in infos])

    def stop(self, req: pb.StopRequest, context) -> pb.StopReply:
        t = req.timeout_seconds
        if not math.isfinite(t) or t < 0 or t > MAX_TIMEOUT_S:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_seconds must be in [0, {MAX_TIMEOUT_S:.0f}], got {t}",
            )
        timeout = t or 120.0
        self._submit("stop", min(timeout, self.request_timeout_s))
        self.log("[control] stop requested over gRPC")
        reply = pb.StopReply(stopping=True)
        if req.wait:
            try:
                info = self._final.result(timeout=timeout)
            except futures.TimeoutError:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stopping, but the final checkpoint was not written within {timeout:.0f}s",
                ) from None
            if info is not None:
                reply.final_checkpoint.CopyFrom(info.message())
        return reply

    # -- status ----------------------------------------------------------------
    def status_message(self, include_history: bool = False) -> pb.Status:
        cfg = self.cfg
        st = self.state
        msg = pb.Status(
            job_id=self.job_id,
            ready=st is not None and not self.stopping,
            stopping=self.stopping,
            metrics_address=self.metrics_address,
            uptime_seconds=time.time() - self.start_time,
            checkpoints=self.store.count(),
            restarts=self.restarts,
            resumed_from=self.resumed_from,
        )
        c = msg.config
        c.sizes.extend(cfg.model.sizes)
        c.classes = cfg.model.classes
        c.update_rule = cfg.ps.update_rule
        c.n_fetch, c.n_push = cfg.ps.n_fetch, cfg.ps.n_push
        c.staleness_bound, c.sync = cfg.ps.staleness_bound, cfg.ps.sync
        c.pretrain_epochs, c.finetune_epochs = cfg.pretrain.epochs, cfg.finetune.epochs
        c.n_servers, c.n_workers = self.n_servers, self.n_workers
        c.config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        if st is None:
            msg.phase = msg.progress.phase = "starting"
            return msg
        ps = self.ps
        c.train_samples = st.n_train
        c.n_params = ps.layout.size
        msg.phase = st.phase_name
        p = msg.progress
        p.phase, p.phase_index = st.phase_name, st.phase
        p.n_phases = ps.layout.done_phase
        p.samples_in_phase, p.phase_samples = st.samples_in_phase, st.phase_samples
        p.epoch = st.epoch
        p.phase_epochs = st.phase_samples / st.n_train if st.n_train else 0.0
        p.fraction = min(st.samples_in_phase / st.phase_samples, 1.0) if st.phase_samples else 0.0
        msg.version = st.version
        msg.updates_applied = st.applied_total
        rejected = {name: 0 for name in pr.RESULT_NAMES.values() if name != "applied"}
        rejected.update(dict(st.rejected))
        msg.updates_rejected.update(rejected)
        msg.bytes_received = st.bytes_in
        counts = st.staleness_counts.copy()
        n = int(counts.sum())
        s = msg.staleness
        s.count, s.sum, s.max = n, st.staleness_sum, st.staleness_max
        s.mean = st.staleness_sum / n if n else 0.0
        s.bucket_upper_bounds.extend(STALENESS_BUCKETS)
        s.counts.extend(int(x) for x in counts)
        now = time.time()
        stats = st.worker_stats
        applied, rejected_w = st.worker_applied.copy(), st.worker_rejected.copy()
        for w in range(st.n_workers):
            row = stats[w]
            beat = float(row[pr.HEARTBEAT])
            age = now - beat if beat > 0 else -1.0
            state = st.members.state(w)  # the one liveness rule (dbnps.common.membership)
            alive = st.members.up(w)
            msg.workers.add(
                worker=w,
                rank=st.n_servers + w,
                state=state,
                alive=alive,
                steps=int(row[pr.STEPS]),
                samples=int(row[pr.ST_SAMPLES]),
                samples_per_second=float(row[pr.RATE]),
                heartbeat_age_seconds=age,
                loss=float(row[pr.LOSS]),
                pushes=int(row[pr.PUSHES]),
                pulls=int(row[pr.PULLS]),
                updates_applied=int(applied[w]),
                updates_rejected=int(rejected_w[w]),
            )
        msg.samples_per_second = float(stats[:, pr.RATE].sum())
        if st.loss == st.loss:
            msg.has_loss, msg.loss = True, st.loss
        if st.test_accuracy == st.test_accuracy:
            msg.has_test_accuracy, msg.test_accuracy = True, st.test_accuracy
        msg.eval_split = st.eval_split
        if st.eval_accuracy == st.eval_accuracy:
            msg.has_eval_accuracy, msg.eval_accuracy = True, st.eval_accuracy
        if include_history:
            msg.history_json.extend(json.dumps(e, default=float) for e in list(st.history))
        return msg


def make_control_plane(
    cfg: Config,
    *,
    out: Path | None,
    run_dir: Path | None,
    job_id: str | None,
    grpc_port: int | None,
    metrics_port: int | None,
    bind: str,
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    keep_checkpoints: int,
) -> ControlPlane:
    """The control plane from `python -m dbnps.server` options (rank 0)."""
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    if run_dir is None:
        run_dir = out.parent if out is not None else Path.cwd()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if token_file is not None:
        token = read_token(token_file)
        if Path(token_file).stat().st_mode & 0o077:
            print(f"warning: token file {token_file} is readable by others", file=sys.stderr)
    else:  # a fresh token next to the run's files, readable by the owner only
        path = run_dir / TOKEN_FILE
        token = read_token(path) if path.exists() else create_token(path)
    return ControlPlane(
        cfg,
        job_id=job_id or run_dir.resolve().name,
        run_dir=run_dir,
        bind=bind,
        grpc_port=grpc_port or 0,
        metrics_port=metrics_port,
        token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        keep_checkpoints=keep_checkpoints,
    )
