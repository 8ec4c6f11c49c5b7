"""`python -m dbnps.cli.supervise EXIT_JSON [OPTIONS] -- CMD...`: run a detached job, record how it ended.

`psctl start` launches this in a new session (so the job outlives the shell
and every process of it shares one session id); it runs `mpiexec` as its
child, forwards SIGTERM/SIGINT/SIGHUP to it, and writes the exit status to
EXIT_JSON atomically when mpiexec ends, so `psctl stop` and `psctl status`
can report it although they are not the job's parent.

`--restart-on-failure N --run-dir DIR` (torchrun's `--max-restarts`): when
mpiexec ends with a non-zero status that no stop caused (no signal forwarded
by us, no `stop-requested` marker written by the server's Stop RPC), relaunch
the job from the newest good checkpoint in DIR/checkpoints (a corrupt one is
skipped with a warning), at most N times.  No checkpoint yet: from the
original `--resume` source if there was one, else from scratch.  Each restart
is appended to DIR/restarts.json and told to the server (`--restarts`), so
`psctl status` shows the count.

`--targets-file F`: the job's Prometheus file_sd target (dbnps.runfiles).  A
thread keeps F in step with the metrics address in DIR/endpoints.json (a
restarted job may listen on a new port), and F is removed when the job ends.

EXIT_JSON also says who ended a job that did not end by itself
(`stopped_by`: `psctl stop`, `psctl stop --force`, or the signal's name), and
the log's last line says it too: mpiexec's own last words on a SIGTERM
("Abort is in progress...") read like a crash.

The wait for mpiexec has no timeout of its own, because a job may train for
days; a dead or stuck server ends the job through the workers' watchdogs
(`[ps] step_timeout_s`), and mpiexec then ends too.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dbnps.runfiles import (
    ENDPOINTS_FILE,
    EXIT_DIVERGED,
    FORCE_MARKER,
    STOP_MARKER,
    STOPPED_BY_FORCE,
    STOPPED_BY_STOP,
    write_json_atomic,
    write_target,
)


def restart_decision(
    rc: int, *, stopped: bool, restarts_done: int, max_restarts: int
) -> tuple[bool, str]:
    """(relaunch the job?, why not) after mpiexec ended with status `rc`.

    Pure, so the policy is tested without MPI.  Not restarted: a clean end, a
    stop the user asked for, and exit status 5 (EXIT_DIVERGED): the server ended
    the job because training diverged or stopped making progress.  A restart
    would resume the same checkpoint with the same data, config and seeds and
    diverge again: retrying a deterministic divergence is pointless and only
    burns the restart budget; the last good checkpoint is kept for a resume
    with a fixed config.  Every other non-zero status is a crash worth a retry
    while restarts are left.
    """
    if rc == 0:
        return False, "the job finished"
    if stopped:
        return False, "the job was stopped"
    if rc == EXIT_DIVERGED:
        return False, (
            f"the job diverged or made no progress (exit status {rc}); not restarted: "
            "a restart would repeat it from the same checkpoint, data and seeds "
            "(fix the config, then `psctl start --resume`)"
        )
    if restarts_done >= max_restarts:
        return False, f"no restarts left ({max_restarts} used)"
    return True, ""


def with_server_args(cmd: list[str], extra: list[str]) -> list[str]:
    """`cmd` (an MPMD mpiexec argv) with `extra` appended to the server's arguments.

    They go last in the server section, so they override an earlier `--resume`.
    """
    try:
        i = cmd.index("dbnps.server")
    except ValueError:
        return [*cmd, *extra]
    j = cmd.index(":", i) if ":" in cmd[i:] else len(cmd)
    return [*cmd[:j], *extra, *cmd[j:]]


def _original_resume(cmd: list[str]) -> str | None:
    out = None
    for a, b in itertools.pairwise(cmd):
        if b == ":":
            break
        if a == "--resume":
            out = b
    return out


def _log(msg: str) -> None:
    print(f"[supervise] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: python -m dbnps.cli.supervise EXIT_JSON "
        "[--restart-on-failure N --run-dir DIR --targets-file F] -- CMD..."
    )
    if len(args) < 3 or "--" not in args[1:]:
        print(usage, file=sys.stderr)
        return 2
    sep = args.index("--", 1)
    exit_file, opts, cmd = Path(args[0]), args[1:sep], args[sep + 1 :]
    max_restarts, run_dir, targets = 0, exit_file.parent, None
    while opts:
        if opts[0] == "--restart-on-failure" and len(opts) > 1 and opts[1].isdigit():
            max_restarts, opts = int(opts[1]), opts[2:]
        elif opts[0] == "--run-dir" and len(opts) > 1:
            run_dir, opts = Path(opts[1]), opts[2:]
        elif opts[0] == "--targets-file" and len(opts) > 1:
            targets, opts = Path(opts[1]), opts[2:]
        else:
            print(usage, file=sys.stderr)
            return 2
    if not cmd:
        print(usage, file=sys.stderr)
        return 2

    proc: subprocess.Popen | None = None
    signalled: list[int] = []

    def forward(signum, _frame):
        signalled.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    # Every file the job writes (checkpoints, endpoints, summary, model, logs) is the
    # owner's only, like the token; Prometheus targets are opened up explicitly.
    os.umask(0o077)

    publisher = _TargetPublisher(run_dir / ENDPOINTS_FILE, targets) if targets else None
    if publisher is not None:
        publisher.start()
    restarts: list[dict] = []
    original = _original_resume(cmd)
    this_cmd = cmd
    rc, failure = 127, None
    try:
        while True:
            (run_dir / STOP_MARKER).unlink(missing_ok=True)
            proc = subprocess.Popen(this_cmd)
            rc = proc.wait()
            stopped = bool(signalled) or (run_dir / STOP_MARKER).exists()
            again, why = restart_decision(
                rc, stopped=stopped, restarts_done=len(restarts), max_restarts=max_restarts
            )
            if not again:
                if rc != 0 and not stopped and (max_restarts or rc == EXIT_DIVERGED):
                    _log(f"job exited with status {rc}; {why}")
                break
            source, version = _restart_point(run_dir, original)
            n = len(restarts) + 1
            restarts.append(
                {
                    "restart": n,
                    "time": time.time(),
                    "returncode": rc,
                    "resumed_from": source,
                    "version": version,
                }
            )
            write_json_atomic(run_dir / "restarts.json", restarts)
            where = f"{source} (version {version})" if source else "the start (no checkpoint yet)"
            _log(f"job exited with status {rc}; restart {n}/{max_restarts} from {where}")
            (run_dir / ENDPOINTS_FILE).unlink(missing_ok=True)  # the old address is dead
            extra = ["--restarts", str(n)] + (["--resume", source] if source else [])
            this_cmd = with_server_args(cmd, extra)
    except Exception as exc:  # never end without exit.json: psctl reads the end from it
        failure = f"{type(exc).__name__}: {exc}"
        _log(f"error: the supervisor failed: {failure}")
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    if publisher is not None:
        publisher.close()
    end = {"returncode": rc, "ended": time.time(), "restarts": len(restarts)}
    if failure is not None:
        end["supervisor_error"] = failure
    if (run_dir / FORCE_MARKER).exists():
        end["stopped_by"] = STOPPED_BY_FORCE
    elif (run_dir / STOP_MARKER).exists():
        end["stopped_by"] = STOPPED_BY_STOP
    elif signalled:
        end["stopped_by"] = signal.Signals(signalled[0]).name
    if "stopped_by" in end and rc != 0:
        _log(f"job ended by {end['stopped_by']} (mpiexec exit status {rc})")
    write_json_atomic(exit_file, end)
    return rc if rc >= 0 else 128 - rc


class _TargetPublisher(threading.Thread):
    """Keeps the Prometheus target file in step with the job's metrics address."""

    def __init__(self, endpoints: Path, targets: Path, period_s: float = 0.5):
        super().__init__(name="targets", daemon=True)
        self.endpoints, self.targets, self.period_s = endpoints, targets, period_s
        self._closing = threading.Event()

    def run(self) -> None:
        published = None
        while not self._closing.wait(self.period_s):
            try:
                metrics = json.loads(self.endpoints.read_text()).get("metrics")
            except (OSError, ValueError):
                continue  # not written yet, or being replaced after a restart
            if metrics and metrics != published:
                write_target(self.targets, metrics)
                published = metrics

    def close(self) -> None:
        self._closing.set()
        self.join(5)
        self.targets.unlink(missing_ok=True)


def _restart_point(run_dir: Path, original: str | None) -> tuple[str | None, int | None]:
    """(checkpoint to resume from, its version): the newest good one, else `original`."""
    from dbnps.common.errors import DataError
    from dbnps.server.checkpoint.store import find_resumable

    try:
        path, (_, _, meta) = find_resumable(run_dir / "checkpoints", warn=_log, quarantine=True)
        return str(path), int(meta["version"])
    except (DataError, OSError) as exc:  # OSError: the folder cannot be read
        if original is None:
            _log(f"{exc}; restarting from scratch")
            return None, None
        _log(f"{exc}; restarting from {original}")
        return original, None


if __name__ == "__main__":
    sys.exit(main())
