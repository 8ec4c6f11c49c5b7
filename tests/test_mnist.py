"""MNIST loader: the vendored data, sharding, directory lookup, and every bad-file case."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbnps.common import mnist
from dbnps.common.errors import DataError, UserError

PSCTL = Path(sys.executable).parent / "psctl"
VENDORED = mnist.VENDORED_DIR


# --------------------------------------------------------------------------- helpers


def idx_images(n: int, rows: int = 28, cols: int = 28, magic: int = 2051, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=n * rows * cols, dtype=np.uint8)
    return struct.pack(">4I", magic, n, rows, cols) + pixels.tobytes()


def idx_labels(n: int, magic: int = 2049, seed: int = 0) -> bytes:
    labels = (np.arange(n) + seed) % 10
    return struct.pack(">2I", magic, n) + labels.astype(np.uint8).tobytes()


def list_sum(path: Path) -> None:
    """Record `path`'s SHA-256 in its directory's SHA256SUMS (replacing an older line)."""
    sums = path.parent / mnist.SUMS_FILE
    lines = sums.read_text().splitlines() if sums.exists() else []
    lines = [line for line in lines if not line.endswith(f"  {path.name}")]
    lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    sums.write_text("\n".join(lines) + "\n")


def write(path: Path, raw: bytes, *, gz: bool = True, listed: bool = True) -> Path:
    """Write an IDX file; `listed`: its checksum goes into SHA256SUMS, so the
    loader's structural checks (not the checksum) are what a broken file meets."""
    if gz:
        path.write_bytes(gzip.compress(raw, mtime=0))
    else:
        path = path.with_name(path.name.removesuffix(".gz"))
        path.write_bytes(raw)
    if listed:
        list_sum(path)
    return path


def synthetic_dir(root: Path, n_train: int = 30, n_test: int = 20, *, gz: bool = True) -> Path:
    """A directory holding four small but valid IDX files, listed in its SHA256SUMS
    (data of one's own: files named like MNIST's must be listed or be MNIST)."""
    root.mkdir(parents=True, exist_ok=True)
    write(root / mnist.TRAIN_IMAGES, idx_images(n_train, seed=1), gz=gz)
    write(root / mnist.TRAIN_LABELS, idx_labels(n_train, seed=1), gz=gz)
    write(root / mnist.TEST_IMAGES, idx_images(n_test, seed=2), gz=gz)
    write(root / mnist.TEST_LABELS, idx_labels(n_test, seed=2), gz=gz)
    return root


def run_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PSCTL), "data", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_cli_one_line_error(data_dir: Path, names: Path | str) -> str:
    """Run `psctl data verify` on a bad directory: exit != 0, one `error:` line naming the file."""
    proc = run_verify(data_dir)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert str(names) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ds() -> mnist.MNIST:
    return mnist.load_mnist(VENDORED)


# --------------------------------------------------------------------------- the real data


def test_a_subset_is_the_first_images_of_the_whole_files(ds: mnist.MNIST) -> None:
    """`train_subset`/`test_subset` cut only the float copy: the same arrays as the whole
    load's first rows (the files are still verified and checked whole)."""
    part = mnist.load_mnist(train_subset=700, test_subset=300)
    for got, whole, n in (
        (part.X_train, ds.X_train, 700),
        (part.y_train, ds.y_train, 700),
        (part.X_test, ds.X_test, 300),
        (part.y_test, ds.y_test, 300),
    ):
        assert got.shape[0] == n and got.dtype == whole.dtype
        np.testing.assert_array_equal(got, whole[:n])
    assert part.X_train.flags.c_contiguous


def test_vendored_data_loads(ds: mnist.MNIST) -> None:
    assert ds.X_train.shape == (60000, 784)
    assert ds.X_test.shape == (10000, 784)
    assert ds.y_train.shape == (60000,)
    assert ds.y_test.shape == (10000,)
    assert ds.X_train.dtype == np.float32
    assert ds.X_test.dtype == np.float32
    assert ds.y_train.dtype == np.uint8
    assert ds.y_test.dtype == np.uint8
    for X in (ds.X_train, ds.X_test):
        assert X.min() == 0.0
        assert X.max() == 1.0
        assert X.flags.c_contiguous
    # Pixels are exactly k/255 in float32.
    k = np.round(ds.X_test * 255)
    assert np.array_equal(ds.X_test, k.astype(np.float32) / np.float32(255))
    train_counts = np.bincount(ds.y_train, minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    assert len(train_counts) == len(test_counts) == 10
    assert train_counts.sum() == 60000
    assert test_counts.sum() == 10000
    assert train_counts.min() > 5000  # every digit is well represented
    # The well-known first training labels of MNIST.
    assert ds.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]


