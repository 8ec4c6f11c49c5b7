"""Detached jobs: `psctl start | status | stop | checkpoint | checkpoints | logs | list`.

Modelled on `ray start/status/stop` and `dask scheduler --scheduler-file`:
`psctl start` launches mpiexec in a new session and leaves it running; every
job gets a run directory under the state directory::

    $DBNPS_STATE_DIR or ${XDG_STATE_HOME:-~/.local/state}/dbnps/
      runs/<job-id>/job.json        pid, session, addresses, config, start time
                    token           bearer token for mutating RPCs (mode 0600)
                    job.log         stdout + stderr of every rank
                    endpoints.json  written by server rank 0 (actual ports)
                    exit.json       exit status, written when the job ends
                    checkpoints/    ckpt-<version>.npz
                    model.npz, summary.json
      runs/latest -> <job-id>

The other commands find a job by `--run ID` (default: the latest) or talk to
any control plane with `--address HOST:PORT` (plus `--token-file` for the
mutating ones).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psutil

from dbnps.cli.placement import placement_options
from dbnps.common.errors import UserError
from dbnps.runfiles import (
    FORCE_MARKER,
    STOPPED_BY_FORCE,
    read_token,
    target_file,
    write_advertise,
    write_target,
    write_token,
)

STATE_ENV = "DBNPS_STATE_DIR"
TOKEN_ENV = "DBNPS_TOKEN"


# -- where runs live ------------------------------------------------------------
def state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dbnps"


def runs_dir() -> Path:
    return state_dir() / "runs"


def _write_json(path: Path, obj: dict) -> None:
    """Atomic, and private to the owner (0600) like every file of a run directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# -- processes (psutil; one session id covers the supervisor, mpiexec and every rank) --
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _created(pid: int) -> float | None:
    """When `pid` was created (Unix time), or None if it is gone: with the pid it
    names one process, so a recycled pid is not taken for the job."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def pid_alive(pid: int, created: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() in _GONE:
            return False
        # psutil derives it from the boot time, which the kernel may report 1 s apart
        # from one read to the next; a pid is not recycled that fast.
        return created is None or abs(proc.create_time() - created) < 1.5
    except psutil.Error:
        return False


def job_pids(info: dict) -> list[int]:
    """Live processes of a run's session, only if that session is still the job's.

    The session id is the supervisor's pid.  Linux does not hand out a pid while a
    session of that id has members, so while any process of the job lives, the
    number names the job's session; once they are all gone, the pid (and with
    it a new session of the same id) may belong to anyone.  So: when a process
    with pid `sid` exists but was created at another time than the supervisor
    (`pid_created`), the session is someone else's and nothing is returned; and
    only processes created after the supervisor count.
    """
    sid, created = info.get("sid"), info.get("pid_created")
    if not sid:
        return []
    pids = session_pids(sid)
    if created is None:
        return pids
    leader = _created(sid)
    if leader is not None and abs(leader - created) >= 1.5:
        return []  # the pid was reused: not our session
    out = []
    for pid in pids:
        t = _created(pid)
        if t is not None and t >= created - 1.5:
            out.append(pid)
    return out


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] not in _GONE and os.getsid(proc.pid) == sid:
                out.append(proc.pid)
        except OSError:  # gone meanwhile
            continue
    return out


# -- runs ------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    info: dict

    @property
    def id(self) -> str:
        return self.info.get("job_id", self.dir.name)

    @property
    def log(self) -> Path:
        return self.dir / "job.log"

    def reload(self) -> Run:
        self.info = json.loads((self.dir / "job.json").read_text())
        return self

    def running(self) -> bool:
        pid = self.info.get("pid")
        return bool(pid) and pid_alive(pid, self.info.get("pid_created"))

    def exit_info(self) -> dict | None:
        try:
            return json.loads((self.dir / "exit.json").read_text())
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        if self.running():
            return "running"
        ex = self.exit_info()
        if ex is None or ex.get("stopped_by") == STOPPED_BY_FORCE:
            return "killed"
        return f"exited {ex['returncode']}"

    def endpoints(self) -> dict:
        try:
            return json.loads((self.dir / "endpoints.json").read_text())
        except (OSError, ValueError):
            return {}

    def describe_end(self) -> str:
        ex = self.exit_info()
        if ex is None:
            return "its process is gone without an exit status (killed?)"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ex["ended"]))
        if ex.get("stopped_by") == STOPPED_BY_FORCE:
            return f"was killed by `{STOPPED_BY_FORCE}` at {when}"
        return f"exited with status {ex['returncode']} at {when}"

    def drop_target(self) -> None:
        """Withdraw the job's Prometheus target (an ended job is no target to scrape)."""
        path = self.info.get("prometheus_target")
        if path:
            Path(path).unlink(missing_ok=True)


