"""`launcher`: the mpiexec command lines and environment built from the running venv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dbnps.common import launcher
from dbnps.common.errors import UserError

VENV_MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def test_mpiexec_is_the_venvs_own() -> None:
    assert Path(VENV_MPIEXEC).is_file()
    assert launcher.mpiexec_path() == VENV_MPIEXEC


def test_mpmd_argv_shape() -> None:
    argv = launcher.mpmd_argv(1, 3, ["--config", "c.toml"], ["--seed", "7"])
    assert argv[0] == VENV_MPIEXEC
    assert "--oversubscribe" in argv
    assert argv.count(":") == 1
    sep = argv.index(":")
    left, right = argv[1:sep], argv[sep + 1 :]
    assert left[left.index("-n") + 1] == "1"
    assert right[:2] == ["-n", "3"]
    assert left[-5:] == [sys.executable, "-m", "dbnps.server", "--config", "c.toml"]
    assert right[2:] == [sys.executable, "-m", "dbnps.worker", "--seed", "7"]
    assert "--with-ft" not in argv


def test_mpmd_argv_options() -> None:
    argv = launcher.mpmd_argv(2, 5, fault_tolerant=True)
    sep = argv.index(":")
    assert argv[argv.index("--with-ft") + 1] == "ulfm"
    assert argv.index("--with-ft") < argv.index("-n") < sep  # an mpiexec option, before the apps
    assert argv[argv.index("-n") + 1] == "2"
    assert argv[sep + 1 : sep + 6] == ["-n", "5", sys.executable, "-m", "dbnps.worker"]
    assert "dbnps.server" in argv[:sep]


@pytest.mark.parametrize(
    ("servers", "workers", "word"),
    [(0, 2, "servers"), (-1, 2, "servers"), (1, 0, "workers"), (1, -4, "workers")],
)
def test_mpmd_argv_rejects_bad_counts(servers: int, workers: int, word: str) -> None:
    with pytest.raises(UserError, match=f"{word} must be >= 1"):
        launcher.mpmd_argv(servers, workers)


def test_spmd_argv() -> None:
    assert launcher.spmd_argv(4, ["prog.py", "--x"]) == [
        VENV_MPIEXEC,
        "--oversubscribe",
        "-n",
        "4",
        sys.executable,
        "prog.py",
        "--x",
    ]


def test_mpi_env_as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    base = {"PATH": "/bin"}
    env = launcher.mpi_env(base)
    assert env["OMPI_MCA_osc"] == "^ucx"
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "true"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env
    assert "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM" not in env
    assert base == {"PATH": "/bin"}  # the caller's mapping is not modified


def test_mpi_env_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    env = launcher.mpi_env({})
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["OMPI_MCA_osc"] == "^ucx"


def test_mpi_env_keeps_user_choices() -> None:
    env = launcher.mpi_env({"OMPI_MCA_osc": "sm", "OPENBLAS_NUM_THREADS": "4"})
    assert env["OMPI_MCA_osc"] == "sm"
    assert env["OPENBLAS_NUM_THREADS"] == "4"


def test_mpi_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBNPS_TEST_MARKER", "42")
    monkeypatch.delenv("OMPI_MCA_osc", raising=False)
    env = launcher.mpi_env()
    assert env["DBNPS_TEST_MARKER"] == "42"
    assert env["OMPI_MCA_osc"] == "^ucx"
    assert "OMPI_MCA_osc" not in os.environ


# -- placement across hosts (pure: no MPI, no network) --------------------------
def _contexts(argv: list[str]) -> list[tuple[str, str, str]]:
    """[(-n count, --host value, module)] of every app context of an mpiexec argv."""
    out, start = [], argv.index("-n")
    for part in " ".join(argv[start:]).split(" : "):
        words = part.split()
        host = words[words.index("--host") + 1] if "--host" in words else ""
        out.append((words[1], host, words[words.index("-m") + 1]))
    return out


def test_parse_hosts() -> None:
    assert launcher.parse_hosts("h0:1,h1:2") == [("h0", 1), ("h1", 2)]
    assert launcher.parse_hosts("h0,h1") == [("h0", 1), ("h1", 1)]
    assert launcher.parse_hosts("10.0.0.1:3, n-2.example.org") == [
        ("10.0.0.1", 3),
        ("n-2.example.org", 1),
    ]
    assert launcher.parse_hosts("a:1,b:1,a:2") == [("a", 3), ("b", 1)]  # Open MPI sums slots


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("h0:0", "slots of 'h0' must be an integer >= 1"),
        ("h0:x", "must be an integer >= 1"),
        ("h0:", "must be an integer >= 1"),
        ("h0,,h1", "empty host entry"),
        ("h 0", "is not a host name"),
    ],
)
def test_parse_hosts_rejects(spec: str, said: str) -> None:
    with pytest.raises(UserError, match=said):
        launcher.parse_hosts(spec)


def test_parse_hostfile(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text(
        "# cluster\n"
        "node01 slots=2\n"
        "\n"
        "node02 slots=4 max_slots=8   # a comment after\n"
        "node03\n"
        "node01 slots=1\n"
    )
    assert launcher.parse_hostfile(f) == [("node01", 3), ("node02", 4), ("node03", 1)]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("node01 slots=0\n", "line 1: slots must be an integer >= 1, got '0'"),
        ("ok\nnode01 cpus=2\n", "line 2: unknown attribute 'cpus=2'"),
        ("node01 slots\n", "unknown attribute 'slots'"),
        ("# only a comment\n\n", "names no host"),
        ("no:de slots=1\n", "is not a host name"),
    ],
)
def test_parse_hostfile_rejects(tmp_path: Path, text: str, said: str) -> None:
    f = tmp_path / "hosts"
    f.write_text(text)
    with pytest.raises(UserError, match=said):
        launcher.parse_hostfile(f)


def test_parse_hostfile_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read hostfile"):
        launcher.parse_hostfile(tmp_path / "nope")


def test_place_fills_slots_in_host_order() -> None:
    p = launcher.place(1, 4, [("h0", 1), ("h1", 2), ("h2", 2)])
    assert p.servers == ("h0",) and p.workers == ("h1", "h1", "h2", "h2")
    assert p.hosts == ["h0", "h1", "h2"] and p.multihost
    # The server takes one slot of its host; the rest go to workers.
    p = launcher.place(1, 3, [("h0", 2), ("h1", 2)])
    assert p.servers == ("h0",) and p.workers == ("h0", "h1", "h1")
    # Spare slots stay unused.
    assert launcher.place(1, 1, [("h0", 1), ("h1", 8)]).workers == ("h1",)


def test_place_server_hosts() -> None:
    hosts = [("a", 2), ("b", 2), ("c", 2)]
    p = launcher.place(1, 2, hosts, ["c"])
    assert p.servers == ("c",) and p.workers == ("a", "a")
    p = launcher.place(2, 3, hosts, ["a", "b"])  # shards round-robin over the server hosts
    assert p.servers == ("a", "b") and p.workers == ("a", "b", "c")
    assert not launcher.place(1, 1, [("solo", 2)]).multihost


@pytest.mark.parametrize(
    ("servers", "workers", "hosts", "srv", "said"),
    [
        (1, 4, [("h0", 1), ("h1", 2)], (), "need 5 slots, the hosts give 3 \\(h0:1, h1:2\\)"),
        (1, 1, [("h0", 1), ("h1", 1)], ("h9",), "--server-host h9: not one of the hosts"),
        (2, 1, [("h0", 1), ("h1", 1)], ("h0",), "host h0 has 1 slot\\(s\\), too few"),
        (0, 1, [("h0", 1)], (), "servers must be >= 1"),
        (1, 0, [("h0", 1)], (), "workers must be >= 1"),
    ],
)
def test_place_rejects(servers, workers, hosts, srv, said) -> None:
    with pytest.raises(UserError, match=said):
        launcher.place(servers, workers, hosts, srv)


def test_mpmd_argv_with_placement_one_context_per_host() -> None:
    p = launcher.place(1, 3, [("h0", 1), ("h1", 1), ("h2", 2)])
    argv = launcher.mpmd_argv(1, 3, ["--s"], ["--w"], fault_tolerant=True, placement=p)
    assert _contexts(argv) == [
        ("1", "h0:1", "dbnps.server"),
        ("1", "h1:1", "dbnps.worker"),
        ("2", "h2:2", "dbnps.worker"),
    ]
    head = argv[: argv.index("-n")]
    assert head[:2] == [VENV_MPIEXEC, "--oversubscribe"] and "--with-ft" in head
    mca = {head[i + 1]: head[i + 2] for i, w in enumerate(head) if w == "--mca"}
    assert mca == dict(launcher.MULTIHOST_MCA)
    assert mca["osc_rdma_buffer_size"] == "8388608" and mca["mpi_yield_when_idle"] == "1"
    # Every context carries its own module's arguments.
    sep = argv.index(":")
    assert argv[sep - 1] == "--s" and argv[-1] == "--w"


def test_mpmd_argv_placement_on_one_host_adds_no_multihost_settings() -> None:
    p = launcher.place(1, 2, [("solo", 3)])
    argv = launcher.mpmd_argv(1, 2, placement=p)
    assert "--mca" not in argv
    assert _contexts(argv) == [("1", "solo:1", "dbnps.server"), ("2", "solo:2", "dbnps.worker")]


def test_mpmd_argv_without_placement_is_unchanged() -> None:
    """Single host stays zero-config: no --host, no --mca, two contexts."""
    argv = launcher.mpmd_argv(1, 2, ["--a"], ["--b"], fault_tolerant=True)
    assert "--host" not in argv and "--mca" not in argv
    assert _contexts(argv) == [("1", "", "dbnps.server"), ("2", "", "dbnps.worker")]


def test_mpmd_argv_placement_must_match_counts() -> None:
    p = launcher.place(1, 2, [("a", 1), ("b", 2)])
    with pytest.raises(UserError, match="placement is for 1 server \\+ 2 workers"):
        launcher.mpmd_argv(1, 3, placement=p)


def test_spmd_argv_with_hosts() -> None:
    argv = launcher.spmd_argv(3, ["prog.py"], hosts=["a", "b", "b"])
    assert argv.count("--host") == 2 and argv.count(":") == 1
    assert argv[argv.index("--host") + 1] == "a:1"
    assert "--mca" in argv
    assert launcher.spmd_argv(2, ["p.py"], hosts=["a", "a"]).count("--mca") == 0
    with pytest.raises(UserError, match="3 ranks but 2 hosts"):
        launcher.spmd_argv(3, ["p.py"], hosts=["a", "b"])


def test_placement_from_options(tmp_path: Path) -> None:
    assert launcher.placement_from_options(1, 2) is None  # the zero-config default
    f = tmp_path / "hosts"
    f.write_text("n1 slots=1\nn2 slots=2\n")
    p = launcher.placement_from_options(1, 2, hostfile=f)
    assert (p.servers, p.workers) == (("n1",), ("n2", "n2"))
    p = launcher.placement_from_options(1, 3, hostfile=f, hosts="n3:1", server_host="n3")
    assert (p.servers, p.workers) == (("n3",), ("n1", "n2", "n2"))
    p = launcher.placement_from_options(2, 1, hosts="a:1,b:1,c:1", server_host="b,c")
    assert p.servers == ("b", "c") and p.workers == ("a",)
    with pytest.raises(UserError, match="--server-host needs --hosts or --hostfile"):
        launcher.placement_from_options(1, 2, server_host="n1")


# -- deploy/slurm/dbnps.sbatch: the hostfile it derives from the allocation -------------
SBATCH = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "dbnps.sbatch"


def _slurm_hostfile(tmp_path: Path, nodes: list[str], tasks_per_node: str) -> str:
    """Run the batch script's hostfile step with a stand-in `scontrol` (prints `nodes`)."""
    import subprocess

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "scontrol"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo {n}\n" for n in nodes))
    fake.chmod(0o755)
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "ignored-by-the-fake",
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_NTASKS": "0",
        "SLURM_JOB_NUM_NODES": str(len(nodes)),
        "TMPDIR": str(tmp_path),
        "DBNPS_SLURM_HOSTFILE_ONLY": "1",
    }
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_sbatch_hostfile_from_the_allocation_puts_the_server_on_the_first_node(
    tmp_path: Path,
) -> None:
    out = _slurm_hostfile(tmp_path, ["n1", "n2", "n3", "n4"], "2(x3),1")
    assert out.splitlines() == ["n1 slots=2", "n2 slots=2", "n3 slots=2", "n4 slots=1"]
    hostfile = tmp_path / "dbnps-77.hosts"
    assert hostfile.read_text() == out
    p = launcher.placement_from_options(1, 6, hostfile=hostfile, server_host="n1")
    assert p.servers == ("n1",) and p.workers == ("n1", "n2", "n2", "n3", "n3", "n4")


