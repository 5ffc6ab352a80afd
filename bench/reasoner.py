"""``gamecopilot bench reasoner``: how fast advice follows an event, per backend, and how rarely the
cascade wakes the model.

Each backend runs the default pipeline over the same replay at real time (the way a user runs it:
``gamecopilot replay FILE --reasoner NAME``, in its own process), and the advice JSONL it writes gives
the latencies the reasoner measured from the trigger's emission of each event: event to first
token, event to final advice (p50, p95).  Backends: ``rules`` always; ``transformers`` on a *tiny
random* Qwen3-VL built on the fly (labelled so: it proves the path and its overheads, not a real
model's speed) when torch and transformers are installed; ``openai`` when ``--llm-url`` is given.

Wakes per minute: the events the reasoner woke for (its metrics notes), per minute of media, beside
what a fixed 1 Hz waker (a model asked every second, no cascade) would make of the same replay.

    gamecopilot bench reasoner [FILE] [--until 60] [--llm-url URL] [--llm-model M] [--json] [-o F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import check_output_path, emit_result, run_tool
from copilot.args import OneLineParser
from copilot.errors import UsageError

TINY_LABEL = "transformers (tiny random Qwen3-VL, CPU)"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gamecopilot bench reasoner", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="the replay (default: the bundled sample clip)")
    p.add_argument("--until", type=float, default=60.0, help="media seconds to replay per backend (default 60)")
    p.add_argument("--profile", help="game profile (default: the default profile)")
    p.add_argument("--llm-url", help="also measure the openai backend against this server")
    p.add_argument("--llm-model", help="the served model's id for --llm-url")
    p.add_argument("--backends", default="rules,transformers,openai",
                   help="which to run, of rules, transformers, openai (default: all that can run)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", help="also write the JSON here")
    return p


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p95": round(float(np.percentile(arr, 95)), 1)}


def _replay(file: str, until: float, extra: list[str], workdir: Path, label: str) -> dict[str, Any]:
    """One real-time replay with one backend; its advice latencies and the reasoner's counts."""
    advice, metrics = workdir / f"{label}.advice.jsonl", workdir / f"{label}.metrics.json"
    cmd = [sys.executable, "-m", "copilot", "replay", file, "--speed", "1", "--until", str(until), "-q",
           "--advice-out", str(advice), "--metrics-out", str(metrics), *extra]
    print(f"... {label}: {until:g} s of media at real time", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"the {label} replay failed (exit {proc.returncode}): {last}")
    lines = [json.loads(x) for x in advice.read_text().splitlines() if x.strip()]
    report = json.loads(metrics.read_text())
    entry = report.get("stages", {}).get("reasoner", {})
    notes = entry.get("notes", {})
    first = [float(a["latency_ms"]["event_to_first"]) for a in lines]
    final = [float(a["latency_ms"]["event_to_final"]) for a in lines]
    first_ms = _percentiles(first)
    if not lines and isinstance(entry.get("event_to_first"), dict):
        # no valid advice (a tiny random model writes no JSON): the first tokens still came, and the
        # reasoner timed every one of them
        first_ms = {k: round(float(entry["event_to_first"][k]), 1) for k in ("p50", "p95")}
    return {"event_to_first_ms": first_ms, "event_to_final_ms": _percentiles(final), "n": len(lines),
            "wakes": int(notes.get("wakes", 0)), "media_s": float(report.get("media_s", 0.0)),
            "realtime_factor": report.get("realtime_factor"), "notes": notes}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from copilot.commands import sample_clip

    file = str(Path(args.file).resolve()) if args.file else str(sample_clip())
    if not Path(file).is_file():
        raise UsageError(f"no such file: {file}")
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    unknown = wanted - {"rules", "transformers", "openai"}
    if unknown:
        raise UsageError(f"--backends: unknown {', '.join(sorted(unknown))} (rules, transformers, openai)")
    profile = ["--profile", args.profile] if args.profile else []
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reasoner-") as tmp:
        work = Path(tmp)
        if "rules" in wanted:
            results["rules"] = _replay(file, args.until, ["--reasoner", "rules", *profile], work, "rules")
        if "transformers" in wanted:
            try:
                from engines.tiny_qwen3vl import build_tiny_qwen3vl
            except ImportError as exc:
                print(f"... transformers: skipped ({exc}; pip install 'gameplay-copilot[transformers]')",
                      file=sys.stderr)
            else:
                model_dir = build_tiny_qwen3vl(work / "tiny-qwen3vl")
                results[TINY_LABEL] = _replay(file, args.until, ["--reasoner", "transformers", "--llm-model",
                                                                 str(model_dir), *profile], work, "transformers")
        if "openai" in wanted and args.llm_url:
            extra = ["--reasoner", "openai", "--llm-url", args.llm_url, *profile]
            if args.llm_model:
                extra += ["--llm-model", args.llm_model]
            results["openai"] = _replay(file, args.until, extra, work, "openai")
    if not results:
        raise UsageError("no backend could run (see the lines above)")
    any_run = next(iter(results.values()))
    minutes = max(any_run["media_s"], 1e-9) / 60
    fixed = math.floor(any_run["media_s"])  # a 1 Hz waker: one wake per whole second of media
    return {
        "file": file,
        "media_s": round(any_run["media_s"], 2),
        "backends": {k: {key: v[key] for key in ("event_to_first_ms", "event_to_final_ms", "n", "realtime_factor",
                                                  "notes")} for k, v in results.items()},
        "wakes_per_min": round(any_run["wakes"] / minutes, 2),
        "fixed_1hz_wakes_per_min": round(fixed / minutes, 2),
    }


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"reasoner over {Path(result['file']).name}, {result['media_s']:.0f} s at real time: "
                    f"{result['wakes_per_min']:.1f} wakes/min (a fixed 1 Hz waker: "
                    f"{result['fixed_1hz_wakes_per_min']:.0f}/min)")
    for col in ("backend", "advice", "first p50", "first p95", "final p50", "final p95", "realtime"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for name, r in result["backends"].items():
        f, g = r["event_to_first_ms"], r["event_to_final_ms"]
        t.add_row(name, str(r["n"]), *(f"{x:.1f}" if x == x else "-" for x in (f["p50"], f["p95"], g["p50"], g["p95"])),
                  f"{r['realtime_factor']:.2f}" if r.get("realtime_factor") else "-")
    t.caption = "latencies in ms from the trigger's emission of the event to the advice's first token and its end"
    return t


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.until > 0:
        raise UsageError("--until must be positive")
    check_output_path(args.output)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run_bench(args)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench reasoner")