def find_run(run_id: str | None) -> Run:
    root = runs_dir()
    if run_id is None:
        latest = root / "latest"
        if not latest.exists():
            raise UserError(f"no runs in {root}; start one with `psctl start`")
        path = latest.resolve()
    elif os.sep in run_id:
        path = Path(run_id)
    else:
        path = root / run_id
    if not (path / "job.json").is_file():
        raise UserError(f"no such run: {run_id} (see `psctl list`)")
    try:
        return Run(path, {}).reload()
    except (OSError, ValueError) as exc:
        raise UserError(f"run {path.name}: unreadable job.json ({exc})") from exc


def _all_runs() -> list[Run]:
    root = runs_dir()
    if not root.is_dir():
        return []
    runs = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.is_symlink() and (p / "job.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                runs.append(Run(p, {}).reload())
    return runs


# -- gRPC client -----------------------------------------------------------------
@dataclass
class Target:
    address: str
    token: str | None
    tls_ca: bytes | None
    run: Run | None

    def channel(self):
        import grpc

        if self.tls_ca is not None:
            return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.tls_ca))
        return grpc.insecure_channel(self.address)

    def call(self, method: str, request, *, timeout: float = 10.0, auth: bool = False):
        import grpc

        from dbnps.v1 import control_pb2_grpc

        metadata = ()
        if auth:
            if not self.token:
                raise UserError(f"no token for {self.address}: give --token-file (or ${TOKEN_ENV})")
            metadata = (("authorization", f"Bearer {self.token}"),)
        with self.channel() as ch:
            stub = control_pb2_grpc.ControlStub(ch)
            try:
                return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise UserError(f"bad token for {self.address}: {details}") from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise UserError(
                        f"cannot reach the job at {self.address} ({code.name}: {details})"
                    ) from None
                raise UserError(f"{method} failed: {code.name}: {details}") from None


def _target(
    run_id: str | None,
    address: str | None,
    token_file: Path | None,
    tls_ca: Path | None,
) -> Target:
    token = os.environ.get(TOKEN_ENV) or None
    if token_file is not None:
        token = read_token(token_file)
    ca = None
    if tls_ca is not None:
        try:
            ca = tls_ca.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {tls_ca}: {exc.strerror}") from exc
    if address is not None:
        if ":" not in address:
            raise UserError(f"--address must be HOST:PORT, got {address!r}")
        return Target(address, token, ca, None)
    run = find_run(run_id)
    if not run.running():
        raise UserError(f"job {run.id} is not running: {run.describe_end()}")
    # endpoints.json first: a job restarted after a failure listens on a new port.
    address = run.endpoints().get("grpc") or run.info.get("grpc")
    if not address:
        raise UserError(
            f"job {run.id} has no control-plane address yet (starting or restarting; "
            "see `psctl logs`)"
        )
    if token is None and (run.dir / "token").exists():
        token = read_token(run.dir / "token")
    if ca is None and run.info.get("tls_cert"):
        try:
            ca = Path(run.info["tls_cert"]).read_bytes()
        except OSError as exc:  # moved or removed since `psctl start`
            raise UserError(
                f"job {run.id} serves TLS, but its certificate {run.info['tls_cert']} cannot "
                f"be read ({exc.strerror}); give the CA with --tls-ca"
            ) from None
    return Target(address, token, ca, run)


def target_options(fn):
    fn = click.option(
        "--tls-ca",
        type=click.Path(path_type=Path),
        default=None,
        help="CA/cert to trust for a TLS control plane (with --address)",
    )(fn)
    fn = click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        default=None,
        help=f"bearer token file (default: the run's token, or ${TOKEN_ENV})",
    )(fn)
    fn = click.option(
        "--address", default=None, help="talk to the control plane at HOST:PORT directly"
    )(fn)
    fn = click.option("--run", "run_id", default=None, help="job id (default: the latest run)")(fn)
    return fn


