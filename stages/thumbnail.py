"""Thumbnail embedding: a tiny normalised picture of the frame, for similarity.

The frame is sampled on a stride, block-averaged to ``cols`` x ``rows`` cells per colour
channel, centred and L2-normalised: a 576-number vector (16 x 12 x 3) whose dot product
with another is a cosine similarity that ignores overall brightness shifts.  It is the
cheapest embedding that still tells "the same scene" from "a new screen", and the default
input of HiCo later.

Per frame it emits ``Features(name="thumb", vector=...)`` with ``novelty`` (1 - cosine to
the previous frame) and ``novelty_long`` (1 - the best cosine to a memory of frames kept
every ``memory_every_s`` over the last ``memory_s``, the newest ``memory_skip_s`` left out):
high when the screen looks like nothing seen recently (a game-over screen, a new level).
The numeric core is :func:`thumbnail_vector` and :class:`ThumbnailAnalyzer`.
"""

from __future__ import annotations

from collections import deque

import msgspec
import numpy as np

from copilot.messages import Features, VideoFrame
from copilot.registry import register_stage
from copilot.signals import MOTION, SCENE, Signal
from copilot.stage import StageContext
from stages._analyzer import AnalyzerStage
from stages.motion import rgb_view


class ThumbnailParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cols: int = 16
    rows: int = 12
    stride: int = 4
    memory_s: float = 10.0
    memory_every_s: float = 0.5
    memory_skip_s: float = 1.0


def thumbnail_vector(image: np.ndarray, cols: int = 16, rows: int = 12, stride: int = 4,
                     pixel_format: str = "rgb24") -> np.ndarray:
    """The centred, unit-norm ``rows * cols * 3`` float32 thumbnail of ``image``."""
    small = rgb_view(image[::stride, ::stride], pixel_format)
    h, w = small.shape[:2]
    bh, bw = max(1, h // rows), max(1, w // cols)
    r, c = min(rows, h // bh), min(cols, w // bw)
    crop = small[: r * bh, : c * bw].astype(np.float32)
    cells = crop.reshape(r, bh, c, bw, 3).mean(axis=(1, 3))
    if (r, c) != (rows, cols):  # a frame smaller than the grid: pad by edge values
        cells = np.pad(cells, ((0, rows - r), (0, cols - c), (0, 0)), mode="edge")
    v = cells.reshape(-1)
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return (v / n if n > 1e-6 else np.zeros_like(v)).astype(np.float32)


class ThumbnailAnalyzer:
    """Thumbnail vectors plus short- and long-range novelty."""

    def __init__(self, *, cols: int = 16, rows: int = 12, stride: int = 4, memory_s: float = 10.0,
                 memory_every_s: float = 0.5, memory_skip_s: float = 1.0) -> None:
        self.cols, self.rows, self.stride = cols, rows, stride
        self.memory_s, self.every, self.skip = memory_s, memory_every_s, memory_skip_s
        self._prev: np.ndarray | None = None
        self._memory: deque[tuple[float, np.ndarray]] = deque()

    def update(self, image: np.ndarray, t: float, pixel_format: str = "rgb24") -> tuple[np.ndarray, dict[str, float]]:
        v = thumbnail_vector(image, self.cols, self.rows, self.stride, pixel_format)
        novelty = 0.0 if self._prev is None else max(0.0, 1.0 - float(v @ self._prev))
        mem = self._memory
        while mem and t - mem[0][0] > self.memory_s:
            mem.popleft()
        old = [m for ts, m in mem if t - ts >= self.skip]
        novelty_long = 0.0
        if old:
            novelty_long = max(0.0, 1.0 - float(np.max(np.stack(old) @ v)))
        if not mem or t - mem[-1][0] >= self.every:
            mem.append((t, v))
        self._prev = v
        return v, {"novelty": round(novelty, 6), "novelty_long": round(novelty_long, 6)}


@register_stage("thumbnail")
class ThumbnailStage(AnalyzerStage[ThumbnailParams, VideoFrame]):
    """A 16x12 colour thumbnail embedding per frame: ``Features(name="thumb", vector=...)``."""

    Params = ThumbnailParams
    accepts = (VideoFrame,)
    output_ports = ("features",)
    signals = (
        Signal("thumb.novelty", MOTION, floor=0.05),
        Signal("thumb.novelty_long", SCENE, floor=0.2),  # a screen not seen lately
    )

    def __init__(self, ctx: StageContext, params: ThumbnailParams) -> None:
        super().__init__(ctx, params)
        p = params
        self.analyzer = ThumbnailAnalyzer(cols=p.cols, rows=p.rows, stride=p.stride, memory_s=p.memory_s,
                                          memory_every_s=p.memory_every_s, memory_skip_s=p.memory_skip_s)

    def analyze(self, frame: VideoFrame, t_media: float) -> Features:
        vec, values = self.analyzer.update(frame.image, t_media, frame.pixel_format)
        return Features(name="thumb", values=values, vector=vec)
