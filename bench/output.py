"""How every benchmark hands its figures over: a table for people, JSON for tools."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from copilot.errors import UsageError


def check_output_path(output: str | None) -> None:
    """Fail before the (long) benchmark runs if ``-o`` cannot be written."""
    if output and not Path(output).resolve().parent.is_dir():
        raise UsageError(f"-o: directory {Path(output).parent} does not exist")


def emit_result(result: dict[str, Any], *, as_json: bool, output: str | None, table: Callable[[Any], Any]) -> None:
    """Write ``result`` to ``output`` (JSON), then print it as JSON or as ``table(result)``."""
    text = json.dumps(result)
    if output:
        Path(output).write_text(text + "\n")
    if as_json:
        print(text)
    else:
        from rich.console import Console

        Console().print(table(result))


def run_tool(main: Callable[[], int], prog: str) -> None:
    """Run a bench tool's ``main`` as a program: bad input is one line on stderr and exit 2."""
    try:
        code = main()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)
