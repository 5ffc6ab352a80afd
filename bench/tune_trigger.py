"""Fast offline tuning of the TriggerDetector over features the real pipeline recorded.

Running the whole pipeline costs ~10-25 s per 90 s recording; the detector itself costs
milliseconds.  So this tool runs the real default pipeline (``configs/default.yaml``, exactly
what ``gamecopilot annotate --features-out`` runs) once per recording and caches what its
encoders sent the trigger as ``<stem>.<profile>.v<N>.features.jsonl`` beside the recording
(with the pipeline's own events beside it).  The detector is then replayed over those
features (:func:`replay_detector`), in the media-time order the trigger stage's merge releases
them, with any settings, and scored with :mod:`copilot.scoring`.  Nothing here wires encoders
by hand: a change to an encoder or to the default pipeline reaches the tuner (bump
:data:`CACHE_VERSION` to record again).

Usage::

    python -m bench.tune_trigger --pool train --data /tmp/atari [--set fire_threshold=0.7 ...]
        [--grid KEY=V1,V2 ...] [--per-game] [--by-class] [--jobs N]
    python -m bench.tune_trigger --games Breakout Pong --seeds 0 1 2 --data /tmp/atari

Prints per-game scores and averages for each parameter setting, and how many games fail a
per-game acceptance line.  Tune on ``--pool train`` only; score ``--pool validation`` with
the chosen settings, never the other way round (:mod:`bench.pools`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.output import run_tool
from bench.pools import POOLS, ensure_recording, selection
from copilot.args import OneLineParser, positive_int, seed_number
from copilot.config import default_config_path, load_yaml, parse_pipeline
from copilot.errors import UsageError
from copilot.messages import Cue, Features, GameState
from copilot.profile import Profile, load_profile, resolve_profile
from copilot.scoring import evaluate, read_truth, wake_figures
from copilot.signals import SignalTable, pipeline_signals
from engines.atari_game import resolve_game
from stages.hud_cues import HudCuePolicy, HudCueSettings, hud_cue_settings
from stages.trigger import DetectorEvent, TriggerDetector
from stages.trigger_settings import TriggerParams, trigger_settings

# bump when an encoder or the default pipeline changes, so recorded features are made again
CACHE_VERSION = 35


def cache_paths(video: Path, profile: str | None) -> tuple[Path, Path]:
    """``(features, events)`` the real pipeline recorded for ``video`` with ``profile``."""
    tag = f"{Path(profile).stem if profile else 'default'}.v{CACHE_VERSION}"
    return video.with_suffix(f".{tag}.features.jsonl"), video.with_suffix(f".{tag}.events.jsonl")


def record_features(video: Path, profile: str | None, features: Path, events: Path) -> None:
    """Run the real default pipeline (``configs/default.yaml``) over ``video`` at max speed, as
    ``gamecopilot annotate`` does, keeping everything its encoders sent the trigger.

    Both files are written under temporary names and renamed when complete, so an interrupted
    run, or two runs sharing ``--data``, never leave a half-written cache.
    """
    tmp_f = features.with_name(f".{features.name}.{os.getpid()}.partial")
    tmp_e = events.with_name(f".{events.name}.{os.getpid()}.partial")
    # --scorer none: the trigger's own candidates, which the event scorer is trained on and rescored from
    cmd = [sys.executable, "-m", "copilot", "annotate", str(video), "-o", str(tmp_e), "--features-out", str(tmp_f),
           "-q", "--scorer", "none", *(["--profile", profile] if profile else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(f"{video}: the pipeline failed (exit {proc.returncode}): {last}")
        os.replace(tmp_e, events)
        os.replace(tmp_f, features)
    finally:
        tmp_f.unlink(missing_ok=True)
        tmp_e.unlink(missing_ok=True)


def cached_features(video: str | Path, profile: str | None = None, refresh: bool = False) -> Path:
    """The features JSONL the real pipeline recorded for ``video``, recorded first when missing or
    older than the video."""
    v = Path(video)
    features, events = cache_paths(v, profile)
    fresh = all(p.exists() and p.stat().st_mtime >= v.stat().st_mtime for p in (features, events))
    if refresh or not fresh:
        record_features(v, profile, features, events)
    return features


# what the trigger reads, by the record's message kind (the features sink's format, stages/sink.py)
_READ: dict[str, type] = {"features": Features, "cue": Cue, "state": GameState}


def observations(features: Path) -> list[tuple[float, str, int, int, Any]]:
    """The recorded inputs of the trigger as ``(t, stream, rank, n, payload)`` in the order its
    media-time merge releases them (see :class:`copilot.order.MediaTimeOrder` and TriggerStage)."""
    obs: list[tuple[float, str, int, int, Any]] = []
    with open(features, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            rec = json.loads(line)
            kind = rec.get("kind")
            if kind not in _READ:
                continue
            # a cue is nested under its kind (it has a t and a kind of its own); the others are flat
            body = rec[kind] if kind == "cue" else {k: v for k, v in rec.items() if k not in ("t", "kind", "source")}
            payload: Features | Cue | GameState = msgspec.convert(body, _READ[kind])
            if isinstance(payload, Features):
                obs.append((rec["t"], payload.name, 1, n, (rec["source"], payload)))
            else:
                obs.append((rec["t"], rec["source"], 0 if kind == "cue" else 1, n, (rec["source"], payload)))
    obs.sort(key=lambda o: o[:4])
    return obs


def replay_detector(obs: list[tuple[float, str, int, int, Any]], profile: Profile) -> list[dict[str, Any]]:
    """Run a fresh TriggerDetector over recorded inputs with ``profile``'s settings; the events as
    events-JSONL records.

    The HUD stage's cues are derived again from its recorded features with the profile's ``hud``
    section (the same :class:`stages.hud_cues.HudCuePolicy` the stage runs), so HUD settings can be
    tuned too; every other input is replayed as recorded.
    """
    det = TriggerDetector(profile, default_signal_table())
    hud = HudCuePolicy(hud_cue_settings(profile.hud, profile.name))
    hud_sources = {src for _, name, _, _, (src, p) in obs if isinstance(p, Features) and name == "hud"}
    out: list[DetectorEvent] = []
    for t, _, _, _, (src, p) in obs:
        if isinstance(p, Features):
            if p.name == "hud":
                for cue in hud.update(t, p.values):
                    out += det.observe_cue(t, cue)
            out += det.observe(t, p.name, p.values)
        elif isinstance(p, Cue):
            if src not in hud_sources:
                out += det.observe_cue(t, p)
        else:
            out += det.observe_state(t, p)
    out += det.finish()
    return [ev.record() for ev in out]


@functools.cache
def default_signal_table() -> SignalTable:
    """What the default pipeline's trigger scores (the pipeline the features came from): read once,
    not for every recording and setting replayed."""
    cfg = parse_pipeline(load_yaml(default_config_path()), str(default_config_path()))
    return SignalTable(pipeline_signals(cfg, "trigger"))


def with_trigger(profile: Profile, changes: dict[str, Any]) -> Profile:
    """``profile`` with trigger (or HUD cue) settings changed; a setting that is unknown or of the
    wrong type is a :class:`UsageError` naming it."""
    if not changes:
        return profile
    hud_keys, trig_keys = set(HudCueSettings.__struct_fields__), set(TriggerParams.__struct_fields__)
    unknown = sorted(set(changes) - hud_keys - trig_keys)
    if unknown:
        raise UsageError(f"no trigger or hud setting {', '.join(unknown)} (see stages/trigger_settings.py and"
                         " stages/hud_cues.py)")
    trig = {**profile.trigger, **{k: v for k, v in changes.items() if k in trig_keys}}
    hud = {**profile.hud, **{k: v for k, v in changes.items() if k in hud_keys}}
    trigger_settings(trig, "trigger setting")
    hud_cue_settings(hud, "hud setting")
    return msgspec.structs.replace(profile, trigger=trig, hud=hud)


def prepare(game: str, seed: int, data: Path, seconds: float, refresh: bool,
            profile: str | None = None, policy: str = "random") -> tuple[Path, Path]:
    """Make one recording if missing and cache its signals: ``(video, truth)``.

    The slow part of a first run (15-45 s a recording on this project's 2-core machines);
    :func:`prepare_all` runs it in worker processes."""
    video, truth = ensure_recording(game, seed, data, seconds, policy)
    cached_features(video, profile, refresh)
    return video, truth


def _prepare_job(job: tuple[str, int, Path, float, bool, str | None, str]) -> tuple[str, int, Path, Path]:
    game, seed = job[0], job[1]
    return (game, seed, *prepare(*job))


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them (no traceback from each worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_all(wanted: list[tuple[str, int]], data: Path, seconds: float, refresh: bool, jobs: int,
                step: Callable[[str | None], None], profile: str | None = None, policy: str = "random"
                ) -> dict[tuple[str, int], tuple[Path, Path]]:
    """:func:`prepare` every recording, ``jobs`` at a time; ``step`` reports progress."""
    # each recording once: two workers must never make the same files
    todo = [(g, s, data, seconds, refresh, profile, policy) for g, s in dict.fromkeys(wanted)]
    done: dict[tuple[str, int], tuple[Path, Path]] = {}
    if jobs <= 1 or len(todo) <= 1:
        for game, seed, *_ in todo:
            step(f"{game} s{seed}")
            done[(game, seed)] = prepare(game, seed, data, seconds, refresh, profile, policy)
            step(None)
        return done
    import multiprocessing

    # spawn, not fork: the progress bar runs a thread, and forking a threaded process can deadlock
    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), initializer=_ignore_sigint)
    try:
        step(f"{len(todo)} recordings, {min(jobs, len(todo))} at a time")
        for game, seed, video, truth in pool.imap_unordered(_prepare_job, todo):
            done[(game, seed)] = (video, truth)
            step(None)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return done


def parse_settings(items: list[str], *, sweep: bool) -> dict[str, list[Any]]:
    """``KEY=VALUE`` (or, for a sweep, ``KEY=V1,V2,...``) items as ``{key: [values]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            form = "KEY=V1,V2,..." if sweep else "KEY=VALUE"
            raise UsageError(f"{'--grid' if sweep else '--set'} {item!r}: expected {form}")
        out[key] = [_parse_value(x) for x in text.split(",")] if sweep else [_parse_value(text)]
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("crit_recall", "wake_precision", "excess_wakes", "ann_recall", "ann_precision")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {
        "worst_crit": min(r["crit_recall"] for r in rows),
        "worst_excess": max(r["excess_wakes"] for r in rows),
    }


def fails_a_game_line(row: dict[str, Any]) -> bool:
    """Whether one recording misses a per-game acceptance line (critical recall, excess wakes)."""
    return bool(row["crit_recall"] < 0.75 or row["excess_wakes"] > 4.0)


def score(pred: list[dict[str, Any]], truth_path: Path, classes: WakeClasses | None = None) -> dict[str, float]:
    """The acceptance figures of one recording; ``classes``, when given, counts its wakes."""
    meta, truth = read_truth(truth_path)
    result = evaluate(pred, [meta, *truth] if meta else truth)
    if classes is not None:
        classes.add(pred, result["wakes"], truth_path.name.removesuffix(".truth.jsonl"))
    return wake_figures(result)


class WakeClasses:
    """Wakes grouped by what woke them, and how each fared against the truth (``--by-class``).

    A class is the wake's priority, its kind and the families that agreed on it (those at
    ``agree_min`` or more in its evidence): which kinds of wake are worth their cost."""

    def __init__(self, agree_min: float) -> None:
        self.agree_min = agree_min
        self.counts: dict[tuple[str, str, str], dict[str, int]] = {}
        self.games: dict[tuple[str, str, str], set[str]] = {}

    def add(self, pred: list[dict[str, Any]], outcomes: list[dict[str, Any]], game: str) -> None:
        for w in outcomes:
            e = pred[w["index"]]
            fams = (e.get("evidence") or {}).get("families") or {}
            agreeing = "+".join(sorted(f for f, v in fams.items() if v >= self.agree_min)) or "-"
            key = (str(e.get("priority")), str(e.get("kind")), agreeing)
            row = self.counts.setdefault(key, {"wakes": 0, "matched": 0, "false": 0})
            row["wakes"] += 1
            row["matched"] += w["outcome"] in ("moment", "reward")
            row["false"] += w["outcome"] == "false"
            self.games.setdefault(key, set()).add(game)

    def table(self) -> str:
        lines = [f"    {'priority':<9}{'kind':<22}{'families':<26}{'wakes':>6}{'matched':>9}{'false':>7}{'games':>7}"]
        for key, row in sorted(self.counts.items(), key=lambda kv: -kv[1]["wakes"]):
            n = row["wakes"]
            lines.append(f"    {key[0]:<9}{key[1]:<22}{key[2]:<26}{n:>6}{row['matched'] / n:>9.2f}"
                         f"{row['false'] / n:>7.2f}{len(self.games[key]):>7}")
        return "\n".join(lines)


@contextlib.contextmanager
def _preparing(total: int) -> Iterator[Callable[[str | None], None]]:
    """A progress bar on stderr over the recordings being made and decoded; ``step(None)`` is one done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("recordings", total=total)

    def step(what: str | None) -> None:
        if what is None:
            bar.advance(task)
        else:
            bar.update(task, description=what)

    with bar:
        yield step


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m bench.tune_trigger", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=None, help="a named set of recordings: " + ", ".join(POOLS))
    ap.add_argument("--games", nargs="+", default=["Breakout", "SpaceInvaders", "DemonAttack", "Pong"])
    ap.add_argument("--seeds", nargs="+", type=seed_number, default=[0])
    ap.add_argument("--data", default="/tmp/copilot_trigger_data")
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="trigger settings to change (repeatable)")
    ap.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                    help="trigger settings to sweep, every combination (repeatable)")
    ap.add_argument("--refresh", action="store_true", help="recompute cached signals")
    ap.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                    help="recordings made and decoded at once, one process each (default: the CPU count)")
    ap.add_argument("--per-game", action="store_true")
    ap.add_argument("--by-class", action="store_true",
                    help="also show wakes by priority, kind and agreeing families, and how they fared")
    ap.add_argument("--dump", default=None, help="write predicted events to this directory")
    args = ap.parse_args(argv)

    prof_path = str(resolve_profile(args.profile)) if args.profile else None
    profile = load_profile(resolve_profile(args.profile))
    base = {k: v[0] for k, v in parse_settings(args.set, sweep=False).items()}
    grid = parse_settings(args.grid, sweep=True)
    grid_keys, grid_vals = list(grid), list(grid.values())
    for combo in itertools.product(*grid_vals):  # every setting checked before anything runs
        with_trigger(profile, base | dict(zip(grid_keys, combo, strict=True)))
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    runs = []
    wanted = selection(args.pool, args.games, args.seeds)
    for game, _seed in wanted:  # an unknown game is refused before any work starts
        resolve_game(game)
    with _preparing(len(wanted)) as step:  # a first run records and decodes every game
        prepared = prepare_all(wanted, data, args.seconds, args.refresh, args.jobs, step, prof_path)
    for game, seed in wanted:
        video, truth = prepared[(game, seed)]
        runs.append((game, seed, truth, observations(cache_paths(video, prof_path)[0])))
    for combo in itertools.product(*grid_vals) if grid_vals else [()]:
        changes = dict(base) | dict(zip(grid_keys, combo, strict=True))
        prof = with_trigger(profile, changes)
        rows = []
        classes = WakeClasses(trigger_settings(prof.trigger).agree_min) if args.by_class else None
        t0 = time.perf_counter()
        for game, seed, truth, obs in runs:
            pred = replay_detector(obs, prof)
            if args.dump:
                with open(Path(args.dump) / truth.name.replace(".truth.jsonl", ".events.jsonl"), "w") as fh:
                    for e in pred:
                        fh.write(json.dumps(e) + "\n")
            r = score(pred, truth, classes) | {"game": game, "seed": seed}
            rows.append(r)
            if args.per_game:
                mark = "!" if fails_a_game_line(r) else " "
                print(f"  {mark}{game:<14} s{seed}  crit {r['crit_recall']:.2f}/{r['moments']:<3}"
                      f" wprec {r['wake_precision']:.2f}"
                      f"  wakes/min {r['wakes_per_min']:5.1f} excess {r['excess_wakes']:+5.1f}"
                      f"  ann R {r['ann_recall']:.2f} P {r['ann_precision']:.2f}")
        s = summarize(rows)
        print(f"{changes}  [{time.perf_counter() - t0:.2f}s]\n"
              f"    crit {s['crit_recall']:.3f} (worst {s['worst_crit']:.2f})"
              f"  wprec {s['wake_precision']:.3f}  excess {s['excess_wakes']:+.2f} (worst {s['worst_excess']:+.2f})"
              f"  ann R {s['ann_recall']:.3f} P {s['ann_precision']:.3f}"
              f"  games failing a per-game line: {sum(map(fails_a_game_line, rows))}/{len(rows)}")
        if classes is not None:
            print(classes.table())
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_tool(main, "python -m bench.tune_trigger")

