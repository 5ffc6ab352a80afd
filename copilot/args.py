"""Argument parsing shared by ``gamecopilot`` and the bench tools: one-line errors, common types.

Bad input on the command line is one line on stderr and exit code 2, like every other bad input;
argparse's default prints the whole usage block first.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: ...`` and exit code 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def seed_number(text: str) -> int:
    """A random seed: an integer >= 0 (numpy and the emulator refuse negative ones deep inside)."""
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    """A count of at least 1 (processes, jobs)."""
    return _whole_number(text, 1)
