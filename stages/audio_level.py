"""Audio loudness per chunk (RMS in dBFS and peak), the cheapest audio signal."""

from __future__ import annotations

import math

import msgspec
import numpy as np

from copilot.messages import AudioChunk, Envelope, Features
from copilot.registry import register_stage
from copilot.stage import Stage

SILENCE_DB = -120.0


class AudioLevelParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def loudness_db(samples: np.ndarray) -> tuple[float, float]:
    """RMS and peak of float samples in [-1, 1], in dBFS (floored at -120)."""
    if samples.size == 0:
        return SILENCE_DB, SILENCE_DB
    x = samples.astype(np.float32, copy=False)
    rms = float(np.sqrt(np.mean(np.square(x))))
    peak = float(np.max(np.abs(x)))
    to_db = lambda v: max(SILENCE_DB, 20 * math.log10(v)) if v > 0 else SILENCE_DB  # noqa: E731
    return to_db(rms), to_db(peak)


@register_stage("audio_level")
class AudioLevelStage(Stage):
    Params = AudioLevelParams
    output_ports = ("features",)

    async def process(self, msg: Envelope) -> None:
        chunk = msg.payload
        if not isinstance(chunk, AudioChunk):
            return
        rms_db, peak_db = loudness_db(chunk.samples)
        await self.emit(
            "features",
            Features(name="loudness", values={"rms_db": round(rms_db, 2), "peak_db": round(peak_db, 2)}),
            parent=msg,
        )