def _health(address: str, tls_ca: bytes | None, timeout: float = 2.0) -> str | None:
    """The grpc.health.v1 status name of `address`, or None if unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t = Target(address, None, tls_ca, None)
    with t.channel() as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# -- psctl start -------------------------------------------------------------------
def _check_port_free(bind: str, port: int, what: str) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as exc:
            raise UserError(f"{what} port {port} on {bind} is not free: {exc.strerror}") from None


def _last_error_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:") or "Error:" in line:
            return line.strip()
    return ""


def _is_this_host(host: str) -> bool:
    """`host` names the machine psctl runs on (its hostname or a loopback name)."""
    me = socket.gethostname()
    return host in ("localhost", "127.0.0.1", "::1", me, me.split(".")[0])


def _new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _kill_session(sid: int, grace_s: float = 5.0, *, created: float | None = None) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after `grace_s`.

    `created`: the supervisor's creation time (job.json `pid_created`); with it
    only a session that is still the job's is touched (`job_pids`)."""
    info = {"sid": sid, "pid_created": created}

    def live() -> list[int]:
        return job_pids(info)

    pids = live()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while live() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in live():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


@click.command("start")
@click.option("--config", type=click.Path(path_type=Path), default=None, help="TOML job config")
@click.option("--workers", "-k", type=int, default=2, show_default=True)
@click.option("--servers", "-s", type=int, default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="0 (default): any free port; with --resume: the resumed run's",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="0 (default): any free port; with --resume: the resumed run's",
)
@click.option(
    "--bind",
    default=None,
    help="address the job listens on (default 127.0.0.1; with --resume: the resumed run's)",
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to be ready")
@click.option("--job-id", default=None, help="name of the run (default: time + random)")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path), default=None)
@click.option("--keep-checkpoints", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[RUN|CHECKPOINT]",
    help="continue from a checkpoint file, or the newest good one of a run "
    "(id or dir; alone: the latest run)",
)
@click.option(
    "--restart-on-failure",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="relaunch from the newest good checkpoint when the job dies, at most N times",
)
@placement_options
def start_cmd(
    config,
    workers,
    servers,
    data_dir,
    grpc_port,
    metrics_port,
    bind,
    timeout,
    job_id,
    tls_cert,
    tls_key,
    keep_checkpoints,
    resume,
    restart_on_failure,
    hostfile,
    hosts,
    server_host,
) -> None:
    """Start a training job in the background and wait until it serves."""
    from dbnps.cli.run import job_argv
    from dbnps.common.config import load
    from dbnps.common.job import layout_of, preflight
    from dbnps.common.launcher import mpi_env, placement_from_options
    from dbnps.common.mnist import resolve_data_dir

    resumed = _resume_source(resume) if resume is not None else None
    grpc_port, metrics_port, bind = _listen_options(resumed, grpc_port, metrics_port, bind)
    # Resuming without --config: the checkpoint's own config (written into the new run dir).
    # Otherwise a bad config fails here, once, not in every rank.
    cfg = resumed["cfg"] if resumed is not None and config is None else load(config)
    layout = layout_of(cfg)
    if resumed is not None:
        _check_resumable(resumed, cfg, layout.size)
    data = resolve_data_dir(data_dir or cfg.data.dir or None)
    preflight(cfg, workers, servers, on_one_host=not (hosts or hostfile))  # as psctl run
    placement = placement_from_options(
        servers, workers, hosts=hosts, hostfile=hostfile, server_host=server_host
    )
    remote_server = placement is not None and not _is_this_host(placement.servers[0])
    if remote_server and bind in ("127.0.0.1", "localhost", "::1"):
        raise UserError(
            f"the server runs on {placement.servers[0]}, not here: give --bind 0.0.0.0 (or its "
            "address) so the control plane is reachable; the token guards the mutating calls"
        )
    if not (timeout > 0 and math.isfinite(timeout)):
        raise UserError("--timeout must be > 0")
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            raise UserError(f"no such file: {p}")
    if grpc_port and grpc_port == metrics_port:
        raise UserError("--grpc-port and --metrics-port must differ")
    if not remote_server:  # another host's ports cannot be checked from here
        _check_port_free(bind, grpc_port, "gRPC")
        _check_port_free(bind, metrics_port, "metrics")
    job_id = job_id or _new_job_id()
    if not job_id.replace("-", "").replace("_", "").replace(".", "").isalnum() or job_id in (
        "latest",
        ".",
        "..",
    ):
        raise UserError(f"--job-id may use letters, digits, '-', '_' and '.', got {job_id!r}")
    root = runs_dir()
    run_dir = root / job_id
    try:
        root.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(mode=0o700)  # private: token, config, model and logs live here
    except FileExistsError:
        raise UserError(f"run {job_id} exists already in {root}") from None
    token_path = run_dir / "token"
    if resumed is not None and config is None:
        from dbnps.common.config import to_toml

        config = run_dir / "config.toml"
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(to_toml(cfg))
    write_token(token_path, secrets.token_urlsafe(32))
    if remote_server:  # rank 0 advertises this name for a wildcard bind, not 127.0.0.1
        write_advertise(run_dir, placement.servers[0])
    server_args = [
        "--run-dir",
        str(run_dir),
        "--job-id",
        job_id,
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--bind",
        bind,
        "--token-file",
        str(token_path),
        "--keep-checkpoints",
        str(keep_checkpoints),
    ]
    if tls_cert is not None:
        server_args += ["--tls-cert", str(tls_cert.resolve()), "--tls-key", str(tls_key.resolve())]
    if resumed is not None:
        server_args += ["--resume", str(resumed["path"])]
    config_abs = config.resolve() if config is not None else None
    argv = job_argv(
        config_abs,
        workers,
        servers,
        data,
        run_dir,
        extra_server_args=tuple(server_args),
        placement=placement,
    )
    log = run_dir / "job.log"
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dbnps.cli.supervise",
                str(run_dir / "exit.json"),
                "--restart-on-failure",
                str(restart_on_failure),
                "--run-dir",
                str(run_dir),
                "--targets-file",
                str(target_file(state_dir(), job_id)),
                "--",
                *argv,
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=mpi_env(),
            start_new_session=True,
        )
    created = _created(proc.pid)
    info = {
        "job_id": job_id,
        "pid": proc.pid,
        "pgid": proc.pid,
        "sid": proc.pid,
        "pid_created": created,
        "run_dir": str(run_dir),
        "config": str(config_abs) if config_abs else None,
        "workers": workers,
        "servers": servers,
        "bind": bind,
        "prometheus_target": str(target_file(state_dir(), job_id)),
        "hosts": None
        if placement is None
        else {"servers": list(placement.servers), "workers": list(placement.workers)},
        "grpc": None,
        "metrics": None,
        "tls_cert": str(tls_cert.resolve()) if tls_cert else None,
        "token_file": str(token_path),
        "log": str(log),
        "started": time.time(),
        "started_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": argv,
        "restart_on_failure": restart_on_failure,
        "resumed_from": None
        if resumed is None
        else {
            "checkpoint": str(resumed["path"]),
            "run": resumed["run"],
            "version": resumed["meta"]["version"],
            "phase": resumed["meta"]["phase_name"],
            "samples_in_phase": resumed["meta"]["samples_in_phase"],
        },
    }
    _write_json(run_dir / "job.json", info)
    latest_tmp = root / f".latest.{os.getpid()}"
    latest_tmp.unlink(missing_ok=True)
    latest_tmp.symlink_to(job_id)
    os.replace(latest_tmp, root / "latest")
    try:
        ca = tls_cert.read_bytes() if tls_cert else None
    except OSError as exc:
        _kill_session(proc.pid, grace_s=2.0, created=created)
        raise UserError(f"cannot read {tls_cert}: {exc.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            _kill_session(proc.pid, grace_s=2.0, created=created)  # ranks left behind, if any
            hint = _last_error_line(log)
            raise UserError(
                f"job {job_id} exited with status {rc} before it was ready; see its log {log}"
                + (f" ({hint})" if hint else "")
            )
        ep = Run(run_dir, info).endpoints()
        if ep.get("grpc") and _health(ep["grpc"], ca, timeout=1.0) == "SERVING":
            break
        if time.monotonic() > deadline:
            _kill_session(proc.pid, created=created)
            raise UserError(
                f"job {job_id} was not ready within {timeout:.0f}s and was stopped; "
                f"see its log {log}"
            )
        time.sleep(0.1)
    info["grpc"], info["metrics"] = ep["grpc"], ep.get("metrics") or None
    _write_json(run_dir / "job.json", info)
    if info["metrics"]:  # Prometheus (deploy/prometheus.yml) finds the job from here on
        write_target(Path(info["prometheus_target"]), info["metrics"])
    click.echo(f"psctl: started job {job_id} ({servers} server + {workers} workers)")
    click.echo(f"  run dir  {run_dir}")
    click.echo(f"  gRPC     {info['grpc']}  (token: {token_path})")
    if info["metrics"]:
        click.echo(
            f"  metrics  http://{info['metrics']}/metrics  (target {info['prometheus_target']})"
        )
    click.echo(f"  log      {log}")
    if resumed is not None:
        m = resumed["meta"]
        click.echo(
            f"  resumed  {resumed['path']} (phase {m['phase_name']}, version {m['version']})"
        )
    click.echo("  next     psctl status | psctl logs -f | psctl checkpoint | psctl stop")


def _listen_options(
    resumed: dict | None, grpc_port: int | None, metrics_port: int | None, bind: str | None
) -> tuple[int, int, str]:
    """(gRPC port, metrics port, bind address) of a new job.

    Given on the command line, else those the resumed run asked for (so the
    scrape configs, port-forwards and firewall rules made for it still hold),
    else any free port on loopback.  A run's request is read back from the
    server arguments in its job.json.
    """
    asked: dict[str, str] = {}
    if resumed is not None:
        try:
            argv = json.loads((Path(resumed["run"]) / "job.json").read_text()).get("argv") or []
        except (OSError, ValueError):
            argv = []
        for flag, value in itertools.pairwise(argv):
            if flag == ":":
                break  # the workers' section
            if flag in ("--grpc-port", "--metrics-port", "--bind"):
                asked[flag] = value

    def port(given: int | None, flag: str) -> int:
        if given is not None:
            return given
        return int(asked[flag]) if asked.get(flag, "").isdigit() else 0

    if bind is None:
        bind = asked.get("--bind", "127.0.0.1")
    return port(grpc_port, "--grpc-port"), port(metrics_port, "--metrics-port"), bind


def _resume_source(spec: str) -> dict:
    """The checkpoint `psctl start --resume SPEC` continues from (verified), or UserError.

    SPEC: "" (the latest run), a run id, a run or checkpoints directory, or a
    checkpoint file.  In a directory the newest good checkpoint is taken; each
    newer corrupt one is reported with one warning line on stderr.
    """
    from dbnps.common.config import from_dict
    from dbnps.server.checkpoint import find_resumable

    if spec == "":
        where = find_run(None).dir
    elif Path(spec).exists():
        where = Path(spec)
    else:
        where = find_run(spec).dir
    path, (params, _, meta) = find_resumable(where, warn=lambda m: click.echo(m, err=True))
    try:
        cfg = from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} has no usable config ({exc})") from None
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    _refuse_running(run)
    return {
        "path": path.resolve(),
        "meta": meta,
        "cfg": cfg,
        "n_params": params.size,
        "run": str(run.resolve()),
    }


