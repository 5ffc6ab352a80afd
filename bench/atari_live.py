"""``gamecopilot bench atari``: does the live ``atari`` source hold real time, picture and sound?

One process runs a two-stage pipeline through the real group runner and real ZeroMQ links
(``ipc://`` by default, the links a multi-process run uses; ``--transport inproc`` for the
in-process ones): the ``atari`` source (default Breakout, 60 fps, 640x480, its audio at
30720 Hz, its truth events) and a consumer stage that only counts and timestamps what arrives.
Video goes over a ``latest`` link, audio and truth over ``ordered`` ones, as in
``configs/atari_live.yaml``.

What it prints (and ``--json`` as one object):

* video fps achieved at the consumer, frames sent / received / skipped as late by the source /
  lost on the link, and the arrival interval p50/p95/p99/max (ms; 16.7 ms is perfect at 60);
* audio samples per second of wall time against the rate the source states (30720);
* drift: wall time elapsed minus media time elapsed, per frame, at the end and its worst (ms);
  the source schedules against absolute due times, so this stays within a frame;
* capture-to-consumer latency p50/p99 (ms);
* CPU% of the whole process (source, consumer and ZeroMQ's I/O thread; 100% = one core).

"holds real time" means: fps within 1% of the target, under 1% of pictures late or lost, audio
rate within 1%, and the end drift within one frame.  Timings on a shared machine are noisy;
run it again before believing a single bad figure.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from bench.output import check_output_path, emit_result
from copilot.args import OneLineParser, seed_number
from copilot.clock import SYSTEM_CLOCK
from copilot.config import parse_pipeline
from copilot.errors import UsageError
from copilot.group import GroupRunner, RunOptions
from copilot.messages import AudioChunk, Envelope, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext

TRANSPORTS = ("ipc", "inproc")
COUNTER_KIND = "bench_atari_counter"


class _CounterParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stall_ms: float = 0.0  # block the whole process this long ...
    stall_every_s: float = 5.0  # ... every this many seconds of media (a GC pause, a busy host)


@register_stage(COUNTER_KIND)
class CounterStage(Stage):
    """The consumer: records when each message arrives, nothing else (it must never be the bottleneck)."""

    Params = _CounterParams

    def __init__(self, ctx: StageContext, params: msgspec.Struct) -> None:
        super().__init__(ctx, params)
        self.video: list[tuple[int, float, int]] = []  # (arrival ns, t_media, t_capture ns)
        self.audio_samples = 0
        self.audio_chunks = 0
        self.audio_rate = 0
        self.audio_first_ns: int | None = None
        self.audio_last: tuple[int, float, float] | None = None  # (arrival ns, t_media, duration s)
        self.events = 0
        self.stalls = 0

    async def process(self, msg: Envelope) -> None:
        now = self.clock.now_ns()
        p = msg.payload
        if isinstance(p, VideoFrame):
            self.video.append((now, msg.t_media, msg.t_capture_ns))
            params: _CounterParams = self.params  # type: ignore[assignment]
            if params.stall_ms > 0 and msg.t_media >= (self.stalls + 1) * params.stall_every_s:
                self.stalls += 1
                time.sleep(params.stall_ms / 1000)  # on purpose: blocks the source's event loop too
        elif isinstance(p, AudioChunk):
            n = int(p.samples.shape[0])
            if self.audio_first_ns is None:
                self.audio_first_ns = now
            self.audio_samples += n
            self.audio_chunks += 1
            self.audio_rate = p.sample_rate
            self.audio_last = (now, msg.t_media, n / p.sample_rate)
        elif msg.kind == "event":
            self.events += 1


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "version": 1,
        "name": f"bench-atari-{os.getpid()}",
        "links": {
            "frames": {"policy": "latest", "hwm": 2, "max_age_ms": 250},
            "audio": {"policy": "ordered", "hwm": 512},
            "truth": {"policy": "ordered", "hwm": 256},
        },
        "stages": [
            {
                "name": "atari",
                "kind": "atari",
                "params": {"game": args.game, "seed": args.seed, "policy": args.policy, "fps": args.fps,
                           "width": args.width, "height": args.height, "seconds": args.seconds},
                "outputs": {"video": "frames", "audio": "audio", "truth": "truth"},
            },
            {"name": "counter", "kind": COUNTER_KIND, "inputs": ["frames", "audio", "truth"],
             "params": {"stall_ms": args.stall_ms, "stall_every_s": args.stall_every}},
        ],
    }


def _pcts(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p95, p99 = np.percentile(values, (50, 95, 99))
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(float(values.max()), 3)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline once and return the figures (see the module docstring)."""
    from stages.atari_live import AtariLiveParams, AtariLiveStage

    cfg_data = _pipeline(args)
    AtariLiveStage.check(msgspec.convert(cfg_data["stages"][0]["params"], AtariLiveParams))
    cfg = parse_pipeline(cfg_data, "bench atari")
    tmp = tempfile.mkdtemp(prefix="gamecopilot-atari-")
    opts = RunOptions(run_dir=tmp if args.transport == "ipc" else None, speed=1.0)
    runner = GroupRunner(cfg, "main", opts, SYSTEM_CLOCK)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        runner.build()
        asyncio.run(asyncio.wait_for(runner.run(), args.seconds * 3 + 30))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    src = next(r.stage for r in runner.runners if isinstance(r.stage, AtariLiveStage))
    sink = next(r.stage for r in runner.runners if isinstance(r.stage, CounterStage))
    return _figures(args, src, sink, runner, cpu_s, w1 - w0)