def test_default_dir_is_vendored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBNPS_DATA", raising=False)
    assert mnist.resolve_data_dir() == VENDORED
    assert (VENDORED / mnist.SUMS_FILE).is_file()
    assert mnist.read_sums(VENDORED) == mnist.KNOWN_SHA256


def test_cli_verify_ok_on_vendored() -> None:
    proc = run_verify(VENDORED)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("OK ") and "sha256 ok" in line for line in lines)
    assert "60000 images" in lines[0]
    assert "10000 labels" in lines[3]


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("k", [1, 2, 3, 7, 16])
def test_shards_are_a_balanced_partition(ds: mnist.MNIST, k: int) -> None:
    y = ds.y_train
    parts = [mnist.shard_indices(y, r, k) for r in range(k)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(y)
    assert max(sizes) - min(sizes) <= 1
    every = np.concatenate(parts)
    assert len(np.unique(every)) == len(y)  # disjoint ...
    assert np.array_equal(np.sort(every), np.arange(len(y)))  # ... and covering
    per_class = np.stack([np.bincount(y[p], minlength=10) for p in parts])
    assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()
    for p in parts:
        assert (np.diff(p) > 0).all()  # ascending


def test_one_shard_keeps_original_order(ds: mnist.MNIST) -> None:
    idx = mnist.shard_indices(ds.y_train, 0, 1)
    assert np.array_equal(idx, np.arange(60000))
    X1, y1 = mnist.shard(ds.X_test, ds.y_test, 0, 1)
    assert np.array_equal(X1, ds.X_test)
    assert np.array_equal(y1, ds.y_test)


def test_shard_slices_rows_and_labels_together(ds: mnist.MNIST) -> None:
    Xs, ys = mnist.shard(ds.X_test, ds.y_test, 1, 3)
    idx = mnist.shard_indices(ds.y_test, 1, 3)
    assert Xs.dtype == np.float32
    assert np.array_equal(Xs, ds.X_test[idx])
    assert np.array_equal(ys, ds.y_test[idx])


def test_shard_is_deterministic_on_a_small_case() -> None:
    y = np.array([1, 0, 1, 0, 2, 2, 1], dtype=np.uint8)
    # stable sort by label: 1 3 | 0 2 6 | 4 5 ; dealt to 2 shards: 1 0 6 5 / 3 2 4
    assert mnist.shard_indices(y, 0, 2).tolist() == [0, 1, 5, 6]
    assert mnist.shard_indices(y, 1, 2).tolist() == [2, 3, 4]


@pytest.mark.parametrize(("rank", "n"), [(-1, 2), (2, 2), (0, 0), (0, -3), (0, 11)])
def test_shard_rejects_bad_rank_or_count(rank: int, n: int) -> None:
    y = np.arange(10, dtype=np.uint8) % 10
    with pytest.raises(UserError):
        mnist.shard_indices(y, rank, n)


def test_shard_rejects_mismatched_lengths() -> None:
    with pytest.raises(UserError, match="rows"):
        mnist.shard(np.zeros((5, 784), np.float32), np.zeros(4, np.uint8), 0, 1)


# --------------------------------------------------------------------------- directory lookup


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = synthetic_dir(tmp_path / "explicit", n_train=30)
    env_dir = synthetic_dir(tmp_path / "env", n_train=40)
    monkeypatch.setenv("DBNPS_DATA", str(env_dir))
    assert mnist.resolve_data_dir(explicit) == explicit
    assert mnist.resolve_data_dir(str(explicit)) == explicit
    assert mnist.resolve_data_dir() == env_dir
    assert mnist.resolve_data_dir("") == env_dir
    assert mnist.load_mnist(explicit).X_train.shape == (30, 784)
    assert mnist.load_mnist().X_train.shape == (40, 784)
    monkeypatch.setenv("DBNPS_DATA", "")
    assert mnist.resolve_data_dir() == VENDORED
    monkeypatch.delenv("DBNPS_DATA")
    assert mnist.resolve_data_dir() == VENDORED


def test_env_dir_without_files_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBNPS_DATA", str(tmp_path))
    with pytest.raises(DataError, match="psctl data fetch"):
        mnist.resolve_data_dir()


def test_raw_idx_files_without_gz(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path, n_train=12, n_test=8, gz=False)
    assert not (d / mnist.TRAIN_IMAGES).exists()
    data = mnist.load_mnist(d)
    assert data.X_train.shape == (12, 784)
    assert data.y_test.tolist() == [(i + 2) % 10 for i in range(8)]
    raw = idx_images(12, seed=1)
    expected = np.frombuffer(raw, np.uint8, offset=16).reshape(12, 784) / np.float32(255)
    assert np.array_equal(data.X_train, expected.astype(np.float32))


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    (d / mnist.TEST_LABELS).unlink()
    target = d / mnist.TEST_LABELS
    with pytest.raises(DataError, match="missing") as exc:
        mnist.load_mnist(d)
    assert str(target) in str(exc.value)
    assert "\n" not in str(exc.value)
    assert_cli_one_line_error(d, target)


def test_missing_directory(tmp_path: Path) -> None:
    d = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, d)


