"""A job's log (stdout and stderr of every rank), read as `psctl logs` shows it."""

from __future__ import annotations

import time
from collections.abc import Iterator

from dbnps.common.errors import UserError
from dbnps.jobs.registry import Run


def log_chunks(
    run: Run, *, raw: bool = False, follow: bool = False, poll_s: float = 0.2
) -> Iterator[bytes]:
    """The run's log in chunks, cleaned like `psctl run` output (no Open MPI banners,
    no NULs) unless `raw`; with `follow`, new output is awaited while the job runs."""
    from dbnps.joboutput import LineFilter

    try:
        f = open(run.log, "rb")  # noqa: SIM115 (read while the job appends)
    except OSError as exc:
        raise UserError(f"no log for job {run.id}: {exc.strerror}") from None
    filt, partial = LineFilter(), b""

    def clean(data: bytes, final: bool = False) -> bytes:
        nonlocal partial
        if raw:
            return data
        # Whole lines through the filter; a partial last line waits for its end.
        lines = (partial + data).split(b"\n")
        partial = lines.pop()  # b"" after a newline
        if final and partial:
            lines.append(partial)
        shown = [s for line in lines for s in filt.feed(line.decode(errors="replace"))]
        if final:
            shown += filt.close()
        return b"".join(s.encode() + b"\n" for s in shown)

    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                yield clean(chunk)
                continue
            if not follow or not run.running():
                yield clean(f.read(), final=True)
                return
            time.sleep(poll_s)
