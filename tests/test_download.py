"""`mnist.download` and `psctl data fetch` against a real local HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dbnps.common import mnist
from dbnps.common.errors import DataError

PSCTL = Path(sys.executable).parent / "psctl"
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serves `/good/` (the four vendored files), `/bad/` (one corrupted) and `/empty/` (404s)."""
    root = tmp_path_factory.mktemp("mirror")
    good = root / "good"
    good.mkdir()
    for name in mnist.FILES:
        shutil.copyfile(mnist.VENDORED_DIR / name, good / name)
    bad = root / "bad"
    shutil.copytree(good, bad)
    blob = bytearray((bad / mnist.TEST_LABELS).read_bytes())
    blob[100] ^= 0xFF
    (bad / mnist.TEST_LABELS).write_bytes(bytes(blob))
    (root / "empty").mkdir()

    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def _final_files(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir())


def test_download_then_load(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "fresh" / "mnist"  # parents are created
    mnist.download(dest, [f"{server}/good"], timeout=10)
    assert _final_files(dest) == sorted([*mnist.FILES, mnist.SUMS_FILE])  # no temp files left
    assert mnist.read_sums(dest) == mnist.KNOWN_SHA256
    got = mnist.load_mnist(dest)
    ref = mnist.load_mnist(mnist.VENDORED_DIR)
    assert got.X_train.shape == (60000, 784)
    assert np.array_equal(got.X_train, ref.X_train)
    assert np.array_equal(got.y_test, ref.y_test)


def test_404_mirror_falls_back_to_the_next(server: str, tmp_path: Path) -> None:
    mnist.download(tmp_path, [f"{server}/empty", f"{server}/good"], timeout=10)
    assert mnist.load_mnist(tmp_path).y_train.shape == (60000,)


def test_corrupt_mirror_falls_back_to_the_next(server: str, tmp_path: Path) -> None:
    mnist.download(tmp_path, [f"{server}/bad", f"{server}/good"], timeout=10)
    assert mnist.read_sums(tmp_path)[mnist.TEST_LABELS] == mnist.KNOWN_SHA256[mnist.TEST_LABELS]
    assert mnist.load_mnist(tmp_path).y_test.shape == (10000,)


def test_corrupt_file_is_an_error_and_never_lands(server: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        mnist.download(tmp_path, [f"{server}/bad"], timeout=10)
    msg = str(exc.value)
    assert str(tmp_path / mnist.TEST_LABELS) in msg
    assert "checksum mismatch" in msg
    assert "\n" not in msg
    names = _final_files(tmp_path)
    assert mnist.TEST_LABELS not in names
    assert mnist.SUMS_FILE not in names
    assert not [n for n in names if n.endswith(".part")]


def test_all_mirrors_404(server: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404") as exc:
        mnist.download(tmp_path, [f"{server}/empty", f"{server}/empty/"], timeout=10)
    assert str(tmp_path / mnist.FILES[0]) in str(exc.value)
    assert _final_files(tmp_path) == []


def test_unreachable_mirror(tmp_path: Path) -> None:
    # Port 1 on loopback: connection refused, immediately.
    with pytest.raises(DataError, match="last error"):
        mnist.download(tmp_path, ["http://127.0.0.1:1"], timeout=5)
    assert _final_files(tmp_path) == []


def test_existing_good_files_are_kept(server: str, tmp_path: Path) -> None:
    for name in mnist.FILES:
        shutil.copyfile(mnist.VENDORED_DIR / name, tmp_path / name)
    # Every mirror 404s, so this only succeeds if nothing is fetched.
    mnist.download(tmp_path, [f"{server}/empty"], timeout=10)
    assert mnist.read_sums(tmp_path) == mnist.KNOWN_SHA256


def test_load_mnist_download_flag(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBNPS_DATA", str(tmp_path / "via-env"))
    with pytest.raises(DataError, match="psctl data fetch"):
        mnist.load_mnist()
    data = mnist.load_mnist(download=True, mirrors=[f"{server}/good"])
    assert data.X_test.shape == (10000, 784)
    assert (tmp_path / "via-env" / mnist.SUMS_FILE).is_file()


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARS}


def test_cli_fetch_end_to_end(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "cli"
    proc = subprocess.run(
        [str(PSCTL), "data", "fetch", "--dest", str(dest), "--mirror", f"{server}/good"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "60000 train" in proc.stdout
    assert mnist.load_mnist(dest).y_train.shape == (60000,)
    verify = subprocess.run(
        [str(PSCTL), "data", "verify", "--data-dir", str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    assert len(verify.stdout.splitlines()) == 4


def test_cli_fetch_failure_is_one_line(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "cli"
    proc = subprocess.run(
        [str(PSCTL), "data", "fetch", "--dest", str(dest), "--mirror", f"{server}/bad"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert str(dest / mnist.TEST_LABELS) in lines[0]
    assert not (dest / mnist.TEST_LABELS).exists()
