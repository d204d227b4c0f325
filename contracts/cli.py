"""How every command reports a user error: one `error: ...` line on stderr and exit code 2.

A user error is a bad config value, a missing file, a full disk (`NoSpace`) or a read-only
one (`NotWritable`): something the
user fixes, for which a traceback is noise. With `TOKENCLOCK_DEBUG=1` in the environment the
exception propagates instead, traceback and all. Every `main()` of train, data_prep and
estimate goes through `run_main`. Standard library only, like the rest of `contracts`.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "TOKENCLOCK_DEBUG"
EXIT_USAGE = 2  # what argparse exits with for a bad command line


class NoSpace(OSError):
    """A write failed because the device is full; its message names the path and the size."""

    def __init__(self, path, needed_bytes: int | None = None):
        need = f" needs ~{max(1, round(needed_bytes / 1e6))} MB" if needed_bytes else ""
        super().__init__(errno.ENOSPC, f"no space left on device: {path}{need}")

    def __str__(self) -> str:
        return self.strerror


def is_no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


class NotWritable(OSError):
    """A write failed because the place is read-only or not ours; its message names the path."""

    def __init__(self, path, error: OSError):
        super().__init__(error.errno, f"cannot write to {path}: {os.strerror(error.errno)}")

    def __str__(self) -> str:
        return self.strerror


def is_not_writable(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, NoSpace, NotWritable)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def run_main(fn: Callable, *args, code: int = EXIT_USAGE) -> int:
    """`fn(*args)`'s exit code (None = 0); a user error becomes one `error:` line and `code`,
    unless TOKENCLOCK_DEBUG is set."""
    try:
        return fn(*args) or 0
    except USER_ERRORS as e:
        return report(e, code)


def report(error: BaseException, code: int = EXIT_USAGE) -> int:
    """Print `error` as one `error:` line and return `code`; under TOKENCLOCK_DEBUG re-raise it
    with its traceback. Call it in an `except USER_ERRORS` block."""
    if debug():
        raise error
    print(f"error: {error}", file=sys.stderr, flush=True)
    return code
