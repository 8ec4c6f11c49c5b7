"""Launching jobs: the mpiexec argv, the checks before it, and a detached start.

`psctl run` runs `job_argv` in the foreground; `psctl start` (`start_job`)
runs it under the supervisor (`python -m dbnps.cli.supervise`) in a new
session, records the run in its directory and waits until rank 0's control
plane reports SERVING.  Config, data and placement modules are imported on
use: they pull in numpy, which `psctl status` must not load.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbnps.common.errors import UserError
from dbnps.common.launcher import Placement, mpmd_argv
from dbnps.jobs import process
from dbnps.jobs.client import health
from dbnps.jobs.registry import Run, create_run_dir, mark_latest, new_job_id, state_dir
from dbnps.jobs.resume import Resumed, check_resumable, listen_options, resume_source
from dbnps.runfiles import (
    EXIT_FILE,
    TOKEN_FILE,
    create_token,
    target_file,
    write_advertise,
    write_target,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def job_argv(
    config: Path | None,
    workers: int,
    servers: int,
    data_dir: Path,
    run_dir: Path,
    extra_worker_args: tuple[str, ...] = (),
    *,
    extra_server_args: tuple[str, ...] = (),
    fault_tolerant: bool = True,
    placement: Placement | None = None,
) -> list[str]:
    """The mpiexec argv of a job; `extra_server_args` carry e.g. the control-plane flags.

    `fault_tolerant` runs MPI with ULFM (`--with-ft ulfm`): a dead worker no longer
    takes the job down, the server notices its silence and the others finish.
    `placement` (`launcher.placement_from_options`): the host of every rank.
    """
    common = ["--data-dir", str(data_dir)]
    if config is not None:
        common += ["--config", str(config)]
    server_args = [
        *common,
        "--out",
        str(run_dir / "model.npz"),
        "--summary",
        str(run_dir / "summary.json"),
        *extra_server_args,
    ]
    return mpmd_argv(
        servers,
        workers,
        server_args,
        [*common, *extra_worker_args],
        fault_tolerant=fault_tolerant,
        placement=placement,
    )


@dataclass
class Plan:
    """A job checked before launch: its config, data folder and rank placement."""

    cfg: Any
    n_params: int
    data_dir: Path
    placement: Placement | None


def plan_job(
    cfg,
    workers: int,
    servers: int,
    data_dir: Path | None,
    *,
    hosts: str | None = None,
    hostfile: Path | None = None,
    server_host: str | None = None,
) -> Plan:
    """What `psctl run` and `psctl start` check before launching, so a doomed job is
    refused in one line here instead of failing in every rank."""
    from dbnps.common.job import layout_of, preflight
    from dbnps.common.launcher import placement_from_options
    from dbnps.common.mnist import resolve_data_dir

    layout = layout_of(cfg)
    data = resolve_data_dir(data_dir or cfg.data.dir or None)
    preflight(cfg, workers, servers, on_one_host=not (hosts or hostfile))
    placement = placement_from_options(
        servers, workers, hosts=hosts, hostfile=hostfile, server_host=server_host
    )
    return Plan(cfg, layout.size, data, placement)


def run_foreground(argv: list[str], *, progress: bool) -> int:
    """mpiexec `argv` with its output relayed (Open MPI banners dropped, progress bars
    drawn when `progress`); its exit status.

    SIGTERM and SIGHUP to psctl reach mpiexec, which stops every rank: a
    batch system or a closed terminal that ends `psctl run` ends the job too
    (without this, psctl died and the job trained on without it).
    """
    from dbnps.common.launcher import mpi_env
    from dbnps.joboutput import relay

    # Through pipes, not the terminal: joboutput drops Open MPI's banners and NULs
    # and draws the progress bars.
    proc = subprocess.Popen(
        argv, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    got: list[int] = []

    def forward(signum, _frame):
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = relay(proc, progress=progress)  # until mpiexec closes its output
    except KeyboardInterrupt:  # mpiexec got the same SIGINT from the terminal
        proc.wait()
        raise UserError("interrupted; the job was stopped") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        proc.wait()
        raise UserError(f"{signal.Signals(got[0]).name}: the job was stopped")
    return rc


# -- psctl start ------------------------------------------------------------------------
@dataclass
class StartOptions:
    """`psctl start`'s options; None: the default, or with `resume` the resumed run's."""

    config: Path | None = None
    workers: int = 2
    servers: int = 1
    data_dir: Path | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    bind: str | None = None
    timeout: float = 60.0
    job_id: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keep_checkpoints: int = 3
    resume: str | None = None  # "" the latest run, a run id or dir, a checkpoint file
    restart_on_failure: int = 0
    hostfile: Path | None = None
    hosts: str | None = None
    server_host: str | None = None


def check_port_free(bind: str, port: int, what: str) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as exc:
            raise UserError(f"{what} port {port} on {bind} is not free: {exc.strerror}") from None


def last_error_line(log: Path) -> str:
    """The last line of `log` that reads like an error, or ""."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:") or "Error:" in line:
            return line.strip()
    return ""


