"""The live ``atari`` source: exact frame and audio counts, pacing on the clock, skipping late
pictures without drifting, truth identical to the dataset maker's, and clear usage errors.

Every run here uses a virtual clock (or no pacing), so nothing depends on how busy the machine
is; the real-time figures are measured by ``bench/atari_live.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

pytest.importorskip("ale_py")

from copilot.clock import VirtualClock
from copilot.errors import UsageError
from copilot.links import LinkSpec, Publisher, Subscriber
from copilot.messages import AudioChunk, Envelope, Event, VideoFrame
from copilot.registry import resolve_stage
from copilot.scoring import evaluate_files
from copilot.stage import StageContext, StageRunner
from copilot.testing import run_pipeline, run_stage
from engines.atari_dataset import make_atari_recording
from engines.atari_game import AUDIO_RATE
from stages.atari_live import AtariLiveParams, AtariLiveStage

ROOT = Path(__file__).resolve().parent.parent
PORTS = ("video", "audio", "truth")
_ids = itertools.count()
pytestmark = pytest.mark.usefixtures("leak_check")


class StallingClock(VirtualClock):
    """A virtual clock whose ``stall_at``-th sleep overshoots by ``stall_ns`` (a stalled process)."""

    def __init__(self, stall_at: int, stall_ns: int) -> None:
        super().__init__()
        self.stall_at, self.stall_ns, self.sleeps = stall_at, stall_ns, 0

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        await super().sleep_until_ns(deadline_ns)
        self.sleeps += 1
        if self.sleeps == self.stall_at:
            self.advance(self.stall_ns)


class Run(msgspec.Struct):
    stage: AtariLiveStage
    video: list[Envelope]
    audio: list[Envelope]
    truth: list[Envelope]


def run(
    params: AtariLiveParams,
    *,
    speed: float | None = None,
    clock: VirtualClock | None = None,
    options: dict[str, Any] | None = None,
) -> Run:
    """The stage alone through the real StageRunner lifecycle (copilot.testing), every message
    through the wire codec."""
    res = run_stage(AtariLiveStage, params=params, clock=clock, speed=speed, options=options)
    assert all(res.eos.values()), "end of stream on every port"
    stage = res.stage
    assert isinstance(stage, AtariLiveStage)
    return Run(stage=stage, video=res.envelopes("video"), audio=res.envelopes("audio"),
               truth=res.envelopes("truth"))


async def _run_until_stopped(params: AtariLiveParams, options: dict[str, Any], stop_after_audio: int) -> Run:
    """Over real inproc links, with a graceful stop (as Ctrl-C asks) after some audio arrived."""
    clock = VirtualClock()
    run_id = next(_ids)
    specs = {
        port: LinkSpec(name=port, endpoint=f"inproc://atari-live-test-{run_id}/{port}", hwm=64, block_ms=None)
        for port in PORTS
    }
    pubs = {port: Publisher(spec, lossless=True, clock=clock) for port, spec in specs.items()}
    subs = {port: Subscriber(spec, lossless=True, clock=clock) for port, spec in specs.items()}
    ctx = StageContext(name="atari", clock=clock, outputs={p: [pub] for p, pub in pubs.items()}, speed=1.0,
                       options=options)
    stage = AtariLiveStage(ctx, params)
    runner = StageRunner(stage, [])
    got: dict[str, list[Envelope]] = {p: [] for p in PORTS}

    async def collect(port: str) -> None:
        while True:
            env = await subs[port].recv()
            if env.kind == "control":
                subs[port].unsubscribe()  # tells the producer this consumer took the end of stream
                return
            if port == "video":
                env.payload.image = np.empty(0, np.uint8)  # type: ignore[union-attr]
            got[port].append(env)
            if port == "audio" and len(got[port]) == stop_after_audio:
                runner.request_stop()

    try:
        assert all([await pub.wait_subscribers(1, 5.0) for pub in pubs.values()])
        await asyncio.wait_for(asyncio.gather(runner.run(), *(collect(p) for p in PORTS)), 120)
    finally:
        for pub in pubs.values():
            pub.close()
        for sub in subs.values():
            sub.close()
    return Run(stage=stage, video=got["video"], audio=got["audio"], truth=got["truth"])


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- counts and pacing


@pytest.mark.parametrize(("fps", "size", "seconds"), [(30, (640, 480), 3), (60, (0, 0), 2.5)])
def test_exact_frames_audio_and_pacing(fps: int, size: tuple[int, int], seconds: float) -> None:
    clock = VirtualClock()
    t0 = clock.now_ns()
    r = run(AtariLiveParams(game="Pong", fps=fps, width=size[0], height=size[1], seconds=seconds),
            speed=1.0, clock=clock)
    n = round(seconds * fps)
    step = 60 // fps
    assert len(r.video) == len(r.audio) == n == r.stage.frames
    assert r.stage.late_frames == 0
    first = r.video[0].payload
    assert isinstance(first, VideoFrame) and first.pixel_format == "rgb24"
    assert first.image.shape == ((size[1], size[0], 3) if size[0] else (210, 160, 3))
    assert first.image.dtype == np.uint8
    for k, (v, a) in enumerate(zip(r.video, r.audio, strict=True)):
        assert isinstance(v.payload, VideoFrame) and isinstance(a.payload, AudioChunk)
        assert v.payload.frame_index == a.payload.chunk_index == k
        assert v.t_media == a.t_media == k / fps
        # paced by the injected clock: released exactly when the frame's media time is due
        assert v.t_capture_ns == a.t_capture_ns == t0 + round(k * 1e9 / fps)
    samples = np.concatenate([a.payload.samples for a in r.audio])  # type: ignore[union-attr]
    assert samples.dtype == np.float32 and samples.shape == (n * step * 512, 1)
    assert all(a.payload.sample_rate == AUDIO_RATE for a in r.audio)  # type: ignore[union-attr]
    assert samples.shape[0] / AUDIO_RATE == pytest.approx(n / fps)  # audio length = video length
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    assert np.abs(samples).max() > 0.05, "the console's sound is there"
    assert r.stage.recorder.media_span() == pytest.approx(n / fps)


def test_speed_two_halves_the_intervals_and_max_does_not_wait() -> None:
    clock = VirtualClock()
    t0 = clock.now_ns()
    r = run(AtariLiveParams(game="Pong", fps=30, width=0, height=0, seconds=1), speed=2.0, clock=clock)
    assert [v.t_capture_ns - t0 for v in r.video] == [round(k * 1e9 / 60) for k in range(30)]
    clock = VirtualClock()
    t0 = clock.now_ns()
    r = run(AtariLiveParams(game="Pong", fps=30, width=0, height=0, seconds=1), speed=None, clock=clock)
    assert len(r.video) == 30 and all(v.t_capture_ns == t0 for v in r.video)


def test_late_pictures_are_skipped_without_drift() -> None:
    """A 210 ms stall: the pictures more than a frame late are dropped and counted, audio and
    truth keep every frame, and the source is back on the clock right after."""
    fps, n, stall_ms = 30, 90, 210
    frame_ns = 1e9 / fps
    clock = StallingClock(stall_at=30, stall_ns=stall_ms * 1_000_000)
    t0 = clock.now_ns()
    r = run(AtariLiveParams(game="Pong", fps=fps, width=0, height=0, seconds=n / fps), speed=1.0, clock=clock)
    # the stalled frame is late by the stall, each next one a frame less, until within one frame
    expected_late = sum(1 for j in range(n) if stall_ms * 1e6 - j * frame_ns > frame_ns)
    assert expected_late == 6
    assert r.stage.late_frames == expected_late
    assert r.stage.recorder.dropped["late"] == expected_late
    assert len(r.audio) == n and [a.payload.chunk_index for a in r.audio] == list(range(n))  # type: ignore[union-attr]
    sent = [v.payload.frame_index for v in r.video]  # type: ignore[union-attr]
    assert len(sent) == n - expected_late
    missing = sorted(set(range(n)) - set(sent))
    assert len(missing) == expected_late and missing == list(range(missing[0], missing[0] + expected_late))
    # no drift: once caught up, every frame is released exactly at its media time again
    last = r.video[-1]
    assert last.t_capture_ns == t0 + round(last.payload.frame_index * frame_ns)  # type: ignore[union-attr]
    assert r.audio[-1].t_capture_ns == t0 + round((n - 1) * frame_ns)


# --------------------------------------------------------------------------- truth


@pytest.mark.parametrize(("game", "fps", "policy", "seed"), [("Breakout", 30, "random", 3), ("Pong", 60, "sticky", 1)])
def test_truth_equals_the_dataset_makers(tmp_path: Path, game: str, fps: int, policy: str, seed: int) -> None:
    seconds = 10
    rec = make_atari_recording(game, seconds, tmp_path / "ds", fps=fps, seed=seed, policy=policy, progress=False)
    want = _lines(rec.truth)[1:]
    out = tmp_path / "live.truth.jsonl"
    r = run(AtariLiveParams(game=game, fps=fps, policy=policy, seed=seed, seconds=seconds, width=0, height=0,
                            truth_out=str(out)))
    meta, *events = _lines(out)
    assert events == want
    assert want, f"{game} with a random agent has events within {seconds} s"
    assert meta["kind"] == "meta" and meta["frames"] == seconds * fps and meta["seconds"] == seconds
    assert (meta["seed"], meta["fps"], meta["policy"]) == (seed, fps, policy)
    # the same events on the truth port, as Event payloads with priorities and evidence
    assert len(r.truth) == len(want)
    for env, e in zip(r.truth, want, strict=True):
        ev = env.payload
        assert isinstance(ev, Event)
        assert (ev.t, ev.event_kind) == (e["t"], e["kind"])
        assert env.t_media == e["frame"] / fps  # the media time of the frame, unrounded
        assert ev.priority == ("high" if e["kind"] == "reward" else "critical")
        assert "score" in ev.evidence and "lives" in ev.evidence
        for key in ("value", "score", "lives"):
            if key in e:
                assert ev.evidence[key] == e[key]


def test_truth_out_scores_perfectly_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    run(AtariLiveParams(game="Breakout", seed=3, seconds=12, width=0, height=0), options={"truth_out": str(out)})
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    res = evaluate_files(out, out)
    assert res["per_kind"], "there are events to score"
    for kind, m in res["per_kind"].items():
        assert (m["precision"], m["recall"], m["f1"], m["fn"], m["fp"]) == (1.0, 1.0, 1.0, 0, 0), kind
    assert res["critical"]["recall"] == 1.0 and res["wake_precision"] == 1.0
    assert res["false_wakes_per_min"] == 0.0


def test_run_option_wins_and_a_stopped_run_keeps_a_valid_truth(tmp_path: Path) -> None:
    param_out, opt_out = tmp_path / "param.jsonl", tmp_path / "opt.jsonl"
    r = asyncio.run(_run_until_stopped(AtariLiveParams(game="Breakout", seed=3, width=0, height=0,
                                                       truth_out=str(param_out)),
                                       {"truth_out": str(opt_out)}, stop_after_audio=400))
    assert not param_out.exists()
    frames = r.stage.frames
    assert frames >= 400 and frames - 1 <= len(r.audio) <= frames  # the last one may be cut by the stop
    meta, *events = _lines(opt_out)
    assert meta["frames"] == frames and meta["seconds"] == round(frames / 30, 6)
    assert events and all(e["frame"] < frames for e in events)
    sent = [env.payload.t for env in r.truth]  # type: ignore[union-attr]
    assert sent == [e["t"] for e in events][: len(sent)] and len(sent) >= len(events) - 3


# --------------------------------------------------------------------------- usage errors and wiring


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (AtariLiveParams(game="NoSuchGame"), "unknown Atari game"),
        (AtariLiveParams(game="Breakout", fps=25), "fps must divide"),
        (AtariLiveParams(game="Breakout", width=0), "width and height"),
        (AtariLiveParams(game="Breakout", policy="greedy"), "unknown policy"),
        (AtariLiveParams(game="Breakout", seconds=0), "seconds must be positive"),
        (AtariLiveParams(game="Breakout", truth_out="/no/such/dir/t.jsonl"), "does not exist"),
    ],
)
def test_bad_params_are_usage_errors(params: AtariLiveParams, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        AtariLiveStage.check(params)
    if params.truth_out is None:
        with pytest.raises(UsageError, match=match):
            run(params)


def test_registered_kind_and_pipeline_config(tmp_path: Path) -> None:
    assert resolve_stage("atari") is AtariLiveStage
    feats, truth = tmp_path / "features.jsonl", tmp_path / "truth.jsonl"
    res = run_pipeline(ROOT / "configs" / "atari_live.yaml", speed=None, overrides={"atari": {"seconds": 2}},
                       options={"features_out": str(feats), "truth_out": str(truth)})
    assert res.stages["atari"].count == 60
    assert res.stages["motion"].count == 60 and res.stages["loudness"].count == 60
    lines = _lines(feats)
    assert sum(1 for x in lines if x["name"] == "motion") == 60
    assert sum(1 for x in lines if x["name"] == "loudness") == 60
    assert _lines(truth)[0]["frames"] == 60


def test_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    """One real-time second through ipc links: the report's shape, not its timings."""
    from bench.atari_live import main

    out = tmp_path / "bench.json"
    assert main(["--seconds", "1", "--width", "0", "--height", "0", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    v, a = res["video"], res["audio"]
    assert v["frames_expected"] == 60 and v["sent"] + v["late_skipped"] == 60
    assert 0 < v["received"] <= v["sent"]
    assert a["chunks"] == 60 and a["samples"] == 60 * 512 and a["expected_per_s"] == AUDIO_RATE
    for key in ("p50", "p95", "p99", "max"):
        assert key in v["interval_ms"] and key in res["latency_ms"]
    assert {"end", "max_abs", "source_end", "source_max_abs"} <= set(res["drift_ms"])
    assert res["cpu_percent"] > 0 and isinstance(res["holds_realtime"], bool)
    with pytest.raises(UsageError, match="unknown Atari game"):
        main(["--game", "NoSuchGame", "--seconds", "1"])


def _duplicates(path: Path) -> list[float]:
    times = [e["t"] for e in _lines(path) if e.get("kind") != "meta"]
    return sorted({t for t in times if times.count(t) > 1})


@pytest.mark.slow
def test_live_breakout_writes_each_moment_once(tmp_path: Path) -> None:
    """``gamecopilot live --game Breakout --until 15`` wrote the event near 11.03 s twice (a HUD
    step decided, then opened again by its sound a frame later): one moment, one event."""
    import subprocess
    import sys

    events = tmp_path / "e.jsonl"
    proc = subprocess.run([sys.executable, "-m", "copilot", "live", "--game", "Breakout", "--until", "15",
                           "--events-out", str(events)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _lines(events), "no events"
    assert _duplicates(events) == [], events.read_text()