def test_sbatch_one_node(tmp_path: Path) -> None:
    assert _slurm_hostfile(tmp_path, ["solo"], "3").splitlines() == ["solo slots=3"]


def test_sbatch_asks_for_overcommit_and_runs_through_psctl() -> None:
    """`--ntasks=3` on a 2-CPU node needs --overcommit; psctl's launcher sets the run-as-root
    switches (a bare mpiexec as root fails with "prterun has detected an attempt to run as root")."""
    text = SBATCH.read_text()
    assert "#SBATCH --overcommit" in text
    assert '"$VENV/bin/psctl" start' in text and "mpiexec" not in text.split("set -euo")[1]


def test_sbatch_ends_with_the_jobs_exit_status(tmp_path: Path) -> None:
    """The batch step's last line reads the job's exit.json and exits with its status
    (it imported a name the CLI split moved, so every Slurm job would have ended in
    an ImportError instead of the job's status)."""
    import json
    import re
    import subprocess
    import sys

    code = re.search(r"exec \"\$VENV/bin/python\" -c '(.*?)' \"\$JOB\"", SBATCH.read_text(), re.S)
    assert code, "the sbatch script's last step changed shape"
    run = tmp_path / "state" / "runs" / "slurm-7"
    run.mkdir(parents=True)
    (run / "exit.json").write_text(json.dumps({"returncode": 3}))
    env = {**os.environ, "DBNPS_STATE_DIR": str(tmp_path / "state")}
    res = subprocess.run(
        [sys.executable, "-c", code.group(1), "slurm-7"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 3, res.stderr
