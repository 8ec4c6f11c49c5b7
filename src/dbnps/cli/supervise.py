"""`python -m dbnps.cli.supervise EXIT_JSON -- CMD...`: run a detached job, record how it ended.

`psctl start` launches this in a new session (so the job outlives the shell
and every process of it shares one session id); it runs `mpiexec` as its
child, forwards SIGTERM/SIGINT/SIGHUP to it, and writes the exit status to
EXIT_JSON atomically when mpiexec ends, so `psctl stop` and `psctl status`
can report it although they are not the job's parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m dbnps.cli.supervise EXIT_JSON -- CMD...", file=sys.stderr)
        return 2
    exit_file, cmd = Path(args[0]), args[2:]
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    rc = proc.wait()
    tmp = exit_file.with_name(f".{exit_file.name}.tmp")
    tmp.write_text(json.dumps({"returncode": rc, "ended": time.time()}) + "\n")
    os.replace(tmp, exit_file)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
