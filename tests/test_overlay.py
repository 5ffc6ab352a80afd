"""The overlay stage and its page, in a real browser (Debian's chromium driven by Playwright).

The page must be transparent everywhere but its boxes (an OBS Browser Source shows the game
through it), its advice legible, advice and events must arrive as they stream, each drawn
advice must come back as a receipt that times emitted -> rendered, and a bind beyond loopback
must refuse a client without the run's token.  Skipped only when chromium or Playwright is
missing (tests/run.sh installs both).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from bench.browser import BROWSER_ARGS, chromium_path
from copilot.messages import Advice, Event, Metrics, StageMetrics
from copilot.stage import StageContext
from copilot.testing import make_envelope
from stages.overlay import OverlayParams, OverlayStage
from stages.overlay_protocol import AdvicePush, EventPush, Hello, Rendered, decode_server, encode

aiohttp = pytest.importorskip("aiohttp")
needs_browser = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium is not installed (tests/run.sh installs it)")


@asynccontextmanager
async def overlay(**params: Any) -> AsyncIterator[OverlayStage]:
    options = {"overlay_port": 0, **params.pop("options", {})}
    stage = OverlayStage(StageContext(name="overlay", options=options), OverlayParams(**params))
    await stage.start()
    try:
        yield stage
    finally:
        await stage.close()


@asynccontextmanager
async def browser_page(url: str) -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium_path(), args=BROWSER_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            yield page
        finally:
            await browser.close()


def advice(text: str, *, final: bool = True, wake: int = 1, structured: dict[str, Any] | None = None) -> Any:
    return make_envelope(Advice(t_event=12.5, backend="rules", text=text, event_kind="hud_revert",
                                priority="critical", final=final, wake=wake, structured=structured or {}),
                         t_media=13.0)


def event(t: float, kind: str = "hud_revert", priority: str = "critical") -> Any:
    return make_envelope(Event(t=t, event_kind=kind, priority=priority, score=2.6,  # type: ignore[arg-type]
                               evidence={"reasons": ["a HUD area went back"]}), t_media=t)


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def ocr_words(rgba: np.ndarray) -> str:
    """The text RapidOCR's bundled models read in ``rgba`` composited over black."""
    from engines.ocr import FullFrameOcr

    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = (rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    return " ".join(line.text for line in FullFrameOcr()(np.ascontiguousarray(rgb[..., ::-1])))


def test_an_advice_stream_and_events_reach_a_websocket_client_and_receipts_time_them() -> None:
    async def main() -> tuple[list[Any], Any]:
        async with overlay(fade_s=5.0) as stage, aiohttp.ClientSession() as http:
            await stage.process(event(11.0))  # before the client: it is shown the ticker on connect
            async with http.ws_connect(stage.server.ws_url) as ws:
                got = [decode_server((await ws.receive()).data) for _ in range(2)]
                await stage.process(advice("Keep the paddle", final=False))
                await stage.process(advice("Keep the paddle under the ball", final=True,
                                           structured={"advice": "Keep the paddle under the ball"}))
                await stage.process(event(20.0, "sound", "low"))  # under min_priority: not shown
                for _ in range(2):
                    m = decode_server((await ws.receive()).data)
                    got.append(m)
                    if isinstance(m, AdvicePush):
                        await ws.send_str(encode(Rendered(id=m.id)))
                await asyncio.sleep(0.2)
                with pytest.raises(asyncio.TimeoutError):
                    await ws.receive(timeout=0.3)
            return got, stage.recorder.snapshot(stage.clock.now_ns())

    got, snap = asyncio.run(main())
    assert isinstance(got[0], Hello) and got[0].fade_s == 5.0
    assert isinstance(got[1], EventPush) and got[1].kind == "hud_revert" and got[1].why == "a HUD area went back"
    partial, final = got[2], got[3]
    assert isinstance(partial, AdvicePush) and not partial.final and partial.text == "Keep the paddle"
    assert isinstance(final, AdvicePush) and final.final and final.wake == partial.wake
    assert final.structured == {"advice": "Keep the paddle under the ball"}
    assert snap.extra_ms["push_ms"].p50 is not None and snap.extra_ms["push_ms"].p50 >= 0


def test_the_latency_panel_gets_the_supervisor_s_metrics_feed() -> None:
    import zmq

    from copilot.codec import Codec
    from copilot.links import contexts
    from copilot.messages import Envelope, LatencySummary

    async def main() -> Any:
        sync, _ = contexts()
        pub = sync.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        try:
            async with overlay(options={"metrics_feed": f"tcp://127.0.0.1:{port}"}) as stage, \
                    aiohttp.ClientSession() as http, http.ws_connect(stage.server.ws_url) as ws:
                await ws.receive()  # hello
                figures = Metrics(group="", stages=[StageMetrics(
                    stage="hud", count=30, fps=29.9, dropped=2, latency_ms=LatencySummary(p50=12.0, p95=30.0, p99=40.0),
                    slow=True)])
                frames = Codec().encode(Envelope.wrap(figures, source="supervisor", seq=1, t_media=1.0,
                                                      t_capture_ns=0))
                for _ in range(40):  # (a SUB socket misses what was sent before it connected)
                    pub.send_multipart(frames)
                    try:
                        return decode_server((await ws.receive(timeout=0.1)).data)
                    except TimeoutError:
                        continue
        finally:
            pub.close(linger=0)
        return None

    m = asyncio.run(main())
    assert m is not None, "no metrics reached the client"
    assert [(s.stage, s.fps, s.p50_ms, s.p95_ms, s.dropped, s.slow) for s in m.stages] == [
        ("hud", 29.9, 12.0, 30.0, 2, True)]


@needs_browser
def test_the_page_is_transparent_outside_its_boxes_and_its_advice_legible() -> None:
    text = "Jump to the LADDER now"

    async def main() -> tuple[bytes, dict[str, str], Any]:
        async with overlay(fade_s=0.0) as stage, browser_page(stage.server.url) as page:
            await page.goto(stage.server.url)
            await page.wait_for_function("document.body.dataset.connected === '1'")
            await stage.process(event(11.0))
            await stage.process(advice(text, structured={"advice": text, "summary": "a life was lost"}))
            await page.wait_for_function(f"document.getElementById('advice-text').textContent === {text!r}")
            await page.wait_for_timeout(1000)  # the box's fade-in transition (0.8 s)
            shot = await page.screenshot(omit_background=True)
            dom = await page.evaluate("""() => ({
                ticker: document.getElementById('ticker').textContent,
                summary: document.getElementById('advice-summary').textContent,
                priority: document.getElementById('advice').dataset.priority})""")
            await asyncio.sleep(0.2)
            return shot, dom, stage.recorder.snapshot(stage.clock.now_ns())

    shot, dom, snap = asyncio.run(main())
    rgba = read_png(shot)
    assert rgba.shape[:2] == (720, 1280)
    # the advice box sits bottom-left; the page's middle and its corners show the game through
    assert rgba[360, 640, 3] == 0 and rgba[5, 5, 3] == 0 and rgba[715, 1275, 3] == 0
    opaque = rgba[..., 3] > 0
    assert 0.005 < opaque.mean() < 0.25, "the boxes cover a small part of the page, not none, not most"
    box = rgba[600:700, 30:200]
    assert (box[..., 3] > 100).mean() > 0.9, "the advice box is drawn bottom-left"
    assert "LADDER" in ocr_words(rgba).upper().replace(" ", "") or "LADDER" in ocr_words(rgba).upper()
    assert "hud_revert" in dom["ticker"] and dom["summary"] == "a life was lost" and dom["priority"] == "critical"
    assert snap.extra_ms["push_ms"].p95 is not None, "the page sent a receipt for the advice it drew"


@needs_browser
def test_a_bind_beyond_loopback_refuses_a_client_without_the_token() -> None:
    async def main() -> tuple[int, str, int, bool, bool, int]:
        async with overlay(host="0.0.0.0", token="s3cret-t0ken") as stage:
            bare = f"http://127.0.0.1:{stage.server.port}/"
            async with browser_page(bare) as page:
                refused = await page.goto(bare)
                assert refused is not None
                body = await page.text_content("body") or ""
                connected = await page.evaluate("document.body.dataset.connected === '1'")
                allowed = await page.goto(stage.server.url)
                assert allowed is not None
                await page.wait_for_function("document.body.dataset.connected === '1'")
                joined = await page.evaluate("document.body.dataset.connected === '1'")
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as ws_refused:
                    await http.ws_connect(f"ws://127.0.0.1:{stage.server.port}/ws?token=wrong")
            return refused.status, body, allowed.status, connected, joined, ws_refused.value.status

    refused, body, allowed, connected, joined, ws_status = asyncio.run(main())
    assert refused == 403 and "forbidden" in body and not connected
    assert allowed == 200 and joined
    assert ws_status == 403


def test_overlay_params_that_cannot_work_are_one_line() -> None:
    from copilot.errors import UsageError

    with pytest.raises(UsageError, match="beyond loopback"):
        OverlayStage.check(OverlayParams(host="0.0.0.0"))
    with pytest.raises(UsageError, match="min_priority"):
        OverlayStage.check(OverlayParams(min_priority="urgent"))
    line = OverlayStage.announce(OverlayParams(), {"overlay": "web", "overlay_port": 9123})
    assert line is not None and "http://127.0.0.1:9123/" in line and "OBS" in line
    assert OverlayStage.announce(OverlayParams(), {}) is None
    hello = json.loads(encode(Hello()))
    assert hello["type"] == "hello"


def test_an_overlay_without_aiohttp_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from copilot.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real(name, *a))
    with pytest.raises(UsageError, match=r"--overlay web needs aiohttp: pip install 'gameplay-copilot\[overlay\]'"):
        OverlayStage.announce(OverlayParams(), {"overlay": "web"})


