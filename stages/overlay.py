"""Overlay stage: shows the advice where the player looks, as it streams.

It takes the trigger's events and the reasoner's advice and pushes them over a WebSocket to a
transparent web page (``--overlay web``: any browser, or OBS as a Browser Source) and, with
``--overlay window``, to a native click-through window over the captured screen area as well
(``stages/overlay_window.py``, a PySide6 program this stage starts and stops).  The supervisor's
metrics feed (the run option ``metrics_feed``) fills the page's latency panel.

The stage never waits on a client: ``process`` turns a message into a push and queues it for each
client (see :mod:`stages.overlay_server`).  The page answers each advice push with a receipt once it
has drawn it; the time from the reasoner emitting that advice (its trace stamp) to the receipt is the
stage's ``push_ms`` timing (both ends on this host's monotonic clock).

Run options set by the command line (they win over the params): ``overlay`` (``web`` or ``window``),
``overlay_host``, ``overlay_port``, ``overlay_token``, and ``overlay_area`` (the capture's monitor,
region or window, so the native window covers what is captured).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from collections import OrderedDict, deque
from typing import Annotated, Any

import msgspec

from copilot.errors import UsageError
from copilot.messages import PRIORITY_RANK, Advice, Envelope, Event, Metrics, StageMetrics
from copilot.net import is_loopback
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from stages.overlay_protocol import AdvicePush, EventPush, Hello, MetricsPush, ServerMessage, StageFigures
from stages.overlay_server import OverlayServer, address

log = logging.getLogger(__name__)

RECEIPTS_KEPT = 512  # advice pushes waiting for a page's receipt (older ones are forgotten)


class OverlayParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"  # beyond loopback only with a token (the command line makes one)
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8765
    token: str | None = None
    fade_s: Annotated[float, msgspec.Meta(ge=0.0)] = 12.0  # advice fades this long after it is final (0: stays)
    ticker: Annotated[int, msgspec.Meta(ge=0, le=50)] = 5  # event lines on the page
    min_priority: str = "normal"  # events of this priority and above reach the ticker
    panel: bool = False  # the latency panel is shown when the page opens (the L key toggles it)
    window: bool = False  # also open the native window (what --overlay window sets)
    max_clients: Annotated[int, msgspec.Meta(ge=1)] = 16
    client_queue: Annotated[int, msgspec.Meta(ge=4)] = 64  # messages waiting per client before the oldest goes


def _why(ev: Event) -> str:
    evidence = ev.evidence if isinstance(ev.evidence, dict) else {}
    reasons = evidence.get("reasons")
    if isinstance(reasons, list) and reasons:
        return str(reasons[0])
    signals = evidence.get("signals")
    if isinstance(signals, list) and signals:
        return ", ".join(map(str, signals[:3]))
    return ""


def figures(stages: list[StageMetrics]) -> list[StageFigures]:
    """What the latency panel shows of each stage."""
    return [StageFigures(stage=m.stage, fps=round(m.fps, 1), frames=m.video_frames or m.count,
                         p50_ms=round(m.latency_ms.p50, 1) if m.latency_ms else None,
                         p95_ms=round(m.latency_ms.p95, 1) if m.latency_ms else None,
                         dropped=m.dropped, slow=m.slow) for m in stages]


def window_available() -> str | None:
    """Why the native window cannot open here, or None when it can."""
    try:
        import PySide6  # noqa: F401
    except ImportError:
        return "--overlay window needs PySide6: pip install 'gameplay-copilot[window]'"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        return "--overlay window needs a display (DISPLAY or WAYLAND_DISPLAY is not set); use --overlay web"
    return None


@register_stage("overlay")
class OverlayStage(Stage[OverlayParams]):
    Params = OverlayParams
    accepts = (Event, Advice)

    @classmethod
    def check(cls, params: OverlayParams) -> None:
        if params.min_priority not in PRIORITY_RANK:
            raise UsageError(f"overlay: min_priority must be one of {', '.join(PRIORITY_RANK)}, "
                             f"got {params.min_priority!r}")
        if not is_loopback(params.host) and not params.token:
            raise UsageError(f"overlay: host {params.host} is beyond loopback: set a token")

    @classmethod
    def announce(cls, params: OverlayParams, options: dict[str, Any]) -> str | None:
        mode = options.get("overlay")
        if not mode:
            return None
        if importlib.util.find_spec("aiohttp") is None:
            raise UsageError(f"--overlay {mode} needs aiohttp: pip install 'gameplay-copilot[overlay]'")
        if mode == "window" or params.window:
            why = window_available()
            if why:
                raise UsageError(why)
        url = address("http", str(options.get("overlay_host") or params.host),
                      int(options.get("overlay_port", params.port)), "/",
                      options.get("overlay_token") or params.token)
        where = " and in a click-through window over the game" if mode == "window" else ""
        return (f"overlay: {url}{where} (OBS: add a Browser Source with this URL, the size of your canvas; "
                "add ?panel=1 for the latency panel)")

    def __init__(self, ctx: StageContext, params: OverlayParams) -> None:
        super().__init__(ctx, params)
        o = ctx.options
        self.window = params.window or o.get("overlay") == "window"
        self.server = OverlayServer(
            host=str(o.get("overlay_host") or params.host), port=int(o.get("overlay_port", params.port)),
            token=o.get("overlay_token") or params.token,
            hello=Hello(fade_s=params.fade_s, ticker=params.ticker, panel=params.panel,
                        title=str(o.get("pipeline_name", ""))),
            max_clients=params.max_clients, queue_size=params.client_queue,
            on_rendered=self._rendered, on_drop=self.recorder.drop)
        self.server.state = self._state
        self._min_rank = PRIORITY_RANK.get(params.min_priority, 2)
        self._id = 0
        self._emitted: OrderedDict[int, int] = OrderedDict()  # advice push id -> when the reasoner emitted it
        self._advice: AdvicePush | None = None  # the latest advice push: the page shows one advice at a time
        self._ticker: deque[EventPush] = deque(maxlen=max(1, params.ticker))
        self._metrics: MetricsPush | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self._window: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.server.start()
        except OSError as exc:
            raise UsageError(f"overlay: cannot serve on {self.server.host}:{self.server.port} "
                             f"({exc.strerror or exc}); choose another --overlay-port") from None
        log.info("overlay: serving %s", self.server.url)
        feed = self.ctx.options.get("metrics_feed")
        if feed:
            self._feed_task = asyncio.create_task(self._read_feed(str(feed)), name="overlay-metrics-feed")
        if self.window:
            self._open_window()

    async def process(self, msg: Envelope) -> None:
        p = msg.payload
        if isinstance(p, Event):
            if PRIORITY_RANK.get(p.priority, 3) <= self._min_rank:
                self._push(EventPush(id=self._next_id(), t=p.t, kind=p.event_kind, priority=p.priority,
                                     score=round(p.score, 2), why=_why(p)))
        elif isinstance(p, Advice):
            push = AdvicePush(id=self._next_id(), wake=p.wake, final=p.final, text=p.text, t_event=p.t_event,
                              event_kind=p.event_kind, priority=p.priority, backend=p.backend,
                              question=p.question, structured=dict(p.structured) if p.final and p.structured else None)
            emitted = msg.trace[-1].t_out_ns if msg.trace else msg.t_capture_ns
            self._emitted[push.id] = emitted
            while len(self._emitted) > RECEIPTS_KEPT:
                self._emitted.popitem(last=False)
            self._advice = push
            self._push(push)

    async def close(self) -> None:
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        self._close_window()
        await self.server.close()

    # -- pushes ------------------------------------------------------------------------------
    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def _push(self, message: ServerMessage) -> None:
        if isinstance(message, EventPush):
            self._ticker.append(message)
        self.server.broadcast(message)

    def _state(self) -> list[ServerMessage]:
        """What a client that connects now is shown first."""
        state: list[ServerMessage] = list(self._ticker)
        if self._metrics is not None:
            state.append(self._metrics)
        if self._advice is not None:
            state.append(self._advice)
        return state

    def _rendered(self, push_id: int) -> None:
        emitted = self._emitted.pop(push_id, None)  # the first client to draw it times it
        if emitted is not None:
            self.recorder.observe_extra("push_ms", (self.clock.now_ns() - emitted) / 1e6)

    async def _read_feed(self, endpoint: str) -> None:
        """The supervisor's metrics feed, for the latency panel."""
        import zmq

        from copilot.codec import Codec, CodecError
        from copilot.links import contexts

        _, actx = contexts()
        sock = actx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        codec = Codec()
        try:
            while True:
                frames = await sock.recv_multipart(copy=False)
                try:
                    env = codec.decode(frames)
                except CodecError:
                    continue
                if isinstance(env.payload, Metrics):
                    self._metrics = MetricsPush(id=self._next_id(), stages=figures(env.payload.stages))
                    self.server.broadcast(self._metrics)
        finally:
            sock.close(linger=0)

    # -- the native window -------------------------------------------------------------------
    def _open_window(self) -> None:
        cmd = [sys.executable, "-m", "stages.overlay_window", "--url", self.server.ws_url]
        area = self._window_area()
        if area is not None:
            cmd += ["--geometry", ",".join(str(v) for v in area)]
        self._window = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        log.info("overlay: native window started (pid %d)", self._window.pid)

    def _window_area(self) -> list[int] | None:
        """The screen rectangle the capture watches (x, y, w, h), for the window to cover; None: the screen."""
        area = self.ctx.options.get("overlay_area")
        if not isinstance(area, dict) or not area:
            return None
        try:
            from stages.capture import CaptureParams, capture_area, screen_grabber

            params = msgspec.convert(area, CaptureParams)
            with screen_grabber() as grabber:
                rect = capture_area(params, list(grabber.monitors))
        except Exception as exc:  # the window still opens, over the whole screen
            log.warning("overlay: cannot find the captured area (%s); the window covers the screen", exc)
            return None
        return [rect["left"], rect["top"], rect["width"], rect["height"]]

    def _close_window(self) -> None:
        proc, self._window = self._window, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc.returncode:
            log.warning("overlay: the native window exited with code %d", proc.returncode)
