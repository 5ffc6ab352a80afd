"""Clip embedding stage: VideoMAE over the last few seconds, every couple of seconds.

A frame embedding says what the screen shows; a clip embedding says what is going on (a chase, a
fall, a menu being scrolled).  This stage keeps a ring of frames sampled every ``sample_every_s``
of media (0.25 s: VideoMAE's 16 frames then cover ~4 s) and, every ``every_s`` (2 s) once the
ring is full, encodes the newest 16 as one clip (:mod:`engines.videomae`) and emits::

    Features(name="videomae", vector=<unit embedding>, values={"clip_s": <span of the clip, s>})

on ``features``, stamped with the media time of the clip's newest frame.  HiCo takes it as its
source (``hico`` with ``source: videomae``): one unit vector per message, in media-time order, of
one width.  Frames are shrunk to the model's input size as they are sampled (a few milliseconds
on the event loop), so the ring holds 16 small frames whatever the capture size.

The encoding runs on the stage's worker thread, one clip at a time; a clip falling due while the
previous one is still encoding is dropped and counted (``busy``): the model is slower than real
time and the next clip, ``every_s`` later, covers most of it anyway.  In a lossless run
(``--speed max``) the stage waits for each clip instead, so every clip is encoded.  Notes:
``clips`` encoded, ``frames_sampled``; timing ``encode_ms``.  The engine is made by
:func:`load_engine` (the seam tests replace).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import Envelope, Features, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from engines.model_registry import DEFAULT_MODELS
from stages._placed import check_export, placed_params, report_device
from stages.motion import rgb_view

FEATURES_NAME = "videomae"


class ClipEmbedParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str = DEFAULT_MODELS["videomae"]  # a model id (Hugging Face cache) or a local directory
    runtime: str = "auto"  # auto | torch | onnxruntime
    device: str = "auto"  # auto | cpu | cuda
    onnx_dir: str | None = None  # the files of `gamecopilot export videomae` (runtime onnxruntime)
    allow_download: bool = False
    threads: int = 0  # intra-op threads of ONNX Runtime or torch (torch: process-wide); 0: one per core
    sample_every_s: float = 0.25  # media seconds between the frames of a clip (16 frames: ~4 s)
    every_s: float = 2.0  # media seconds between clips

    def __post_init__(self) -> None:
        if self.runtime not in ("auto", "torch", "onnxruntime"):
            raise ValueError(f"runtime must be auto, torch or onnxruntime, got {self.runtime!r}")
        if self.sample_every_s <= 0 or self.every_s <= 0:
            raise ValueError("sample_every_s and every_s must be > 0")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def load_engine(p: ClipEmbedParams) -> Any:
    """The VideoMAE engine the params ask for (a seam tests replace)."""
    from engines.videomae import load_videomae

    return load_videomae(p.model, runtime=p.runtime, device=p.device, allow_download=p.allow_download,
                         onnx_dir=None if p.onnx_dir is None else Path(p.onnx_dir), threads=p.threads)


@register_stage("clip_embed")
class ClipEmbedStage(Stage[ClipEmbedParams]):
    """VideoMAE clip embeddings of the last ~4 s every ``every_s``, as ``Features`` named ``videomae``."""

    Params = ClipEmbedParams
    accepts = (VideoFrame,)
    output_ports: ClassVar[tuple[str, ...]] = ("features",)

    @classmethod
    def check(cls, params: ClipEmbedParams) -> None:
        """The model (or the ONNX export that replaces it) exists before anything runs (no download unless allowed)."""
        from engines.model_registry import resolve_model, stage_hint

        if params.onnx_dir is not None and not Path(params.onnx_dir).is_dir():
            raise UsageError(f"clip_embed: onnx_dir {params.onnx_dir} is not a directory")
        exported = check_export(params, "clip_embed", "videomae")
        if not params.allow_download and not (exported and params.runtime != "torch"):
            resolve_model(params.model, hint=stage_hint("clip_embed"))

    def __init__(self, ctx: StageContext, params: ClipEmbedParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.engine: Any = None
        self.ring: deque[tuple[float, np.ndarray]] = deque()
        self._next_sample = -math.inf
        self._next_clip: float | None = None
        self._last_t = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.engine = await self.run_blocking(load_engine, placed_params(self, self.p))
        report_device(self, self.engine)
        eng = self.engine
        self.ring = deque(maxlen=int(eng.num_frames))
        self.log.info("%s on %s (%s, %d frames every %g s, pooling %s)%s", getattr(eng, "label", eng.model_id),
                      eng.device, eng.runtime, eng.num_frames, self.p.sample_every_s, getattr(eng, "pooling", "?"),
                      f": {eng.fallback}" if getattr(eng, "fallback", "") else "")
        self.recorder.note(f"runtime_{eng.runtime}_{eng.device}")

    async def process(self, msg: Envelope) -> None:
        t = msg.t_media
        if t < self._last_t - 1.0:  # the media went back (a new replay): start afresh
            self.ring.clear()
            self._next_sample, self._next_clip = -math.inf, None
        self._last_t = t
        if self.engine is None or t < self._next_sample - 1e-9:
            return
        step = self.p.sample_every_s
        if self._next_sample == -math.inf:
            self._next_sample = t
        self._next_sample += step * max(1, math.floor((t - self._next_sample) / step) + 1)
        frame = msg.payload_as(VideoFrame)
        self.ring.append((t, self.engine.prepare_frames(rgb_view(frame.image, frame.pixel_format))))
        self.recorder.note("frames_sampled")
        if len(self.ring) < (self.ring.maxlen or 0):
            return
        if self._next_clip is None:
            self._next_clip = t
        if t < self._next_clip - 1e-9:
            return
        every = self.p.every_s
        self._next_clip += every * max(1, math.floor((t - self._next_clip) / every) + 1)
        times = [ft for ft, _ in self.ring]
        clip = np.stack([img for _, img in self.ring])[None]
        if self.ctx.speed is None:  # lossless: every clip, in turn
            await self._encode(clip, times, msg)
        elif self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._encode(clip, times, msg))
        else:
            self.recorder.drop("busy")

    async def _encode(self, clip: np.ndarray, times: list[float], parent: Envelope) -> None:
        t0 = time.perf_counter_ns()
        try:
            emb = await self.run_blocking(self.engine.encode_clips, clip)
        except Exception:
            self.recorder.note("failures")
            self.log.exception("clip_embed: VideoMAE failed on the clip ending at %.2f s", times[-1])
            return
        self.recorder.observe_extra("encode_ms", (time.perf_counter_ns() - t0) / 1e6)
        self.recorder.note("clips")
        vec = np.ascontiguousarray(np.asarray(emb, dtype=np.float32)[0])
        await self.emit("features", Features(name=FEATURES_NAME, vector=vec,
                                             values={"clip_s": round(times[-1] - times[0], 4)}),
                        parent=parent, t_media=times[-1])

    async def flush(self) -> None:
        if self._task is not None:
            await self._task

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