@pytest.mark.slow
def test_a_replay_with_the_overlay_pushes_events_advice_and_the_pipeline_s_figures(tmp_path: Any) -> None:
    """The whole path as a user runs it: the supervisor's metrics feed, the events and advice links,
    the overlay's own group, and the URL printed on stderr."""
    import subprocess
    import sys
    import time

    from copilot.commands import sample_clip
    from copilot.net import free_port
    from stages.overlay_protocol import MetricsPush

    port = free_port()
    metrics = tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, "-m", "copilot", "replay", str(sample_clip()), "--until", "12",
                             "--overlay", "web", "--overlay-port", str(port), "--metrics-out", str(metrics), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def watch() -> list[Any]:
        got: list[Any] = []
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws")
                    break
                except aiohttp.ClientError:
                    assert proc.poll() is None and time.monotonic() < deadline, "the overlay never served"
                    await asyncio.sleep(0.2)
            async with ws:
                async for msg in ws:
                    m = decode_server(msg.data)
                    got.append(m)
                    if isinstance(m, AdvicePush):
                        await ws.send_str(encode(Rendered(id=m.id)))
        return got

    try:
        got = asyncio.run(watch())
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"overlay: http://127.0.0.1:{port}/" in err
    assert isinstance(got[0], Hello)
    kinds = {type(m) for m in got}
    assert {EventPush, AdvicePush, MetricsPush} <= kinds, kinds
    stages = {s.stage for m in got if isinstance(m, MetricsPush) for s in m.stages}
    assert {"replay", "trigger", "reasoner", "overlay"} <= stages, stages
    report = json.loads(metrics.read_text())
    assert report["stages"]["overlay"]["push_ms"]["p95"] is not None
    assert report["restarts"]["overlay"] == 0


@pytest.mark.slow
def test_overlay_window_opens_the_native_window_and_times_what_it_draws(tmp_path: Any) -> None:
    """``--overlay window``: the page is served and the stage starts the native window (offscreen here),
    whose receipts time the advice it drew; the window is gone when the run ends."""
    import os
    import subprocess
    import sys

    pytest.importorskip("PySide6")
    from copilot.net import free_port
    from copilot.testing import descendants

    port = free_port()
    metrics = tmp_path / "m.json"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.Popen([sys.executable, "-m", "copilot", "demo", "--until", "12", "--overlay", "window",
                             "--overlay-port", str(port), "--metrics-out", str(metrics), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    windows: set[int] = set()

    def cmdline(pid: int) -> bytes:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return fh.read()
        except OSError:
            return b""

    try:
        import time

        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            windows.update(pid for pid in descendants(proc.pid) if b"stages.overlay_window" in cmdline(pid))
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "click-through window" in err
    assert windows, "no native window process was started"
    assert not any(b"overlay_window" in cmdline(pid) for pid in windows), "the window outlived the run"
    report = json.loads(metrics.read_text())
    assert report["stages"]["overlay"]["push_ms"]["p95"] is not None, "the window sent no receipt for what it drew"