def _refuse_running(run_dir: Path) -> None:
    """A run that is still running is not resumed: two jobs would train from one
    checkpoint and write into one checkpoints folder."""
    try:
        run = Run(run_dir, {}).reload()
    except (OSError, ValueError):
        return  # not a psctl run directory (a copied checkpoint, a `psctl run` folder)
    if run.running():
        raise UserError(
            f"run {run.id} is still running (pid {run.info.get('pid')}): stop it first "
            f"(`psctl stop --run {run.id}`; its final checkpoint is then resumed)"
        )


def _check_resumable(resumed: dict, cfg, n_params: int) -> None:
    path, meta = resumed["path"], resumed["meta"]
    if resumed["n_params"] != n_params:
        raise UserError(
            f"cannot resume from {path}: it holds {resumed['n_params']} parameters, "
            f"the config's network has {n_params}"
        )
    if meta.get("update_rule") != cfg.ps.update_rule:
        click.echo(
            f"warning: {path} was trained with update rule {meta.get('update_rule')}, the "
            f"config says {cfg.ps.update_rule}: the optimizer state restarts at zero",
            err=True,
        )


# -- psctl status --------------------------------------------------------------------
def _message_dict(msg) -> dict:
    """`msg` in the proto3 JSON mapping (what grpcurl prints: int64 as strings), every field
    present, with the fields that carry JSON text (`config.config_json`, `history_json`)
    parsed into objects, so `--json` output is JSON all the way down."""
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    cfg = out.get("config")
    if isinstance(cfg, dict) and "config_json" in cfg:
        text = cfg.pop("config_json")
        cfg["resolved"] = json.loads(text) if text else None
    if "history_json" in out:
        out["history"] = [json.loads(h) for h in out.pop("history_json")]
    return out


