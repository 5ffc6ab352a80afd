"""``gamecopilot devices``: the screens, windows and audio devices ``live`` can capture.

Under Xvfb (1280x720) with the windowed game running and a private PulseAudio server with a null
sink; skipped when Xvfb or PulseAudio is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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

PREFIX = "gamecopilot devices: note: "


def _devices(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "copilot", "devices", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@needs_xvfb
@needs_xdotool
@needs_pulse
def test_devices_lists_the_screen_the_game_window_and_the_sink_monitor(display: str, pulse: dict[str, str]) -> None:
    env = dict(pulse, DISPLAY=display)
    game = _start_game(env, 30)
    try:
        _wait_ready(game)
        as_json = _devices(env, "--json")
        table = _devices(env)
    finally:
        _stop(game)
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == "", as_json.stderr  # every section found something: no notes, no ALSA noise
    found = json.loads(as_json.stdout)
    assert set(found) == {"monitors", "windows", "audio"}
    assert {"index": 1, "left": 0, "top": 0, "width": 1280, "height": 720} in found["monitors"]
    assert all(set(m) == {"index", "left", "top", "width", "height"} for m in found["monitors"])
    games = [w for w in found["windows"] if "copilot-test" in w["title"]]
    assert len(games) == 1, found["windows"]
    game_window = games[0]
    assert {"id", "title", "left", "top", "width", "height"} <= set(game_window)
    assert game_window["width"] > 0 and game_window["height"] > 0
    assert (game_window["left"], game_window["top"]) == (0, 0)  # the game was placed at 0,0
    assert all({"name", "id", "loopback"} <= set(a) for a in found["audio"])
    monitors = [a for a in found["audio"] if a["id"] == "copilot_test.monitor"]
    assert len(monitors) == 1 and monitors[0]["loopback"] is True and monitors[0]["backend"] == "soundcard"
    if importlib.util.find_spec("pyaudio") is not None:
        pulse_pcm = [a for a in found["audio"] if a.get("backend") == "pyaudio" and a["name"] == "pulse"]
        assert pulse_pcm and pulse_pcm[0]["id"] == "pyaudio:pulse" and pulse_pcm[0]["loopback"] is False

    assert table.returncode == 0 and table.stderr == "", table.stderr
    text = table.stdout
    assert "Traceback" not in text and not text.lstrip().startswith("{")
    monitor_row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["1"])
    assert monitor_row == ["1", "0", "0", "1280", "720"]
    window_row = next(line for line in text.splitlines() if "copilot-test" in line)
    assert str(game_window["id"]) in window_row
    assert "copilot_test.monitor" in text and "Monitor of Null Output" in text


def test_devices_without_a_display_or_a_sound_server_lists_nothing_and_says_why(tmp_path: Path) -> None:
    env = dict(os.environ, PULSE_SERVER=f"unix:{tmp_path}/nothing", HOME=str(tmp_path))
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    proc = _devices(env, "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["monitors"] == [] and found["windows"] == []
    assert not [a for a in found["audio"] if a.get("backend") == "soundcard"]
    notes = proc.stderr.strip().splitlines()
    # each line is a note (no traceback, no ALSA noise): the screen, the windows, the sound server
    assert notes and all(line.startswith(PREFIX) for line in notes), proc.stderr
    assert any("no monitors" in n and "DISPLAY" in n for n in notes)
    assert any("no windows" in n for n in notes)
    assert any("no soundcard devices" in n for n in notes)
    table = _devices(env)
    assert table.returncode == 0 and table.stdout.count("(none)") >= 2, table.stdout


def test_devices_refuses_an_unknown_option_in_one_line() -> None:
    proc = _devices(dict(os.environ), "--jsn")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--jsn" in proc.stderr, proc.stderr
