"""Detached jobs as a library: what `psctl start | status | stop | ...` do, without click.

One role per module; `dbnps.cli.jobs` only parses arguments, calls these and prints::

    registry  where runs live: the state directory, run directories, job.json, `latest`
    process   a job's processes (psutil): liveness with the pid-reuse guard, session kill
    client    the gRPC control plane: resolve a run or address, call it, health probe
    launch    the mpiexec argv of a job, start it detached under the supervisor, stop it
    resume    which checkpoint `start --resume` continues from, and what it may change
    format    status, checkpoint and run tables as text; messages as JSON-ready dicts
    logs      a job's log, cleaned as `psctl run` shows it, optionally followed

Nothing here imports `dbnps.cli`, numpy or mpi4py at import time: `psctl status`
and `psctl list` stay light (tests/test_control.py checks the imports).
"""
