"""``gamecopilot live`` beside a real game window: Xvfb for the screen, PulseAudio for sound.

The windowed Atari game (``bench.games.window``) draws into a real X window and plays its
sound into a null sink; the copilot captures the window with mss and the sink's monitor
with soundcard, through the default pipeline.  Skipped only when Xvfb or PulseAudio is not
installed (``tests/run.sh`` installs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_window_game import (
    ROOT,
    _start_game,
    _stop,
    _wait_ready,
    display,
    needs_pulse,
    needs_xdotool,
    needs_xvfb,
    pulse,
)

__all__ = ["display", "pulse"]  # fixtures used below


def _live(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    metrics = tmp_path / "m.json"
    features = tmp_path / "f.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "live", *args, "--until", "6", "-q",
         "--metrics-out", str(metrics), "--features-out", str(features)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(metrics.read_text()), features.read_text()


@needs_xvfb
@needs_xdotool
@needs_pulse
@pytest.mark.slow
def test_live_captures_a_game_window_and_its_sound(display: str, pulse: dict[str, str], tmp_path: Path) -> None:
    env = dict(pulse, DISPLAY=display)
    game = _start_game(env, 30)
    try:
        _wait_ready(game)
        m, features = _live(env, tmp_path, "--window", "copilot-test", "--fps", "30")
    finally:
        _stop(game)
    cap = m["stages"]["capture"]
    # about 30 fps for 6 s; a loaded 2-core machine may lose some, never most
    assert cap["count"] > 100, cap
    assert 5.0 <= m["media_s"] <= 7.0
    assert m["wall_s"] == pytest.approx(6.0, abs=1.5)
    lines = [json.loads(line) for line in features.splitlines()]
    video_features = [r for r in lines if r.get("kind") == "features" and r.get("name") in ("motion", "frame_diff")]
    assert video_features, "no encoder saw the captured frames"
    # the game moves: some captured frames differ from the previous one
    assert any(max(r["values"].values()) > 0 for r in video_features)
    audio = [r for r in lines if r.get("kind") == "features" and r.get("name") in ("loudness", "audio")]
    assert audio, "no audio features: the loopback capture delivered nothing"
    levels = [v for r in audio for k, v in r["values"].items() if k in ("rms_db", "loudness_db")]
    assert levels and max(levels) > -60.0, "captured audio is silent: the game's sound did not reach the copilot"


@needs_xvfb
def test_live_region_without_audio(display: str, tmp_path: Path) -> None:
    env = dict(os.environ, DISPLAY=display)
    game = _start_game(env, 30)
    try:
        _wait_ready(game)
        m, _ = _live(env, tmp_path, "--region", "0,0,320,240", "--audio", "none", "--fps", "20")
    finally:
        _stop(game)
    assert m["stages"]["capture"]["count"] > 60


def test_live_bad_input_is_one_line(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    proc = subprocess.run([sys.executable, "-m", "copilot", "live", "--until", "1", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "copilot", "live", "--truth-out", str(tmp_path / "t.jsonl")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--game" in proc.stderr


@needs_xvfb
@needs_xdotool
def test_live_record_replays_what_was_captured(display: str, tmp_path: Path) -> None:
    import av

    env = dict(os.environ, DISPLAY=display)
    game = _start_game(env, 30)
    record = tmp_path / "session.mp4"
    try:
        _wait_ready(game)
        _live(env, tmp_path, "--window", "copilot-test", "--audio", "none", "--record", str(record))
    finally:
        _stop(game)
    with av.open(str(record)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) > 100
    assert frames[0].shape == (480, 640, 3)
    # the recording holds the game's picture, not a blank screen
    assert max(float(f.std()) for f in frames) > 10.0
    # and it replays through the same pipeline
    proc = subprocess.run([sys.executable, "-m", "copilot", "replay", str(record), "--speed", "max", "-q", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["media_s"] > 4.0


def test_live_atari_game_writes_its_truth(tmp_path: Path) -> None:
    """``live --game`` needs no screen: the emulated game is the source and knows its truth."""
    from copilot.scoring import evaluate_files, read_truth

    truth = tmp_path / "truth.jsonl"
    events = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "live", "--game", "Breakout", "--until", "4", "-q",
         "--truth-out", str(truth), "--events-out", str(events), "--metrics-out", str(tmp_path / "m.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    meta, found = read_truth(truth)
    assert meta is not None and meta["game"] == "Breakout"
    assert found, "4 s of random Breakout loses a life"
    assert evaluate_files(truth, truth)["per_kind"]["all"]["recall"] == 1.0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["stages"]["atari"]["count"] > 0
    assert 3.5 <= m["media_s"] <= 4.5


@needs_xvfb
def test_a_restarted_capture_goes_on_with_the_run_s_media_time(display: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its group restarts, capture's media time is still seconds since the run began."""
    from copilot.clock import SYSTEM_CLOCK
    from copilot.testing import run_stage

    monkeypatch.setenv("DISPLAY", display)
    session_start = SYSTEM_CLOCK.now_ns() - 5_000_000_000  # the run began 5 s ago
    res = run_stage("capture", params={"region": [0, 0, 64, 48], "audio": None, "fps": 30, "seconds": 6.0},
                    clock=SYSTEM_CLOCK, restart={"incarnation": 1, "session_start_ns": session_start})
    times = [e.t_media for e in res.envelopes("video")]
    assert times and 5.0 <= times[0] < 5.3 and times[-1] < 6.1
    assert len(times) == pytest.approx((6.0 - times[0]) * 30, abs=3)  # on the run's 30 fps grid, none counted late
    assert res.metrics.dropped_by_reason.get("late", 0) <= 2


