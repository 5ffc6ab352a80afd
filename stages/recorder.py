"""Recorder: writes the frames and audio it receives to an MP4 (H.264 + AAC).

``gamecopilot live --record F`` adds it beside the encoders, so a live session can be
replayed later through the same pipeline.  The file is a fragmented MP4 (a fragment per
keyframe, the index up front), so if the run dies mid-way everything up to the last
fragment still plays: nothing already written is lost.  Encoding runs on the stage's
worker thread, off the event loop.  Timestamps are the messages' media times, so what is
replayed lines up with the events of the live run.

An MP4's header names every track, and it is written with the first packet: a track added later
cannot be muxed.  Audio often comes before the first picture (a loopback stream opens faster than a
screen grab), so packets are held until both tracks exist, or for at most ``HOLD_S`` of media (a
source without audio, or without video, starts the file with what it has); a track that first shows
up after that is left out, with one warning.

If the group restarts, the file of the first run is kept and the recording goes on in a
second file beside it (``F.restart1.mp4``, then ``restart2``...): an MP4 cannot be reopened
for appending, and rewriting it would lose what was recorded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import AudioChunk, Envelope, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = 90_000
HOLD_S = 2.0  # media seconds packets wait for the other track before the file starts without it


class RecorderParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str | None = None
    option: str | None = "record"  # run option holding the path (set by --record)
    fps: int = 30  # nominal rate for the encoder; frames keep their own timestamps
    crf: int = 23
    audio_bitrate: int = 96_000


AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
AAC_FALLBACK_RATE = 48000


class _Writer:
    """The PyAV container; every method runs on the recorder's worker thread."""

    def __init__(self, path: str, params: RecorderParams) -> None:
        import av

        self.path = path
        self.params = params
        self.container = av.open(path, mode="w", format="mp4",
                                 options={"movflags": "frag_keyframe+empty_moov+default_base_moof"})
        self.video: Any = None
        self.audio: Any = None
        self.size: tuple[int, int] | None = None
        self.last_pts = -1
        self.audio_samples = 0
        self.audio_t0: float | None = None
        self.resampler: Any = None  # to an AAC rate, when the source's rate is not one
        self.held: list[Any] = []  # packets waiting for the header (see the module docstring)
        self.t_first: float | None = None
        self.started = False
        self.left_out: set[str] = set()

    def _mux(self, packets: list[Any], t_media: float) -> None:
        if self.started:
            for packet in packets:
                self.container.mux(packet)
            return
        self.held.extend(packets)
        if self.t_first is None:
            self.t_first = t_media
        if (self.video is not None and self.audio is not None) or t_media - self.t_first >= HOLD_S:
            self._start()

    def _start(self) -> None:
        """Write the header (with the tracks there are now) and what was held."""
        self.started = True
        held, self.held = self.held, []
        for packet in held:
            self.container.mux(packet)

    def _too_late(self, kind: str) -> bool:
        """A track whose first data comes after the file started: left out (the header is written)."""
        if not self.started:
            return False
        if kind not in self.left_out:
            self.left_out.add(kind)
            log.warning("recorder: the first %s came more than %g s after the recording started; %s leaves it out",
                        kind, HOLD_S, self.path)
        return True

    def _open_video(self, width: int, height: int) -> None:
        from fractions import Fraction

        w, h = width - width % 2, height - height % 2
        stream = self.container.add_stream("libx264", rate=self.params.fps,
                                           options={"crf": str(self.params.crf), "preset": "veryfast",
                                                    "g": str(2 * self.params.fps)})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, VIDEO_TIME_BASE)
        self.video, self.size = stream, (w, h)

    def write_video(self, image: np.ndarray, pixel_format: str, t_media: float) -> None:
        import av

        if self.video is None:
            if self._too_late("video"):
                return
            self._open_video(image.shape[1], image.shape[0])
        w, h = self.size  # type: ignore[misc]  # (set by _open_video just above; the attribute is Optional)
        fmt = {"rgb24": "rgb24", "bgra": "bgra", "gray": "gray"}[pixel_format]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=fmt)
        frame = frame.reformat(width=w, height=h, format="yuv420p")
        pts = round(t_media * VIDEO_TIME_BASE)
        if pts <= self.last_pts:
            return  # a timestamp must grow; a repeated one is a duplicate
        from fractions import Fraction

        frame.pts, frame.time_base = pts, Fraction(1, VIDEO_TIME_BASE)
        self.last_pts = pts
        self._mux(list(self.video.encode(frame)), t_media)

    def write_audio(self, samples: np.ndarray, rate: int, t_media: float) -> None:
        import av

        channels = samples.shape[1] if samples.ndim == 2 else 1
        layout = "mono" if channels == 1 else "stereo"
        if self.audio is None:
            if self._too_late("audio"):
                return
            # AAC has a fixed set of rates: the Atari console's 30720 Hz is resampled to 48 kHz
            out_rate = rate if rate in AAC_RATES else AAC_FALLBACK_RATE
            self.audio = self.container.add_stream("aac", rate=out_rate, layout=layout)
            self.audio.bit_rate = self.params.audio_bitrate
            self.audio_t0 = t_media
            if out_rate != rate:
                self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        data = samples.reshape(-1, channels)[:, : min(channels, 2)].T.astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp",
                                           layout="mono" if data.shape[0] == 1 else "stereo")
        frame.sample_rate = rate
        self._encode_audio(self.resampler.resample(frame) if self.resampler is not None else [frame], t_media)

    def _encode_audio(self, frames: list[Any], t_media: float) -> None:
        for frame in frames:
            frame.pts = self.audio_samples  # in samples of the stream's rate
            self.audio_samples += frame.samples
            self._mux(list(self.audio.encode(frame)), t_media)

    def close(self) -> None:
        if self.resampler is not None:
            self._encode_audio(self.resampler.resample(None), math.inf)  # what the resampler still holds
        if not self.started:
            self._start()
        for stream in (self.video, self.audio):
            if stream is not None:
                for packet in stream.encode(None):
                    self.container.mux(packet)
        self.container.close()