def _fmt_status(msg, run_info: dict | None = None) -> str:
    p = msg.progress
    rej = dict(msg.updates_rejected)
    if not msg.ready and not msg.stopping and p.n_phases == 0:
        # Rank 0 serves before the windows exist: nothing to say about phases or workers
        # yet, except what the run asked for.
        info = run_info or {}
        asked = (
            f"  {info['servers']} server(s), {info['workers']} worker(s) requested"
            if info.get("workers")
            else ""
        )
        return (
            f"job {msg.job_id}  starting  up {msg.uptime_seconds:.0f}s{asked}"
            f"  net {'-'.join(map(str, msg.config.sizes))}  rule {msg.config.update_rule}\n"
            "waiting for every rank to join (RMA windows not ready yet)"
        )
    # updates_applied counts this server process; version carries on over a resume/restart.
    since = "  (since resume)" if msg.resumed_from or msg.restarts else ""
    lines = [
        f"job {msg.job_id}  {'stopping' if msg.stopping else 'running' if msg.ready else 'starting'}"
        f"  up {msg.uptime_seconds:.0f}s  {msg.config.n_servers} server(s), "
        f"{msg.config.n_workers} worker(s)  net {'-'.join(map(str, msg.config.sizes))}"
        f"  rule {msg.config.update_rule}"
        + (f"  restarts {msg.restarts}" if msg.restarts else "")
        + (f"  resumed from {msg.resumed_from}" if msg.resumed_from else ""),
        f"phase {p.phase} ({p.phase_index + 1}/{p.n_phases})  epoch {p.epoch:.2f}/"
        f"{p.phase_epochs:g} ({100 * p.fraction:.1f}%)  version {msg.version}",
        f"updates applied {msg.updates_applied}{since}, rejected {sum(rej.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) + ")" if rej else "")
        + f"  staleness mean {msg.staleness.mean:.2f} max {msg.staleness.max}",
        f"throughput {msg.samples_per_second:,.0f} samples/s  loss "
        + (f"{msg.loss:.4f}" if msg.has_loss else "-")
        + (
            f"  validation accuracy {msg.eval_accuracy:.4f}"
            if msg.eval_split == "validation" and msg.has_eval_accuracy
            else ""
        )
        + "  test accuracy "
        + (f"{msg.test_accuracy:.4f}" if msg.has_test_accuracy else "-")
        + f"  checkpoints {msg.checkpoints}",
        "",
        f"{'WORKER':>6} {'RANK':>4} {'STATE':<8} {'STEPS':>9} {'SAMPLES/S':>11} "
        f"{'HEARTBEAT':>9} {'APPLIED':>8} {'REJECTED':>8} {'LOSS':>8}",
    ]
    for w in msg.workers:
        beat = f"{w.heartbeat_age_seconds:.1f}s" if w.heartbeat_age_seconds >= 0 else "-"
        lines.append(
            f"{w.worker:>6} {w.rank:>4} {w.state:<8} {w.steps:>9} {w.samples_per_second:>11,.0f} "
            f"{beat:>9} {w.updates_applied:>8} {w.updates_rejected:>8} {w.loss:>8.4f}"
        )
    return "\n".join(lines)


