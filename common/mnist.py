"""MNIST in IDX format: find it, check it, load it as float32, shard it, fetch it.

Lookup order for the data directory: an explicit argument, then `$DBNPS_DATA`,
then the copy vendored in the repository (`data/mnist`). Every problem with a
file (missing, truncated, wrong kind, failed checksum) is a `DataError` whose
message is one line naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.resources
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dbnps.common.errors import DataError, UserError

__all__ = [
    "DEFAULT_MIRRORS",
    "FILES",
    "KNOWN_SHA256",
    "MNIST",
    "UPSTREAM_SHA256",
    "VENDORED_DIR",
    "choose_data_dir",
    "download",
    "find_file",
    "load_mnist",
    "read_sums",
    "resolve_data_dir",
    "shard",
    "shard_indices",
]

DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://storage.googleapis.com/cvdf-datasets/mnist",
)

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

SUMS_FILE = "SHA256SUMS"

# SHA-256 of the gzip files vendored in data/mnist (same as its SHA256SUMS).
KNOWN_SHA256: dict[str, str] = {
    TRAIN_IMAGES: "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    TRAIN_LABELS: "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    TEST_IMAGES: "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    TEST_LABELS: "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}

# SHA-256 of the gzip files as the public mirrors serve them. The vendored copy
# was recompressed, so its bytes (not its pixels) differ; a download accepts both.
UPSTREAM_SHA256: dict[str, str] = {
    TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# Package data (`dbnps.data`, the repository's data/ folder): found the same way
# from a source tree, an editable install and a wheel.
VENDORED_DIR = Path(str(importlib.resources.files("dbnps.data") / "mnist"))

# SHA-256 of the decompressed IDX files (the same for every mirror's gzip): raw
# files in a data directory are checked against these.
RAW_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# No MNIST-shaped file declares more images than this; a larger header is refused
# before anything is decompressed (a gzip bomb costs no memory).
MAX_IMAGES = 1_000_000

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
ROWS = COLS = 28
N_CLASSES = 10

_FETCH_HINT = "run `psctl data fetch` (or pass --download)"


@dataclass
class MNIST:
    X_train: np.ndarray  # float32 (60000, 784), values in [0, 1]
    y_train: np.ndarray  # uint8 (60000,)
    X_test: np.ndarray  # float32 (10000, 784)
    y_test: np.ndarray  # uint8 (10000,)
    # Held out of the training images for model selection ([data] validation); empty if none.
    X_val: np.ndarray = field(default_factory=lambda: np.zeros((0, 784), np.float32))
    y_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def find_file(directory: Path, name: str) -> Path | None:
    """`name` (gzip) if present, else the raw IDX file without `.gz`, else None."""
    gz = directory / name
    if gz.is_file():
        return gz
    raw = directory / name.removesuffix(".gz")
    if raw.is_file():
        return raw
    return None


def choose_data_dir(data_dir: str | Path | None = None) -> Path:
    """The directory the lookup order picks, without checking its contents."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("DBNPS_DATA", "")
    if env:
        return Path(env).expanduser()
    return VENDORED_DIR


def _missing_files(directory: Path) -> list[str]:
    return [name for name in FILES if find_file(directory, name) is None]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The MNIST directory: `data_dir` if given, else `$DBNPS_DATA`, else the vendored copy.

    Raises DataError if the chosen directory lacks any of the four files.
    """
    directory = choose_data_dir(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: MNIST data directory not found; {_FETCH_HINT}")
    missing = _missing_files(directory)
    if missing:
        raise DataError(
            f"{directory / missing[0]}: missing ({len(missing)} of {len(FILES)} MNIST files "
            f"absent); {_FETCH_HINT}"
        )
    return directory


def read_sums(directory: Path) -> dict[str, str]:
    """`{file name: sha256}` from `directory/SHA256SUMS`; empty if there is none."""
    path = directory / SUMS_FILE
    if not path.is_file():
        return {}
    sums: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        digest = parts[0].lower() if parts else ""
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DataError(f"{path}: line {lineno} is not '<sha256>  <file name>'")
        sums[parts[1].lstrip("*")] = digest
    return sums


def expected_digests(path: Path, sums: dict[str, str]) -> tuple[str, set[str]]:
    """(where the expectation comes from, the accepted SHA-256 digests) for a data file.

    The directory's SHA256SUMS speaks first (a data set of one's own); else a
    file named like an MNIST file must be MNIST: its known digests apply
    whatever directory it is in.  Anything else has no expectation (empty set).
    """
    if path.name in sums:
        return "SHA256SUMS", {sums[path.name]}
    known = {KNOWN_SHA256.get(path.name), UPSTREAM_SHA256.get(path.name), RAW_SHA256.get(path.name)}
    return "the known MNIST checksum", known - {None}


def _verify(path: Path, blob: bytes, sums: dict[str, str]) -> None:
    source, digests = expected_digests(path, sums)
    if not digests:
        raise DataError(
            f"{path}: no checksum to verify it against; list it in {path.parent / SUMS_FILE} "
            f"or set [data] verify = false to load it unverified"
        )
    actual = hashlib.sha256(blob).hexdigest()
    if actual not in digests:
        hint = (
            "; data of your own: list it in SHA256SUMS or set [data] verify = false"
            if source != "SHA256SUMS"
            else ""
        )
        raise DataError(
            f"{path}: checksum mismatch: {source} says {' or '.join(sorted(digests))}, "
            f"file has {actual}{hint}"
        )


def _declared_size(path: Path, head: bytes) -> int | None:
    """Bytes an IDX file whose first bytes are `head` declares; None if `head` cannot tell."""
    if len(head) < 4 or head[3] not in (1, 3) or len(head) < 4 + 4 * head[3]:
        return None  # the header parser reports what is wrong
    ndim = head[3]
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    if dims[0] > MAX_IMAGES:
        raise DataError(
            f"{path}: header declares {dims[0]} items, more than {MAX_IMAGES}; "
            f"refused before decompressing"
        )
    return 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))


def _gunzip_bounded(path: Path, blob: bytes) -> bytes:
    """Decompress no more than the IDX header inside declares, plus one byte to see
    trailing data: a gzip bomb stops at its header, not after filling memory."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    try:
        head = d.decompress(blob, 16)
        size = _declared_size(path, head)
        limit = (size if size is not None else 16 + ROWS * COLS * MAX_IMAGES) + 1
        data = head + d.decompress(d.unconsumed_tail, max(limit - len(head), 1))
    except zlib.error as exc:
        raise DataError(f"{path}: not a valid gzip file: {_one_line(exc)}") from None
    if not d.eof and len(data) < limit:
        raise DataError(f"{path}: truncated gzip stream")
    return data


