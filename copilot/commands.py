"""Implementations of the pipeline commands: demo, replay, run, stage, bench pipeline."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from copilot.config import default_config_path, load_yaml, parse_pipeline, with_absolute_paths
from copilot.errors import UsageError, check_writable, write_output
from copilot.group import RunOptions
from copilot.registry import resolve_stage

REPLAY_KIND = "replay"
OUTPUT_OPTIONS = ("events_out", "advice_out", "features_out")


def sample_clip() -> Path:
    """The bundled sample: real Atari gameplay with its game audio (see bench/data/README.md)."""
    return Path(__file__).resolve().parent.parent / "bench" / "data" / "breakout_s0.mp4"


def _log_level(args: argparse.Namespace) -> int:
    v = getattr(args, "verbose", 0)
    return logging.DEBUG if v >= 2 else logging.INFO if v == 1 else logging.WARNING


def _check_asr_stage(args: argparse.Namespace, cfg: Any, where: str) -> None:
    """``--asr-model`` with a pipeline that has no ``asr`` stage would do nothing: say so."""
    if getattr(args, "asr_model", None) and not any(s.kind == "asr" for s in cfg.stages):
        raise UsageError(f"--asr-model: the pipeline {where} has no asr stage to use it")


REASONER_KIND = "reasoner"
TIMELINE_KIND = "timeline"
HICO_KIND = "hico"
TIMELINE_FILE = "timeline.sqlite"  # (stages/timeline_db.py names it too: the core imports no stage)


def _session_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--session DIR``: the run option ``session`` (an absolute directory, made here).  A directory
    that already holds a session is refused: two runs in one timeline would mix their media times,
    and nothing already written is ever overwritten."""
    where = getattr(args, "session", None)
    if not where:
        return {}
    d = Path(where).expanduser()
    if d.exists() and not d.is_dir():
        raise UsageError(f"--session {where}: exists and is not a directory")
    if (d / TIMELINE_FILE).exists():
        raise UsageError(f"--session {where}: already holds a session ({TIMELINE_FILE}); question it with "
                         f"`gamecopilot ask {where}`, or give a new directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--session {where}: cannot make the directory ({exc.strerror or exc})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"--session {where}: not writable")
    return {"session": str(d.resolve())}


OVERLAY_KIND = "overlay"


def _overlay_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options of ``--overlay``, ``--overlay-port``, ``--overlay-host`` (and, for ``live``, the
    captured area the native window covers).  Beyond loopback the run gets a fresh token, which the
    printed URL carries; a port already taken is one line here, before anything starts."""
    import secrets

    from copilot.net import is_loopback, port_free

    mode = getattr(args, "overlay", "none") or "none"
    if mode == "none":
        return {}
    host = getattr(args, "overlay_host", None) or "127.0.0.1"
    port = int(getattr(args, "overlay_port", 8765))
    if not port_free(host, port):
        raise UsageError(f"--overlay-port {port}: {host}:{port} is in use (another copilot?) or cannot be bound "
                         "here; choose another port")
    options: dict[str, Any] = {"overlay": mode, "overlay_host": host, "overlay_port": port}
    if not is_loopback(host):
        options["overlay_token"] = secrets.token_urlsafe(12)
    area = getattr(args, "overlay_area", None)
    if area:
        options["overlay_area"] = area
    return options


def _announced_options(args: argparse.Namespace, cfg: Any, overrides: dict[str, dict[str, Any]],
                       where: str) -> tuple[dict[str, Any], list[str]]:
    """The run options of ``--reasoner``, ``--llm-url``, ``--llm-model`` and the overlay's, and the lines
    each stage that cares has to say about them (what will answer, where the overlay is), to print once
    every check has passed; a combination that cannot work is a UsageError here."""
    options: dict[str, Any] = {"pipeline_name": cfg.name}
    options.update(_session_options(args))
    for name in ("reasoner", "llm_url", "llm_model", "scorer"):
        value = getattr(args, name, None)
        if value:
            options[name] = value
    options.update(_overlay_options(args))
    lines = []
    for s in cfg.stages:
        cls = resolve_stage(s.kind)
        line = cls.announce(msgspec.convert({**s.params, **overrides.get(s.name, {})}, cls.Params), options)
        if line:
            lines.append(f"gamecopilot: {line}")
    kinds = {s.kind for s in cfg.stages}
    if REASONER_KIND not in kinds and getattr(args, "advice_out", None):
        raise UsageError(f"--advice-out: the pipeline {where} has no reasoner stage to give advice")
    if REASONER_KIND not in kinds and options.get("reasoner", "auto") not in ("auto", "none"):
        raise UsageError(f"--reasoner: the pipeline {where} has no reasoner stage")
    if options.get("overlay") and OVERLAY_KIND not in kinds:
        raise UsageError(f"--overlay: the pipeline {where} has no overlay stage")
    if options.get("session") and TIMELINE_KIND not in kinds:
        raise UsageError(f"--session: the pipeline {where} has no timeline stage to write it")
    return options, lines


def _flag(args: argparse.Namespace, option: str) -> str:
    """The flag the user typed for an output option: ``--events-out``, or what the command
    that filled ``args`` names it (``annotate -o``) in ``args.flags``."""
    return getattr(args, "flags", {}).get(option, f"--{option.replace('_', '-')}")


def _file_key(path: str | os.PathLike[str]) -> tuple[Any, ...]:
    """What makes two paths the same file: its inode when it exists (a hard link, a symlink, ``..``),
    else the resolved path."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return ("path", p.resolve())
    return ("inode", st.st_dev, st.st_ino)


def _prepare_outputs(args: argparse.Namespace, *inputs: str | None,
                     kept: Sequence[tuple[str | os.PathLike[str] | None, str]] = (),
                     defer_empty: list[tuple[str, Path]] | None = None) -> dict[str, Any]:
    """Resolve ``--asr-model``, check every output path can be written, and start each file empty.

    Every check that can fail on a bad argument comes before any file is emptied.  No output may be
    an input, another output, or a file the run reads (``kept``: the pipeline config, the profile).
    With ``defer_empty``, the files are not emptied here but listed there, for :func:`_empty_outputs`
    once every stage has started (a model that does not load must not cost the old outputs).
    """
    options: dict[str, Any] = {}
    asr_model = getattr(args, "asr_model", None)
    if asr_model:
        try:  # the asr stage knows what a model is (a directory, package:NAME) and where it lies
            options["asr_model"] = resolve_stage("asr").resolve_model(asr_model)
        except UsageError as exc:
            raise UsageError(f"--asr-model: {exc}") from None
    outputs: dict[str, tuple[str, Path]] = {}  # option -> (its flag, path)
    for name in OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = _flag(args, name)
        path = check_writable(value, flag)  # the text as typed: Path("dir/") drops the slash
        outputs[name] = (flag, path)
    metrics_out = getattr(args, "metrics_out", None)
    metrics_flag = _flag(args, "metrics_out")
    if metrics_out is not None:
        check_writable(metrics_out, metrics_flag)
    # two outputs in one file would overwrite each other, and an output over the input destroys it
    taken: dict[tuple[Any, ...], str] = {_file_key(f): "the input" for f in inputs if f}
    taken.update({_file_key(f): what for f, what in kept if f})
    for flag, path in [*outputs.values(), *([(metrics_flag, Path(metrics_out))] if metrics_out is not None else [])]:
        key = _file_key(path)
        if key in taken:
            raise UsageError(f"{flag}: {path} is also {taken[key]}")
        taken[key] = flag
    for name, (_, path) in outputs.items():
        options[name] = str(path.resolve())
    if defer_empty is None:
        _empty_outputs(list(outputs.values()))
    else:
        defer_empty.extend(outputs.values())
    return options


def _empty_outputs(outputs: Sequence[tuple[str, Path]]) -> None:
    for flag, path in outputs:
        try:
            path.write_bytes(b"")
        except OSError as exc:
            raise UsageError(f"{flag}: cannot write {path} ({exc.strerror})") from exc


def resolve_profile_option(profile: str | None, cfg: Any = None) -> str | None:
    """Validate ``--profile`` (a name under configs/profiles or a YAML path); its resolved path.

    With the parsed pipeline ``cfg``, each of its stages validates the profile sections it owns
    (the trigger its settings and the weights against the signals declared upstream of it), so a
    wrong key ends in one line before any group starts or any output is emptied.
    """
    from copilot.profile import check_sections, load_profile, resolve_profile

    path = resolve_profile(profile)
    prof = load_profile(path)
    if cfg is not None:
        check_sections(prof, {s.name: resolve_stage(s.kind) for s in cfg.stages}, str(path), cfg)
    return str(path)


def swap_source(data: Any, where: str, kind: str, params: dict[str, Any], record: str | None = None) -> Any:
    """The pipeline with its replay stage replaced by another source of the same ports.

    With ``record``, a recorder stage beside it writes what the source produced to that MP4.

    ``live`` runs the very pipeline a replay runs, with capture (or the emulated game) in
    place of the file reader, so what is measured on recordings holds beside a live game.
    """
    stages = data.get("stages") if isinstance(data, dict) else None
    replays = [s for s in stages or [] if isinstance(s, dict) and s.get("kind") == REPLAY_KIND]
    if not replays:
        raise UsageError(f"{where}: the pipeline has no {REPLAY_KIND!r} stage to replace with {kind!r}")
    new_stages = [
        {**s, "name": kind, "kind": kind, "params": dict(params)} if s is replays[0] else s
        for s in stages  # type: ignore[union-attr]
    ]
    if record:
        outputs = replays[0].get("outputs") or {}
        new_stages.append({"name": "recorder", "kind": "recorder", "params": {"path": record},
                           "inputs": [link for port, link in outputs.items() if port in ("video", "audio")],
                           "placement": replays[0].get("placement", {})})
    return {**data, "stages": new_stages}


def without_stages(data: Any, kinds: Sequence[str]) -> Any:
    """The pipeline without its stages of ``kinds``: their output links leave the inputs of the stages
    they fed, and a stage left with no input at all (a sink of their output) goes too."""
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list):
        return data

    def inputs(s: Any) -> list[Any]:
        ins = s.get("inputs") if isinstance(s, dict) else None
        return ins if isinstance(ins, list) else []

    def outputs(s: Any) -> list[str]:
        outs = s.get("outputs") if isinstance(s, dict) else None
        return [str(v) for v in outs.values()] if isinstance(outs, dict) else []

    gone = [s for s in stages if isinstance(s, dict) and s.get("kind") in kinds]
    gone_links: set[str] = set()
    while gone:  # a dropped stage's links go, and so does whoever only listened to them
        for s in gone:
            gone_links.update(outputs(s))
        gone_ids = {id(s) for s in gone}
        stages = [s for s in stages if id(s) not in gone_ids]
        gone = [s for s in stages if inputs(s) and all(i in gone_links for i in inputs(s))]
    kept = [{**s, "inputs": [i for i in inputs(s) if i not in gone_links]} if inputs(s) else s for s in stages]
    out = {**data, "stages": kept}
    links = data.get("links")
    if isinstance(links, dict):
        out["links"] = {k: v for k, v in links.items() if k not in gone_links}
    groups = data.get("groups")
    if isinstance(groups, dict):  # a placement group whose every stage went goes too
        used = {(s.get("placement") or {}).get("group", "main") for s in kept if isinstance(s, dict)}
        out["groups"] = {k: v for k, v in groups.items() if k in used}
    return out


