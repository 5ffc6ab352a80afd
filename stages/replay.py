"""Replay a recording through the pipeline at real-time speed (or faster).

PyAV decodes video and audio on a worker thread, in file order, a few frames ahead; the
event loop releases each frame when its PTS is due (``speed`` 1 or 2), or at once (``speed``
``max``, with lossless links so nothing is dropped).  A frame's ``t_capture_ns`` is the moment
it is released, which is when a live capture would have produced it, so latency figures mean
the same thing in replay and live runs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import AudioChunk, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Source

log = logging.getLogger(__name__)

DECODE_AHEAD = 8


class ReplayParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    start: float = 0.0
    until: float | None = None
    video: bool = True
    audio: bool = True


@dataclass
class MediaInfo:
    path: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    sample_rate: int = 0


def probe_media(path: str | Path) -> MediaInfo:
    """Open ``path`` and check it has something to replay; :class:`UsageError` if not."""
    import av

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: file not found")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a video or audio file")
    if p.stat().st_size == 0:
        raise UsageError(f"{p}: file is empty")
    try:
        with av.open(str(p)) as c:
            v = c.streams.video[0] if c.streams.video else None
            a = c.streams.audio[0] if c.streams.audio else None
            if v is None and a is None:
                raise UsageError(f"{p}: no audio or video stream")
            duration = float(c.duration / 1e6) if c.duration else 0.0
            # Demux once (no decoding): a truncated file ends early or raises here.
            last = 0.0
            for pkt in c.demux():
                if pkt.pts is not None and pkt.time_base is not None:
                    last = max(last, float(pkt.pts * pkt.time_base))
            if duration and last < duration - 1.0:
                raise UsageError(f"{p}: truncated (data ends at {last:.1f} s of {duration:.1f} s)")
            fps = float(v.average_rate) if v is not None and v.average_rate else 0.0
            return MediaInfo(
                path=str(p),
                duration_s=duration or last,
                has_video=v is not None,
                has_audio=a is not None,
                width=v.codec_context.width if v is not None else 0,
                height=v.codec_context.height if v is not None else 0,
                fps=fps,
                sample_rate=a.codec_context.sample_rate if a is not None else 0,
            )
    except UsageError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:  # type: ignore[attr-defined]
        raise UsageError(f"{p}: not a readable media file ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resampled_samples(resampler: Any, frame: Any) -> np.ndarray | None:
    """A decoded audio frame as float32 samples shaped (n, channels); None if the resampler
    is still buffering.  The resampler converts to packed ``flt`` at the stream's layout."""
    chunks = [r.to_ndarray() for r in resampler.resample(frame)]
    if not chunks:
        return None
    data = np.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]
    layout = frame.layout
    channels = layout.nb_channels if hasattr(layout, "nb_channels") else len(layout.channels)
    return np.ascontiguousarray(data.reshape(-1, channels), dtype=np.float32)


class _Decoder(threading.Thread):
    """Decodes on its own thread into a bounded queue, so pacing never waits on decoding."""

    def __init__(self, params: ReplayParams, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]):
        super().__init__(name="replay-decode", daemon=True)
        self.params = params
        self.loop = loop
        self.queue = queue
        self.stop = threading.Event()
        self.error: str | None = None

    def _put(self, item: Any) -> bool:
        fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        while not self.stop.is_set():
            try:
                fut.result(timeout=0.1)
                return True
            except TimeoutError:
                continue
        fut.cancel()
        return False

    def run(self) -> None:
        import av

        p = self.params
        try:
            with av.open(p.path) as c:
                streams: list[Any] = []
                if p.video and c.streams.video:
                    streams.append(c.streams.video[0])
                if p.audio and c.streams.audio:
                    streams.append(c.streams.audio[0])
                for s in streams:
                    s.thread_type = "AUTO"
                if p.start > 0:
                    c.seek(int(p.start * 1e6), any_frame=False, backward=True)
                resampler = None
                if p.audio and c.streams.audio:
                    resampler = av.AudioResampler(format="flt", layout=c.streams.audio[0].layout.name)
                rate = c.streams.video[0].average_rate if c.streams.video else None
                frame_dur = 1.0 / float(rate) if rate else 1 / 30
                finished: set[str] = set()
                frame: Any
                for frame in c.decode(*streams):
                    if self.stop.is_set():
                        return
                    t = frame.time
                    kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
                    if t is None or t < p.start - 1e-6:
                        continue
                    if p.until is not None and t >= p.until - 1e-6:
                        finished.add(kind)
                        if len(finished) == len(streams):
                            break
                        continue
                    item: tuple[Any, ...]
                    if kind == "video":
                        img = frame.to_ndarray(format="rgb24")
                        item = ("video", t, frame_dur, img)
                    else:
                        assert resampler is not None
                        samples = resampled_samples(resampler, frame)
                        if samples is None:
                            continue
                        item = ("audio", t, samples.shape[0] / frame.sample_rate, (samples, frame.sample_rate))
                    if not self._put(item):
                        return
        except Exception as exc:  # reported to the stage and logged once
            self.error = _first_line(exc)
        finally:
            self._put(None)


