"""``gamecopilot models``: which models a pipeline uses and whether this machine has them.

Before a session starts an expensive encoder, this says where each model would come from (a
local path or the Hugging Face cache), the runtime and dtype the config asks for, and which
are missing, without downloading anything (``--allow-download`` fetches the missing ones).
``--json`` prints a list of ``{"id", "path", "found", "runtime", "dtype", "role"}`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from copilot.args import OneLineParser
from copilot.errors import UsageError

PROG = "gamecopilot models"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="List the models a pipeline config uses and where they are found "
                                             "(local paths or the Hugging Face cache; nothing is downloaded).")
    p.add_argument("--config", "-c", help="pipeline YAML (default: configs/default.yaml)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, path, found, runtime, dtype, role}")
    p.add_argument("--allow-download", action="store_true", help="download models missing from the cache")
    return p


def _config_data(path: str | None) -> dict[str, object]:
    from copilot.config import default_config_path, load_yaml

    data = load_yaml(Path(path) if path else default_config_path())
    if not isinstance(data, dict):
        raise UsageError(f"{path or default_config_path()}: expected a mapping at the top level")
    return data


def render(entries: list[object]) -> str:
    """The human table: role, id, where (or ``not found``), runtime, dtype."""
    from engines.model_registry import ModelEntry

    rows = [("role", "model", "where", "runtime", "dtype")]
    for e in entries:
        assert isinstance(e, ModelEntry)
        rows.append((e.role, e.id, e.path if e.found and e.path else "not found", e.runtime, e.dtype))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    """``gamecopilot models [--config FILE] [--json] [--allow-download]``; exit 0, bad input 2."""
    args = build_parser().parse_args(argv)
    try:
        from copilot.config import default_config_path
        from engines.model_registry import configured_models

        source = str(args.config or default_config_path())
        entries = configured_models(_config_data(args.config), allow_download=args.allow_download, source=source)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([e.as_json() for e in entries]))
    else:
        print(render(list(entries)))
        missing = sum(not e.found for e in entries)
        if missing:
            print(f"{missing} of {len(entries)} not found here; `gamecopilot models --allow-download` fetches them",
                  file=sys.stderr)
    return 0