def prepare_run(
    config: str | None,
    *,
    input_file: str | None,
    start: float = 0.0,
    until: float | None = None,
    source: tuple[str, dict[str, Any], str | None] | None = None,
    without_kinds: Sequence[str] = (),
) -> tuple[Any, Any, str, dict[str, dict[str, Any]], float | None]:
    """Load and validate the pipeline and its input.

    Returns (cfg, raw data, source, per-stage param overrides, seconds of media to replay
    or None when unknown).  ``without_kinds``: stages of these kinds are left out (with what only
    they fed), e.g. the reasoner for ``--reasoner none`` and ``annotate``.
    """
    path = Path(config) if config else default_config_path()
    data = with_absolute_paths(load_yaml(path), path)
    if source is not None:
        data = swap_source(data, str(path), *source)
    if without_kinds:
        data = without_stages(data, without_kinds)
    cfg = parse_pipeline(data, str(path))
    overrides: dict[str, dict[str, Any]] = {}
    replays = [s for s in cfg.stages if s.kind == REPLAY_KIND]
    if input_file is not None:
        if not replays:
            raise UsageError(f"{path}: the pipeline has no {REPLAY_KIND!r} stage to read {input_file}")
        for s in replays:
            overrides[s.name] = {"path": str(Path(input_file).resolve()), "start": start, "until": until}
    media_s: float | None = None
    for s in cfg.stages:
        cls = resolve_stage(s.kind)
        params = msgspec.convert({**s.params, **overrides.get(s.name, {})}, cls.Params)
        info = cls.check(params)  # (Stage.check: before any group starts or any output is emptied)
        duration = getattr(info, "duration_s", None)
        if duration:
            end = min(duration, until) if until is not None else duration
            media_s = max(media_s or 0.0, end - start)
    return cfg, data, str(path), overrides, media_s


