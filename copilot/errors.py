"""User-facing errors.

Anything raised as :class:`UsageError` is the user's input being wrong (a missing file, a bad
config key, a malformed JSONL line).  The CLI prints its message as one line on stderr and
exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    exit_code = 2
