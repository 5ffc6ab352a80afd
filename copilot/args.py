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


def seed_number(text: str) -> int:
    """A random seed: an integer >= 0 (numpy and the emulator refuse negative ones deep inside)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value
