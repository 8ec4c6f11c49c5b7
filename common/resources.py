"""How much memory a job needs, estimated before launching it, against what the host has.

Calibrated on the full 784-500-500-2000-10 job (1.67 M parameters, 60 000
images, K = 2) on this machine: measured RSS 306 MB for the server and 461 MB
per worker, estimated 345 and 433 MB.  Every rank loads the whole data set
(as float32); the server holds its window, K push slots, the update rule's
state and evaluation snapshots; a worker holds its parameters, gradient,
accumulator, rule state and step buffers, plus a copy of its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbnps.common.config import Config
from dbnps.common.errors import UserError
from dbnps.common.job import layout_of

BASE_BYTES = 80 << 20  # python + numpy + mpi4py + Open MPI in one rank
PIXELS = 784
TEST_IMAGES = 10_000
SERVER_COPIES = 5  # window, rule state, gather buffer, evaluation snapshot, best/target snapshot
WORKER_COPIES = 6  # params, grad, accumulator, rule state, step buffers


@dataclass
class Estimate:
    server_bytes: int  # one server rank
    worker_bytes: int  # one worker rank
    total_bytes: int  # S servers + K workers on one host


def estimate(cfg: Config, workers: int, servers: int, n_train: int | None = None) -> Estimate:
    """Resident bytes of a job whose ranks all run on one host."""
    P = layout_of(cfg).size
    n_train = n_train or (cfg.data.train_subset or 60_000)
    n_test = cfg.data.test_subset or TEST_IMAGES
    data = 4 * PIXELS * (n_train + n_test)
    shard = 4 * PIXELS * n_train // max(workers, 1)
    slots = workers if cfg.ps.mode == "apply" else 0
    server = BASE_BYTES + data + 4 * (P // servers) * (SERVER_COPIES + slots)
    worker = BASE_BYTES + data + shard + 4 * P * WORKER_COPIES
    return Estimate(server, worker, servers * server + workers * worker)


def check_memory(cfg: Config, workers: int, servers: int, available: int | None = None) -> Estimate:
    """Refuse, with one line and the estimate, a job that cannot fit in this host's memory."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    est = estimate(cfg, workers, servers)
    if est.total_bytes > available:
        gib = 1 << 30
        raise UserError(
            f"this job needs about {est.total_bytes / gib:.1f} GiB ({servers} server rank(s) x "
            f"{est.server_bytes / gib:.2f} + {workers} workers x {est.worker_bytes / gib:.2f} GiB) "
            f"but {available / gib:.1f} GiB is available; use fewer workers or a smaller network"
        )
    return est