@click.command("status")
@target_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="refresh until the job ends (Ctrl-C to leave)")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
def status_cmd(run_id, address, token_file, tls_ca, as_json, watch, interval) -> None:
    """Show a job's phase, progress, updates and workers."""
    from dbnps.v1 import control_pb2 as pb

    target = _target(run_id, address, token_file, tls_ca)
    while True:
        try:
            msg = target.call("GetStatus", pb.GetStatusRequest())
        except UserError:
            if watch and target.run is not None and not target.run.running():
                click.echo(f"job {target.run.id} {target.run.describe_end()}")
                return
            raise
        if as_json:
            click.echo(json.dumps(_message_dict(msg), indent=None if watch else 1))
        else:
            if watch:
                click.clear()
            click.echo(_fmt_status(msg, target.run.info if target.run else None))
        if not watch:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


# -- psctl stop / checkpoint / checkpoints --------------------------------------------
@click.command("stop")
@target_options
@click.option("--force", is_flag=True, help="kill every process of the job (no checkpoint)")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True)
def stop_cmd(run_id, address, token_file, tls_ca, force, timeout) -> None:
    """Stop a job: checkpoint, let the workers finish, exit (or --force: kill it)."""
    from dbnps.v1 import control_pb2 as pb

    if force:
        if address is not None:
            raise UserError("--force needs a run (--run ID), not --address")
        run = find_run(run_id)
        sid = run.info.get("sid")
        if not job_pids(run.info):  # pid reuse: a session of that id may be someone else's
            raise UserError(f"job {run.id} is not running: {run.describe_end()}")
        # Read by the supervisor: the end is the user's doing, not a failure to restart.
        (run.dir / FORCE_MARKER).touch()
        n = _kill_session(sid, created=run.info.get("pid_created"))
        if run.exit_info() is None:  # the supervisor was killed before it could say so
            _write_json(
                run.dir / "exit.json",
                {"returncode": None, "ended": time.time(), "stopped_by": STOPPED_BY_FORCE},
            )
        run.drop_target()
        click.echo(f"psctl: killed job {run.id} ({n} processes)")
        return
    target = _target(run_id, address, token_file, tls_ca)
    reply = target.call(
        "Stop", pb.StopRequest(wait=True, timeout_seconds=timeout), timeout=timeout + 10, auth=True
    )
    if reply.final_checkpoint.path:
        click.echo(f"psctl: final checkpoint {reply.final_checkpoint.path}")
    run = target.run
    if run is None:
        click.echo(f"psctl: job at {target.address} is stopping")
        return
    deadline = time.monotonic() + timeout
    while run.running():
        if time.monotonic() > deadline:
            raise UserError(
                f"job {run.id} did not exit within {timeout:.0f}s after stopping; "
                f"see {run.log}, or `psctl stop --force --run {run.id}`"
            )
        time.sleep(0.1)
    sid = run.info.get("sid")
    deadline = time.monotonic() + 5
    while job_pids(run.info) and time.monotonic() < deadline:
        time.sleep(0.1)  # ranks still exiting after mpiexec
    if job_pids(run.info):
        n = _kill_session(sid, grace_s=2.0, created=run.info.get("pid_created"))
        click.echo(f"psctl: killed {n} leftover process(es) of job {run.id}", err=True)
    ex = run.exit_info()
    if ex is None:
        raise UserError(f"job {run.id} ended without an exit status; see {run.log}")
    if ex["returncode"] != 0:
        raise UserError(f"job {run.id} exited with status {ex['returncode']}; see {run.log}")
    click.echo(f"psctl: job {run.id} stopped (exit status 0)")


