"""Bad configs are one ConfigError naming the file or the key (in-process, no MPI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dbnps.common import config
from dbnps.common.errors import ConfigError

CASES = {
    "binary": (b"\x00\x01\x02\xff\xfe[model]", "not UTF-8"),
    "latin1": ("[run]\nseed = 1 # caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    "seed": (b"[run]\nseed = -1\n", "[run] seed"),
    "eval": (b"[run]\neval_every_epochs = 1e-300\n", "[run] eval_every_epochs"),
    "log": (b"[run]\nlog_every_s = 0.0\n", "[run] log_every_s"),
    "validation": (b"[data]\nvalidation = -5\n", "[data] validation"),
    "keep_best": (b"[run]\nkeep_best = true\n", "[run] keep_best"),
    "toml": (b"[model\nsizes = [784]\n", "not valid TOML"),
    "key": (b"[model]\nsize = [784, 10]\n", "unknown config key [model] size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_config_is_one_error_naming_it(tmp_path: Path, case: str):
    body, expected = CASES[case]
    p = tmp_path / f"{case}.toml"
    p.write_bytes(body)
    with pytest.raises(ConfigError) as err:
        config.load(p)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg, msg


def test_a_directory_is_not_a_config(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_psctl_prints_one_line_for_a_binary_config(tmp_path: Path):
    p = tmp_path / "bin.toml"
    p.write_bytes(bytes(range(256)))
    psctl = Path(sys.executable).parent / "psctl"
    res = subprocess.run([psctl, "run", "--config", p], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr.startswith("error: config file") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