def _read_idx_bytes(path: Path, sums: dict[str, str] | None) -> bytes:
    """The decompressed IDX bytes of `path`, verified unless `sums` is None (verify = false)."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or _one_line(exc)}") from None
    if sums is not None:
        _verify(path, blob, sums)
    if path.suffix != ".gz":
        return blob
    return _gunzip_bounded(path, blob)


def _parse_header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    header_len = 4 * (1 + ndim)
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated: IDX {kind} header needs {header_len} bytes, got {len(data)}"
        )
    got_magic, *dims = struct.unpack(f">{1 + ndim}I", data[:header_len])
    if got_magic != magic:
        raise DataError(
            f"{path}: wrong magic number {got_magic}, expected {magic} (IDX {kind} file)"
        )
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise DataError(
            f"{path}: size mismatch: expected {expected} bytes, got {len(data)} (trailing data)"
        )
    return tuple(dims)


def _load_images(path: Path, sums: dict[str, str] | None) -> np.ndarray:
    """The images as uint8 rows: a view of the decompressed file, checked whole."""
    data = _read_idx_bytes(path, sums)
    n, rows, cols = _parse_header(path, data, IMAGES_MAGIC, 3)
    if (rows, cols) != (ROWS, COLS):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows * cols)


def _to_float(pixels: np.ndarray) -> np.ndarray:
    X = pixels.astype(np.float32)
    X /= np.float32(255)
    return X


def _load_labels(path: Path, sums: dict[str, str] | None) -> np.ndarray:
    data = _read_idx_bytes(path, sums)
    _parse_header(path, data, LABELS_MAGIC, 1)
    y = np.frombuffer(data, dtype=np.uint8, offset=8).copy()
    if y.size and int(y.max()) >= N_CLASSES:
        raise DataError(f"{path}: label {int(y.max())} out of range 0..{N_CLASSES - 1}")
    return y


def _load_split(
    directory: Path, images: str, labels: str, sums: dict[str, str] | None, first: int
) -> tuple[np.ndarray, np.ndarray]:
    ipath = find_file(directory, images)
    lpath = find_file(directory, labels)
    for name, p in ((images, ipath), (labels, lpath)):
        if p is None:
            raise DataError(f"{directory / name}: missing; {_FETCH_HINT}")
    assert ipath is not None and lpath is not None
    pixels = _load_images(ipath, sums)
    y = _load_labels(lpath, sums)
    if pixels.shape[0] != y.shape[0]:
        raise DataError(
            f"{lpath}: has {y.shape[0]} labels but {ipath.name} has {pixels.shape[0]} images"
        )
    n = first or len(y)
    return _to_float(pixels[:n]), y[:n]


def load_mnist(
    data_dir: str | Path | None = None,
    *,
    verify: bool = True,
    download: bool = False,
    mirrors: Sequence[str] | None = None,
    train_subset: int = 0,
    test_subset: int = 0,
) -> MNIST:
    """Load the four MNIST files as float32 pixels in [0, 1] and uint8 labels.

    `verify`: check each file against `SHA256SUMS` in the directory when it lists
    the file, else against the known MNIST checksums; a file neither covers is
    an error.  False loads unverified data (an explicit opt-out).
    `download`: fetch the files into the chosen directory first if any is missing.
    `train_subset` / `test_subset` (0: all): only the first N images of a split
    are returned.  The files are still read, verified and checked whole; only
    the float copy is cut (all 60000 training images are 188 MB of float32,
    made by every rank of a job, most of which train on a few thousand).
    """
    directory = choose_data_dir(data_dir)
    if download and (not directory.is_dir() or _missing_files(directory)):
        _download(directory, DEFAULT_MIRRORS if mirrors is None else tuple(mirrors), timeout=30)
    directory = resolve_data_dir(directory)
    sums = read_sums(directory) if verify else None
    X_train, y_train = _load_split(directory, TRAIN_IMAGES, TRAIN_LABELS, sums, train_subset)
    X_test, y_test = _load_split(directory, TEST_IMAGES, TEST_LABELS, sums, test_subset)
    return MNIST(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)


def shard_indices(y: np.ndarray, rank: int, n_shards: int) -> np.ndarray:
    """Indices of shard `rank` of `n_shards`: balanced by size and by class.

    Indices are stable-sorted by label and dealt round-robin, then each shard's
    indices are returned in ascending order, so `n_shards=1` keeps the original
    order. Shard sizes, and each class's count per shard, differ by at most 1.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"labels must be a 1-D array, got shape {y.shape}")
    if isinstance(n_shards, bool) or not isinstance(n_shards, int | np.integer):
        raise UserError(f"n_shards must be an integer, got {n_shards!r}")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise UserError(f"rank must be an integer, got {rank!r}")
    if n_shards < 1:
        raise UserError(f"n_shards must be >= 1, got {n_shards}")
    if not 0 <= rank < n_shards:
        raise UserError(f"rank must be in [0, {n_shards}), got {rank}")
    if n_shards > y.shape[0]:
        raise UserError(f"cannot split {y.shape[0]} examples into {n_shards} non-empty shards")
    order = np.argsort(y, kind="stable")
    return np.sort(order[int(rank) :: int(n_shards)])


