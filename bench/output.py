"""How every benchmark hands its figures over: a table for people, JSON for tools."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from copilot.errors import UsageError, check_writable, write_output


def check_output_path(output: str | None) -> None:
    """Fail before the (long) benchmark runs if ``-o`` cannot be written."""
    if output is not None:
        check_writable(output, "-o")


def emit_result(result: dict[str, Any], *, as_json: bool, output: str | None, table: Callable[[Any], Any]) -> None:
    """Write ``result`` to ``output`` (JSON), then print it as JSON or as ``table(result)``.

    A figure that could not be measured (NaN, infinite) is written as null: strict JSON readers
    refuse NaN."""
    text = json.dumps(_finite(result), allow_nan=False)
    if output:
        write_output(output, text + "\n", "-o")
    if as_json:
        print(text)
    else:
        from rich.console import Console

        Console().print(table(result))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_tool(main: Callable[[], int], prog: str) -> None:
    """Run a bench tool's ``main`` as a program: bad input is one line on stderr and exit 2;
    Ctrl-C is one line and exit 130 (what was finished, recordings and caches, is kept)."""
    try:
        code = main()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into `head`, which has read enough: not an error to show
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        code = 1
    sys.exit(code)
