"""Implementations of the pipeline commands: demo, replay, run, stage, bench pipeline."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import msgspec

from copilot.config import default_config_path, load_yaml, parse_pipeline
from copilot.errors import UsageError
from copilot.group import RunOptions
from copilot.registry import resolve_stage

REPLAY_KIND = "replay"
OUTPUT_OPTIONS = ("events_out", "advice_out", "features_out")


def sample_clip() -> Path:
    """The bundled sample: real Atari gameplay with its game audio (see bench/data/README.md)."""
    return Path(__file__).resolve().parent.parent / "bench" / "data" / "sample_breakout.mp4"


def _log_level(args: argparse.Namespace) -> int:
    v = getattr(args, "verbose", 0)
    return logging.DEBUG if v >= 2 else logging.INFO if v == 1 else logging.WARNING


def _prepare_outputs(args: argparse.Namespace) -> dict[str, Any]:
    """Check every output path can be written, and start each file empty."""
    options: dict[str, Any] = {}
    for name in OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if not value:
            continue
        path = Path(value)
        if not path.parent.is_dir():
            raise UsageError(f"--{name.replace('_', '-')}: directory {path.parent} does not exist")
        try:
            path.write_bytes(b"")
        except OSError as exc:
            raise UsageError(f"--{name.replace('_', '-')}: cannot write {path} ({exc.strerror})") from exc
        options[name] = str(path.resolve())
    metrics_out = getattr(args, "metrics_out", None)
    if metrics_out and not Path(metrics_out).parent.is_dir():
        raise UsageError(f"--metrics-out: directory {Path(metrics_out).parent} does not exist")
    return options


def prepare_run(
    config: str | None,
    *,
    input_file: str | None,
    start: float = 0.0,
    until: float | None = None,
) -> tuple[Any, Any, str, dict[str, dict[str, Any]]]:
    """Load and validate the pipeline and its input; return (cfg, raw data, source, overrides)."""
    path = Path(config) if config else default_config_path()
    data = load_yaml(path)
    cfg = parse_pipeline(data, str(path))
    overrides: dict[str, dict[str, Any]] = {}
    replays = [s for s in cfg.stages if s.kind == REPLAY_KIND]
    if input_file is not None:
        if not replays:
            raise UsageError(f"{path}: the pipeline has no {REPLAY_KIND!r} stage to read {input_file}")
        for s in replays:
            overrides[s.name] = {"path": str(Path(input_file).resolve()), "start": start, "until": until}
    for s in cfg.stages:
        cls = resolve_stage(s.kind)
        check = getattr(cls, "check", None)
        if check is not None:
            params = msgspec.convert({**s.params, **overrides.get(s.name, {})}, cls.Params)
            check(params)
    return cfg, data, str(path), overrides


def execute(args: argparse.Namespace, *, input_file: str | None, start: float = 0.0, until: float | None = None) -> int:
    """Run a whole pipeline under the supervisor, show metrics live, write the outputs."""
    from copilot.logs import setup_logging
    from copilot.metrics import metrics_json
    from copilot.report import metrics_table
    from copilot.supervisor import Supervisor

    setup_logging(_log_level(args))
    cfg, data, source, overrides = prepare_run(args.config, input_file=input_file, start=start, until=until)
    options = _prepare_outputs(args)
    speed = getattr(args, "speed", 1.0)
    opts = RunOptions(
        speed=speed,
        lossless=speed is None,
        stage_overrides=overrides,
        stage_options=options,
        log_level=_log_level(args),
    )
    from rich.console import Console
    from rich.live import Live

    err = Console(stderr=True)
    live_on = err.is_terminal and not args.quiet and not args.json
    live = Live(console=err, auto_refresh=False, transient=True) if live_on else None

    def on_metrics(stages: list[Any]) -> None:
        if live is not None:
            live.update(metrics_table(stages, title=f"{cfg.name}: live"), refresh=True)

    sup = Supervisor(cfg, data, source, opts, on_metrics=on_metrics)
    if live is not None:
        with live:
            result = asyncio.run(sup.run())
    else:
        result = asyncio.run(sup.run())
    report = metrics_json(
        result.stages,
        wall_s=result.wall_s,
        media_s=result.media_s,
        extra={"config": source, "input": input_file, "speed": "max" if speed is None else speed,
               "restarts": result.restarts, "interrupted": result.interrupted},
    )
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        out = Console()
        out.print(metrics_table(result.stages, title=f"{cfg.name}: {result.media_s:.1f} s of media in "
                                f"{result.wall_s:.1f} s ({report['realtime_factor']:.2f}x real time)"))
    return 130 if result.interrupted else 0


def cmd_replay(args: argparse.Namespace) -> int:
    return execute(args, input_file=args.file, start=args.start, until=args.until)


def cmd_demo(args: argparse.Namespace) -> int:
    clip = sample_clip()
    if not clip.is_file():
        raise UsageError(f"the bundled sample clip is missing ({clip}); see bench/data/README.md")
    return execute(args, input_file=str(clip), until=args.until)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError("run: give the pipeline with -c PIPELINE.yaml")
    return execute(args, input_file=args.input)


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one group in this process (for placing a group on another host or GPU)."""
    from copilot.group import run_group
    from copilot.logs import setup_logging

    setup_logging(_log_level(args))
    cfg, _, _, overrides = prepare_run(args.config, input_file=args.input)
    if args.group not in cfg.groups():
        raise UsageError(f"{args.config}: no placement group {args.group!r} (groups: {', '.join(cfg.groups())})")
    options = _prepare_outputs(args)
    sup = cfg.supervisor
    opts = RunOptions(
        run_dir=None,
        control_endpoint=sup.control_endpoint,
        metrics_endpoint=sup.metrics_endpoint,
        speed=args.speed,
        lossless=args.speed is None,
        stage_overrides=overrides,
        stage_options=options,
        wait_for_start=sup.control_endpoint is not None,
    )
    runner = asyncio.run(run_group(cfg, args.group, opts))
    snap = runner.metrics_snapshot()
    print(json.dumps(msgspec.to_builtins(snap)), file=sys.stderr if not args.json else sys.stdout)
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(
        config=args.config, speed=args.speed, quiet=True, json=args.json, metrics_out=args.output,
        verbose=0, events_out=None, advice_out=None, features_out=None,
    )
    return execute(ns, input_file=args.file, until=args.until)
