"""``gamecopilot bench encoders``: per-encoder latency on real game frames and audio.

Every encoder stage kind that imports is driven the same way, through the registry
(:func:`copilot.registry.resolve_stage`), with its default params and a capture-only output
(no sockets, no codec): ``start()``, then ``process()`` once per message, timed, then
``flush()`` and ``close()``.  The figure is the stage's own work per message, the number
that decides whether it keeps up with 30 fps video (33 ms a frame) or with the audio (a
1024-sample chunk at 48 kHz is 21 ms); queueing and transport are ``bench bus``'s job.

Inputs are real: Atari frames from ale-py (random play), nearest-upscaled to 640x480 and
1280x720 as recordings are, fed in order at 30 fps of media time (motion and HUD encoders
see real changes, duplicates included); the game's own audio, resampled to 48 kHz and cut
in 1024-sample chunks as the replay stage delivers AAC.  Without ale-py, frames and audio
are synthetic and the report says so.

``hud_ocr`` costs nothing with the default profile, so it is also run with a bench profile
naming a HUD region over the game's score (recognition only, gated by change: ``+regions``;
forced to read every frame: ``+every``, the worst case) and with keywords (full-frame
detection on its own thread, so ``process`` returns at once; its time shows as
``keywords_ms``; that row is paced at 30 fps of wall time, so reads complete while frames flow).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from copilot.args import OneLineParser
from copilot.clock import SYSTEM_CLOCK
from copilot.errors import first_line
from copilot.links import DropCounter
from copilot.messages import AudioChunk, Envelope, Payload, VideoFrame
from copilot.stage import StageContext

FPS = 30
AUDIO_RATE = 48_000
AUDIO_CHUNK = 1024
RESOLUTIONS = ((640, 480), (1280, 720))



@dataclass(frozen=True)
class Encoder:
    """One benchmark row: a stage kind with params, an optional bench profile, and whether
    messages are paced at media rate (for work that runs beside ``process``, off the loop)."""

    label: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None
    paced: bool = False


VIDEO_ENCODERS: list[Encoder] = [
    Encoder("frame_diff", "frame_diff"),
    Encoder("motion", "motion"),
    Encoder("thumbnail", "thumbnail"),
    Encoder("hud", "hud"),
    Encoder("hud_ocr", "hud_ocr"),
    Encoder("hud_ocr+regions", "hud_ocr", profile="regions"),
    Encoder("hud_ocr+every", "hud_ocr", {"interval_s": 0.0, "change_threshold": 0.0}, profile="regions"),
    # keyword reads run on their own thread; paced so that several complete during the run
    Encoder("hud_ocr+keywords", "hud_ocr", {"keyword_interval_s": 0.5}, profile="keywords", paced=True),
]
AUDIO_ENCODERS: list[Encoder] = [
    Encoder("audio_level", "audio_level"),
    Encoder("audio_features", "audio_features"),
    Encoder("audio_mel", "audio_mel"),
    Encoder("vad", "vad"),
]

BENCH_PROFILES = {
    # Atari score digits sit in the top strip of the screen in most games
    "regions": "name: bench-regions\nregions:\n  - {name: top, box: [0.0, 0.0, 1.0, 0.1]}\n"
    "ocr_fields:\n  - {name: score, region: top, type: int}\n",
    "keywords": 'name: bench-keywords\nkeywords: {"GAME OVER": critical, "PLAYER": low}\n',
}


class CaptureOutput:
    """Stands in for a link publisher: counts what the stage emits and keeps nothing."""

    def __init__(self) -> None:
        self.drops = DropCounter()
        self.sent = 0

    async def send(self, env: Envelope) -> bool:
        self.sent += 1
        return True


@dataclass
class Result:
    label: str
    kind: str
    input: str
    count: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    period_ms: float = 0.0  # media time one message covers
    emitted: int = 0
    extra_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str = ""

    def row(self) -> dict[str, Any]:
        d: dict[str, Any] = {"encoder": self.label, "kind": self.kind, "input": self.input}
        if self.skipped:
            d["skipped"] = self.skipped
            return d
        d.update(count=self.count, latency_ms=self.latency_ms, period_ms=round(self.period_ms, 3),
                 load=round(self.latency_ms.get("mean", 0.0) / self.period_ms, 4) if self.period_ms else None,
                 emitted=self.emitted)
        if self.extra_ms:
            d["extra_ms"] = self.extra_ms
        return d


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {}
    p50, p95, p99 = np.percentile(a, (50, 95, 99))
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)}


# -- inputs -------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Native-resolution frames and 48 kHz audio chunks, made once, upscaled on the fly."""

    frames: list[np.ndarray]
    audio: list[np.ndarray]
    source: str

    def video(self, size: tuple[int, int]) -> Iterator[Payload]:
        from engines.atari_game import upscale_indices

        w, h = size
        rows, cols = upscale_indices(self.frames[0].shape[:2], (w, h))
        for i, f in enumerate(self.frames):
            yield VideoFrame(image=np.ascontiguousarray(f[rows][:, cols]), frame_index=i)

    def audio_chunks(self) -> Iterator[Payload]:
        for i, a in enumerate(self.audio):
            yield AudioChunk(samples=a, sample_rate=AUDIO_RATE, chunk_index=i)