def _figures(args: argparse.Namespace, src: Any, sink: CounterStage, runner: GroupRunner, cpu_s: float,
             wall_s: float) -> dict[str, Any]:
    fps = args.fps
    v = np.array(sink.video, dtype=np.float64).reshape(-1, 3)
    arrivals, media, captures = v[:, 0], v[:, 1], v[:, 2]
    received = len(v)
    span_s = (arrivals[-1] - arrivals[0]) / 1e9 if received > 1 else 0.0
    achieved = (received - 1) / span_s if span_s > 0 else 0.0
    # drift: wall time elapsed since the source released its first frame minus media time elapsed,
    # at the consumer (so the link's latency is in it) and at the source (its release schedule)
    t0 = captures[0] - media[0] * 1e9 if received else 0.0
    drift_ms = ((arrivals - t0) / 1e9 - media) * 1e3
    release_drift_ms = ((captures - t0) / 1e9 - media) * 1e3
    intervals_ms = np.diff(arrivals) / 1e6
    latency_ms = (arrivals - captures) / 1e6
    link_drops: dict[str, int] = {}
    for sub in runner.subscribers:
        for reason, n in sub.drops.by_reason.items():
            link_drops[reason] = link_drops.get(reason, 0) + n
    audio_ps = 0.0
    audio_drift_ms = float("nan")
    if sink.audio_first_ns is not None and sink.audio_last is not None:
        last_ns, last_media, last_dur = sink.audio_last
        audio_wall = (last_ns - sink.audio_first_ns) / 1e9 + last_dur  # the last chunk plays for its length
        audio_ps = sink.audio_samples / audio_wall if audio_wall > 0 else 0.0
        if received:  # the same reference as the video's drift: the source's first release
            audio_drift_ms = ((last_ns - t0) / 1e9 - last_media) * 1e3
    expected_frames = round(args.seconds * fps)
    lost = expected_frames - received
    expected_rate = sink.audio_rate or 30720
    result: dict[str, Any] = {
        "bench": "atari_live",
        "game": args.game,
        "fps_target": fps,
        "seconds": args.seconds,
        "size": [args.width, args.height],
        "transport": args.transport,
        "cpus": os.cpu_count(),
        "wall_s": round(wall_s, 3),
        "video": {
            "frames_expected": expected_frames,
            "sent": src.video_sent,
            "received": received,
            "late_skipped": src.late_frames,
            "link_drops": link_drops,
            "fps": round(achieved, 3),
            "interval_ms": _pcts(intervals_ms),
        },
        "audio": {
            "chunks": sink.audio_chunks,
            "samples": sink.audio_samples,
            "samples_per_s": round(audio_ps, 1),
            "expected_per_s": expected_rate,
            "end_drift_ms": round(audio_drift_ms, 3),
        },
        "drift_ms": {
            "end": round(float(drift_ms[-1]), 3) if received else float("nan"),
            "max_abs": round(float(np.abs(drift_ms).max()), 3) if received else float("nan"),
            "source_end": round(float(release_drift_ms[-1]), 3) if received else float("nan"),
            "source_max_abs": round(float(np.abs(release_drift_ms).max()), 3) if received else float("nan"),
        },
        "latency_ms": _pcts(latency_ms),
        "truth_events": sink.events,
        "stalls": {"count": sink.stalls, "ms": args.stall_ms},
        "cpu_percent": round(100.0 * cpu_s / wall_s, 1) if wall_s > 0 else float("nan"),
    }
    frame_ms = 1e3 / fps
    result["holds_realtime"] = bool(
        received > 1
        and abs(achieved - fps) <= 0.01 * fps
        and lost <= 0.01 * expected_frames
        and abs(audio_ps - expected_rate) <= 0.01 * expected_rate
        and abs(result["drift_ms"]["end"]) <= frame_ms
    )
    return result


