"""Where runs live: the state directory, run directories and their records.

Modelled on `ray start/status/stop` and `dask scheduler --scheduler-file`: every
job `psctl start` launches gets a run directory under the state directory::

    $DBNPS_STATE_DIR or ${XDG_STATE_HOME:-~/.local/state}/dbnps/
      runs/<job-id>/job.json        pid, session, addresses, config, start time
                    token           bearer token for mutating RPCs (mode 0600)
                    job.log         stdout + stderr of every rank
                    endpoints.json  written by server rank 0 (actual ports)
                    exit.json       exit status, written when the job ends
                    checkpoints/    ckpt-<version>.npz
                    model.npz, summary.json
      runs/latest -> <job-id>
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from dbnps.common.errors import UserError
from dbnps.jobs.process import job_pids, pid_alive
from dbnps.runfiles import (
    ENDPOINTS_FILE,
    EXIT_FILE,
    STOPPED_BY_FORCE,
    STOPPED_BY_STOP,
    write_json_atomic,
)

STATE_ENV = "DBNPS_STATE_DIR"
JOB_FILE = "job.json"
LATEST = "latest"


def state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dbnps"


def runs_dir() -> Path:
    return state_dir() / "runs"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Run:
    """One run directory and its job.json (`info`)."""

    dir: Path
    info: dict

    @classmethod
    def load(cls, path: Path) -> Run:
        """The run in `path` (OSError or ValueError if its job.json cannot be read)."""
        return cls(path, {}).reload()

    @property
    def id(self) -> str:
        return self.info.get("job_id", self.dir.name)

    @property
    def log(self) -> Path:
        return self.dir / "job.log"

    def reload(self) -> Run:
        self.info = json.loads((self.dir / JOB_FILE).read_text())
        return self

    def save(self) -> None:
        write_json_atomic(self.dir / JOB_FILE, self.info)

    def supervised(self) -> bool:
        """Its supervisor (job.json `pid`, the session leader) is alive."""
        pid = self.info.get("pid")
        return bool(pid) and pid_alive(pid, self.info.get("pid_created"))

    def running(self) -> bool:
        """Some process of the job lives: the supervisor, or, when the supervisor was
        killed, the mpiexec and ranks it left behind (they train on, orphaned)."""
        return self.supervised() or bool(job_pids(self.info))

    def orphaned(self) -> bool:
        """The ranks live on without the supervisor: no restart, no exit status."""
        return not self.supervised() and bool(job_pids(self.info))

    def exit_info(self) -> dict | None:
        return _read_json(self.dir / EXIT_FILE)

    def record_end(self, stopped_by: str, **extra) -> None:
        """exit.json for an end the supervisor could not record (it was killed, or had
        been: `psctl stop --force`, or `psctl stop` of an orphaned job); an exit
        status the supervisor did write stays."""
        if self.exit_info() is None:
            write_json_atomic(
                self.dir / EXIT_FILE,
                {"returncode": None, "ended": time.time(), "stopped_by": stopped_by, **extra},
            )

    def state(self) -> str:
        if self.supervised():
            return "running"
        if self.orphaned():
            return "orphaned"  # supervisor killed; psctl stop still ends it
        ex = self.exit_info()
        if ex is None or ex.get("stopped_by") == STOPPED_BY_FORCE:
            return "killed"
        if ex.get("supervisor") == "gone":
            return "stopped"
        return f"exited {ex['returncode']}"

    def endpoints(self) -> dict:
        return _read_json(self.dir / ENDPOINTS_FILE) or {}

    def describe_end(self) -> str:
        ex = self.exit_info()
        if ex is None:
            return "its process is gone without an exit status (killed?)"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ex["ended"]))
        if ex.get("stopped_by") == STOPPED_BY_FORCE:
            return f"was killed by `{STOPPED_BY_FORCE}` at {when}"
        if ex.get("supervisor") == "gone":
            return f"was stopped by `{STOPPED_BY_STOP}` at {when} (its supervisor had been killed)"
        return f"exited with status {ex['returncode']} at {when}"

    def drop_target(self) -> None:
        """Withdraw the job's Prometheus target (an ended job is no target to scrape)."""
        path = self.info.get("prometheus_target")
        if path:
            Path(path).unlink(missing_ok=True)


def find_run(run_id: str | None) -> Run:
    """The run named `run_id` (an id, or a run directory's path); None: the latest."""
    root = runs_dir()
    if run_id is None:
        latest = root / LATEST
        if not latest.exists():
            raise UserError(f"no runs in {root}; start one with `psctl start`")
        path = latest.resolve()
    elif os.sep in run_id:
        path = Path(run_id)
    else:
        path = root / run_id
    if not (path / JOB_FILE).is_file():
        raise UserError(f"no such run: {run_id} (see `psctl list`)")
    try:
        return Run.load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"run {path.name}: unreadable {JOB_FILE} ({exc})") from exc


def all_runs() -> list[Run]:
    """Every readable run of the state directory, oldest id first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    runs = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.is_symlink() and (p / JOB_FILE).is_file():
            with contextlib.suppress(OSError, ValueError):
                runs.append(Run.load(p))
    return runs


def latest_id() -> str | None:
    try:
        return (runs_dir() / LATEST).resolve().name
    except OSError:
        return None


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_job_id(job_id: str) -> None:
    """A job id names a folder under runs/: no separators, not `latest`."""
    bare = job_id.replace("-", "").replace("_", "").replace(".", "")
    if not bare.isalnum() or job_id in (LATEST, ".", ".."):
        raise UserError(f"--job-id may use letters, digits, '-', '_' and '.', got {job_id!r}")


def create_run_dir(job_id: str) -> Path:
    """runs/<job_id>, new and private (token, config, model and logs live there)."""
    check_job_id(job_id)
    root = runs_dir()
    run_dir = root / job_id
    try:
        root.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise UserError(f"run {job_id} exists already in {root}") from None
    return run_dir


def mark_latest(run: Run) -> None:
    """Point runs/latest at `run` (atomically: a reader sees the old or the new one)."""
    root = run.dir.parent
    tmp = root / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.dir.name)
    os.replace(tmp, root / LATEST)


def run_rows(runs: list[Run]) -> list[dict]:
    """`psctl list --json`: one record per run."""
    latest = latest_id()
    return [
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