def make_inputs(game: str, n_frames: int, audio_s: float, seed: int = 0) -> Inputs:
    """Real Atari frames and audio (random play), or synthetic ones without ale-py."""
    from engines.silero_vad import StreamResampler

    steps_per_frame = 60 // FPS
    n_emu = max(n_frames * steps_per_frame, int(audio_s * 60) + 1)
    try:
        import ale_py  # noqa: F401
    except ImportError as exc:  # still measure without ale-py, and say so
        rng = np.random.default_rng(seed)
        frames = []
        base = rng.integers(0, 255, (210, 160, 3), dtype=np.uint8)
        for k in range(n_frames):
            f = base.copy()
            y = (k * 3) % 190
            f[y : y + 20, 40:60] = 255
            frames.append(f)
        t = np.arange(int(audio_s * 30720)) / 30720
        raw = (0.2 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)).astype(np.float32)
        src_rate, source = 30720, f"synthetic frames and audio ({exc})"
    else:
        from engines.atari_game import AUDIO_RATE as ATARI_RATE
        from engines.atari_game import AtariGame

        g = AtariGame(game, seed=seed)  # an unknown game is a UsageError
        frames, sound = [], []
        for k in range(n_emu):
            s = g.step()
            if k % steps_per_frame == steps_per_frame - 1 and len(frames) < n_frames:
                frames.append(s.rgb.copy())
            sound.append(s.audio)
        raw = (np.concatenate(sound).astype(np.float32) - 128.0) / 128.0
        src_rate, source = ATARI_RATE, f"atari:{g.name} seed {seed}"
    rs = StreamResampler(AUDIO_RATE)
    audio = np.concatenate([rs(raw, src_rate), rs.flush()])[: int(audio_s * AUDIO_RATE)]
    chunks = [audio[i : i + AUDIO_CHUNK, None].copy() for i in range(0, audio.size - AUDIO_CHUNK + 1, AUDIO_CHUNK)]
    return Inputs(frames=frames, audio=chunks, source=source)


# -- driving one stage ---------------------------------------------------------------------------------


async def drive_stage(
    kind: str,
    payloads: Iterator[Payload],
    *,
    step_s: float,
    params: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    warmup: int = 5,
    paced: bool = False,
) -> tuple[list[float], int, dict[str, dict[str, float]]]:
    """Run stage ``kind`` over ``payloads``: (process latencies in ms, messages emitted, extras)."""
    from copilot.registry import resolve_stage

    cls = resolve_stage(kind)
    out = CaptureOutput()
    outputs: dict[str, list[Any]] = {p: [out] for p in cls.output_ports}
    ctx = StageContext(name=kind, clock=SYSTEM_CLOCK, outputs=outputs, speed=None, options=dict(options or {}))
    stage = cls(ctx, msgspec.convert(params or {}, cls.Params))
    lat: list[float] = []
    try:
        await stage.start()
        t_start = time.perf_counter()
        for i, payload in enumerate(payloads):
            if paced:
                await asyncio.sleep(max(0.0, t_start + i * step_s - time.perf_counter()))
            env = Envelope.wrap(payload, source="bench", seq=i + 1, t_media=round(i * step_s, 6),
                                t_capture_ns=SYSTEM_CLOCK.now_ns())
            t0 = time.perf_counter_ns()
            stage._t_in_ns = SYSTEM_CLOCK.now_ns()
            await stage.process(env)
            dt = (time.perf_counter_ns() - t0) / 1e6
            if i >= warmup:
                lat.append(dt)
        await stage.flush()
    finally:
        await stage.close()
        stage.shutdown_executor()
    extras = {name: _summary(list(res.values[: min(res.seen, len(res.values))]))
              for name, res in stage.recorder.extra.items()}
    return lat, out.sent, extras


