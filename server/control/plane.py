"""`ControlPlane`: the control plane's lifecycle on rank 0 and the operations its RPCs ask for.

It composes the other modules of `dbnps.server.control` (see its docstring
for the threads and the lifecycle): the gRPC server (`startup`), the token
check (`auth`), the service (`servicer`), the main-thread queue
(`mainthread`), the status message (`status`), and /metrics
(`dbnps.server.metrics`, which reads this object's public fields).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent import futures
from pathlib import Path

from grpc_health.v1 import health_pb2

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
from dbnps.server.checkpoint.format import CheckpointInfo
from dbnps.server.checkpoint.snapshot import snapshot
from dbnps.server.checkpoint.store import CheckpointStore
from dbnps.server.control.auth import TokenAuth
from dbnps.server.control.mainthread import MainThreadQueue
from dbnps.server.control.servicer import MUTATING, SERVICE, ControlServicer
from dbnps.server.control.startup import Health, connect_host, host_port, listen
from dbnps.server.control.status import status_message
from dbnps.server.state import ServerState


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
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep=keep_checkpoints)
        self.ps = None
        self.state: ServerState | None = None  # the live state once attached
        self.start_time = time.time()
        self.stopping = False
        self.grpc_address = ""
        self.metrics_address = ""
        self.calls = MainThreadQueue()
        self._stop_phase: int | None = None
        self._final: futures.Future = futures.Future()
        self._server = None
        self._health = Health()
        self._metrics_httpd = None
        self.restarts = 0  # times the supervisor relaunched this job (psctl --restart-on-failure)
        self.resumed_from = ""  # checkpoint this process continued from

    # -- lifecycle (main thread) --------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in self.store.clean_partial():
            self.log(f"[control] removed a partial checkpoint left by a crashed writer: {p.name}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server, port = listen(
            ControlServicer(self, self.log).handler(),
            SERVICE,
            bind=self.bind,
            port=self.grpc_port,
            tls=self.tls,
            interceptors=(TokenAuth(self._token, MUTATING),),
            health_servicer=self._health,
        )
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
        self.calls.open()
        self.n_servers, self.n_workers = ps.topo.n_servers, ps.topo.n_workers
        ps.refresh_workers()
        self.state = ps.state
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def on_tick(self, ps) -> None:
        """Called by `ParameterServer.run` on every iteration: keep it cheap."""
        if self.calls.pending():
            self.calls.drain(ps)

    def after_run(self, ps) -> CheckpointInfo | None:
        """Every worker has left; windows still exist.  Returns the final checkpoint, if any."""
        self.calls.close()
        self.stopping = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        ps.refresh_workers()
        self.calls.drain(ps)
        info = None
        if ps.state.stopped:
            try:
                info = self.store.write(
                    snapshot(
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

    # -- what the RPCs ask for (gRPC threads: no MPI here) -------------------
    def status_message(self, include_history: bool = False):
        return status_message(self, include_history)

    def checkpoint(self, note: str) -> CheckpointInfo:
        """A checkpoint now: the snapshot on the main thread, the disk work on this one."""
        snap = self.calls.call(
            lambda ps: snapshot(ps.checkpoint_state(), job_id=self.job_id, note=note),
            self.request_timeout_s,
        )
        info = self.store.write(snap)
        self.log(f"[control] checkpoint {info.path} (version {info.version})")
        return info

    def request_stop(self, timeout_s: float) -> None:
        """Ask the loop to stop; once it has ended, the stop is only recorded."""
        self.calls.call(
            self._stop, min(timeout_s, self.request_timeout_s), when_closed=self._mark_stopped
        )
        self.log("[control] stop requested over gRPC")

    def final_checkpoint(self, timeout_s: float) -> CheckpointInfo | None:
        """The checkpoint `after_run` writes for a stopped job (futures.TimeoutError if not yet)."""
        return self._final.result(timeout=timeout_s)

    # -- main thread -----------------------------------------------------------
    def _stop(self, ps) -> bool:
        # Written here, when the stop takes effect: written before the request was
        # accepted, a refused Stop left it behind, and a later crash was taken for a
        # requested stop (no restart).
        self._mark_stopped()
        if not ps.state.stopped:
            if ps.state.phase < ps.layout.done_phase:
                self._stop_phase = ps.state.phase
            ps.request_stop()
        self.stopping = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return True

    def _mark_stopped(self) -> None:
        """Tell the supervisor a non-zero exit from here on is no failure to restart."""
        (self.run_dir / STOP_MARKER).touch()

    def _set_health(self, status) -> None:
        self._health.set("", status)
        self._health.set(SERVICE, status)


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