@click.command("checkpoint")
@target_options
@click.option("--note", default="", help="text stored in the checkpoint")
def checkpoint_cmd(run_id, address, token_file, tls_ca, note) -> None:
    """Write a checkpoint of a running job now and print its path."""
    from dbnps.v1 import control_pb2 as pb

    target = _target(run_id, address, token_file, tls_ca)
    reply = target.call("Checkpoint", pb.CheckpointRequest(note=note), timeout=120, auth=True)
    c = reply.checkpoint
    click.echo(
        f"{c.path}  (version {c.version}, phase {c.phase}, {c.size_bytes} bytes, "
        f"{reply.duration_seconds:.3f}s)"
    )


@click.command("checkpoints")
@target_options
@click.option("--json", "as_json", is_flag=True)
def checkpoints_cmd(run_id, address, token_file, tls_ca, as_json) -> None:
    """List a job's checkpoints (from the job, or from its run directory once it ended)."""
    from dbnps.v1 import control_pb2 as pb

    if address is None:
        run = find_run(run_id)
        if not run.running():
            from dbnps.server.checkpoint import CheckpointStore

            infos = [
                _message_dict(i.message()) for i in CheckpointStore(run.dir / "checkpoints").list()
            ]
            _print_checkpoints(infos, as_json, f"job {run.id}")
            return
    target = _target(run_id, address, token_file, tls_ca)
    reply = target.call("ListCheckpoints", pb.ListCheckpointsRequest())
    who = f"job {target.run.id}" if target.run else target.address
    _print_checkpoints([_message_dict(c) for c in reply.checkpoints], as_json, who)


