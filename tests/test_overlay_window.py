"""The native overlay window: click-through and on top, transparent outside its boxes, the advice
really drawn (read back by OCR), streaming and fading, and the real program as a WebSocket client of a
real aiohttp server (render receipts, reconnecting, SIGTERM).  Qt runs offscreen (no display needed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before PySide6 creates its application
pytest.importorskip("PySide6")
from PySide6 import QtCore, QtGui, QtWidgets

from copilot.net import free_port
from stages import overlay_window as ow
from stages.overlay_protocol import (
    AdvicePush,
    EventPush,
    Hello,
    MetricsPush,
    StageFigures,
    decode_client,
    encode,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = (0, 0, 1280, 720)
ADVICE = {"advice": "Climb the LADDER now to dodge the rolling barrel", "summary": "A barrel rolls in from the left"}


@pytest.fixture(scope="module")
def app() -> QtWidgets.QApplication:
    instance = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    assert isinstance(instance, QtWidgets.QApplication)
    return instance


@pytest.fixture
def view(app: QtWidgets.QApplication) -> Iterator[ow.OverlayView]:
    widget = ow.OverlayView(SIZE)
    yield widget
    widget.close()
    widget.deleteLater()
    app.processEvents()


def final_push(push_id: int = 2, wake: int = 1, text: str = "", structured: dict[str, str] | None = None) -> AdvicePush:
    return AdvicePush(id=push_id, wake=wake, final=True, text=text or ADVICE["advice"], t_event=75.0,
                      event_kind="danger", priority="critical", structured=structured)


def rgba(widget: QtWidgets.QWidget) -> np.ndarray:
    """The widget as it would reach the compositor: H x W x RGBA, straight (not premultiplied) alpha."""
    image = widget.grab().toImage().convertToFormat(QtGui.QImage.Format.Format_RGBA8888)
    rows = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine())
    return rows[:, : image.width() * 4].reshape(image.height(), image.width(), 4).copy()


def over_black(pixels: np.ndarray) -> np.ndarray:
    """RGB of the overlay composited over a black game frame."""
    alpha = pixels[..., 3:4].astype(np.float32) / 255
    return (pixels[..., :3].astype(np.float32) * alpha).astype(np.uint8)


def crop(pixels: np.ndarray, rect: QtCore.QRect) -> np.ndarray:
    return pixels[rect.top(): rect.bottom() + 1, rect.left(): rect.right() + 1]


def pump(app: QtWidgets.QApplication, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.01)


# -- the window's kind -------------------------------------------------------------------------------


def test_window_is_click_through_on_top_frameless_and_translucent(view: ow.OverlayView) -> None:
    wt, wa = QtCore.Qt.WindowType, QtCore.Qt.WidgetAttribute
    flags = view.windowFlags()
    for flag in (wt.WindowTransparentForInput, wt.WindowStaysOnTopHint, wt.FramelessWindowHint,
                 wt.WindowDoesNotAcceptFocus, wt.Tool):
        assert flags & flag == flag, flag
        assert ow.window_flags() & flag == flag
    for attribute in (wa.WA_TransparentForMouseEvents, wa.WA_TranslucentBackground, wa.WA_ShowWithoutActivating):
        assert view.testAttribute(attribute), attribute
    assert view.focusPolicy() == QtCore.Qt.FocusPolicy.NoFocus
    assert view.geometry() == QtCore.QRect(*SIZE)


def test_without_geometry_it_covers_the_primary_screen(app: QtWidgets.QApplication) -> None:
    widget = ow.OverlayView(None)
    screen = QtGui.QGuiApplication.primaryScreen()
    assert screen is not None
    assert widget.geometry() == screen.geometry()
    widget.deleteLater()


# -- what it paints -----------------------------------------------------------------------------------


def test_advice_box_is_translucent_text_legible_and_elsewhere_transparent(view: ow.OverlayView) -> None:
    view.apply(Hello(fade_s=0))
    view.apply(EventPush(id=1, t=75.4, kind="danger", priority="critical", score=0.9, why="barrel near"))
    view.apply(final_push(structured=ADVICE))
    pixels = rgba(view)
    box = view.advice_rect
    assert not box.isEmpty()
    assert box.left() < view.width() / 3 and box.bottom() > view.height() * 2 / 3  # bottom-left
    # far from every box (the ticker is top-right, the advice bottom-left): nothing at all
    assert pixels[view.height() // 2 - 20: view.height() // 2 + 20, -200:, 3].max() == 0
    assert pixels[-5:, -5:, 3].max() == 0
    # the box's padding: translucent dark, the game shows through
    inside = pixels[box.top() + box.height() // 2, box.left() + 4]
    assert 0 < inside[3] < 255
    assert inside[:3].max() < 80
    # the ticker line is drawn top-right
    assert pixels[:60, -300:, 3].max() > 0

    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.use_cls": False, "Global.log_level": "error"})
    result = engine(np.ascontiguousarray(over_black(crop(pixels, box))[..., ::-1]))  # RapidOCR wants BGR
    read = " ".join(getattr(result, "txts", None) or ())
    assert "LADDER" in read.upper(), read
    assert "BARREL ROLLS" in read.upper(), read  # the summary, smaller, under the header


def test_box_shows_text_pixels(view: ow.OverlayView, app: QtWidgets.QApplication) -> None:
    """White-ish pixels in the box come from the text: an empty final shows a box without them."""
    view.apply(Hello(fade_s=0))
    view.apply(final_push(text=" "))
    empty = crop(over_black(rgba(view)), view.advice_rect)
    view.apply(final_push(push_id=3, wake=2, text="Grab the KEY before the door closes"))
    full = crop(over_black(rgba(view)), view.advice_rect)
    white = (full.min(axis=2) > 180).sum()
    assert (empty.min(axis=2) > 180).sum() == 0
    assert white > 500


def test_streaming_partials_end_with_the_final_text(view: ow.OverlayView, app: QtWidgets.QApplication) -> None:
    view.apply(Hello(fade_s=0))
    receipts: list[int] = []
    view.rendered.connect(receipts.append)
    seen = []
    for i, text in enumerate(["Grab", "Grab the", "Grab the KEY"], start=1):
        view.apply(AdvicePush(id=i, wake=7, final=False, text=text, t_event=3.0, event_kind="item"))
        seen.append(rgba(view))
    view.apply(AdvicePush(id=4, wake=7, final=True, text="Grab the KEY before the door closes", t_event=3.0,
                          event_kind="item"))
    view.apply(AdvicePush(id=5, wake=7, final=False, text="Grab", t_event=3.0))  # late partial: ignored
    streamed = rgba(view)
    assert view.state.advice is not None and view.state.advice.text == "Grab the KEY before the door closes"
    assert receipts == [1, 2, 3, 4]  # a receipt per push painted; none for the ignored one

    fresh = ow.OverlayView(SIZE)
    fresh.apply(Hello(fade_s=0))
    fresh.apply(AdvicePush(id=9, wake=7, final=True, text="Grab the KEY before the door closes", t_event=3.0,
                           event_kind="item"))
    assert np.array_equal(streamed, rgba(fresh))  # exactly what the final alone shows
    # the partial text grew: each frame has more text pixels than the one before
    counts = [(over_black(p).min(axis=2) > 180).sum() for p in [*seen, streamed]]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    fresh.deleteLater()


def test_advice_fades_out_after_fade_s(view: ow.OverlayView, app: QtWidgets.QApplication) -> None:
    view.show()
    view.apply(Hello(fade_s=0.2))
    view.apply(final_push(structured=ADVICE))
    before = rgba(view)
    box = view.advice_rect
    assert crop(before, box)[..., 3].max() > 0
    pump(app, 1.5)
    after = rgba(view)
    assert view.state.advice is None
    assert crop(after, box)[..., 3].max() == 0
    assert after[..., 3].max() == 0  # nothing else was on screen


def test_opacity_holds_then_falls_over_the_last_second() -> None:
    now = [100.0]
    state = ow.OverlayState(clock=lambda: now[0])
    state.apply(Hello(fade_s=5.0))
    state.apply(AdvicePush(id=1, wake=1, final=False, text="partial", t_event=0.0))
    now[0] = 200.0
    assert state.advice_opacity() == 1.0  # a partial never fades
    state.apply(final_push())
    for t, opacity in ((203.0, 1.0), (204.0, 1.0), (204.5, 0.5), (205.0, 0.0)):
        now[0] = t
        assert state.advice_opacity() == pytest.approx(opacity), t
    assert state.expire() and state.advice is None
    state.apply(Hello(fade_s=0))
    state.apply(final_push(wake=2))
    now[0] = 10_000.0
    assert state.advice_opacity() == 1.0 and not state.expire()  # fade_s 0: it stays


def test_ticker_keeps_the_last_lines_and_the_panel_marks_slow_stages(view: ow.OverlayView) -> None:
    view.apply(Hello(ticker=2, panel=True, title="demo"))
    for i, kind in enumerate(["score", "death", "boss"]):
        view.apply(EventPush(id=i, t=60 * i + 5.7, kind=kind, priority="high", score=0.5, why=f"why{i}"))
    assert [line for line, _ in view.state.ticker] == ["01:05 high death why1", "02:05 high boss why2"]
    panel_off = rgba(view)
    view.apply(MetricsPush(id=9, stages=[StageFigures(stage="capture", fps=30, p50_ms=4, p95_ms=9),
                                         StageFigures(stage="hud_ocr", fps=2.5, p50_ms=120, p95_ms=300, slow=True)]))
    panel_on = rgba(view)
    assert panel_off[:150, :300, 3].max() == 0 and panel_on[:150, :300, 3].max() > 0  # top-left
    reds = (panel_on[:150, :300, 0] > 200) & (panel_on[:150, :300, 1] < 120)
    assert reds.sum() > 20  # the slow stage's row
    assert ow.panel_line(StageFigures(stage="hud_ocr", fps=2.5, slow=True)).endswith("SLOW")


# -- the program --------------------------------------------------------------------------------------


def window_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.overlay_window", *args]


def window_env() -> dict[str, str]:
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen"}


async def serve_and_watch(port: int, proc: subprocess.Popen[bytes]) -> tuple[list[int], int]:
    """A tiny overlay server, started after the window: pushes, collects receipts, closes once."""
    from aiohttp import WSMsgType, web

    receipts: list[int] = []
    connections = 0
    open_sockets: set[web.WebSocketResponse] = set()
    got_final = asyncio.Event()
    reconnected = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        nonlocal connections
        assert request.query.get("token") == "T"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        open_sockets.add(ws)
        connections += 1
        if connections > 1:
            reconnected.set()
        await ws.send_str(encode(Hello(fade_s=0, ticker=3, panel=True)))
        await ws.send_str("{not json")  # ignored by the window, counted
        await ws.send_str(encode(EventPush(id=1, t=12.0, kind="danger", priority="critical", score=0.9)))
        await ws.send_str(encode(AdvicePush(id=2, wake=1, final=False, text="Jump", t_event=12.0)))
        await ws.send_str(encode(AdvicePush(id=3, wake=1, final=True, text="Jump over the pit", t_event=12.0)))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                receipts.append(decode_client(msg.data).id)
                if 3 in receipts and connections == 1:
                    got_final.set()
                    break  # the server goes away once: the window must come back
        await ws.close()
        open_sockets.discard(ws)
        return ws

    await asyncio.sleep(0.7)  # the window is up first and retrying
    assert proc.poll() is None
    web_app = web.Application()
    web_app.router.add_get("/ws", handler)
    runner = web.AppRunner(web_app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.wait_for(got_final.wait(), 8.0)
        await asyncio.wait_for(reconnected.wait(), 5.0)
    finally:
        for ws in list(open_sockets):  # as a real server does on shutdown (else cleanup waits for them)
            await ws.close()
        await runner.cleanup()
    return receipts, connections


def test_program_renders_pushes_from_a_real_server_reconnects_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(window_cmd("--url", f"ws://127.0.0.1:{port}/ws?token=T", "--geometry", "0,0,640,480"),
                            cwd=ROOT, env=window_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        receipts, connections = asyncio.run(serve_and_watch(port, proc))
        assert 3 in receipts and set(receipts) <= {2, 3}
        assert connections >= 2
        assert proc.poll() is None  # the server went away: the window stays
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def churn_then_stop(rounds: int) -> list[float]:
    """A server that closes every connection at once; the client is stopped mid-churn, several times."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(encode(Hello()))
        await ws.close()
        return ws

    web_app = web.Application()
    web_app.router.add_get("/ws", handler)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stops = []
    try:
        for i in range(rounds):
            got: list[object] = []
            client = ow.SocketClient(f"ws://127.0.0.1:{port}/ws", got.append)
            client.start()
            await asyncio.sleep(0.3 + 0.037 * i)
            t0 = time.monotonic()
            await asyncio.to_thread(client.stop)
            stops.append(time.monotonic() - t0)
            assert got and client.connects >= 2  # it did reconnect after each close
    finally:
        await runner.cleanup()
    return stops