def test_truncated_file(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d", n_train=30)
    target = write(d / mnist.TRAIN_IMAGES, idx_images(30)[:1000])
    msg = f"{target}: truncated: expected {16 + 30 * 784} bytes, got 1000"
    with pytest.raises(DataError) as exc:
        mnist.load_mnist(d)
    assert str(exc.value) == msg
    line = assert_cli_one_line_error(d, target)
    assert line == f"error: {msg}"


def test_truncated_header(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = write(d / mnist.TEST_LABELS, idx_labels(20)[:5])
    with pytest.raises(DataError, match="truncated"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_trailing_bytes(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d", n_test=20)
    target = write(d / mnist.TEST_IMAGES, idx_images(20) + b"\0" * 10)
    with pytest.raises(DataError, match="size mismatch"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = d / mnist.TRAIN_IMAGES
    target.write_bytes(target.read_bytes()[:200])
    list_sum(target)
    with pytest.raises(DataError, match="truncated gzip"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_wrong_magic(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    # A labels file where the images should be: a classic mix-up.
    target = write(d / mnist.TRAIN_IMAGES, idx_labels(30))
    with pytest.raises(DataError, match="wrong magic number 2049, expected 2051") as exc:
        mnist.load_mnist(d)
    assert str(target) in str(exc.value)
    assert_cli_one_line_error(d, target)


def test_wrong_magic_on_labels(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = write(d / mnist.TEST_LABELS, idx_labels(20, magic=0x12345678))
    with pytest.raises(DataError, match="expected 2049"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_wrong_dimensions(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = write(d / mnist.TEST_IMAGES, idx_images(20, rows=32, cols=32))
    with pytest.raises(DataError, match="32x32"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_count_mismatch(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d", n_train=30)
    target = write(d / mnist.TRAIN_LABELS, idx_labels(29))
    with pytest.raises(DataError, match="29 labels") as exc:
        mnist.load_mnist(d)
    assert "30 images" in str(exc.value)
    assert_cli_one_line_error(d, target)


def test_label_out_of_range(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = write(d / mnist.TEST_LABELS, struct.pack(">2I", 2049, 20) + bytes([3] * 19 + [10]))
    with pytest.raises(DataError, match="out of range"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def _real_labels_with_sums(root: Path) -> Path:
    """Synthetic images + copies of the real (small) label files + a SHA256SUMS for them."""
    d = synthetic_dir(root)
    for name in (mnist.TRAIN_LABELS, mnist.TEST_LABELS):
        shutil.copyfile(VENDORED / name, d / name)
        list_sum(d / name)
    return d


def test_checksum_listed_and_good_passes_then_count_check(tmp_path: Path) -> None:
    d = _real_labels_with_sums(tmp_path / "d")
    # The sums pass, so the next check to fail is the 60000 labels vs 30 synthetic images.
    with pytest.raises(DataError, match="60000 labels"):
        mnist.load_mnist(d)


def test_checksum_mismatch(tmp_path: Path) -> None:
    d = _real_labels_with_sums(tmp_path / "d")
    target = d / mnist.TRAIN_LABELS
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        mnist.load_mnist(d)
    assert str(target) in str(exc.value)
    assert actual in str(exc.value)
    line = assert_cli_one_line_error(d, target)
    assert "checksum mismatch" in line
    # Without verification the flipped byte is still caught, by gzip's own CRC.
    with pytest.raises(DataError, match=f"{target}: not a valid gzip file"):
        mnist.load_mnist(d, verify=False)


def test_checksum_mismatch_on_vendored_copy(tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(VENDORED, d)
    sums = (
        (d / mnist.SUMS_FILE).read_text().replace(mnist.KNOWN_SHA256[mnist.TEST_LABELS], "0" * 64)
    )
    (d / mnist.SUMS_FILE).write_text(sums)
    with pytest.raises(DataError, match="checksum mismatch"):
        mnist.load_mnist(d)
    assert mnist.load_mnist(d, verify=False).y_test.shape == (10000,)


def test_malformed_sums_file(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    (d / mnist.SUMS_FILE).write_text("not a checksum line\n")
    with pytest.raises(DataError, match="line 1"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, d / mnist.SUMS_FILE)


# --------------------------------------------------------------------------- always verified


def test_tampered_mnist_without_sums_is_refused_by_the_known_digest(tmp_path: Path) -> None:
    d = tmp_path / "d"
    shutil.copytree(VENDORED, d)
    (d / mnist.SUMS_FILE).unlink()
    raw = bytearray(gzip.decompress((d / mnist.TEST_IMAGES).read_bytes()))
    raw[16 + 400] ^= 0xFF  # one pixel of the first test image
    # Level 1: any re-compression changes the file's digest; level 9 took seconds.
    (d / mnist.TEST_IMAGES).write_bytes(gzip.compress(bytes(raw), compresslevel=1, mtime=0))
    with pytest.raises(DataError, match="the known MNIST checksum") as exc:
        mnist.load_mnist(d)
    assert "verify = false" in str(exc.value)
    line = assert_cli_one_line_error(d, d / mnist.TEST_IMAGES)
    assert "checksum mismatch" in line
    assert mnist.load_mnist(d, verify=False).X_test.shape == (10000, 784)  # the opt-out


def test_real_mnist_without_sums_verifies_by_the_known_digests(tmp_path: Path) -> None:
    d = tmp_path / "d"
    shutil.copytree(VENDORED, d)
    (d / mnist.SUMS_FILE).unlink()
    proc = run_verify(d)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("sha256 ok (the known MNIST checksum)") == 4


def test_raw_idx_mnist_verifies_by_its_decompressed_digest(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for name in mnist.FILES:
        (d / name.removesuffix(".gz")).write_bytes(gzip.decompress((VENDORED / name).read_bytes()))
    assert mnist.load_mnist(d).y_train.shape == (60000,)


def test_a_gzip_bomb_header_is_refused_before_decompressing(tmp_path: Path) -> None:
    d = synthetic_dir(tmp_path / "d")
    target = write(d / mnist.TRAIN_IMAGES, struct.pack(">4I", 2051, 10**8, 28, 28) + bytes(1000))
    with pytest.raises(DataError, match="declares 100000000 items"):
        mnist.load_mnist(d)
    assert_cli_one_line_error(d, target)


def test_a_gzip_bomb_body_stops_at_the_declared_size(tmp_path: Path) -> None:
    """10 images declared, 1 GiB of zeros inside: decompression stops after the 10."""
    d = synthetic_dir(tmp_path / "d")
    header = struct.pack(">4I", 2051, 10, 28, 28)
    c = zlib_gzip_of_zeros(header, 1 << 30)
    (d / mnist.TRAIN_IMAGES).write_bytes(c)
    list_sum(d / mnist.TRAIN_IMAGES)
    code = (
        "import sys\n"
        "from dbnps.common import mnist\n"
        "try:\n    mnist.load_mnist(sys.argv[1])\nexcept mnist.DataError as e:\n    print(e)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert "trailing data" in out[0], out
    assert int(out[-1]) < 400, f"peak RSS {out[-1]} MB"  # not the 1 GiB the bomb holds


def zlib_gzip_of_zeros(prefix: bytes, n: int) -> bytes:
    """A valid gzip file of `prefix` and `n` zero bytes (n a multiple of 1 MiB), built fast.

    Each MiB is deflated after a full flush (no history), so every MiB's
    compressed bytes are the same: deflating it once and repeating those bytes
    gives the stream zlib writes with a full flush after each MiB; the
    trailer's CRC and size cover all of it.  Deflating the whole GiB took 5-40 s.
    """
    import zlib

    chunk = bytes(1 << 20)
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # deflate, no gzip framing
    head = raw.compress(prefix) + raw.flush(zlib.Z_FULL_FLUSH)
    block = raw.compress(chunk) + raw.flush(zlib.Z_FULL_FLUSH)
    tail = raw.flush()  # the final (empty) block
    crc = zlib.crc32(prefix)
    for _ in range(n >> 20):
        crc = zlib.crc32(chunk, crc)
    size = (len(prefix) + n) & 0xFFFFFFFF
    gz_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0
    return gz_header + head + block * (n >> 20) + tail + struct.pack("<II", crc, size)