def shard(X: np.ndarray, y: np.ndarray, rank: int, n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """`(X[idx], y[idx])` for `idx = shard_indices(y, rank, n_shards)`."""
    if len(X) != len(y):
        raise UserError(f"X has {len(X)} rows but y has {len(y)} labels")
    idx = shard_indices(y, rank, n_shards)
    return X[idx], y[idx]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ChecksumMismatch(Exception):
    pass


def _fetch_one(url: str, dest: Path, name: str, timeout: float) -> str:
    """Download `url` into a temp file in `dest`; return its SHA-256 after moving it to `name`.

    The temp file is always removed, and the final name only ever holds a
    verified file.
    """
    accepted = {KNOWN_SHA256[name], UPSTREAM_SHA256[name]}
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if digest not in accepted:
            raise _ChecksumMismatch(f"{url}: checksum mismatch: got {digest}")
        tmp.chmod(0o644)
        os.replace(tmp, dest / name)
        return digest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def download(dest: Path, mirrors: Sequence[str] = DEFAULT_MIRRORS, *, timeout: float = 30) -> None:
    """Fetch the four MNIST files into `dest`, verified, then write `dest/SHA256SUMS`.

    Each file is tried on each mirror in turn (`<mirror>/<file>`); a file is
    written under its final name only after its SHA-256 matched. A file already
    present with a known checksum is kept.
    """
    _download(dest, mirrors, timeout=timeout)


def _download(dest: Path, mirrors: Sequence[str], *, timeout: float) -> None:
    dest = Path(dest).expanduser()
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    mirrors = tuple(m for m in mirrors if m)
    if not mirrors:
        raise UserError("no download mirrors given")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create directory: {exc.strerror or exc}") from None
    sums: dict[str, str] = {}
    for name in FILES:
        final = dest / name
        accepted = {KNOWN_SHA256[name], UPSTREAM_SHA256[name]}
        if final.is_file():
            digest = _sha256_file(final)
            if digest in accepted:
                sums[name] = digest
                continue
        last_error = "no mirror tried"
        for mirror in mirrors:
            url = f"{mirror.rstrip('/')}/{name}"
            try:
                sums[name] = _fetch_one(url, dest, name, timeout)
                break
            except urllib.error.HTTPError as exc:
                last_error = f"{url}: HTTP {exc.code} {exc.reason}"
            except urllib.error.URLError as exc:
                last_error = f"{url}: {exc.reason}"
            except _ChecksumMismatch as exc:
                last_error = str(exc)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last_error = f"{url}: {type(exc).__name__}: {exc}"
        else:
            raise DataError(
                f"{final}: download failed from all {len(mirrors)} mirror(s); "
                f"last error: {_one_line(last_error)}"
            )
    text = "".join(f"{sums[name]}  {name}\n" for name in FILES)
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{SUMS_FILE}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest / SUMS_FILE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