def is_this_host(host: str) -> bool:
    """`host` names the machine psctl runs on (its hostname or a loopback name)."""
    me = socket.gethostname()
    return host in ("localhost", "127.0.0.1", "::1", me, me.split(".")[0])


def _check_start_options(o: StartOptions, remote_server: str | None) -> None:
    if remote_server and o.bind in LOOPBACK:
        raise UserError(
            f"the server runs on {remote_server}, not here: give --bind 0.0.0.0 (or its "
            "address) so the control plane is reachable; the token guards the mutating calls"
        )
    if not (o.timeout > 0 and math.isfinite(o.timeout)):
        raise UserError("--timeout must be > 0")
    if (o.tls_cert is None) != (o.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    for p in (o.tls_cert, o.tls_key):
        if p is not None and not p.is_file():
            raise UserError(f"no such file: {p}")
    if o.grpc_port and o.grpc_port == o.metrics_port:
        raise UserError("--grpc-port and --metrics-port must differ")
    if not remote_server:  # another host's ports cannot be checked from here
        check_port_free(o.bind, o.grpc_port, "gRPC")
        check_port_free(o.bind, o.metrics_port, "metrics")


def start_job(opts: StartOptions, warn: Callable[[str], None]) -> tuple[Run, Resumed | None]:
    """Launch a detached job and return its run once it serves (UserError otherwise).

    A job that exits or is not ready within `opts.timeout` is stopped, every
    process of its session with it, and the error names its log.
    """
    from dataclasses import replace

    from dbnps.common.config import load, to_toml
    from dbnps.common.launcher import mpi_env

    resumed = resume_source(opts.resume, warn) if opts.resume is not None else None
    grpc_port, metrics_port, bind = listen_options(
        resumed.run if resumed else None, opts.grpc_port, opts.metrics_port, opts.bind
    )
    o = replace(opts, grpc_port=grpc_port, metrics_port=metrics_port, bind=bind)
    # Resuming without --config: the checkpoint's own config (written into the new run dir).
    # Otherwise a bad config fails here, once, not in every rank.
    cfg = resumed.cfg if resumed is not None and o.config is None else load(o.config)
    plan = plan_job(
        cfg,
        o.workers,
        o.servers,
        o.data_dir,
        hosts=o.hosts,
        hostfile=o.hostfile,
        server_host=o.server_host,
    )
    if resumed is not None:
        check_resumable(resumed, cfg.ps.update_rule, plan.n_params, warn)
    placement = plan.placement
    server_host = placement.servers[0] if placement is not None else None
    remote_server = server_host if server_host and not is_this_host(server_host) else None
    _check_start_options(o, remote_server)

    job_id = o.job_id or new_job_id()
    run_dir = create_run_dir(job_id)
    config = o.config
    if resumed is not None and config is None:
        config = run_dir / "config.toml"
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(to_toml(cfg))
    token_path = run_dir / TOKEN_FILE
    create_token(token_path)
    if remote_server:  # rank 0 advertises this name for a wildcard bind, not 127.0.0.1
        write_advertise(run_dir, remote_server)
    server_args = [
        "--run-dir", str(run_dir),
        "--job-id", job_id,
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        "--bind", bind,
        "--token-file", str(token_path),
        "--keep-checkpoints", str(o.keep_checkpoints),
    ]  # fmt: skip
    if o.tls_cert is not None:
        server_args += [
            "--tls-cert", str(o.tls_cert.resolve()), "--tls-key", str(o.tls_key.resolve())
        ]  # fmt: skip
    if resumed is not None:
        server_args += ["--resume", str(resumed.path)]
    config_abs = config.resolve() if config is not None else None
    argv = job_argv(
        config_abs,
        o.workers,
        o.servers,
        plan.data_dir,
        run_dir,
        extra_server_args=tuple(server_args),
        placement=placement,
    )
    targets = target_file(state_dir(), job_id)
    log = run_dir / "job.log"
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as logf:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "dbnps.cli.supervise", str(run_dir / EXIT_FILE),
                "--restart-on-failure", str(o.restart_on_failure),
                "--run-dir", str(run_dir),
                "--targets-file", str(targets),
                "--", *argv,
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=mpi_env(),
            start_new_session=True,  # outlives the shell; one session id for every process
        )  # fmt: skip
    created = process.created(proc.pid)
    run = Run(
        run_dir,
        {
            "job_id": job_id,
            "pid": proc.pid,
            "pgid": proc.pid,
            "sid": proc.pid,
            "pid_created": created,
            "run_dir": str(run_dir),
            "config": str(config_abs) if config_abs else None,
            "workers": o.workers,
            "servers": o.servers,
            "bind": bind,
            "prometheus_target": str(targets),
            "hosts": None
            if placement is None
            else {"servers": list(placement.servers), "workers": list(placement.workers)},
            "grpc": None,
            "metrics": None,
            "tls_cert": str(o.tls_cert.resolve()) if o.tls_cert else None,
            "token_file": str(token_path),
            "log": str(log),
            "started": time.time(),
            "started_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": argv,
            "restart_on_failure": o.restart_on_failure,
            "resumed_from": None if resumed is None else resumed.record(),
        },
    )
    run.save()
    mark_latest(run)
    _wait_ready(run, proc, o)
    return run, resumed


