"""Motion and scene-change encoders: how much, and how, the picture changed.

Two stages live here.  ``frame_diff`` (:class:`FrameDiffStage`) is the original cheapest
signal: the mean absolute difference of a strided grayscale thumbnail and the fraction of
its pixels that changed.  ``motion`` (:class:`MotionStage`) is what the default pipeline
runs: the same difference plus the cues that separate routine movement from a moment worth
a look, all from one strided thumbnail (a millisecond or two on 640x480):

* ``diff`` / ``changed``: mean absolute luma difference and changed-pixel fraction;
* ``hist``: colour-histogram distance to the previous frame (a cut, a palette change);
* ``flash``: the jump of mean brightness (explosions, hit flashes, screen blinks);
* ``reset``: changed fraction against the frame about half a second ago, high when the
  whole screen is redrawn (a new level, a respawn, a game-over screen);
* ``still``: 1.0 when the frame is an exact duplicate of the previous one;
* ``vanish``: the share of the picture's foreground (pixels away from the background, the
  most common luma) that went away and stayed away: 1 - (foreground now, the most of the
  last few frames, so sprite flicker does not count) / (the most foreground in the second
  before ``reset_lag_s`` ago).  Enemies cleared at a death, a player wiped out, the
  playfield emptied for a respawn: routine movement keeps the foreground constant.

The numeric core is :class:`MotionAnalyzer`, a plain class a test can feed frames to.
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


class FrameDiffParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stride: int = 4
    threshold: int = 12


def gray_thumbnail(image: np.ndarray, stride: int, pixel_format: str = "rgb24") -> np.ndarray:
    """Strided luma-ish thumbnail as int16 (cheap: no colour conversion, no resampling).

    ``pixel_format`` names the channel order (``rgb24`` or ``bgra``); the weights are symmetric
    in red and blue, so both give the same thumbnail.
    """
    small = image[::stride, ::stride]
    if small.ndim == 2:
        return small.astype(np.int16)
    # (R + 2G + B) / 4: integer approximation of luma, no float work on the hot path.  R and B
    # weigh the same, so RGB and BGRA need no reordering; the sums are taken straight from the
    # strided channel views into one int16 array (three times faster than widening the whole
    # RGB thumbnail first, and every frame of every video encoder goes through here)
    out = np.add(small[..., 0], small[..., 2], dtype=np.int16)
    out += small[..., 1]
    out += small[..., 1]
    out >>= 2
    return out


def rgb_view(image: np.ndarray, pixel_format: str = "rgb24") -> np.ndarray:
    """An RGB view of ``image`` (BGRA reordered without a copy; gray stacked to 3 channels)."""
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if pixel_format == "bgra":
        return image[..., 2::-1]
    return image[..., :3]


def colour_histogram(rgb_small: np.ndarray, bits: int = 2) -> np.ndarray:
    """Normalised joint RGB histogram with ``2**bits`` levels per channel (64 bins for 2)."""
    shift = 8 - bits
    q = (rgb_small >> shift).astype(np.int32)
    idx = (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=1 << (3 * bits)).astype(np.float32)
    return hist / max(1.0, float(hist.sum()))


class MotionParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stride: int = 4  # sample every 4th pixel each way: 160x120 of a 640x480 frame
    threshold: int = 12  # luma change that counts a pixel as changed
    reset_lag_s: float = 0.5  # ``reset`` compares with the frame this long ago


class MotionAnalyzer:
    """Per-frame motion signals from consecutive frames (see the module docstring)."""

    def __init__(self, stride: int = 4, threshold: int = 12, reset_lag_s: float = 0.5) -> None:
        self.stride = max(1, stride)
        self.threshold = threshold
        self.reset_lag_s = reset_lag_s
        self._prev: np.ndarray | None = None
        self._prev_hist: np.ndarray | None = None
        self._prev_mean = 0.0
        self._past: deque[tuple[float, np.ndarray]] = deque()
        self._fg: deque[tuple[float, float]] = deque()  # (t, foreground fraction)

    def update(self, image: np.ndarray, t: float, pixel_format: str = "rgb24") -> dict[str, float]:
        gray = gray_thumbnail(image, self.stride, pixel_format)
        small = rgb_view(image[:: self.stride, :: self.stride], pixel_format)
        hist = colour_histogram(small)
        mean = float(gray.mean())
        prev = self._prev
        out = {"diff": 0.0, "changed": 0.0, "hist": 0.0, "flash": 0.0, "reset": 0.0, "still": 0.0, "vanish": 0.0}
        if prev is not None and prev.shape == gray.shape and self._prev_hist is not None:
            d = np.abs(gray - prev)
            n_changed = int(np.count_nonzero(d > self.threshold))
            out["diff"] = float(d.mean()) / 255.0
            out["changed"] = n_changed / d.size
            out["hist"] = 0.5 * float(np.abs(hist - self._prev_hist).sum())
            out["flash"] = abs(mean - self._prev_mean) / 255.0
            out["still"] = 1.0 if not d.any() else 0.0
        # the frame about reset_lag_s ago: keep a short queue of thumbnails
        while len(self._past) > 1 and t - self._past[1][0] >= self.reset_lag_s:
            self._past.popleft()
        if self._past and self._past[0][1].shape == gray.shape and t - self._past[0][0] >= self.reset_lag_s * 0.5:
            old = self._past[0][1]
            out["reset"] = float(np.count_nonzero(np.abs(gray - old) > self.threshold)) / gray.size
        self._past.append((t, gray))
        out["vanish"] = self._vanish(gray, t)
        self._prev, self._prev_hist, self._prev_mean = gray, hist, mean
        return {k: round(v, 6) for k, v in out.items()}

    def _vanish(self, gray: np.ndarray, t: float) -> float:
        """Lasting loss of foreground (see the module docstring)."""
        counts = np.bincount(np.clip(gray, 0, 255).ravel(), minlength=256)
        bg = int(np.argmax(counts))
        fg = float(np.count_nonzero(np.abs(gray - bg) > self.threshold)) / gray.size
        self._fg.append((t, fg))
        lag = self.reset_lag_s
        while self._fg and self._fg[0][0] < t - lag - 1.0:
            self._fg.popleft()
        before = [f for ts, f in self._fg if ts <= t - lag]
        recent = [f for ts, f in self._fg if ts > t - 0.11]  # about 3 frames at 30 fps
        if not before or not recent:
            return 0.0
        ref = max(before)
        return max(0.0, 1.0 - max(recent) / ref) if ref > 0.002 else 0.0


@register_stage("frame_diff")
class FrameDiffStage(AnalyzerStage[FrameDiffParams, VideoFrame]):
    """The original minimal motion signal (``diff`` and ``changed`` only)."""

    Params = FrameDiffParams
    accepts = (VideoFrame,)
    output_ports = ("features",)
    signals = (Signal("motion.diff", MOTION, floor=0.01),)

    def __init__(self, ctx: StageContext, params: FrameDiffParams) -> None:
        super().__init__(ctx, params)
        self._prev: np.ndarray | None = None

    def analyze(self, frame: VideoFrame, t_media: float) -> Features:
        p = self.params
        thumb = gray_thumbnail(frame.image, p.stride, frame.pixel_format)
        if self._prev is None or self._prev.shape != thumb.shape:
            diff, changed = 0.0, 0.0
        else:
            d = np.abs(thumb - self._prev)
            diff = float(d.mean()) / 255.0
            changed = float(np.count_nonzero(d > p.threshold)) / d.size
        self._prev = thumb
        return Features(name="motion", values={"diff": round(diff, 6), "changed": round(changed, 6)})


@register_stage("motion")
class MotionStage(AnalyzerStage[MotionParams, VideoFrame]):
    """Motion, colour-histogram, flash and reset signals per frame: ``Features(name="motion")``."""

    Params = MotionParams
    accepts = (VideoFrame,)
    output_ports = ("features",)
    signals = (
        Signal("motion.diff", MOTION, floor=0.01),  # routine movement: weighted low by default
        # big picture changes: a cut, a flash, the whole screen redrawn
        Signal("motion.hist", SCENE, floor=0.2),
        Signal("motion.flash", SCENE, floor=0.03),
        Signal("motion.reset", SCENE, floor=0.5),
        Signal("motion.vanish", SCENE, floor=0.08),  # a lasting share of the foreground went away (enemies cleared)
    )

    def __init__(self, ctx: StageContext, params: MotionParams) -> None:
        super().__init__(ctx, params)
        self.analyzer = MotionAnalyzer(params.stride, params.threshold, params.reset_lag_s)

    def analyze(self, frame: VideoFrame, t_media: float) -> Features:
        return Features(name="motion", values=self.analyzer.update(frame.image, t_media, frame.pixel_format))
