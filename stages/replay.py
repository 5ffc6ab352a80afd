"""Replay a recording through the pipeline at real-time speed (or faster).

PyAV decodes video and audio on two worker threads, one per stream, each a few items ahead;
the event loop merges the two by media time and releases each item when its PTS is due
(``speed`` 1 or 2), or at once (``speed`` ``max``, with lossless links so nothing is dropped).
One decoder per stream, because a file's packets need not be interleaved closely: a muxer
may write a second of video before the audio that plays with it, and a single decoder in
file order would then hand that audio over (and the pipeline would hear it) a second late.
A frame's ``t_capture_ns`` is the moment it is released, which is when a live capture would
have produced it, so latency figures mean the same thing in replay and live runs.

After a restart of its group the replay goes on as a live source would: at real-time speed
from where the run's clock says the media is now, at ``max`` speed from as far as it had got
(``StageContext.resume_media_s``), never from the start again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from copilot.errors import UsageError, first_line
from copilot.messages import AudioChunk, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Source, StageContext

log = logging.getLogger(__name__)

DECODE_AHEAD = 8  # decoded items queued per stream


class ReplayParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    start: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # media seconds
    until: Annotated[float, msgspec.Meta(gt=0)] | None = None
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
        raise UsageError(f"{p}: not a readable media file ({first_line(exc)})") from exc


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
    """Decodes one stream (``kind``) on its own thread into a bounded queue, so pacing never
    waits on decoding; ``None`` in the queue ends the stream."""

    def __init__(self, params: ReplayParams, kind: str, loop: asyncio.AbstractEventLoop):
        super().__init__(name=f"replay-decode-{kind}", daemon=True)
        self.params = params
        self.kind = kind
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=DECODE_AHEAD)
        self.stop = threading.Event()
        self.error: str | None = None
        self.skipped = 0  # packets that did not decode (corrupt data), skipped
        self.skip_error: str | None = None

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
                streams = c.streams.video if self.kind == "video" else c.streams.audio
                if not streams:  # the file has no such stream: it ends at once
                    return
                stream: Any = streams[0]
                stream.thread_type = "AUTO"
                if p.start > 0:
                    c.seek(int(p.start * 1e6), any_frame=False, backward=True)
                resampler = None
                if self.kind == "audio":
                    resampler = av.AudioResampler(format="flt", layout=stream.layout.name)
                rate = c.streams.video[0].average_rate if c.streams.video else None
                frame_dur = 1.0 / float(rate) if rate else 1 / 30
                for frame in self._frames(c, stream):
                    if self.stop.is_set():
                        return
                    t = frame.time
                    if t is None or t < p.start - 1e-6:
                        continue
                    if p.until is not None and t >= p.until - 1e-6:
                        break
                    item: tuple[Any, ...]
                    if resampler is None:
                        item = ("video", t, frame_dur, frame.to_ndarray(format="rgb24"))
                    else:
                        samples = resampled_samples(resampler, frame)
                        if samples is None:
                            continue
                        item = ("audio", t, samples.shape[0] / frame.sample_rate, (samples, frame.sample_rate))
                    if not self._put(item):
                        return
        except Exception as exc:  # reported to the stage and logged once
            self.error = first_line(exc)
        finally:
            self._put(None)

    def _frames(self, container: Any, stream: Any) -> Iterator[Any]:
        """The stream's frames, packet by packet: a packet of corrupt data is skipped and
        counted (the decoder picks up again at the next good one, as ffmpeg does), where
        ``container.decode`` would end the whole stream at the first bad byte."""
        import av

        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:  # type: ignore[attr-defined]  # (AAC says EPERM on garbage)
                self.skipped += 1
                self.skip_error = self.skip_error or first_line(exc)
                continue
            yield from frames


@register_stage("replay")
class ReplayStage(Source[ReplayParams]):
    """Source of VideoFrame and AudioChunk messages from a file, paced by PTS."""

    Params = ReplayParams
    output_ports = ("video", "audio")

    @classmethod
    def check(cls, params: ReplayParams) -> MediaInfo:
        if not params.path:
            raise UsageError("the replay stage has no file to read: give one with -i FILE "
                             "(or its path: in the pipeline)")
        info = probe_media(params.path)
        if params.until is not None and params.until <= params.start:
            raise UsageError(f"--until ({params.until}) must be after --start ({params.start})")
        if params.start >= info.duration_s > 0:
            raise UsageError(f"{params.path}: --start {params.start} is past the end ({info.duration_s:.1f} s)")
        return info

    def __init__(self, ctx: StageContext, params: ReplayParams) -> None:
        super().__init__(ctx, params)
        self._decoders: dict[str, _Decoder] = {}  # by stream kind
        self._heads: dict[str, Any] = {}  # the next decoded item of each stream not yet ended
        self.resumed_at: float | None = None  # media time a restarted replay went on from

    async def start(self) -> None:
        """Open the file and decode ahead before the run starts, so pacing begins on time."""
        p = self.params
        if not p.path:
            raise UsageError("replay: no input file given")
        resumed = self.resume_media_s()
        if resumed is not None:
            self.resumed_at = p.start + resumed
            log.warning("replay %s: restarted; going on from %.2f s", p.path, self.resumed_at)
        decode = p if self.resumed_at is None else msgspec.structs.replace(p, start=self.resumed_at)
        loop = asyncio.get_running_loop()
        kinds = [k for k, on in (("video", p.video), ("audio", p.audio)) if on]
        self._decoders = {kind: _Decoder(decode, kind, loop) for kind in kinds}
        for dec in self._decoders.values():
            dec.start()
        for dec in self._decoders.values():
            item = await dec.queue.get()
            if item is not None:
                self._heads[dec.kind] = item
        self._check_something_decodes()

    def _check_something_decodes(self) -> None:
        """A file whose every packet is corrupt is bad input.  Found here, before the run starts
        (every stream ended without a frame), it costs no earlier output file."""
        skipped = sum(dec.skipped for dec in self._decoders.values())
        if not self._heads and skipped:
            raise UsageError(f"{self.params.path}: nothing in it decodes ({skipped} packets of corrupt data)")

    async def _pop_earliest(self) -> Any:
        """The earliest of the streams' next items (None when all have ended); its stream's
        next item is awaited in its place, so each stream is read in its own order and an
        item is released only once every stream has shown it holds nothing earlier."""
        if not self._heads:
            return None
        kind = min(self._heads, key=lambda k: (self._heads[k][1], k != "audio"))
        item = self._heads.pop(kind)
        nxt = await self._decoders[kind].queue.get()
        if nxt is not None:
            self._heads[kind] = nxt
        return item

    async def produce(self) -> None:
        p = self.params
        if not self._decoders:
            await self.start()
        speed = self.ctx.speed
        # a restarted replay is paced on the run's clock, as before the restart
        t0_ns = self.ctx.session_start_ns if self.resumed_at is not None else None
        media0 = p.start
        end_media = p.start
        n_video = n_audio = 0
        while (item := await self._pop_earliest()) is not None:
            kind, t, dur, data = item
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
        for dec in self._decoders.values():
            if dec.skipped:
                self.recorder.dropped[f"corrupt_{dec.kind}_packets"] += dec.skipped
                log.warning("replay %s: skipped %d %s packet%s that did not decode (%s)", p.path, dec.skipped,
                            dec.kind, "" if dec.skipped == 1 else "s", dec.skip_error)
            if dec.error:
                log.warning("replay %s: decoding %s stopped early: %s", p.path, dec.kind, dec.error)

    async def close(self) -> None:
        decoders, self._decoders = list(self._decoders.values()), {}
        self._heads.clear()
        for dec in decoders:
            dec.stop.set()
        loop = asyncio.get_running_loop()
        for dec in decoders:
            await loop.run_in_executor(None, dec.join, 2.0)