def run_bench(
    *,
    n_frames: int = 150,
    audio_s: float = 10.0,
    game: str = "Breakout",
    only: set[str] | None = None,
    warmup: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    inputs = make_inputs(game, n_frames + warmup, audio_s)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-encoders-") as tmp:
        profiles = {}
        for name, text in BENCH_PROFILES.items():
            p = Path(tmp) / f"{name}.yaml"
            p.write_text(text)
            profiles[name] = str(p)

        def one(enc: Encoder, what: str, payloads: Callable[[], Iterator[Payload]], step_s: float) -> None:
            if only and enc.label not in only and enc.kind not in only:
                return
            if progress:
                progress(f"{enc.label} on {what}")
            r = Result(label=enc.label, kind=enc.kind, input=what, period_ms=step_s * 1000)
            try:
                opts = {"profile": profiles[enc.profile]} if enc.profile else {}
                lat, emitted, extras = asyncio.run(drive_stage(
                    enc.kind, payloads(), step_s=step_s, params=enc.params, options=opts, warmup=warmup,
                    paced=enc.paced))
                r.count, r.latency_ms, r.emitted, r.extra_ms = len(lat), _summary(lat), emitted, extras
            except Exception as exc:  # a kind that is not importable, or fails, is reported, not fatal
                r.skipped = f"{type(exc).__name__}: {first_line(exc, '')}"
            results.append(r)

        for size in RESOLUTIONS:
            what = f"{size[0]}x{size[1]}"
            for enc in VIDEO_ENCODERS:
                one(enc, what, lambda size=size: inputs.video(size), 1 / FPS)  # type: ignore[misc]
        what = f"audio {AUDIO_RATE // 1000}k/{AUDIO_CHUNK}"
        for enc in AUDIO_ENCODERS:
            one(enc, what, inputs.audio_chunks, AUDIO_CHUNK / AUDIO_RATE)
        if not only or "event_scorer" in only:
            if progress:
                progress("event_scorer on candidates")
            results.append(scorer_cost())
    return {
        "bench": "encoders",
        "source": inputs.source,
        "frames": n_frames,
        "warmup": warmup,
        "audio_s": audio_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "encoders": [r.row() for r in results],
    }


def scorer_cost(n: int = 200, seed: int = 0) -> Result:
    """The event scorer's cost per candidate (window statistics, the session's ranks and the shipped
    model) over windows as full as the default pipeline fills them (4.5 s of motion, thumb and HUD at
    30 Hz, audio at 50 Hz, mel at 10 Hz).  A candidate comes a few times a minute, so its period is not a frame's."""
    from engines.event_scorer import LOOKAHEAD_S, SCALARS, WINDOW_S, candidate_features
    from engines.event_session import SessionContext
    from stages.event_scorer import load_model

    r = Result(label="event_scorer", kind="event_scorer", input="candidate")
    try:
        model = load_model("default")
    except Exception as exc:  # no shipped model in this install
        r.skipped = f"{type(exc).__name__}: {first_line(exc, '')}"
        return r
    rng = np.random.default_rng(seed)
    rates = {"motion": 30, "thumb": 30, "hud": 30, "audio": 50, "mel": 10}
    lat = []
    session = SessionContext()  # a session that has seen the candidates before this one (a full history)
    for k in range(n):
        t = 10.0 + 5.0 * k
        window: dict[str, list[tuple[float, dict[str, float]]]] = {}
        for stream, rate in rates.items():
            keys = SCALARS.get(stream, (*(f"b{i:02d}" for i in range(16)), "db"))
            times = np.arange(t + LOOKAHEAD_S - WINDOW_S, t + LOOKAHEAD_S, 1.0 / rate)
            window[stream] = [(float(x), {k: float(v) for k, v in zip(keys, rng.random(len(keys)), strict=True)})
                              for x in times]
        event = {"t": t, "kind": "moment", "priority": "high", "score": 1.2, "evidence": {"families": {"audio": 0.5}}}
        t0 = time.perf_counter()
        model.predict_proba(model.vector(candidate_features(event, window, session)))
        lat.append((time.perf_counter() - t0) * 1e3)
    r.count, r.latency_ms, r.emitted = len(lat), _summary(lat), len(lat)
    return r


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"encoders on {report['source']}: {report['frames']} frames per size, {report['audio_s']} s of audio "
        f"({report['machine']['cpus']} CPUs)",
        f"{'encoder':<18} {'input':<16} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'load':>7} {'out':>6}",
    ]
    for r in report["encoders"]:
        if "skipped" in r:
            lines.append(f"{r['encoder']:<18} {r['input']:<16} skipped: {r['skipped']}")
            continue
        if not r.get("count"):
            lines.append(f"{r['encoder']:<18} {r['input']:<16} {0:>5}  no timed messages")
            continue
        lat = r["latency_ms"]
        load = f"{100 * r['load']:.1f}%" if r.get("load") is not None else "-"
        lines.append(
            f"{r['encoder']:<18} {r['input']:<16} {r['count']:>5} {lat.get('p50', 0):>9.3f} {lat.get('p95', 0):>9.3f} "
            f"{lat.get('p99', 0):>9.3f} {load:>7} {r['emitted']:>6}"
        )
        for name, s in r.get("extra_ms", {}).items():
            if s:
                lines.append(f"{'  ' + name:<18} {'':<16} {'':>5} {s['p50']:>9.3f} {s['p95']:>9.3f} {s['p99']:>9.3f}")
    lines.append("load: mean process time / media time per message (30 fps frame = 33.3 ms, "
                 f"audio chunk = {1000 * AUDIO_CHUNK / AUDIO_RATE:.1f} ms); out: messages emitted")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="gamecopilot bench encoders", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--frames", type=int, default=150, help="timed frames per resolution (default 150)")
    ap.add_argument("--audio-seconds", type=float, default=10.0, help="seconds of audio (default 10)")
    ap.add_argument("--game", default="Breakout", help="Atari game for the frames and audio")
    ap.add_argument("--only", default="", help="comma-separated encoder labels or kinds to run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed messages at the start of each run")
    ap.add_argument("-o", "--output", help="also write the JSON report to this file")
    ap.add_argument("--tiny", action="store_true",
                    help="bench the expensive engines (SigLIP2, VideoMAE, SAM3) on tiny random models built on the "
                         "fly, by runtime and batch size, instead of the cheap encoders (bench/engines.py)")
    ap.add_argument("--engine-model", action="append", default=[], metavar="NAME=PATH",
                    help="bench engine NAME (siglip2, videomae, sam3) with this checkpoint (local or HF cache)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per engine, runtime and batch (default 10)")
    args = ap.parse_args(argv)
    from bench.output import check_output_path
    from copilot.errors import UsageError, write_output

    if args.tiny or args.engine_model:
        return _engines_main(args)
    if args.frames < 1 or not 0 < args.audio_seconds < math.inf or args.warmup < 0:
        raise UsageError("--frames and --audio-seconds must be positive, --warmup >= 0")
    chunk_s = AUDIO_CHUNK / AUDIO_RATE
    if args.audio_seconds < chunk_s:
        least = math.ceil(chunk_s * 1e4) / 1e4  # rounded up: the figure printed must be enough
        raise UsageError(f"--audio-seconds: at least {least:.4f} (one {AUDIO_CHUNK}-sample chunk)")
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    known = {name for enc in (*VIDEO_ENCODERS, *AUDIO_ENCODERS) for name in (enc.label, enc.kind)} | {"event_scorer"}
    unknown = sorted((only or set()) - known)
    if unknown:
        raise UsageError(f"--only: no encoder {', '.join(map(repr, unknown))} (encoders: {', '.join(sorted(known))})")
    check_output_path(args.output)
    progress = None if args.json else (lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    report = run_bench(n_frames=args.frames, audio_s=args.audio_seconds, game=args.game, only=only,
                       warmup=args.warmup, progress=progress)
    if args.output:
        write_output(args.output, json.dumps(report, indent=2) + "\n", "-o")
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def _engines_main(args: Any) -> int:
    """``--tiny`` / ``--engine-model``: the engines' report (see :mod:`bench.engines`)."""
    from bench.engines import ENGINES, format_engines, run_engines
    from bench.output import check_output_path
    from copilot.errors import UsageError, write_output

    models: dict[str, str] = {}
    for item in args.engine_model:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--engine-model: expected NAME=PATH, got {item!r}")
        models[name.strip()] = path.strip()
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    unknown = sorted((only or set()) - set(ENGINES))
    if unknown:
        raise UsageError(f"--only: no engine {', '.join(map(repr, unknown))} (engines: {', '.join(ENGINES)})")
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    check_output_path(args.output)
    progress = None if args.json else (lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    report = run_engines(tiny=args.tiny, only=only, models=models, repeats=args.repeats,
                         warmup=min(args.warmup, 2), progress=progress)
    if args.output:
        write_output(args.output, json.dumps(report, indent=2) + "\n", "-o")
    print(json.dumps(report) if args.json else format_engines(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