def test_audio_is_stamped_from_when_it_arrives_not_from_when_the_stream_opened() -> None:
    """A loopback stream delivered nothing for 1.2 s after it opened (measured with PulseAudio's
    null sink); counting samples from the opening stamped all audio 1.2 s early."""
    from stages.capture import AudioTimeline

    rate, block = 48000, 2400
    tl = AudioTimeline(rate)
    rng = np.random.default_rng(0)
    for i in range(400):
        heard_s = 1.2 + (i + 1) * block / rate  # the block's last sample, on the capture clock
        arrival = heard_s + rng.uniform(0.0, 0.02)  # the thread hands it over a little later
        t = tl.stamp(i * block, block, arrival)
        assert t == pytest.approx(heard_s - block / rate, abs=0.045)
    assert tl.reanchored == 0  # jitter alone never moves the anchor


def test_audio_stamps_follow_a_drifting_sample_clock() -> None:
    from stages.capture import AudioTimeline

    rate, block = 48000, 2400
    for drift in (+200e-6, -200e-6):  # a sound card 200 ppm slow or fast: 12 ms a minute
        tl = AudioTimeline(rate)
        worst = 0.0
        for i in range(12_000):  # 10 minutes of 50 ms blocks
            heard_s = (i + 1) * block / rate * (1 + drift)
            t = tl.stamp(i * block, block, heard_s)
            worst = max(worst, abs(t - (heard_s - block / rate * (1 + drift))))
        assert worst <= 0.05 and tl.reanchored >= 2  # plain sample counting would be 0.12 s off by now


@needs_xvfb
@needs_pulse
def test_live_with_an_unknown_audio_device_is_one_line(display: str, pulse: dict[str, str]) -> None:
    """A typo in --audio is refused before the run, naming the devices there are (it used to run
    without sound, with one warning at the end)."""
    env = dict(pulse, DISPLAY=display)
    proc = subprocess.run([sys.executable, "-m", "copilot", "live", "--audio", "no_such_device", "--until", "1", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--audio: no audio device 'no_such_device'" in lines[0], proc.stderr
    assert "Null Output" in lines[0], lines[0]  # the private server's sink monitor is listed