def test_client_stops_promptly_while_reconnecting() -> None:
    assert max(asyncio.run(churn_then_stop(3))) < 1.0


async def refuse(seconds: float) -> ow.SocketClient:
    """A server that answers the WebSocket with 403 (a wrong token), as the overlay server does."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=403, text="forbidden")

    web_app = web.Application()
    web_app.router.add_get("/ws", handler)
    runner = web.AppRunner(web_app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = ow.SocketClient(f"ws://127.0.0.1:{runner.addresses[0][1]}/ws?token=wrong", lambda m: None)
    try:
        client.start()
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(client.stop)
        await runner.cleanup()
    return client


def test_a_refused_socket_warns_once_and_keeps_trying(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger=ow.log.name):
        client = asyncio.run(refuse(1.0))
    assert client.refusals >= 2 and client.connects == 0
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "403" in warnings[0].getMessage()


def test_sigint_exits_cleanly_with_no_server() -> None:
    proc = subprocess.Popen(window_cmd("--url", f"ws://127.0.0.1:{free_port()}/ws"), cwd=ROOT, env=window_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert proc.poll() is None  # nothing to connect to: it keeps trying
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--url", "ws://127.0.0.1:1/ws", "--geometry", "1,2,3"], "--geometry"),
        (["--url", "ws://127.0.0.1:1/ws", "--geometry", "0,0,0,480"], "positive"),
        (["--url", "ws://127.0.0.1:1/ws", "--geometry", "a,b,c,d"], "--geometry"),
        (["--url", "http://127.0.0.1:1/ws"], "--url"),
        (["--url", "ws:///ws"], "--url"),
        ([], "--url"),
    ],
)
def test_bad_arguments_one_line_exit_2(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ow.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and err.startswith(ow.PROG), err


def test_bad_geometry_as_a_program_no_traceback() -> None:
    done = subprocess.run(window_cmd("--url", "ws://127.0.0.1:1/ws", "--geometry", "1,2,3"), cwd=ROOT,
                          env=window_env(), capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_without_pyside6_one_line_exit_2() -> None:
    code = ("import sys; sys.modules['PySide6'] = None\n"
            "from stages.overlay_window import main\n"
            "sys.exit(main(['--url', 'ws://127.0.0.1:1/ws']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert done.stderr == ow.NEEDS_QT + "\n"
