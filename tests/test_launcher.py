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
    argv = launcher.mpmd_argv(
        2,
        5,
        server_module="x.srv",
        worker_module="x.wrk",
        fault_tolerant=True,
        extra_mpi_args=["--bind-to", "none"],
    )
    sep = argv.index(":")
    assert argv[argv.index("--with-ft") + 1] == "ulfm"
    assert argv.index("--bind-to") < argv.index("-n") < sep
    assert argv[argv.index("-n") + 1] == "2"
    assert argv[sep + 1 : sep + 6] == ["-n", "5", sys.executable, "-m", "x.wrk"]
    assert "x.srv" in argv[:sep]


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


def test_mpi_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    base = {"PATH": "/bin"}
    env = launcher.mpi_env(base)
    assert env["OMPI_MCA_osc"] == "^ucx"
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "true"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env
    assert "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM" not in env
    assert "OMPI_MCA_mpi_ft_enable" not in env
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
