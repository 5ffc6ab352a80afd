"""The windowed Atari game draws a live picture on a real X server and plays its sound.

Needs Xvfb (Debian ``xvfb``); the sound test also needs PulseAudio (Debian ``pulseaudio``
and ``pulseaudio-utils``).  Both are skipped only when those programs are not installed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.games.desktop import sound_server, stop, virtual_screen

pytest.importorskip("ale_py")
mss = pytest.importorskip("mss")

ROOT = Path(__file__).resolve().parents[1]
needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")
needs_xdotool = pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed (--window)")
needs_pulse = pytest.mark.skipif(
    shutil.which("pulseaudio") is None or shutil.which("parec") is None,
    reason="pulseaudio / pulseaudio-utils are not installed",
)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop(proc)


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with virtual_screen() as number:
        yield number


@pytest.fixture
def pulse(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private PulseAudio server with a null sink; yields the env to reach it."""
    with sound_server(tmp_path, "copilot_test") as env:
        yield env


def _start_game(env: dict[str, str], seconds: float, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.games.window",
            "--game",
            "Breakout",
            "--seconds",
            str(seconds),
            "--seed",
            "1",
            "--position",
            "0,0",
            "--title",
            "copilot-test",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_ready(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "window ready" not in line:
        _stop(proc)
        err = proc.stderr.read().decode() if proc.stderr else ""
        pytest.fail(f"the window game did not start: {line!r} {err}")
    return line


def _grab(display: str, region: dict[str, int]) -> np.ndarray:
    factory = getattr(mss, "MSS", None) or mss.mss  # mss 10 renamed mss.mss to mss.MSS
    with factory(display=display) as shot:
        return np.array(shot.grab(region))[:, :, :3].copy()


@needs_xvfb
def test_window_shows_a_live_picture(display: str, tmp_path: Path) -> None:
    """mss sees the game window changing, and the screen outside it stays blank.

    The sound server is made unreachable on purpose: the game must say so in one
    warning line and go on without sound.
    """
    env = dict(os.environ, DISPLAY=display, PULSE_SERVER=f"unix:{tmp_path}/nothing")
    proc = _start_game(env, 3.0)
    try:
        _wait_ready(proc)
        window = {"left": 0, "top": 0, "width": 640, "height": 480}
        shots = []
        for _ in range(4):
            time.sleep(0.3)
            shots.append(_grab(display, window))
        outside = _grab(display, {"left": 700, "top": 0, "width": 580, "height": 720})
        out, err = proc.communicate(timeout=20)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err.decode()
    for shot in shots:
        assert shot.std() > 10, "the window region is flat"
        assert len(np.unique(shot.reshape(-1, 3), axis=0)) >= 3
    changes = [np.abs(a.astype(int) - b).sum() for a, b in itertools.pairwise(shots)]
    assert sum(c > 0 for c in changes) >= 2, "the picture does not move"
    assert outside.std() == 0, "pixels outside the window changed: not the game's window?"
    warnings = [ln for ln in err.decode().splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "audio" in warnings[0]
    done = out.decode()
    assert "window done:" in done
    emulated = int(done.split("window done: ")[1].split()[0])
    assert 120 <= emulated <= 200, "the emulator runs at 60 Hz of wall-clock time"


@needs_xvfb
@needs_pulse
def test_window_plays_its_sound(display: str, pulse: dict[str, str], tmp_path: Path) -> None:
    """The game's sound reaches the PulseAudio sink: its monitor records non-silence."""
    raw = tmp_path / "sink.raw"
    with raw.open("wb") as sink_file:
        rec = subprocess.Popen(
            [
                "parec",
                "--raw",
                "--format=u8",
                "--rate=30720",
                "--channels=1",
                "--device=copilot_test.monitor",
            ],
            env=pulse,
            stdout=sink_file,
            stderr=subprocess.DEVNULL,
        )
    game = _start_game(dict(pulse, DISPLAY=display), 3.0)
    try:
        _wait_ready(game)
        _, err = game.communicate(timeout=20)
        time.sleep(0.3)
    finally:
        _stop(game)
        _stop(rec)
    samples = np.fromfile(raw, np.uint8)
    assert game.returncode == 0, err.decode()
    assert "warning" not in err.decode()
    assert len(samples) > 30720, "less than a second recorded"
    assert (samples != 128).mean() > 0.01 and samples.std() > 2, "the sink heard silence"
