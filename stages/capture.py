"""Live capture: the screen (mss) and the sound the machine plays (soundcard loopback, or PyAudio).

One source stage with the same output ports as ``replay`` (``video``, ``audio``), so a
pipeline runs unchanged on a recording or beside a live game.  Media time is session time:
seconds since the capture started, on the same monotonic clock for both streams (after a
restart of its group, seconds since the run's capture first started: the timeline goes on).

Video: mss grabs the monitor, a region or a window's rectangle at ``fps``; frames go out
as BGRA views of the grab buffer (``pixel_format="bgra"``), never converted per frame.
When a grab is late the next deadline is re-anchored instead of bursting to catch up
(counted as ``late``): a live copilot wants the newest picture, not a backlog.

Audio (stages/capture_audio.py): soundcard records the default output's monitor (PulseAudio/
PipeWire loopback, or WASAPI loopback on Windows) or a named device, or PyAudio (PortAudio) records
an input device (``audio: "pyaudio:DEVICE"``), on its own thread in blocks of ``audio_block_ms``;
blocks are handed to the event loop through a bounded queue, in order; if the pipeline stalls long
enough to fill it, the oldest blocks are dropped and counted (``audio_overflow``).  A block's
media time comes from its sample count, anchored to when blocks arrive
(:class:`AudioTimeline`): a loopback stream may deliver nothing for a second or two after it
opens, and counting samples from the opening would stamp all audio that much early, so the
trigger would wait for it (every event late) and see sounds before the pictures they go with.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from typing import Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import AudioChunk, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Source
from stages.capture_audio import AudioReader, AudioTimeline, audio_backend

log = logging.getLogger(__name__)


class CaptureParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    monitor: int = 1  # mss numbering: 1 is the first monitor, 0 all of them
    region: list[int] | None = None  # x, y, width, height in screen pixels
    window: str | None = None  # a window title (X11, through xdotool)
    fps: float = 30.0
    # "default" (loopback of the default output), a soundcard device (id or name), "pyaudio:DEVICE"
    # (a PortAudio input by index or name) or None: see stages/capture_audio.py
    audio: str | None = "default"
    audio_rate: int = 48000
    audio_channels: int = 1
    audio_block_ms: float = 50.0
    seconds: float | None = None  # stop after this long; None runs until stopped


def window_geometry(title: str) -> dict[str, int]:
    """The screen rectangle of the first window whose title contains ``title`` (X11)."""
    exe = shutil.which("xdotool")
    if exe is None:
        raise UsageError("--window needs xdotool (Debian package xdotool); use --region X,Y,W,H instead")
    found = subprocess.run([exe, "search", "--onlyvisible", "--name", title], capture_output=True, text=True)
    ids = found.stdout.split()
    if not ids:
        raise UsageError(f"--window: no visible window titled {title!r}")
    geo = subprocess.run([exe, "getwindowgeometry", "--shell", ids[0]], capture_output=True, text=True)
    rect = shell_geometry(geo.stdout.splitlines())
    if rect is None:
        raise UsageError(f"--window: cannot read the geometry of window {title!r}")
    return rect


def shell_geometry(lines: list[str]) -> dict[str, int] | None:
    """The rectangle in ``xdotool getwindowgeometry --shell``'s KEY=VALUE lines, or None if they lack it."""
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    try:
        return {"left": int(values["X"]), "top": int(values["Y"]),
                "width": int(values["WIDTH"]), "height": int(values["HEIGHT"])}
    except (KeyError, ValueError):
        return None


def capture_area(params: CaptureParams, monitors: list[dict[str, int]]) -> dict[str, int]:
    """The rectangle to grab, checked against the screens mss sees."""
    if params.window:
        return window_geometry(params.window)
    if params.region is not None:
        if len(params.region) != 4 or params.region[2] <= 0 or params.region[3] <= 0:
            raise UsageError(f"--region must be X,Y,WIDTH,HEIGHT with a positive size, got {params.region}")
        x, y, w, h = params.region
        return {"left": x, "top": y, "width": w, "height": h}
    if not 0 <= params.monitor < len(monitors):
        raise UsageError(f"--monitor {params.monitor}: this screen has monitors 1..{len(monitors) - 1}")
    m = monitors[params.monitor]
    return {"left": m["left"], "top": m["top"], "width": m["width"], "height": m["height"]}


