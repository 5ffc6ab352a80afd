"""The overlay beside a live game: the windowed Atari game under Xvfb with its sound in PulseAudio,
``gamecopilot live --window ... --overlay web --record``, and a real browser (Debian's chromium,
driven by Playwright) on the page, which must show advice while the game runs.

Skipped only when Xvfb, PulseAudio, xdotool or chromium is not installed (tests/run.sh installs them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.browser import SHOWN_ADVICE, overlay_page
from copilot.net import free_port
from tests.test_overlay import needs_browser
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

FPS = 30.0


def _watch_page(url: str, live: subprocess.Popen[str], seconds: float) -> list[str]:
    """Open the overlay page as soon as it serves and collect every advice text it shows."""
    seen: list[str] = []
    with overlay_page(url, until_serving=live, wait_s=30) as page:
        end = time.monotonic() + seconds
        while time.monotonic() < end and live.poll() is None:
            shown = page.evaluate(SHOWN_ADVICE)
            text = shown.split("|", 1)[1] if shown else ""
            if text and text not in seen:
                seen.append(text)
            page.wait_for_timeout(100)
    return seen


@needs_xvfb
@needs_xdotool
@needs_pulse
@needs_browser
@pytest.mark.slow
def test_live_game_with_the_overlay_shows_advice_in_a_browser(display: str, pulse: dict[str, str],
                                                              tmp_path: Path) -> None:
    pytest.importorskip("playwright")
    env = dict(pulse, DISPLAY=display)
    port = free_port()
    events, advice, record, metrics = (tmp_path / n for n in ("e.jsonl", "a.jsonl", "r.mp4", "m.json"))
    game = _start_game(env, 60)
    live = None
    try:
        _wait_ready(game)
        live = subprocess.Popen(
            [sys.executable, "-m", "copilot", "live", "--window", "copilot-test", "--fps", str(FPS), "--until", "20",
             "--overlay", "web", "--overlay-port", str(port), "--events-out", str(events),
             "--advice-out", str(advice), "--record", str(record), "--metrics-out", str(metrics), "-q"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        shown = _watch_page(f"http://127.0.0.1:{port}/", live, seconds=30)
        _, err = live.communicate(timeout=90)
    finally:
        if live is not None and live.poll() is None:
            live.kill()
            live.wait()
        _stop(game)
    assert live.returncode == 0, err
    assert f"overlay: http://127.0.0.1:{port}/" in err, "the command prints the page's URL"
    m = json.loads(metrics.read_text())
    cap = m["stages"]["capture"]
    assert abs(cap["fps"] - FPS) <= 0.1 * FPS, f"capture ran at {cap['fps']} fps, not within 10% of {FPS}"
    assert sum(m["restarts"].values()) == 0, err
    written = [json.loads(line) for line in advice.read_text().splitlines()]
    assert [json.loads(line) for line in events.read_text().splitlines()], "no events"
    assert written, "no advice was written"
    assert shown, "the browser never showed advice while the game ran"
    assert set(shown) & {a["structured"].get("advice") or a["text"] for a in written} or \
        set(shown) & {a["text"] for a in written}, (shown, written)
    assert m["stages"]["overlay"]["push_ms"]["p95"] is not None
    import av

    with av.open(str(record)) as c:
        assert c.streams.video and c.streams.audio, "the recording has both tracks"
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(record)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
    assert frames >= 0.9 * FPS * 19
    assert samples > 0
