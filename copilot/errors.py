"""User-facing errors.

Anything raised as :class:`UsageError` is the user's input being wrong (a missing file, a bad
config key, a malformed JSONL line).  The CLI prints its message as one line on stderr and
exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    exit_code = 2


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """An exception's message cut to its first line, for a one-line report; ``empty`` (default:
    the exception's type name) when it has no message."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


def check_writable(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` as a file the run can write at its end, checked before the run starts.

    A missing directory, a directory in the file's place or no permission is a
    :class:`UsageError` naming ``flag``; the file itself is not touched, so what it holds
    stays until the run writes it.
    """
    text = os.fspath(path)
    if not text.strip():
        raise UsageError(f"{flag}: empty file name")
    if text == "-":
        raise UsageError(f"{flag}: '-' (standard output) is not supported here; give a file name")
    if text.endswith(("/", os.sep)) or os.path.basename(text) in (".", ".."):
        raise UsageError(f"{flag}: {text} names a directory; give a file name")
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"{flag}: directory {p.parent} does not exist")
    if p.is_dir():
        raise UsageError(f"{flag}: {p} is a directory")
    if not os.access(p if p.exists() else p.parent, os.W_OK):
        raise UsageError(f"{flag}: cannot write {p} (permission denied)")
    return p


def write_output(path: str | os.PathLike[str], text: str, flag: str) -> None:
    """Write an output file at the end of a run; a failure is one line naming ``flag``."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write {path} ({exc.strerror or exc})") from None
