"""`psctl data verify` and `psctl data fetch`: check or download the MNIST files."""

from __future__ import annotations

from pathlib import Path

import click

from dbnps.common import mnist


@click.group("data")
def data() -> None:
    """Check or download the MNIST data set."""


@data.command("verify")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="MNIST directory (default: $DBNPS_DATA, then the vendored data/mnist).",
)
def verify(data_dir: Path | None) -> None:
    """Load every MNIST file, checking format, sizes and SHA256SUMS."""
    directory = mnist.resolve_data_dir(data_dir)
    sums = mnist.read_sums(directory)
    ds = mnist.load_mnist(directory, verify=True)
    rows = (
        (mnist.TRAIN_IMAGES, f"{ds.X_train.shape[0]} images"),
        (mnist.TRAIN_LABELS, f"{ds.y_train.shape[0]} labels"),
        (mnist.TEST_IMAGES, f"{ds.X_test.shape[0]} images"),
        (mnist.TEST_LABELS, f"{ds.y_test.shape[0]} labels"),
    )
    for name, what in rows:
        path = mnist.find_file(directory, name)
        assert path is not None  # resolve_data_dir checked it
        source, _ = mnist.expected_digests(path, sums)
        checked = f"sha256 ok ({source})"
        click.echo(f"OK {path}: {what}, {checked}")


@data.command("fetch")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to download into (default: $DBNPS_DATA, then the vendored data/mnist).",
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="URL",
    help="Base URL to fetch <URL>/<file> from; repeat to try several in order.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True
)
def fetch(dest: Path | None, mirrors: tuple[str, ...], timeout: float) -> None:
    """Download the four MNIST files, verify their SHA-256 and write SHA256SUMS."""
    target = mnist.choose_data_dir(dest)
    mnist.download(target, mirrors or mnist.DEFAULT_MIRRORS, timeout=timeout)
    ds = mnist.load_mnist(target, verify=True)
    click.echo(
        f"fetched MNIST into {target}: {ds.X_train.shape[0]} train, {ds.X_test.shape[0]} test"
    )


COMMANDS: list = [data]