def continuation_path(path: Path, incarnation: int) -> Path:
    """Where a restarted recorder writes: ``F.mp4`` -> ``F.restart1.mp4`` (never an existing file)."""
    n = incarnation
    while True:
        candidate = path.with_name(f"{path.stem}.restart{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


@register_stage("recorder")
class RecorderStage(Stage[RecorderParams]):
    """Records VideoFrame and AudioChunk messages to an MP4 file."""

    Params = RecorderParams
    accepts = (VideoFrame, AudioChunk)

    def __init__(self, ctx: StageContext, params: RecorderParams) -> None:
        super().__init__(ctx, params)
        self._writer: _Writer | None = None
        self._path: str | None = None  # opened at the first message, not at start (see start)

    def output_path(self) -> str | None:
        p = self.params
        if p.path:
            return p.path
        value = self.ctx.options.get(p.option) if p.option else None
        return str(value) if value else None

    async def start(self) -> None:
        path = self.output_path()
        if path is None:
            return
        if not Path(path).resolve().parent.is_dir():
            raise UsageError(f"--record: directory {Path(path).parent} does not exist")
        if self.ctx.incarnation > 0 and Path(path).exists():
            path = str(continuation_path(Path(path), self.ctx.incarnation))
            log.warning("recorder: restarted; the recording goes on in %s", path)
        # The file is created by the first frame: a run that fails to start (another stage's
        # model does not load) leaves an earlier recording of that name as it was.
        self._path = path

    async def process(self, msg: Envelope) -> None:
        if self._writer is None:
            if self._path is None:
                return
            path, self._path = self._path, None
            self._writer = await self.run_blocking(_Writer, path, self.params)
        w = self._writer
        p = msg.payload
        if isinstance(p, VideoFrame):
            await self.run_blocking(w.write_video, p.image, p.pixel_format, msg.t_media)
        elif isinstance(p, AudioChunk):
            await self.run_blocking(w.write_audio, p.samples, p.sample_rate, msg.t_media)

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                await self.run_blocking(writer.close)
            except Exception as exc:
                log.warning("recorder: closing %s failed (%s); the file holds what was written", writer.path, exc)