def execute(
    args: argparse.Namespace,
    *,
    input_file: str | None,
    start: float = 0.0,
    until: float | None = None,
    source: tuple[str, dict[str, Any], str | None] | None = None,
) -> int:
    """Run a whole pipeline under the supervisor, show metrics live, write the outputs."""
    from copilot.logs import setup_logging
    from copilot.metrics import metrics_json
    from copilot.report import metrics_table
    from copilot.supervisor import Supervisor

    setup_logging(_log_level(args))
    reasoner = getattr(args, "reasoner", None) or "auto"
    if reasoner == "none" and getattr(args, "advice_out", None):
        raise UsageError("--advice-out: --reasoner none gives no advice to write")
    # HiCo's context is for the reasoner: without one (--reasoner none, annotate) it goes too
    without = [REASONER_KIND, HICO_KIND] if reasoner == "none" else []
    if (getattr(args, "overlay", None) or "none") == "none":
        without.append(OVERLAY_KIND)
    if not getattr(args, "session", None):
        without.append(TIMELINE_KIND)
    cfg, data, cfg_path, overrides, total_media_s = prepare_run(
        args.config, input_file=input_file, start=start, until=until, source=source, without_kinds=without,
    )
    _check_asr_stage(args, cfg, str(cfg_path))
    run_options, announcements = _announced_options(args, cfg, overrides, str(cfg_path))
    profile = resolve_profile_option(getattr(args, "profile", None), cfg)  # before any output file is emptied
    to_empty: list[tuple[str, Path]] = []
    options = _prepare_outputs(args, input_file, getattr(args, "record", None), getattr(args, "truth_out", None),
                               kept=[(cfg_path, "the pipeline config"), (profile, "the profile")],
                               defer_empty=to_empty)
    if profile:
        options["profile"] = profile
    if input_file:
        options["input"] = str(Path(input_file).resolve())  # (the session records what it watched)
    options.update(run_options)
    speed = getattr(args, "speed", 1.0)
    progress = getattr(args, "progress", False)  # annotate: a progress bar and a one-line summary
    show_bar = progress or getattr(args, "bar", False)  # bench pipeline: the bar, then its table
    options["console"] = not (args.quiet or args.json or progress or show_bar)
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
    bar = _MediaProgress(err, total_media_s, label=Path(input_file).name if input_file else cfg.name) \
        if show_bar and not args.quiet else None
    live_on = err.is_terminal and not args.quiet and not args.json and bar is None
    live = Live(console=err, auto_refresh=False, transient=True) if live_on else None

    def on_metrics(stages: list[Any]) -> None:
        if live is not None:
            live.update(metrics_table(stages, title=f"{cfg.name}: live"), refresh=True)
        if bar is not None:
            bar.update(max((m.media_s for m in stages), default=0.0))

    not_emptied: list[UsageError] = []

    def on_ready() -> None:
        for line in announcements:  # every group started: say what answers (even with -q: it only hides the table)
            print(line, file=sys.stderr, flush=True)
        if sup.placements.any_gpu:  # a pipeline spread over GPUs: where each group really went
            for line in sup.placement_report():
                print(line, file=sys.stderr, flush=True)
        try:
            _empty_outputs(to_empty)
        except UsageError as exc:
            not_emptied.append(exc)
            sup.request_stop(interrupted=False)

    sup = Supervisor(cfg, data, cfg_path, opts, on_metrics=on_metrics, on_ready=on_ready)
    display: Any = live if live is not None else bar
    if display is not None:
        with display:
            result = asyncio.run(sup.run())
    else:
        result = asyncio.run(sup.run())
    if not_emptied:
        raise not_emptied[0]
    report = metrics_json(
        result.stages,
        wall_s=result.wall_s,
        media_s=result.media_s,
        extra={"config": cfg_path, "input": input_file, "speed": "max" if speed is None else speed,
               "restarts": result.restarts, "interrupted": result.interrupted},
    )
    if args.metrics_out and result.started:  # (a run that never started leaves the old file)
        write_output(args.metrics_out, json.dumps(report, indent=2) + "\n", _flag(args, "metrics_out"))
    if result.usage_error:
        raise UsageError(result.usage_error)
    if result.failed:
        for group, why in result.failed.items():
            print(f"gamecopilot: group {group} failed: {why}", file=sys.stderr)
        return 1
    if result.lost_inputs and not result.interrupted:
        for group, links in result.lost_inputs.items():
            print(f"gamecopilot: group {group} was restarted after its input{'s' if len(links) > 1 else ''} "
                  f"{', '.join(links)} ended: what came while it was down is lost (see the warnings above)",
                  file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    elif progress:
        print(f"{result.media_s:.1f} s of media annotated in {result.wall_s:.1f} s "
              f"({report['realtime_factor']:.1f}x real time)", file=sys.stderr)
    else:
        out = Console() if sys.stdout.isatty() else Console(width=120)
        out.print(metrics_table(result.stages, title=f"{cfg.name}: {result.media_s:.1f} s of media in "
                                f"{result.wall_s:.1f} s ({report['realtime_factor']:.2f}x real time)"))
    session = run_options.get("session")
    if session and result.started:
        import shlex

        from copilot.timefmt import format_time

        moment = format_time(min(30.0, result.media_s / 2))[:5]  # a moment the session holds
        print(f"gamecopilot: the session's timeline is in {session}; question it with: gamecopilot ask "
              f"{shlex.quote(session)} '@{moment} what happened?'", file=sys.stderr)
    if not result.interrupted:
        return 0
    return 128 + (result.stop_signal or signal.SIGINT)  # the shell's convention: 130 Ctrl-C, 143 SIGTERM


class _MediaProgress:
    """A progress bar over media seconds, fed from the supervisor's metrics reports."""

    def __init__(self, console: Any, total_s: float | None, label: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TimeRemainingColumn(),
            # off when stderr is not a terminal: a log or a pipe gets no bar (and no blank line where it was)
            console=console, transient=True, disable=not console.is_terminal,
        )
        self._task = self._progress.add_task(label, total=total_s or None)

    def update(self, media_s: float) -> None:
        self._progress.update(self._task, completed=media_s)

    def __enter__(self) -> _MediaProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)


