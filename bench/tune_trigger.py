"""Fast offline tuning of the TriggerDetector over cached per-frame signals.

Running the whole pipeline costs ~20 s per 90 s recording; the detector itself costs
milliseconds.  So this tool decodes each recording once, runs the same encoder cores the
stages use (:class:`stages.motion.MotionAnalyzer`, :class:`stages.hud.HudAnalyzer`,
:class:`stages.thumbnail.ThumbnailAnalyzer`, :class:`stages.audio_features.AudioAnalyzer`),
and caches their outputs as ``<stem>.signals.npz`` beside the recording.  The detector is
then replayed over the cached signals (:func:`replay_detector`), in media-time order as the
trigger stage would see them, with any parameters, and scored with ``copilot.scoring``.

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
import itertools
import json
import os
import signal
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.output import run_tool
from bench.pools import POOLS, ensure_recording, selection
from copilot.args import OneLineParser, positive_int, seed_number
from copilot.errors import UsageError
from copilot.profile import Profile, check_trigger, load_profile, resolve_profile
from copilot.scoring import evaluate, read_truth, wake_figures
from engines.atari_game import resolve_game
from stages.replay import resampled_samples

MOTION_KEYS = ("diff", "changed", "hist", "flash", "reset", "still", "vanish")
HUD_KEYS = ("steps", "cells", "novel", "peak", "age", "revert", "revert_age", "revert_states", "areas", "small",
            "quiet", "quiet_cells", "quiet_area", "revert_clock", "quiet_lost", "clock", "fresh")
THUMB_KEYS = ("novelty", "novelty_long")
AUDIO_KEYS = ("rms_db", "peak_db", "flux", "onset", "rise", "offset", "novelty")
# bump when an encoder changes, so cached signals are recomputed
SIGNALS_VERSION = 33


def extract_signals(video: str | Path, profile: Profile | None = None) -> dict[str, np.ndarray]:
    """Decode ``video`` once and run every cheap encoder core over it."""
    import av

    from stages.audio_features import AudioAnalyzer
    from stages.hud import HudAnalyzer
    from stages.motion import MotionAnalyzer
    from stages.thumbnail import ThumbnailAnalyzer

    prof = profile or Profile()
    motion = MotionAnalyzer()
    hud = HudAnalyzer(regions=prof.regions, auto=prof.auto_hud)
    thumb = ThumbnailAnalyzer()
    audio = AudioAnalyzer()
    vt: list[float] = []
    mrows: list[list[float]] = []
    hrows: list[list[float]] = []
    trows: list[list[float]] = []
    at: list[float] = []
    arows: list[list[float]] = []
    timing = {"motion": 0.0, "hud": 0.0, "thumb": 0.0, "audio": 0.0, "decode": 0.0}
    with av.open(str(video)) as c:
        streams: list[Any] = [c.streams.video[0]]
        if c.streams.audio:
            streams.append(c.streams.audio[0])
        for s in streams:
            s.thread_type = "AUTO"
        resampler = av.AudioResampler(format="flt", layout=c.streams.audio[0].layout.name) if c.streams.audio else None
        t0 = time.perf_counter()
        for frame in c.decode(*streams):
            t = frame.time
            if t is None:
                continue
            if isinstance(frame, av.VideoFrame):
                img = frame.to_ndarray(format="rgb24")
                t1 = time.perf_counter()
                timing["decode"] += t1 - t0
                m = motion.update(img, t)
                t2 = time.perf_counter()
                h, _ = hud.update(img, t)
                t3 = time.perf_counter()
                _, th = thumb.update(img, t)
                t4 = time.perf_counter()
                timing["motion"] += t2 - t1
                timing["hud"] += t3 - t2
                timing["thumb"] += t4 - t3
                vt.append(t)
                mrows.append([m[k] for k in MOTION_KEYS])
                hrows.append([h.get(k, 0.0) for k in HUD_KEYS])
                trows.append([th[k] for k in THUMB_KEYS])
            else:
                assert resampler is not None
                samples = resampled_samples(resampler, frame)
                if samples is None:
                    continue
                t1 = time.perf_counter()
                timing["decode"] += t1 - t0
                a = audio.update(samples, frame.sample_rate)
                timing["audio"] += time.perf_counter() - t1
                at.append(t)
                arows.append([a[k] for k in AUDIO_KEYS])
            t0 = time.perf_counter()
    return {
        "video_t": np.array(vt),
        "motion": np.array(mrows, np.float32).reshape(-1, len(MOTION_KEYS)),
        "hud": np.array(hrows, np.float32).reshape(-1, len(HUD_KEYS)),
        "thumb": np.array(trows, np.float32).reshape(-1, len(THUMB_KEYS)),
        "audio_t": np.array(at),
        "audio": np.array(arows, np.float32).reshape(-1, len(AUDIO_KEYS)),
        "timing_s": np.array([timing[k] for k in ("decode", "motion", "hud", "thumb", "audio")]),
    }


def cached_signals(video: str | Path, refresh: bool = False) -> dict[str, np.ndarray]:
    """Signals of ``video``, from ``<stem>.signals.npz`` beside it when present and current.

    The cache is written under a temporary name and renamed when complete, so a run that is
    interrupted, or two runs sharing ``--data``, never leave a half-written cache; one that
    cannot be read (a cache left by an older, non-atomic writer) is recomputed."""
    v = Path(video)
    cache = v.with_suffix(".signals.npz")
    if not refresh:
        sig = _load_cache(cache, v)
        if sig is not None:
            return sig
    sig = extract_signals(v)
    sig["version"] = np.array(SIGNALS_VERSION)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **sig)  # type: ignore[arg-type]
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return sig


def _load_cache(cache: Path, video: Path) -> dict[str, np.ndarray] | None:
    """The cached signals, or None when missing, older than the video, of another version or unreadable."""
    try:
        if cache.stat().st_mtime < video.stat().st_mtime:
            return None
        with np.load(cache) as z:
            if "version" not in z.files or int(z["version"]) != SIGNALS_VERSION:
                return None
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def prepare(game: str, seed: int, data: Path, seconds: float, refresh: bool) -> tuple[Path, Path]:
    """Make one recording if missing and cache its signals: ``(video, truth)``.

    The slow part of a first run (15-45 s a recording on this project's 2-core machines);
    :func:`prepare_all` runs it in worker processes."""
    video, truth = ensure_recording(game, seed, data, seconds)
    cached_signals(video, refresh)
    return video, truth


def _prepare_job(job: tuple[str, int, Path, float, bool]) -> tuple[str, int, Path, Path]:
    game, seed = job[0], job[1]
    return (game, seed, *prepare(*job))


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them (no traceback from each worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_all(wanted: list[tuple[str, int]], data: Path, seconds: float, refresh: bool, jobs: int,
                step: Callable[[str | None], None]) -> dict[tuple[str, int], tuple[Path, Path]]:
    """:func:`prepare` every recording, ``jobs`` at a time; ``step`` reports progress."""
    # each recording once: two workers must never make the same files
    todo = [(g, s, data, seconds, refresh) for g, s in dict.fromkeys(wanted)]
    done: dict[tuple[str, int], tuple[Path, Path]] = {}
    if jobs <= 1 or len(todo) <= 1:
        for game, seed, *_ in todo:
            step(f"{game} s{seed}")
            done[(game, seed)] = prepare(game, seed, data, seconds, refresh)
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


def observations(sig: dict[str, np.ndarray]) -> list[tuple[float, str, dict[str, float]]]:
    """The cached signals as ``(t, feature name, values)`` in media-time order."""
    obs: list[tuple[float, str, dict[str, float]]] = []
    for i, t in enumerate(sig["video_t"]):
        t = float(t)
        obs.append((t, "motion", dict(zip(MOTION_KEYS, map(float, sig["motion"][i]), strict=True))))
        obs.append((t, "hud", dict(zip(HUD_KEYS, map(float, sig["hud"][i]), strict=True))))
        obs.append((t, "thumb", dict(zip(THUMB_KEYS, map(float, sig["thumb"][i]), strict=True))))
    for i, t in enumerate(sig["audio_t"]):
        obs.append((float(t), "audio", dict(zip(AUDIO_KEYS, map(float, sig["audio"][i]), strict=True))))
    obs.sort(key=lambda o: (o[0], o[1]))  # the order the stage's MediaTimeOrder releases them in
    return obs


def replay_detector(obs: list[tuple[float, str, dict[str, float]]], profile: Profile) -> list[dict[str, Any]]:
    """Run a fresh TriggerDetector over ``obs``; the events as events-JSONL records."""
    from stages.trigger import TriggerDetector

    det = TriggerDetector(profile)
    out = []
    for t, name, values in obs:
        for ev in det.observe(t, name, values):
            out.append(ev.record())
    for ev in det.finish():
        out.append(ev.record())
    return out


def with_trigger(profile: Profile, changes: dict[str, Any]) -> Profile:
    """``profile`` with its trigger settings changed; a setting that is unknown or of the wrong
    type is a :class:`UsageError` naming it."""
    if not changes:
        return profile
    known = set(type(profile.trigger).__struct_fields__)
    unknown = sorted(set(changes) - known)
    if unknown:
        raise UsageError(f"no trigger setting {', '.join(unknown)} (see copilot/profile.py TriggerParams)")
    try:
        trig = msgspec.convert(msgspec.to_builtins(profile.trigger) | changes, type(profile.trigger))
    except msgspec.ValidationError as exc:
        raise UsageError(f"trigger setting: {exc}") from None
    check_trigger(trig, "trigger setting")
    return msgspec.structs.replace(profile, trigger=trig)


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
        prepared = prepare_all(wanted, data, args.seconds, args.refresh, args.jobs, step)
    for game, seed in wanted:
        video, truth = prepared[(game, seed)]
        runs.append((game, seed, truth, observations(cached_signals(video))))
    for combo in itertools.product(*grid_vals) if grid_vals else [()]:
        changes = dict(base) | dict(zip(grid_keys, combo, strict=True))
        prof = with_trigger(profile, changes)
        rows = []
        classes = WakeClasses(prof.trigger.agree_min) if args.by_class else None
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

