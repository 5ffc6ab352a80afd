"""Log-mel band energies of the audio, every ``hop_s``: what a sound *is*, for the event scorer.

The audio_features encoder says *when* something sounds (onsets, loudness rises, a new timbre); the
learned event scorer also needs to tell one sound from another (the low rumble of an explosion, the
falling tune of a death, the chime of a reward).  This encoder gives it the spectrum's shape at a
coarse, cheap resolution: ``bands`` triangular mel bands between ``fmin`` and ``fmax``, in dB,
over each ``hop_s`` block of samples (mono), plus the block's total level ``db``.

``Features(name="mel", values={"b00": dB, ..., "b15": dB, "db": dB})``, one per hop (a chunk
shorter than a hop adds to the next).  Nothing here feeds the TriggerDetector: these values are
read by the event scorer's window (``engines/event_scorer.py``), so the stage declares no signal.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

from copilot.messages import AudioChunk, Features
from copilot.registry import register_stage
from copilot.stage import StageContext
from stages._analyzer import AnalyzerStage

FLOOR_DB = -100.0


class AudioMelParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    hop_s: Annotated[float, msgspec.Meta(ge=0.02, le=1.0)] = 0.1
    bands: Annotated[int, msgspec.Meta(ge=4, le=64)] = 16
    fmin: Annotated[float, msgspec.Meta(ge=0.0)] = 60.0
    fmax: Annotated[float, msgspec.Meta(gt=0.0)] = 8000.0


def band_names(bands: int) -> list[str]:
    return [f"b{i:02d}" for i in range(bands)]


def mel_filterbank(rate: int, nfft: int, bands: int, fmin: float, fmax: float) -> np.ndarray:
    """``(bands, nfft // 2 + 1)`` triangular filters evenly spaced on the mel scale, each summing to 1."""
    def mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)

    top = min(fmax, rate / 2.0)
    edges_mel = np.linspace(mel(fmin), mel(max(top, fmin + 1.0)), bands + 2)
    edges_hz = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(nfft, 1.0 / rate)
    bank = np.zeros((bands, freqs.size), np.float64)
    for b in range(bands):
        lo, mid, hi = edges_hz[b], edges_hz[b + 1], edges_hz[b + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        tri = np.clip(np.minimum(up, down), 0.0, None)
        if not tri.any():  # narrower than a bin: take the nearest bin
            tri[int(np.argmin(np.abs(freqs - mid)))] = 1.0
        bank[b] = tri / tri.sum()
    return bank.astype(np.float32)


class MelAnalyzer:
    """Collects mono samples into ``hop_s`` blocks; each block's band energies in dB."""

    def __init__(self, hop_s: float = 0.1, bands: int = 16, fmin: float = 60.0, fmax: float = 8000.0) -> None:
        self.hop_s, self.bands, self.fmin, self.fmax = hop_s, bands, fmin, fmax
        self.names = band_names(bands)
        self._rate = 0
        self._hop = 0
        self._bank = np.zeros((0, 0), np.float32)
        self._window = np.zeros(0, np.float32)
        self._buf = np.zeros(0, np.float32)

    def _setup(self, rate: int) -> None:
        self._rate = rate
        self._hop = max(64, round(rate * self.hop_s))
        self._bank = mel_filterbank(rate, self._hop, self.bands, self.fmin, self.fmax)
        self._window = np.hanning(self._hop).astype(np.float32)
        self._buf = np.zeros(0, np.float32)

    def update(self, samples: np.ndarray, sample_rate: int) -> dict[str, float] | None:
        """Feed one chunk; the newest complete block's values, or None while a block fills."""
        if sample_rate != self._rate:
            self._setup(sample_rate)
        x = samples.astype(np.float32, copy=False)
        mono = x.mean(axis=1) if x.ndim == 2 else x
        self._buf = np.concatenate([self._buf, mono])
        if self._buf.size < self._hop:
            return None
        n = self._buf.size // self._hop
        block = self._buf[(n - 1) * self._hop: n * self._hop]  # several blocks in one chunk: the newest
        self._buf = self._buf[n * self._hop:]
        power = np.square(np.abs(np.fft.rfft(block * self._window))) / self._hop
        energies = self._bank @ power.astype(np.float32)
        db = 10.0 * np.log10(np.maximum(energies, 1e-10))
        out = {name: round(max(FLOOR_DB, float(v)), 2) for name, v in zip(self.names, db, strict=True)}
        out["db"] = round(max(FLOOR_DB, 10.0 * float(np.log10(max(float(np.mean(np.square(block))), 1e-10)))), 2)
        return out


@register_stage("audio_mel")
class AudioMelStage(AnalyzerStage[AudioMelParams, AudioChunk]):
    """Log-mel band energies per ``hop_s``: ``Features(name="mel")`` for the event scorer."""

    Params = AudioMelParams
    accepts = (AudioChunk,)

    def __init__(self, ctx: StageContext, params: AudioMelParams) -> None:
        super().__init__(ctx, params)
        self.analyzer = MelAnalyzer(params.hop_s, params.bands, params.fmin, params.fmax)

    def analyze(self, chunk: AudioChunk, t_media: float) -> Features | None:
        values = self.analyzer.update(chunk.samples, chunk.sample_rate)
        return None if values is None else Features(name="mel", values=values)

