"""Exceptions shared across modules and the one error convention of the command-line tools
(kept free of mio_jax imports so every module can use them).

A known input error (a bad row, a missing or malformed file, an unknown or bad config key, a
checkpoint that does not fit the run) prints one line, ``error: <message naming the file,
line or key>``, and exits with status 2; anything else is a bug and shows its traceback.
``MIO_TRACEBACK=1`` shows the traceback of input errors too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Iterator, NoReturn

TRACEBACK_ENV = "MIO_TRACEBACK"


class InputError(ValueError):
    """Bad input the user can fix; the message names the file, line or key."""


class ConfigError(InputError):
    """A config value is unknown, mistyped or inconsistent (message names the key)."""


# what a tool reports in one line: ours, and the OS's and parsers' own for a missing or
# malformed file (their messages name the path or the position)
INPUT_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                json.JSONDecodeError)


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Prints ``error: message`` to stderr and exits with status 2."""
    _say(message)
    sys.exit(2)


def describe(error: BaseException) -> str:
    """The one-line message of an input error: ours as they are, the OS's with its type."""
    text = " ".join(str(error).split())
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}"


def report(error: BaseException) -> int:
    """Prints an input error as one ``error:`` line (its traceback first with
    ``MIO_TRACEBACK=1``); returns the exit status, 2."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(error)
    _say(describe(error))
    return 2


@contextlib.contextmanager
def input_errors_in_one_line() -> Iterator[None]:
    """Around a tool's work: an ``INPUT_ERRORS`` exception becomes one ``error:`` line and
    exit status 2 (its traceback too with ``MIO_TRACEBACK=1``); others propagate."""
    try:
        yield
    except INPUT_ERRORS as e:
        sys.exit(report(e))