def cmd_annotate(args: argparse.Namespace) -> int:
    """Perception and triggers at max speed over a file; events JSONL out (seed vidgame-llm-annotation)."""
    ns = argparse.Namespace(
        config=args.config, profile=args.profile, speed=None, quiet=args.quiet, json=False,
        metrics_out=args.metrics_out, verbose=args.verbose, events_out=args.output, advice_out=None,
        features_out=args.features_out, asr_model=args.asr_model, progress=True, flags={"events_out": "-o"},
        reasoner="none", scorer=args.scorer,
    )
    return execute(ns, input_file=args.file, start=args.start, until=args.until)


def cmd_eval(args: argparse.Namespace) -> int:
    from copilot.scoring import evaluate_files, format_report

    result = evaluate_files(args.pred, args.truth, tolerance=args.tolerance, critical_window=args.critical_window)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from copilot.curve import generate_keys

    try:
        public, secret = generate_keys(args.dir)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write the keypair in {args.dir}: {exc.strerror or exc}") from None
    print(f"wrote {public} (public) and {secret} (secret, mode 600)")
    print(f"copy {args.dir} to every host and set in the pipeline YAML:  curve_keys: {secret.resolve()}")
    print("(a relative curve_keys is taken from the YAML's directory)")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    if args.dataset != "atari":
        raise UsageError("dataset: choose a source: atari")
    from copilot.registry import resolve

    try:
        make_recording = resolve(args.dataset, "datasets")  # engines.atari_dataset (see pyproject.toml)
        rec = make_recording(args.game, args.seconds, args.output, fps=args.fps, seed=args.seed,
                             policy=args.policy, progress=not args.quiet)
    except ImportError as exc:
        raise UsageError(f"dataset atari needs ale-py: pip install 'gameplay-copilot[atari]' ({exc})") from exc
    print(f"{rec.video}\n{rec.truth}")
    print(f"{rec.frames} frames, {rec.seconds:.1f} s, {rec.events} truth events, {rec.episodes} games ended",
          file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    return execute(args, input_file=args.file, start=args.start, until=args.until)


def cmd_live(args: argparse.Namespace) -> int:
    """Beside a live game: the default pipeline with capture (or an emulated game) as its source."""
    args.speed = 1.0
    record = None
    if args.record:
        rec = Path(args.record).resolve()
        if not rec.parent.is_dir():
            raise UsageError(f"--record: directory {Path(args.record).parent} does not exist")
        if rec.suffix.lower() != ".mp4":
            raise UsageError(f"--record: write an .mp4 file, got {args.record}")
        record = str(rec)
    if args.game:
        if args.truth_out is not None:
            check_writable(args.truth_out, "--truth-out")
        params: dict[str, Any] = {"game": args.game, "seed": args.seed, "seconds": args.until}
        if args.truth_out:
            params["truth_out"] = str(Path(args.truth_out).resolve())
        return execute(args, input_file=None, source=("atari", params, record))
    if args.truth_out is not None:
        raise UsageError("--truth-out needs --game (only an emulated game knows its ground truth)")
    params = {"fps": args.fps, "audio": None if args.audio == "none" else args.audio, "seconds": args.until}
    if args.monitor is not None:
        params["monitor"] = args.monitor
    if args.region is not None:
        params["region"] = args.region
    if args.window is not None:
        params["window"] = args.window
    args.overlay_area = {k: params[k] for k in ("monitor", "region", "window") if k in params}
    return execute(args, input_file=None, source=("capture", params, record))


def default_session_dir(name: str) -> Path:
    """A new session directory under the user's state directory (``$XDG_STATE_HOME``, else
    ``~/.local/state``): ``gameplay-copilot/sessions/NAME-YYYYmmdd-HHMMSS``."""
    import datetime

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")  # a name for people, not a clock the pipeline uses
    d = base / "gameplay-copilot" / "sessions" / f"{name}-{stamp}"
    n = 1
    while d.exists():
        n += 1
        d = d.with_name(f"{name}-{stamp}-{n}")
    return d


def cmd_demo(args: argparse.Namespace) -> int:
    clip = sample_clip()
    if not clip.is_file():
        raise UsageError(f"the bundled sample clip is missing ({clip}); see bench/data/README.md")
    if args.no_session and args.session:
        raise UsageError("--no-session and --session contradict each other: give one")
    if not args.session and not args.no_session:
        args.session = str(default_session_dir("demo"))
    return execute(args, input_file=str(clip), until=args.until)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError("run: give the pipeline with -c PIPELINE.yaml")
    return execute(args, input_file=args.input)


def shared_run_dir(pipeline: str) -> str:
    """Where the groups of one pipeline, each started by its own ``gamecopilot stage`` on this
    host, find each other: links without an ``endpoint`` are ``ipc://`` sockets here (inproc
    ones would never leave the process).  Per user, and per pipeline ``name``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pipeline).strip(".") or "pipeline"
    base = Path(tempfile.gettempdir()) / f"gamecopilot-{os.getuid()}"
    path = base / safe
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        # sockets are made and removed in it: it must be this user's own, not one set up by another
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise UsageError(f"the run directory {base} is not this user's own (owner {st.st_uid}); remove it, "
                             "or set TMPDIR elsewhere")
        if st.st_mode & 0o077:  # this user's, made open by an earlier version or by hand: close it
            os.chmod(base, 0o700)
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make the run directory {path}: {exc.strerror or exc}") from exc
    return str(path)


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one group in this process (for placing a group on another host or GPU)."""
    from copilot.group import run_group
    from copilot.logs import setup_logging

    setup_logging(_log_level(args))
    cfg, _, _, overrides, _ = prepare_run(args.config, input_file=args.input)
    if args.group not in cfg.groups():
        raise UsageError(f"{args.config}: no placement group {args.group!r} (groups: {', '.join(cfg.groups())})")
    _check_asr_stage(args, cfg, str(args.config))
    profile = resolve_profile_option(args.profile, cfg)  # before any output file is emptied
    run_dir = shared_run_dir(cfg.name)
    to_empty: list[tuple[str, Path]] = []
    options = _prepare_outputs(args, args.input, kept=[(args.config, "the pipeline config"), (profile, "the profile")],
                               defer_empty=to_empty)
    if profile:
        options["profile"] = profile
    options.update(_session_options(args))
    sup = cfg.supervisor
    opts = RunOptions(
        run_dir=run_dir,
        control_endpoint=sup.control_endpoint,
        metrics_endpoint=sup.metrics_endpoint,
        speed=args.speed,
        lossless=args.speed is None,
        stage_overrides=overrides,
        stage_options=options,
        wait_for_start=sup.control_endpoint is not None,
    )
    # outputs are emptied once every stage of the group has started (as execute does for a run), or
    # in a group that only consumes, at its first input: a producer that never comes costs nothing
    cfg.placements().pin_process(args.group)  # this host's group sees only its own GPUs, as a spawned one would
    runner = asyncio.run(run_group(cfg, args.group, opts, on_ready=lambda: _empty_outputs(to_empty)))
    snap = runner.metrics_snapshot()
    print(json.dumps(msgspec.to_builtins(snap)), file=sys.stderr if not args.json else sys.stdout)
    if runner.stop_signal:
        return 128 + runner.stop_signal
    lost = runner.lost_inputs
    if lost:  # (told by a supervisor that their producers had finished before this group took their end)
        print(f"gamecopilot: group {args.group} started after its input{'s' if len(lost) > 1 else ''} "
              f"{', '.join(lost)} ended: what was sent before is lost", file=sys.stderr)
        return 1
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(
        config=args.config, speed=args.speed, quiet=args.quiet, json=args.json, metrics_out=args.output, bar=True,
        verbose=0, events_out=None, advice_out=None, features_out=None, profile=None, flags={"metrics_out": "-o"},
    )
    return execute(ns, input_file=args.file, until=args.until)