@register_stage("replay")
class ReplayStage(Source):
    """Source of VideoFrame and AudioChunk messages from a file, paced by PTS."""

    Params = ReplayParams
    output_ports = ("video", "audio")

    @classmethod
    def check(cls, params: ReplayParams) -> MediaInfo:
        info = probe_media(params.path)
        if params.until is not None and params.until <= params.start:
            raise UsageError(f"--until ({params.until}) must be after --start ({params.start})")
        if params.start >= info.duration_s > 0:
            raise UsageError(f"{params.path}: --start {params.start} is past the end ({info.duration_s:.1f} s)")
        return info

    def __init__(self, ctx, params):  # type: ignore[no-untyped-def]
        super().__init__(ctx, params)
        self._decoder: _Decoder | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._first: Any = None

    async def start(self) -> None:
        """Open the file and decode ahead before the run starts, so pacing begins on time."""
        p: ReplayParams = self.params  # type: ignore[assignment]
        if not p.path:
            raise UsageError("replay: no input file given")
        self._queue = asyncio.Queue(maxsize=DECODE_AHEAD)
        self._decoder = _Decoder(p, asyncio.get_running_loop(), self._queue)
        self._decoder.start()
        self._first = await self._queue.get()
        if self._first is None:  # nothing to replay (the decoder ended at once)
            self._queue = None

    async def _next_items(self, heap: list[Any], order: itertools.count[int]) -> None:
        """Top up the reorder buffer (waiting only when it is empty); at the decoder's end,
        ``self._queue`` becomes None.

        PyAV hands packets over in file order, where a video frame can sit behind audio
        that plays later; releasing the earliest of the buffered items keeps each message
        on its own due time.
        """
        assert self._queue is not None
        while len(heap) < DECODE_AHEAD:
            if self._first is not None:
                item, self._first = self._first, None
            elif not heap:
                item = await self._queue.get()
            else:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if item is None:
                self._queue = None
                break
            heapq.heappush(heap, (item[1], next(order), item))

    async def produce(self) -> None:
        p: ReplayParams = self.params  # type: ignore[assignment]
        if self._decoder is None:
            await self.start()
        speed = self.ctx.speed
        t0_ns: int | None = None
        media0 = p.start
        end_media = p.start
        n_video = n_audio = 0
        heap: list[Any] = []
        order = itertools.count()
        while True:
            if self._queue is not None:
                await self._next_items(heap, order)
            if not heap:
                break
            _, _, (kind, t, dur, data) = heapq.heappop(heap)
            if t0_ns is None:
                t0_ns = self.clock.now_ns()
                media0 = min(t, p.start) if p.start > 0 else t
            if speed is not None:
                due = t0_ns + int((t - media0) / speed * 1e9)
                await self.clock.sleep_until_ns(due)
            cap = self.clock.now_ns()
            if kind == "video":
                await self.emit("video", VideoFrame(image=data, frame_index=n_video), t_media=t, t_capture_ns=cap)
                n_video += 1
            else:
                samples, rate = data
                await self.emit("audio", AudioChunk(samples=samples, sample_rate=rate, chunk_index=n_audio),
                                t_media=t, t_capture_ns=cap)
                n_audio += 1
            self.record_emit(cap, t)
            end_media = max(end_media, t + dur)
            self.recorder.media_extent_s = end_media - media0
        if self._decoder is not None and self._decoder.error:
            log.warning("replay %s: decoding stopped early: %s", p.path, self._decoder.error)

    async def close(self) -> None:
        dec, self._decoder = self._decoder, None
        if dec is not None:
            dec.stop.set()
            await asyncio.get_running_loop().run_in_executor(None, dec.join, 2.0)
