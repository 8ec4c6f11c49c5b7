"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt file).

    Entry points print it as one line and exit with status 2.
    """


class DataError(UserError):
    """A data file is missing, truncated, corrupt or of the wrong kind."""


class ConfigError(UserError):
    """A configuration value is invalid."""


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a UserError becomes `error: <msg>` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
