"""Files of a run directory that `psctl`, its supervisor and server rank 0 all touch.

No MPI, no gRPC, no numpy here: `psctl status`, `stop`, `list`, ... import
this module, and a CLI that imported `mpi4py.MPI` would initialise a
singleton MPI process on every call (over a second, and a 16 MiB
`/dev/shm/sm_segment.*` file left behind).  `tests/test_control.py` checks
the CLI never imports mpi4py.

The Prometheus targets live here too: every job that serves /metrics has one
`file_sd` file `<state dir>/prometheus/<job-id>.json`, which
`deploy/prometheus.yml` reads, so Prometheus finds each job without a config edit.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from dbnps.common.errors import UserError

STOP_MARKER = "stop-requested"  # in the run dir: written by the Stop RPC, read by the supervisor
FORCE_MARKER = "force-stop-requested"  # written by `psctl stop --force` before it kills the job
# exit.json "stopped_by": who ended a job that did not end by itself
STOPPED_BY_STOP = "psctl stop"
STOPPED_BY_FORCE = "psctl stop --force"
# Exit status of a job the server ended because training diverged or made no
# progress (every push rejected, loss beyond bound): not a crash, not retried
# by `--restart-on-failure` (dbnps.cli.supervise.restart_decision).
EXIT_DIVERGED = 5
TARGETS_DIR = "prometheus"  # under the state dir: one file_sd JSON file per job


EXIT_FILE = "exit.json"  # in the run dir: how the job ended, written by the supervisor
ENDPOINTS_FILE = "endpoints.json"  # in the run dir: rank 0's actual gRPC and metrics addresses
ADVERTISE_FILE = "advertise"  # in the run dir: host name a remote rank 0 is reached by


def write_advertise(run_dir: Path, host: str) -> None:
    """psctl start, for a server placed on another host: the name to advertise."""
    write_json_atomic(Path(run_dir) / ADVERTISE_FILE, {"host": host})


def read_advertise(run_dir: Path) -> str | None:
    """Rank 0: the host name to advertise for a wildcard bind, or None (loopback)."""
    try:
        host = json.loads((Path(run_dir) / ADVERTISE_FILE).read_text()).get("host")
    except (OSError, ValueError, AttributeError):
        return None
    return host if isinstance(host, str) and host else None


TOKEN_FILE = "token"  # in the run dir: the bearer token of the mutating RPCs


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read token file {path}: {exc.strerror}") from exc
    if not token:
        raise UserError(f"token file {path} is empty")
    return token


def write_token(path: Path, token: str) -> None:
    """Create `path` with mode 0600 (fails if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def create_token(path: Path) -> str:
    """A fresh random token in a new file `path` (0600); returns it."""
    token = secrets.token_urlsafe(32)
    write_token(path, token)
    return token


PRIVATE = 0o600  # run files: the owner only, like the token
PUBLIC = 0o644  # Prometheus targets: read by a Prometheus that may run as another user


def write_json_atomic(path: Path, obj, mode: int = PRIVATE) -> None:
    """Readers (Prometheus' file_sd watcher, psctl) never see a half-written file.

    The file gets exactly `mode` (fchmod: not narrowed by the umask, which the
    supervisor sets to 077 so every file the job writes is private)."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)
        f.write(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def target_file(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / TARGETS_DIR / f"{job_id}.json"


def write_target(path: Path, metrics: str) -> None:
    """Publish `metrics` (HOST:PORT of /metrics) as a Prometheus file_sd target group.

    No `job_id` target label: the job's own series carry it (`dbnps_job_info`),
    and a target label of the same name would rename theirs to `exported_job_id`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)  # Prometheus lists it; the supervisor's umask is 077
    write_json_atomic(path, [{"targets": [metrics], "labels": {"launcher": "psctl"}}], mode=PUBLIC)