def _table(res: dict[str, Any]) -> Any:
    from rich.table import Table

    v, a, d = res["video"], res["audio"], res["drift_ms"]
    iv, lat = v["interval_ms"], res["latency_ms"]
    w, h = res["size"]
    size = f"{w}x{h}" if w else "native"
    table = Table(title=f"live atari: {res['game']} at {res['fps_target']} fps {size}, {res['seconds']} s, "
                  f"{res['transport']} links, {res['cpus']} CPUs", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target / note")
    drops = ", ".join(f"{k} {n}" for k, n in v["link_drops"].items()) or "none"
    rows = [
        ("video fps", f"{v['fps']:.2f}", f"{res['fps_target']}"),
        ("frames sent / received", f"{v['sent']} / {v['received']}", f"{v['frames_expected']} expected"),
        ("late (skipped by source)", str(v["late_skipped"]), "0"),
        ("lost on the link", drops, "none"),
        ("frame interval p50/p95/p99", f"{iv['p50']:.2f} / {iv['p95']:.2f} / {iv['p99']:.2f}",
         f"{1000 / res['fps_target']:.2f} ms; max {iv['max']:.2f}"),
        ("audio samples/s", f"{a['samples_per_s']:.0f}", f"{a['expected_per_s']}"),
        ("audio chunks", str(a["chunks"]), f"end drift {a['end_drift_ms']:.2f} ms"),
        ("drift at end / worst", f"{d['end']:.2f} / {d['max_abs']:.2f} ms", "wall - media, consumer"),
        ("source drift end / worst", f"{d['source_end']:.2f} / {d['source_max_abs']:.2f} ms",
         "release - media"),
        ("capture->consumer p50/p99", f"{lat['p50']:.2f} / {lat['p99']:.2f} ms", ""),
        ("truth events", str(res["truth_events"]), ""),
        ("injected stalls", f"{res['stalls']['count']} x {res['stalls']['ms']:.0f} ms", "--stall-ms"),
        ("CPU% of the process", f"{res['cpu_percent']:.1f}", "100 = one core"),
        ("holds real time", "yes" if res["holds_realtime"] else "NO", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


MIN_SECONDS = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's options, for ``gamecopilot bench atari`` to reuse."""
    p.add_argument("--game", default="Breakout", help="Atari game (default Breakout)")
    p.add_argument("--seconds", type=float, default=20.0, help="game time to run (default 20)")
    p.add_argument("--fps", type=int, default=60, help="output video fps, divides 60 (default 60)")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--policy", choices=("random", "sticky"), default="random")
    p.add_argument("--width", type=int, default=640, help="0 with --height 0: native 160x210")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--transport", choices=TRANSPORTS, default="ipc", help="link transport (default ipc)")
    p.add_argument("--stall-ms", type=float, default=0.0,
                   help="freeze the process this long every --stall-every s, to see late frames skipped (default 0)")
    p.add_argument("--stall-every", type=float, default=5.0, help="seconds of media between stalls (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-o", "--output", help="also write the JSON here")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gamecopilot bench atari", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run the bench; ``argv`` is a command line or the namespace ``add_arguments`` filled."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    if not MIN_SECONDS <= args.seconds < math.inf:  # shorter measures a handful of frames, or none
        raise UsageError(f"--seconds must be at least {MIN_SECONDS:g} s of game time, got {args.seconds}")
    if args.stall_ms < 0 or not args.stall_every > 0:
        raise UsageError("--stall-ms must be >= 0 and --stall-every positive")
    check_output_path(args.output)
    # one line, not a live bar: a bar's refresh thread would share the cores being measured
    print(f"... {args.game} at {args.fps:g} fps for {args.seconds:g} s of game time (about as long in wall time)",
          file=sys.stderr, flush=True)
    result = run_bench(args)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UsageError as exc:
        print(f"gamecopilot bench atari: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
