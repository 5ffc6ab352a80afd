"""The native overlay window (``--overlay window``): the web page's content, drawn over the game.

Why a separate program: a click-through, always-on-top window needs a GUI toolkit (PySide6, the
``window`` extra) and the GUI thread of its own process, while the copilot's groups are asyncio and
ZeroMQ processes.  So the window is a plain WebSocket client of the overlay server, like the web
page, and shows the same things from the same protocol (``stages/overlay_protocol.py``): the advice
box (bottom-left), the event ticker (top-right) and, when ``hello.panel`` says so, the latency panel
(top-left).  Everything else is fully transparent and the window never takes input or focus.

    python -m stages.overlay_window --url ws://127.0.0.1:PORT/ws?token=T --geometry X,Y,W,H

Threads: the GUI thread owns the widget; a background thread runs aiohttp's WebSocket client on its
own asyncio loop.  Decoded messages go through a small bounded inbox and a queued Qt signal, so the
widget is only touched on the GUI thread; the render receipt (``Rendered``) goes back to the client
thread with ``loop.call_soon_threadsafe``.  Nothing in the core imports this module (it would pull in
PySide6): the overlay stage starts it as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from stages.overlay_protocol import (
    AdvicePush,
    EventPush,
    Hello,
    MetricsPush,
    Rendered,
    ServerMessage,
    StageFigures,
    decode_server,
    encode,
)

try:
    from PySide6 import QtCore, QtGui, QtWidgets
except ImportError as exc:  # the `window` extra is not installed: main() says so in one line
    QT_IMPORT_ERROR: ImportError | None = exc
else:
    QT_IMPORT_ERROR = None

log = logging.getLogger(__name__)

PROG = "gamecopilot overlay window"
NEEDS_QT = f"{PROG}: needs PySide6: pip install 'gameplay-copilot[window]'"
RETRY_FIRST_S = 0.1  # the window starts just after the server: try again soon, then every RETRY_MAX_S
RETRY_MAX_S = 0.5
INBOX_MAX = 256  # decoded messages waiting for the GUI thread (oldest dropped, counted)
RECEIPTS_MAX = 64  # render receipts waiting for a paint or for the socket
FADE_ANIM_S = 1.0  # advice fades out over its last second on screen
FADE_TICK_MS = 40
SIGNAL_TICK_MS = 200  # lets Python run its signal handlers while Qt's loop waits

Geometry = tuple[int, int, int, int]


class UsageError(Exception):
    """A bad command-line argument: one line on stderr, exit code 2."""


# -- arguments ---------------------------------------------------------------------------------------


def parse_geometry(text: str) -> Geometry:
    """``X,Y,W,H`` in screen pixels (X and Y may be negative on a multi-monitor desktop)."""
    parts = text.split(",")
    try:
        x, y, w, h = (int(p.strip()) for p in parts)
    except ValueError:
        raise UsageError(f"bad --geometry {text!r}: want X,Y,W,H (four integers)") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"bad --geometry {text!r}: width and height must be positive")
    return x, y, w, h


def check_url(url: str) -> str:
    """Only a WebSocket address: anything else would retry forever against the wrong thing."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"bad --url {url!r}: want ws://HOST:PORT/ws or wss://...")
    return url


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse prints usage + error: we want one line
        raise UsageError(message)


