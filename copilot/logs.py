"""Logging set-up shared by the CLI and group processes (one format, stderr)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.WARNING) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