def screen_grabber() -> Any:
    """An mss screen grabber (``mss.MSS`` from mss 10 on, where ``mss.mss`` is deprecated)."""
    import mss

    factory = getattr(mss, "MSS", None) or mss.mss
    return factory()


@register_stage("capture")
class CaptureStage(Source[CaptureParams]):
    """Screen and loopback-audio capture as a source of VideoFrame and AudioChunk."""

    Params = CaptureParams
    output_ports = ("video", "audio")

    @classmethod
    def check(cls, params: CaptureParams) -> None:
        if not params.fps > 0:
            raise UsageError(f"--fps must be positive, got {params.fps}")
        try:
            import mss
        except ImportError:
            raise UsageError("live capture needs mss and soundcard: pip install 'gameplay-copilot[capture]'") from None
        try:
            with screen_grabber() as grabber:
                capture_area(params, grabber.monitors)
        except mss.exception.ScreenShotError as exc:
            raise UsageError(f"cannot open the screen for capture ({exc})") from None
        if params.audio:
            audio_backend(params.audio).check(params.audio_rate, params.audio_channels)

    async def produce(self) -> None:
        p = self.params
        loop = asyncio.get_running_loop()
        t0 = self.ctx.session_start_ns if self.ctx.session_start_ns is not None else self.clock.now_ns()
        reader = None
        if p.audio:
            reader = AudioReader(audio_backend(p.audio), rate=p.audio_rate, channels=p.audio_channels,
                                 block_ms=p.audio_block_ms, loop=loop, clock=self.clock)
        tasks: list[asyncio.Task[None]] = []
        if reader is not None:
            reader.start()
            tasks.append(asyncio.create_task(self._audio_loop(reader, t0)))
        try:
            with screen_grabber() as grabber:
                area = capture_area(p, grabber.monitors)
                await self._video_loop(grabber, area, t0)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if reader is not None:
                reader.stop.set()
                reader.join(timeout=1)
                self.recorder.drop("audio_overflow", reader.overflow)
                if reader.error:
                    log.warning("audio capture stopped: %s", reader.error)

    async def _video_loop(self, grabber: Any, area: dict[str, int], t0: int) -> None:
        p = self.params
        period = int(1e9 / p.fps)
        end = None if p.seconds is None else t0 + int(p.seconds * 1e9)
        # a restart goes on at the next frame slot of the run's grid
        index = 0 if self.ctx.session_start_ns is None else max(0, -(-(self.clock.now_ns() - t0) // period))
        due = t0 + index * period
        while end is None or due < end:
            await self.clock.sleep_until_ns(due)
            shot = await self.run_blocking(grabber.grab, area)
            cap = self.clock.now_ns()
            image = np.frombuffer(shot.raw, dtype=np.uint8).reshape(shot.height, shot.width, 4)
            t_media = (cap - t0) / 1e9
            await self.emit("video", VideoFrame(image=image, pixel_format="bgra", frame_index=index),
                            t_media=t_media, t_capture_ns=cap)
            self.record_emit(cap, t_media)
            self.recorder.media_extent_s = t_media
            index += 1
            due += period
            now = self.clock.now_ns()
            if now > due + period:  # fell behind: skip to the next slot rather than burst
                missed = (now - due) // period
                self.recorder.drop("late", int(missed))
                due += missed * period

    async def _audio_loop(self, reader: AudioReader, t0: int) -> None:
        p = self.params
        index = 0
        timeline = AudioTimeline(p.audio_rate)
        while True:
            start_frame, samples, arrival_ns = await reader.queue.get()
            cap = self.clock.now_ns()
            moves = timeline.reanchored
            t_media = timeline.stamp(start_frame, samples.shape[0], (arrival_ns - t0) / 1e9)
            if timeline.reanchored > moves:
                log.info("capture: audio clock re-anchored (sample clock drift or lost samples), now %+.3f s",
                         timeline.offset_s)
            await self.emit("audio", AudioChunk(samples=samples, sample_rate=p.audio_rate, chunk_index=index),
                            t_media=t_media, t_capture_ns=cap)
            index += 1