def _print_checkpoints(infos: list[dict], as_json: bool, who: str) -> None:
    if as_json:
        click.echo(json.dumps(infos, indent=1))
        return
    if not infos:
        click.echo(f"no checkpoints yet ({who}); `psctl checkpoint` writes one")
        return
    click.echo(f"{'CREATED':<19}  {'VERSION':>9}  {'PHASE':<11} {'SIZE':>10}  PATH")
    for c in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(c["created_unix"])))
        click.echo(
            f"{when}  {int(c['version']):>9}  {c['phase']:<11} {int(c['size_bytes']):>10}  "
            f"{c['path']}"
        )


# -- psctl logs / list -------------------------------------------------------------------
@click.command("logs")
@click.option("--run", "run_id", default=None, help="job id (default: the latest run)")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@click.option("--raw", is_flag=True, help="the log file as written, Open MPI banners included")
def logs_cmd(run_id, follow, raw) -> None:
    """Print a job's log (stdout and stderr of every rank), cleaned as `psctl run` shows it."""
    from dbnps.joboutput import LineFilter

    run = find_run(run_id)
    try:
        f = open(run.log, "rb")  # noqa: SIM115 (read while the job appends)
    except OSError as exc:
        raise UserError(f"no log for job {run.id}: {exc.strerror}") from None
    out = click.get_binary_stream("stdout")
    filt, partial = LineFilter(), b""

    def emit(data: bytes, final: bool = False) -> None:
        nonlocal partial
        if raw:
            out.write(data)
        else:  # whole lines through the filter; a partial last line waits for its end
            lines = (partial + data).split(b"\n")
            partial = lines.pop()  # b"" after a newline
            if final and partial:
                lines.append(partial)
            shown = [s for line in lines for s in filt.feed(line.decode(errors="replace"))]
            if final:
                shown += filt.close()
            out.write(b"".join(s.encode() + b"\n" for s in shown))
        out.flush()

    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                emit(chunk)
                continue
            if not follow or not run.running():
                emit(f.read(), final=True)
                return
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                return


@click.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json) -> None:
    """List runs in the state directory."""
    runs = _all_runs()
    for r in runs:
        if not r.running():
            r.drop_target()
    try:
        latest = (runs_dir() / "latest").resolve().name
    except OSError:
        latest = None
    rows = [
        {
            "job_id": r.id,
            "state": r.state(),
            "started": r.info.get("started_iso", ""),
            "servers": r.info.get("servers"),
            "workers": r.info.get("workers"),
            "grpc": r.info.get("grpc"),
            "metrics": r.info.get("metrics"),
            "run_dir": str(r.dir),
            "latest": r.dir.name == latest,
        }
        for r in runs
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"no runs in {runs_dir()}")
        return
    click.echo(f"  {'JOB ID':<24} {'STATE':<10} {'STARTED':<25} {'S+K':<5} GRPC")
    for r in rows:
        mark = "*" if r["latest"] else " "
        sk = f"{r['servers']}+{r['workers']}"
        click.echo(
            f"{mark} {r['job_id']:<24} {r['state']:<10} {r['started']:<25} {sk:<5} {r['grpc'] or '-'}"
        )


COMMANDS = [start_cmd, status_cmd, stop_cmd, checkpoint_cmd, checkpoints_cmd, logs_cmd, list_cmd]
