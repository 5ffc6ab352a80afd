"""Audio loudness per chunk (RMS in dBFS and peak), the cheapest audio signal."""

from __future__ import annotations

import math

import msgspec
import numpy as np

from copilot.messages import AudioChunk, Features
from copilot.registry import register_stage
from stages._analyzer import AnalyzerStage

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
class AudioLevelStage(AnalyzerStage[AudioLevelParams, AudioChunk]):
    Params = AudioLevelParams
    accepts = (AudioChunk,)
    output_ports = ("features",)

    def analyze(self, chunk: AudioChunk, t_media: float) -> Features:
        rms_db, peak_db = loudness_db(chunk.samples)
        return Features(name="loudness", values={"rms_db": round(rms_db, 2), "peak_db": round(peak_db, 2)})
