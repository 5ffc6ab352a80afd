"""Frame-difference encoder: how much the picture changed since the previous frame.

The cheapest visual signal there is (about a millisecond on a 640x480 frame): a strided
grayscale thumbnail, its mean absolute difference from the previous one, and the fraction
of thumbnail pixels that changed by more than ``threshold``.
"""

from __future__ import annotations

import msgspec
import numpy as np

from copilot.messages import Envelope, Features, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Stage


class FrameDiffParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stride: int = 4
    threshold: int = 12


def gray_thumbnail(image: np.ndarray, stride: int, pixel_format: str = "rgb24") -> np.ndarray:
    """Strided luma-ish thumbnail as int16 (cheap: no colour conversion, no resampling)."""
    small = image[::stride, ::stride]
    if small.ndim == 2:
        return small.astype(np.int16)
    if pixel_format == "bgra":
        small = small[..., 2::-1]
    # (R + 2G + B) / 4: integer approximation of luma, no float work on the hot path
    s = small[..., :3].astype(np.int16)
    return (s[..., 0] + 2 * s[..., 1] + s[..., 2]) >> 2


@register_stage("frame_diff")
class FrameDiffStage(Stage):
    Params = FrameDiffParams
    output_ports = ("features",)

    def __init__(self, ctx, params):  # type: ignore[no-untyped-def]
        super().__init__(ctx, params)
        self._prev: np.ndarray | None = None

    async def process(self, msg: Envelope) -> None:
        frame = msg.payload
        if not isinstance(frame, VideoFrame):
            return
        p: FrameDiffParams = self.params  # type: ignore[assignment]
        thumb = gray_thumbnail(frame.image, p.stride, frame.pixel_format)
        if self._prev is None or self._prev.shape != thumb.shape:
            diff, changed = 0.0, 0.0
        else:
            d = np.abs(thumb - self._prev)
            diff = float(d.mean()) / 255.0
            changed = float(np.count_nonzero(d > p.threshold)) / d.size
        self._prev = thumb
        await self.emit(
            "features",
            Features(name="motion", values={"diff": round(diff, 6), "changed": round(changed, 6)}),
            parent=msg,
        )