@dataclass(frozen=True)
class Options:
    url: str
    geometry: Geometry | None
    verbose: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = _Parser(prog="python -m stages.overlay_window",
                     description="The native overlay window: the overlay web page's content, drawn over the game.")
    parser.add_argument("--url", required=True, help="the overlay server's WebSocket, ws://HOST:PORT/ws?token=T")
    parser.add_argument("--geometry", help="X,Y,W,H of the captured monitor, region or window (default: "
                                           "the primary screen)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    ns = parser.parse_args(argv)
    geometry = parse_geometry(ns.geometry) if ns.geometry is not None else None
    return Options(url=check_url(ns.url), geometry=geometry, verbose=ns.verbose)


# -- what is on screen (no Qt: the state the painter reads) -------------------------------------------


@dataclass
class ShownAdvice:
    wake: int
    header: str  # "KIND · PRIORITY"
    text: str  # the advice itself, shown large
    summary: str = ""
    priority: str = "high"
    final_at: float | None = None  # monotonic time the final text arrived


def advice_of(push: AdvicePush) -> ShownAdvice:
    """What the box shows for one push: the structured ``advice`` field when the answer had one."""
    structured = push.structured or {}
    text = structured.get("advice") or push.text
    summary = structured.get("summary") or ""
    header = " · ".join(s for s in (push.event_kind.upper(), push.priority.upper()) if s)
    return ShownAdvice(wake=push.wake, header=header, text=str(text).strip(), summary=str(summary).strip(),
                       priority=push.priority)


def ticker_line(push: EventPush) -> str:
    """``MM:SS priority kind why`` (media time, as the page shows it)."""
    seconds = max(0, int(push.t))
    line = f"{seconds // 60:02d}:{seconds % 60:02d} {push.priority} {push.kind}"
    return f"{line} {push.why}" if push.why else line


@dataclass
class OverlayState:
    """The overlay's content, updated by server messages; the widget paints it."""

    clock: Callable[[], float] = time.monotonic
    hello: Hello = field(default_factory=Hello)
    advice: ShownAdvice | None = None
    ticker: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=Hello().ticker))
    stages: list[StageFigures] = field(default_factory=list)

    def apply(self, message: ServerMessage) -> bool:
        """Take one message; True when something on screen changed."""
        if isinstance(message, Hello):
            self.hello = message
            self.ticker = deque(self.ticker, maxlen=max(0, message.ticker))
            return True
        if isinstance(message, AdvicePush):
            return self._apply_advice(message)
        if isinstance(message, EventPush):
            self.ticker.append((ticker_line(message), message.priority))
            return True
        if isinstance(message, MetricsPush):
            self.stages = list(message.stages)
            return self.hello.panel
        return False

    def _apply_advice(self, push: AdvicePush) -> bool:
        shown = self.advice
        if shown is not None and (push.wake < shown.wake or (push.wake == shown.wake and shown.final_at is not None
                                                              and not push.final)):
            return False  # a late partial of an older wake, or of one already final
        self.advice = advice_of(push)
        if push.final:
            self.advice.final_at = self.clock()
        return True

    def advice_opacity(self) -> float:
        """1 until the last FADE_ANIM_S of ``fade_s``, then down to 0 (0 also when there is none)."""
        shown = self.advice
        if shown is None:
            return 0.0
        if shown.final_at is None or self.hello.fade_s <= 0:
            return 1.0
        left = shown.final_at + self.hello.fade_s - self.clock()
        return min(1.0, max(0.0, left / min(FADE_ANIM_S, self.hello.fade_s)))

    def fading(self) -> bool:
        """An advice is on screen and will fade (the widget's fade timer runs only then)."""
        return self.advice is not None and self.advice.final_at is not None and self.hello.fade_s > 0

    def expire(self) -> bool:
        """Drop a fully faded advice; True when it was dropped."""
        if self.fading() and self.advice_opacity() <= 0.0:
            self.advice = None
            return True
        return False


# -- the WebSocket client (its own thread and asyncio loop) ------------------------------------------


class Inbox:
    """Decoded messages from the client thread to the GUI thread, bounded (oldest dropped, counted).

    Why not one queued signal per message: Qt's event queue has no bound, and a stalled GUI thread
    would let it grow; here the client signals only when the inbox goes from empty to non-empty.
    """

    def __init__(self, maxlen: int = INBOX_MAX) -> None:
        self._items: deque[ServerMessage] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, message: ServerMessage) -> bool:
        """Add one; True when the inbox was empty (the GUI thread must be told)."""
        with self._lock:
            was_empty = not self._items
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(message)
            return was_empty

    def take_all(self) -> list[ServerMessage]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items


