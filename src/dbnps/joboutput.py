"""What a person sees of a job: mpiexec's output cleaned, plus a progress bar per phase.

`psctl run` reads the job's stdout and stderr through pipes instead of
letting the ranks write to the terminal, so that:

* Open MPI's fault-tolerance banner ("The selected 'osc' module 'sm' is not
  tested for post-failure operation ...") and its help-aggregation follow-ups
  are dropped.  ULFM prints it for every window whatever the settings
  (ompi/mca/osc/base/osc_base_init.c, no MCA parameter turns it off); the
  dead-worker tests are what tell us osc/sm works after a failure.
* NUL bytes are removed: PRRTE forwards aggregated help messages with their C
  string terminator, which made redirected logs "binary" for grep.
* rank 0's `[progress] {json}` lines (`python -m dbnps.server --progress`)
  become a tqdm bar per phase when the terminal can show one, and are dropped
  otherwise: the periodic `[server]` log lines stay as plain text.

`LineFilter` is plain logic (tested in-process); `relay` runs the pipes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable
from typing import IO

PROGRESS_PREFIX = "[progress] "
_DASHES = re.compile(r"^-{20,}\s*$")
# Text of the blocks we drop; anything else between dash lines is kept.
_BANNER_MARKS = ("is not tested for post-failure", "insuficiently tested in post-failure")
_AGGREGATED = re.compile(
    r"\d+ more process(es)? ha(ve|s) sent help message help-mpi-ft\.txt / module:untested"
)
_SET_AGGREGATE = re.compile(r'Set MCA parameter "\w*help_aggregate" to 0 to see all help')
_MAX_BLOCK = 40  # a help block is short; a longer run of lines is output, not a banner


class LineFilter:
    """Feed lines (without newline) one at a time; get back the lines to show."""

    def __init__(self) -> None:
        self._block: list[str] | None = None  # lines since an opening dash line
        self._dropped_help = False  # the last thing dropped was an aggregated-help line

    def feed(self, line: str) -> list[str]:
        if "\x00" in line:
            line = line.replace("\x00", "")
            if not line.strip():  # what was left of a forwarded help message's terminator
                return []
        if self._block is not None:
            self._block.append(line)
            if _DASHES.match(line):
                block, self._block = self._block, None
                if any(m in text for text in block for m in _BANNER_MARKS):
                    return []
                return block
            if len(self._block) > _MAX_BLOCK:
                block, self._block = self._block, None
                return block
            return []
        if _DASHES.match(line):
            self._block = [line]
            return []
        if _AGGREGATED.search(line):
            self._dropped_help = True
            return []
        if self._dropped_help and _SET_AGGREGATE.search(line):
            self._dropped_help = False
            return []
        self._dropped_help = False
        return [line]

    def close(self) -> list[str]:
        """Whatever is still buffered (an unterminated block is shown as it is)."""
        block, self._block = self._block or [], None
        return block


def parse_progress(line: str) -> dict | None:
    """The payload of a `[progress] {...}` line, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        out = json.loads(line[len(PROGRESS_PREFIX) :])
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _columns(file: IO[str]) -> int:
    """Width of the terminal `file` is on; 100 when it reports none (a pty of 0 columns)."""
    try:
        return os.get_terminal_size(file.fileno()).columns or 100
    except (OSError, ValueError):
        return 100


class ProgressBars:
    """One tqdm bar per phase on `file`, fed with rank 0's progress payloads."""

    def __init__(self, file: IO[str]):
        self.file = file
        self._bar = None
        self._phase = None

    def update(self, p: dict) -> None:
        from tqdm import tqdm

        phase = p.get("phase")
        if phase != self._phase:
            if self._bar is not None and self._bar.total:  # the phase ran to its end
                self._bar.update(self._bar.total - self._bar.n)
            self.close()
            self._phase = phase
            if phase == "done":
                return
            label = f"{phase} {p.get('index', 0) + 1}/{p.get('phases', 1)}"
            self._bar = tqdm(
                total=int(p.get("total", 0)) or None,
                desc=label,
                unit="img",
                unit_scale=True,
                file=self.file,
                # A pty that reports 0 columns (script, some CI shells) would get an empty bar.
                ncols=_columns(self.file),
                leave=True,
            )
        bar = self._bar
        if bar is None:  # "done", or a late record of a finished phase
            return
        done = int(p.get("done", 0))
        if done > bar.n:
            bar.update(done - bar.n)  # through update(): tqdm's rate and ETA need the steps
        post = f"epoch {p.get('epoch', 0.0):.2f}"
        if p.get("accuracy") is not None:
            post += f", {p.get('split', 'test')} acc {p['accuracy']:.4f}"
        bar.set_postfix_str(post, refresh=False)
        bar.refresh()

    def write(self, line: str, file: IO[str]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            print(line, file=file, flush=True)
        else:
            tqdm.write(line, file=file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _pump(
    lines: Iterable[str], out: IO[str], bars: ProgressBars | None, lock: threading.Lock
) -> None:
    filt = LineFilter()

    def show(text: str) -> None:
        with lock:
            if bars is None:
                print(text, file=out, flush=True)
            else:
                bars.write(text, out)

    for raw in lines:
        for line in filt.feed(raw.rstrip("\n")):
            p = parse_progress(line)
            if p is None:
                show(line)
            elif bars is not None:
                with lock:
                    bars.update(p)
    for line in filt.close():
        show(line)


def relay(proc: subprocess.Popen, *, progress: bool) -> int:
    """Copy `proc`'s piped stdout/stderr to ours, cleaned; bars on stderr if `progress`."""
    bars = ProgressBars(sys.stderr) if progress else None
    lock = threading.Lock()
    err = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, bars, lock), daemon=True)
    err.start()
    _pump(proc.stdout, sys.stdout, bars, lock)
    err.join()
    rc = proc.wait()
    if bars is not None:
        bars.close()
    return rc
