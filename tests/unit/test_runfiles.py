"""The run-directory files every party shares (dbnps.runfiles): tokens, atomic JSON, targets."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dbnps.common.errors import UserError
from dbnps.runfiles import (
    create_token,
    read_token,
    write_json_atomic,
    write_target,
    write_token,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_created_token_is_private_random_and_read_back(tmp_path):
    a = create_token(tmp_path / "a")
    b = create_token(tmp_path / "b")
    assert a != b and len(a) >= 32
    assert read_token(tmp_path / "a") == a
    assert _mode(tmp_path / "a") == 0o600


def test_a_token_file_is_never_overwritten(tmp_path):
    write_token(tmp_path / "t", "first")
    with pytest.raises(FileExistsError):
        create_token(tmp_path / "t")
    assert read_token(tmp_path / "t") == "first"


@pytest.mark.parametrize(("content", "needle"), [(None, "cannot read"), ("  \n", "is empty")])
def test_a_missing_or_empty_token_is_one_user_error(tmp_path, content, needle):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle):
        read_token(path)


def test_atomic_json_replaces_whole_and_keeps_its_mode_under_any_umask(tmp_path):
    path = tmp_path / "x.json"
    old = os.umask(0o077)
    try:
        write_json_atomic(path, {"v": 1})
        write_json_atomic(path, {"v": 2}, mode=0o644)
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"v": 2}
    assert _mode(path) == 0o644  # fchmod: not narrowed by the umask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left


def test_a_prometheus_target_is_public_with_its_folder(tmp_path):
    path = tmp_path / "prometheus" / "j.json"
    write_target(path, "127.0.0.1:9100")
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"launcher": "psctl"}}
    ]
    assert _mode(path) == 0o644 and _mode(path.parent) == 0o755
