"""The unit tier runs in-process in seconds and never imports MPI.

Run alone (`pytest tests/unit`), the session fails if anything it imported
pulled in mpi4py: the protocol logic must stay testable without an MPI job.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent


def pytest_sessionfinish(session, exitstatus):
    items = getattr(session, "items", [])
    only_unit = items and all(Path(str(i.fspath)).is_relative_to(HERE) for i in items)
    if only_unit and "mpi4py" in sys.modules:
        print("\nerror: the unit tier imported mpi4py", file=sys.stderr)
        session.exitstatus = 1