class SocketClient:
    """aiohttp WebSocket client on a background thread: receives pushes, sends render receipts.

    It reconnects until stopped: the window starts just after the server and outlives a server that
    goes away (a new run may start one on the same address).
    """

    def __init__(self, url: str, on_message: Callable[[ServerMessage], None]) -> None:
        self.url = url
        self.on_message = on_message
        self.malformed = 0
        self.connects = 0
        self.refusals = 0
        self._stopping = False
        self.receipts_dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._receipts: asyncio.Queue[int] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="overlay-ws", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5.0)

    def stop(self, timeout: float = 3.0) -> None:
        """Cancel the client's task and wait for its thread (called on the GUI thread at exit)."""
        self._stopping = True  # read by the retry loop, in case a cancel lands where it is absorbed
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)

    def send_rendered(self, push_id: int) -> None:
        """Queue the receipt for push ``push_id``; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._queue_receipt, push_id)

    def _queue_receipt(self, push_id: int) -> None:
        if self._receipts is None:
            return
        try:
            self._receipts.put_nowait(push_id)
        except asyncio.QueueFull:
            self.receipts_dropped += 1

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._run())
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _run(self) -> None:
        import aiohttp

        self._receipts = asyncio.Queue(maxsize=RECEIPTS_MAX)
        delay = RETRY_FIRST_S
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping:
                try:
                    await self._session(session)
                    delay = RETRY_FIRST_S  # it was up: the next try soon
                except aiohttp.WSServerHandshakeError as exc:
                    self._refused(exc.status)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    log.debug("overlay server not reachable (%s): retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    def _refused(self, status: int) -> None:
        """The server is up but said no (a wrong token: 403): worth one warning, then quiet retries."""
        self.refusals += 1
        if self.refusals == 1:
            log.warning("overlay server refused the WebSocket (HTTP %d): wrong token? retrying", status)

    async def _session(self, session: Any) -> None:
        """One connection, until the server closes it."""
        import aiohttp

        async with session.ws_connect(self.url, heartbeat=5.0) as ws:
            self.connects += 1
            log.debug("connected to %s", self.url)
            writer = asyncio.create_task(self._write_receipts(ws))
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self._receive(msg.data)
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                        break
                    else:
                        self._count_malformed(f"a {msg.type.name} frame")
            finally:
                writer.cancel()
                await asyncio.wait([writer])  # not `await writer`: that would swallow our own cancellation
        log.debug("overlay server closed the connection: reconnecting")

    def _receive(self, text: str) -> None:
        try:
            message = decode_server(text)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._count_malformed(str(exc))
            return
        self.on_message(message)

    def _count_malformed(self, why: str) -> None:
        self.malformed += 1
        log.debug("ignored a malformed overlay message (%d so far): %s", self.malformed, why)

    async def _write_receipts(self, ws: Any) -> None:
        assert self._receipts is not None
        while True:
            push_id = await self._receipts.get()
            if ws.closed:
                return
            await ws.send_str(encode(Rendered(id=push_id)))


# -- the window ----------------------------------------------------------------------------------------

PRIORITY_COLORS = {"critical": (255, 82, 82), "high": (255, 167, 38), "medium": (255, 235, 59),
                   "low": (176, 190, 197)}
BOX_RGBA = (12, 14, 22, 190)  # the boxes: dark, translucent (the game shows through a little)
SLOW_RGB = (255, 82, 82)

if QT_IMPORT_ERROR is None:

    def window_flags() -> QtCore.Qt.WindowType:
        """Frameless, on top, a tool window (no taskbar entry), click-through and never focused."""
        wt = QtCore.Qt.WindowType
        return (wt.FramelessWindowHint | wt.WindowStaysOnTopHint | wt.Tool | wt.WindowTransparentForInput
                | wt.WindowDoesNotAcceptFocus)

    def window_attributes() -> tuple[QtCore.Qt.WidgetAttribute, ...]:
        """Translucent (alpha 0 outside the boxes), mouse events pass through, shown without activation."""
        wa = QtCore.Qt.WidgetAttribute
        return (wa.WA_TranslucentBackground, wa.WA_TransparentForMouseEvents, wa.WA_ShowWithoutActivating,
                wa.WA_NoSystemBackground)

    def _color(rgb: tuple[int, ...], alpha: int = 255) -> QtGui.QColor:
        return QtGui.QColor(rgb[0], rgb[1], rgb[2], alpha)

    def _font(pixels: float, bold: bool = False) -> QtGui.QFont:
        font = QtGui.QFont()
        font.setStyleHint(QtGui.QFont.StyleHint.SansSerif)
        font.setPixelSize(max(8, round(pixels)))
        font.setBold(bold)
        return font

    def _wrapped_height(font: QtGui.QFont, width: int, text: str) -> int:
        if not text:
            return 0
        rect = QtGui.QFontMetrics(font).boundingRect(QtCore.QRect(0, 0, width, 100_000),
                                                    int(QtCore.Qt.TextFlag.TextWordWrap), text)
        return rect.height()

    class OverlayView(QtWidgets.QWidget):
        """The overlay: paints the advice box, the ticker and the latency panel, transparent elsewhere.

        ``apply`` takes server messages (on the GUI thread); after a paint that showed an advice push,
        ``rendered`` is emitted with its id, so the server can time advice emitted -> on screen.
        """

        rendered = QtCore.Signal(int)

        def __init__(self, geometry: Geometry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
            super().__init__(None, window_flags())
            for attribute in window_attributes():
                self.setAttribute(attribute, True)
            self.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            self.setWindowTitle("Gameplay Copilot overlay")
            self.state = OverlayState(clock=clock)
            self.advice_rect = QtCore.QRect()  # where the advice box was last painted (empty: none)
            self._receipts: deque[int] = deque(maxlen=RECEIPTS_MAX)
            self._fade_timer = QtCore.QTimer(self)
            self._fade_timer.setInterval(FADE_TICK_MS)
            self._fade_timer.timeout.connect(self._fade_tick)
            self.place(geometry)

        def place(self, geometry: Geometry | None) -> None:
            """Over the captured rectangle, or the whole primary screen."""
            if geometry is None:
                screen = QtGui.QGuiApplication.primaryScreen()
                rect = screen.geometry() if screen is not None else QtCore.QRect(0, 0, 1280, 720)
                geometry = (rect.x(), rect.y(), rect.width(), rect.height())
            self.setGeometry(*geometry)

        @QtCore.Slot(object)
        def apply(self, message: ServerMessage) -> None:
            if not self.state.apply(message):
                return
            if isinstance(message, AdvicePush):
                self._receipts.append(message.id)
            if self.state.fading() and not self._fade_timer.isActive():
                self._fade_timer.start()
            self.update()

        def _fade_tick(self) -> None:
            if not self.state.fading():
                self._fade_timer.stop()
                return
            if self.state.expire():
                self._fade_timer.stop()
                self.update()
            elif self.state.advice_opacity() < 1.0:
                self.update()

        # -- painting --

        def _unit(self) -> float:
            """The text size everything scales from: legible on a 720p capture, not huge on 4K."""
            return max(11.0, min(28.0, self.height() / 50))

        def paintEvent(self, event: QtGui.QPaintEvent) -> None:
            painter = QtGui.QPainter(self)
            try:
                painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
                painter.setRenderHint(QtGui.QPainter.RenderHint.TextAntialiasing)
                painter.setCompositionMode(QtGui.QPainter.CompositionMode.CompositionMode_Source)
                painter.fillRect(self.rect(), QtCore.Qt.GlobalColor.transparent)
                painter.setCompositionMode(QtGui.QPainter.CompositionMode.CompositionMode_SourceOver)
                self._paint_advice(painter)
                self._paint_ticker(painter)
                if self.state.hello.panel and self.state.stages:
                    self._paint_panel(painter)
            finally:
                painter.end()
            self._send_receipts()

        def _send_receipts(self) -> None:
            while self._receipts:
                self.rendered.emit(self._receipts.popleft())

        def _box(self, painter: QtGui.QPainter, rect: QtCore.QRectF, radius: float) -> None:
            painter.setPen(QtCore.Qt.PenStyle.NoPen)
            painter.setBrush(_color(BOX_RGBA[:3], BOX_RGBA[3]))
            painter.drawRoundedRect(rect, radius, radius)

        def _paint_advice(self, painter: QtGui.QPainter) -> None:
            shown, opacity = self.state.advice, self.state.advice_opacity()
            if shown is None or opacity <= 0.0:
                self.advice_rect = QtCore.QRect()
                return
            u = self._unit()
            margin, pad = 1.5 * u, 0.9 * u
            width = min(self.width() - 2 * margin, max(self.width() * 0.5, 24 * u))
            inner = round(width - 2 * pad)
            fonts = (_font(0.8 * u, bold=True), _font(1.0 * u), _font(1.7 * u, bold=True))
            texts = (shown.header, shown.summary, shown.text)
            heights = [_wrapped_height(f, inner, t) for f, t in zip(fonts, texts, strict=True)]
            gaps = 0.4 * u * (sum(1 for h in heights if h) - 1)
            height = min(self.height() - 2 * margin, sum(heights) + gaps + 2 * pad)
            box = QtCore.QRectF(margin, self.height() - 2 * margin - height, width, height)
            painter.save()
            painter.setOpacity(opacity)
            painter.setClipRect(box)
            self._box(painter, box, 0.6 * u)
            colors = (_color(PRIORITY_COLORS.get(shown.priority, (255, 255, 255))), _color((200, 205, 215)),
                      _color((255, 255, 255)))
            y = box.top() + pad
            for font, text, h, color in zip(fonts, texts, heights, colors, strict=True):
                if not h:
                    continue
                painter.setFont(font)
                painter.setPen(color)
                painter.drawText(QtCore.QRectF(box.left() + pad, y, inner, h),
                                 int(QtCore.Qt.TextFlag.TextWordWrap), text)
                y += h + 0.4 * u
            painter.restore()
            self.advice_rect = box.toAlignedRect()

        def _paint_lines(self, painter: QtGui.QPainter, lines: list[tuple[str, QtGui.QColor]], right: bool,
                         font: QtGui.QFont) -> None:
            """Small lines in one box, at the top-left or top-right corner."""
            u = self._unit()
            metrics = QtGui.QFontMetrics(font)
            margin, pad, line_h = 1.0 * u, 0.5 * u, metrics.height()
            widest = max(metrics.horizontalAdvance(text) for text, _ in lines) + 2  # +2: no rounding elision
            width = min(widest + 2 * pad, self.width() * 0.45)
            height = line_h * len(lines) + 2 * pad
            left = self.width() - margin - width if right else margin
            box = QtCore.QRectF(left, margin, width, height)
            self._box(painter, box, 0.4 * u)
            painter.setFont(font)
            for i, (text, color) in enumerate(lines):
                painter.setPen(color)
                row = QtCore.QRectF(box.left() + pad, box.top() + pad + i * line_h, width - 2 * pad, line_h)
                elided = metrics.elidedText(text, QtCore.Qt.TextElideMode.ElideRight, math.floor(row.width()))
                painter.drawText(row, int(QtCore.Qt.AlignmentFlag.AlignVCenter), elided)

        def _paint_ticker(self, painter: QtGui.QPainter) -> None:
            if not self.state.ticker:
                return
            lines = [(text, _color(PRIORITY_COLORS.get(priority, (230, 230, 230))))
                     for text, priority in self.state.ticker]
            self._paint_lines(painter, lines, right=True, font=_font(0.85 * self._unit()))

        def _paint_panel(self, painter: QtGui.QPainter) -> None:
            white, slow = _color((230, 232, 238)), _color(SLOW_RGB)
            lines = [(self.state.hello.title or "latency", white), (PANEL_HEADER, white)]
            lines += [(panel_line(s), slow if s.slow else white) for s in self.state.stages]
            font = _font(0.75 * self._unit())
            font.setStyleHint(QtGui.QFont.StyleHint.Monospace)
            font.setFamily("monospace")
            self._paint_lines(painter, lines, right=False, font=font)

    class Bridge(QtCore.QObject):
        """Hands the client thread's messages to the view on the GUI thread (queued signal, bounded inbox)."""

        arrived = QtCore.Signal()

        def __init__(self, view: OverlayView, inbox: Inbox) -> None:
            super().__init__(view)
            self.view, self.inbox = view, inbox
            self.arrived.connect(self._drain, QtCore.Qt.ConnectionType.QueuedConnection)

        def post(self, message: ServerMessage) -> None:
            """Called on the client thread."""
            if self.inbox.put(message):
                self.arrived.emit()

        @QtCore.Slot()
        def _drain(self) -> None:
            for message in self.inbox.take_all():
                self.view.apply(message)