def _wait_ready(run: Run, proc: subprocess.Popen, o: StartOptions) -> None:
    """Until rank 0's health service says SERVING; then its addresses go into job.json
    and its metrics address becomes a Prometheus target."""
    created = run.info["pid_created"]
    try:
        ca = o.tls_cert.read_bytes() if o.tls_cert else None
    except OSError as exc:
        process.kill_session(proc.pid, grace_s=2.0, created_at=created)
        raise UserError(f"cannot read {o.tls_cert}: {exc.strerror}") from None
    deadline = time.monotonic() + o.timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            process.kill_session(proc.pid, grace_s=2.0, created_at=created)  # ranks left behind
            hint = last_error_line(run.log)
            raise UserError(
                f"job {run.id} exited with status {rc} before it was ready; see its log "
                f"{run.log}" + (f" ({hint})" if hint else "")
            )
        ep = run.endpoints()
        if ep.get("grpc") and health(ep["grpc"], ca, timeout=1.0) == "SERVING":
            break
        if time.monotonic() > deadline:
            process.kill_session(proc.pid, created_at=created)
            raise UserError(
                f"job {run.id} was not ready within {o.timeout:.0f}s and was stopped; "
                f"see its log {run.log}"
            )
        time.sleep(0.1)
    run.info["grpc"], run.info["metrics"] = ep["grpc"], ep.get("metrics") or None
    run.save()
    if run.info["metrics"]:  # Prometheus (deploy/prometheus.yml) finds the job from here on
        write_target(Path(run.info["prometheus_target"]), run.info["metrics"])