PANEL_HEADER = f"{'stage':<14} {'fps':>5} {'p50':>5}/{'p95':<5}"


def panel_line(figures: StageFigures) -> str:
    """One latency panel row: stage, fps, p50/p95 ms (capture to output), SLOW when behind real time."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    line = f"{figures.stage[:14]:<14} {figures.fps:5.1f} {ms(figures.p50_ms):>5}/{ms(figures.p95_ms):<5}"
    if figures.dropped:
        line += f" drop {figures.dropped}"
    return f"{line} SLOW" if figures.slow else line


# -- the program ---------------------------------------------------------------------------------------


def _quit(app: Any, signum: int) -> None:
    log.debug("%s: quitting", signal.Signals(signum).name)
    app.quit()


def _install_signal_handlers(app: Any) -> Any:
    """SIGTERM/SIGINT quit Qt's loop; a timer tick gives Python the chance to run the handlers."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: _quit(app, signum))
    tick = QtCore.QTimer()
    tick.timeout.connect(lambda: None)
    tick.start(SIGNAL_TICK_MS)
    return tick


def _route_qt_messages() -> None:
    """Qt's own messages into logging: the offscreen and X11 plugins warn about things that are harmless
    here ("This plugin does not support raise()"), so warnings are debug; critical ones stay visible."""
    levels = {QtCore.QtMsgType.QtCriticalMsg: logging.ERROR, QtCore.QtMsgType.QtFatalMsg: logging.CRITICAL}

    def handler(kind: QtCore.QtMsgType, _context: Any, text: str) -> None:
        log.log(levels.get(kind, logging.DEBUG), "qt: %s", text)

    QtCore.qInstallMessageHandler(handler)


def run(options: Options) -> int:
    """Show the window and stay connected until SIGTERM/SIGINT."""
    _route_qt_messages()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([sys.argv[0]])
    view = OverlayView(options.geometry)
    bridge = Bridge(view, Inbox())
    client = SocketClient(options.url, bridge.post)
    view.rendered.connect(client.send_rendered)
    tick = _install_signal_handlers(app)
    view.show()
    client.start()
    try:
        app.exec()
    finally:
        tick.stop()
        log.debug("Qt loop done: stopping the client")
        client.stop()
        view.close()
    log.debug("overlay window done: %d connections, %d malformed, %d dropped", client.connects,
              client.malformed, bridge.inbox.dropped)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if QT_IMPORT_ERROR is not None:
        print(NEEDS_QT, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING,
                        format="%(asctime)s overlay-window %(levelname)s %(message)s")
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
