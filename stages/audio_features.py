"""Audio features: loudness and onsets by spectral flux, against adaptive baselines.

Game sound announces most moments: a hit, an explosion, a jingle.  Per hop of 20 ms this
encoder takes the log-compressed magnitude spectrum and its positive difference from the
previous hop (spectral flux: new energy appearing in some band, which an onset is).  The
flux is then judged against its own recent past (a running median plus a multiple of the
running mean absolute deviation over ``baseline_s``, with an absolute floor so the hiss of
near silence never counts), which gives ``onset``: how far above its baseline the flux is
(0 when under it).  Loudness is the RMS and peak in dBFS, and ``rise`` is the RMS against
the median of the last ``baseline_s`` (a sound starting out of silence rises a lot).

``novelty`` says whether the sound is new rather than loud: how unlike anything heard in the
last ``novelty_s`` the shape of a loud hop's spectrum is (:class:`TimbreMemory`).  A game
repeats its shots and footsteps all the time; a death tune or a bonus jingle is heard
rarely.  On the training pool this signal, as a family of its own in the TriggerDetector,
found deaths that only sound announces.

One ``Features(name="audio")`` per input chunk carries the strongest hop of the chunk:
``rms_db``, ``peak_db``, ``flux``, ``onset``, ``rise`` and ``offset`` (seconds from the
chunk's start to that hop, so the detector can place the onset precisely), and the chunk's
highest ``novelty``.  The numeric
core is :class:`AudioAnalyzer`; the old ``audio_level`` stage is folded into it (same dB
rule, :func:`stages.audio_level.loudness_db`).
"""

from __future__ import annotations

import math
from collections import deque

import msgspec
import numpy as np

from copilot.messages import AudioChunk, Features
from copilot.registry import register_stage
from copilot.signals import AUDIO, TIMBRE, Signal
from copilot.stage import StageContext
from stages._analyzer import AnalyzerStage

SILENCE_DB = -120.0


class AudioFeaturesParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    hop_s: float = 0.02
    baseline_s: float = 2.0
    k_mad: float = 3.0  # onset threshold: median + k_mad * MAD of the recent flux
    flux_floor: float = 0.02  # flux under this is never an onset (near silence, codec hiss)
    novelty_s: float = 30.0  # how far back a sound's timbre is remembered for ``novelty`` (0: off)


def _db(v: float) -> float:
    return max(SILENCE_DB, 20.0 * math.log10(v)) if v > 0 else SILENCE_DB


NOVELTY_MIN_DB = -50.0  # hops quieter than this are neither judged nor remembered by the timbre memory
NOVELTY_BANDS = 24


class TimbreMemory:
    """How unlike anything heard in the last ``memory_s`` a hop's spectrum is.

    Why: loudness and onsets say *that* a sound started, not whether it is the shot heard
    every second or the jingle of a lost life.  Each loud hop's spectrum is pooled into
    ``NOVELTY_BANDS`` log-spaced bands and normalised to unit length (its shape, not its
    level); its novelty is 1 minus the best cosine similarity to the remembered hops, the last
    ``skip_s`` excluded so a held note does not match its own start.
    """

    def __init__(self, memory_s: float = 30.0, hop_s: float = 0.02, skip_s: float = 0.3) -> None:
        self.size = max(1, round(memory_s / hop_s))
        self.skip = max(1, round(skip_s / hop_s))
        self._pool: np.ndarray | None = None
        self._mem = np.zeros((0, NOVELTY_BANDS), np.float32)  # a ring of remembered vectors
        self._mem_hop = np.zeros(0, np.int64)  # ... and the hop each was heard at
        self._n = 0  # vectors written so far; the ring holds the last self.size of them
        self._recent: deque[tuple[int, np.ndarray]] = deque()  # (hop, vector) not yet remembered

    def _pooling(self, bins: int) -> np.ndarray:
        edges = np.unique(np.geomspace(2, bins, NOVELTY_BANDS + 1).astype(int))
        pool = np.zeros((bins, len(edges) - 1), np.float32)
        for j in range(len(edges) - 1):
            pool[edges[j]:max(edges[j + 1], edges[j] + 1), j] = 1.0 / max(1, edges[j + 1] - edges[j])
        return pool

    def update(self, spec: np.ndarray, hop: int) -> float:
        """Novelty of ``spec``, the spectrum of hop number ``hop`` (hops count silence too)."""
        if self._pool is None or self._pool.shape[0] != spec.shape[0]:
            self._pool = self._pooling(spec.shape[0])
            self._mem = np.zeros((self.size, self._pool.shape[1]), np.float32)
            self._mem_hop = np.zeros(self.size, np.int64)
            self._n = 0
            self._recent.clear()
        while self._recent and self._recent[0][0] <= hop - self.skip:  # old enough to be remembered
            when, vec = self._recent.popleft()
            self._mem[self._n % self.size] = vec
            self._mem_hop[self._n % self.size] = when
            self._n += 1
        v = spec.astype(np.float32) @ self._pool
        v /= float(np.linalg.norm(v)) + 1e-9
        filled = min(self._n, self.size)
        sims = self._mem[:filled] @ v
        sims = sims[self._mem_hop[:filled] > hop - self.size]  # heard within memory_s
        nov = 1.0 - float(np.max(sims)) if sims.size else 1.0
        self._recent.append((hop, v))
        return max(0.0, nov)


class AudioAnalyzer:
    """Spectral-flux onsets and loudness with adaptive baselines (see the module docstring)."""

    def __init__(self, *, hop_s: float = 0.02, baseline_s: float = 2.0, k_mad: float = 3.0,
                 flux_floor: float = 0.02, novelty_s: float = 30.0) -> None:
        self.hop_s = hop_s
        self.novelty = TimbreMemory(novelty_s, hop_s) if novelty_s > 0 else None
        self.baseline_s = baseline_s
        self.k_mad = k_mad
        self.flux_floor = flux_floor
        self._rate = 0
        self._hop = 0
        self._nfft = 0
        self._window: np.ndarray | None = None
        self._buf = np.zeros(0, np.float32)
        self._prev_spec: np.ndarray | None = None
        self._prev_rms = 0.0
        self._flux_hist: deque[float] = deque()
        self._rms_hist: deque[float] = deque()
        self._hist_len = 1
        self._hops = 0  # hops analysed so far: the timbre memory's clock

    def _setup(self, rate: int) -> None:
        self._rate = rate
        self._hop = max(16, round(rate * self.hop_s))
        self._nfft = 1 << math.ceil(math.log2(2 * self._hop))
        self._window = np.hanning(self._nfft).astype(np.float32)
        self._buf = np.zeros(self._nfft - self._hop, np.float32)  # start with silence as context
        self._prev_spec = None
        self._hist_len = max(5, round(self.baseline_s / self.hop_s))
        self._flux_hist = deque(maxlen=self._hist_len)
        self._rms_hist = deque(maxlen=self._hist_len)

    def update(self, samples: np.ndarray, sample_rate: int) -> dict[str, float]:
        """Feed one chunk (float32 ``(n,)`` or ``(n, channels)`` in [-1, 1]); its strongest hop."""
        if sample_rate != self._rate:
            self._setup(sample_rate)
        x = samples.astype(np.float32, copy=False)
        mono = x.mean(axis=1) if x.ndim == 2 else x
        out = {"rms_db": SILENCE_DB, "peak_db": SILENCE_DB, "flux": 0.0, "onset": 0.0, "rise": 0.0, "offset": 0.0,
               "novelty": 0.0}
        if mono.size:
            out["rms_db"] = round(_db(float(np.sqrt(np.mean(np.square(mono))))), 2)
            out["peak_db"] = round(_db(float(np.max(np.abs(mono)))), 2)
        buf = np.concatenate([self._buf, mono])
        hop, nfft = self._hop, self._nfft
        assert self._window is not None
        n_hops = max(0, (buf.size - nfft) // hop + 1)
        start_of_chunk = self._buf.size  # where this chunk's first sample sits in buf
        best = -1.0
        for i in range(n_hops):
            seg = buf[i * hop : i * hop + nfft]
            spec = np.log1p(100.0 * np.abs(np.fft.rfft(seg * self._window)))
            flux = 0.0
            hop_rms = float(np.sqrt(np.mean(np.square(seg[-hop:]))))
            # a sound cut off mid-window smears into every band: that click is an offset, not an
            # onset, so flux only counts while the energy is not falling
            if self._prev_spec is not None and hop_rms >= 0.5 * self._prev_rms:
                flux = float(np.maximum(0.0, spec - self._prev_spec).mean())
            self._prev_spec = spec
            self._prev_rms = hop_rms
            self._hops += 1
            hop_db = _db(hop_rms)
            hist = self._flux_hist
            if len(hist) >= 5:
                arr = np.fromiter(hist, np.float32)
                med = float(np.median(arr))
                mad = float(np.median(np.abs(arr - med)))
            else:
                med, mad = 0.0, 0.0
            thresh = max(self.flux_floor, med + self.k_mad * mad)
            onset = max(0.0, flux - thresh) / thresh if flux > self.flux_floor else 0.0
            rise = 0.0
            if self._rms_hist:
                rise = max(0.0, hop_db - float(np.median(np.fromiter(self._rms_hist, np.float32))))
            hist.append(flux)
            self._rms_hist.append(hop_db)
            if self.novelty is not None and hop_db >= NOVELTY_MIN_DB:
                out["novelty"] = max(out["novelty"], round(self.novelty.update(spec, self._hops), 4))
            score = onset * 10 + flux
            if score > best:
                best = score
                end = i * hop + nfft  # the hop's newest sample
                out.update(flux=round(flux, 5), onset=round(onset, 4), rise=round(rise, 2),
                           offset=round(max(0.0, (end - hop / 2 - start_of_chunk)) / self._rate, 4))
        self._buf = buf[n_hops * hop :] if n_hops else buf
        if self._buf.size > nfft:
            self._buf = self._buf[-nfft:]
        return out


@register_stage("audio_features")
class AudioFeaturesStage(AnalyzerStage[AudioFeaturesParams, AudioChunk]):
    """Loudness, spectral flux and onsets per audio chunk: ``Features(name="audio")``."""

    Params = AudioFeaturesParams
    accepts = (AudioChunk,)
    output_ports = ("features",)
    signals = (
        Signal("audio.onset", AUDIO, floor=0.5),
        Signal("audio.rise", AUDIO, floor=6.0),
        # a timbre not heard lately (a jingle, a death tune, not the usual shot): its own family, so a
        # new sound agreeing with a picture or HUD change adds to it rather than competing with the onset
        Signal("audio.novelty", TIMBRE, floor=0.005),
    )

    def __init__(self, ctx: StageContext, params: AudioFeaturesParams) -> None:
        super().__init__(ctx, params)
        p = params
        self.analyzer = AudioAnalyzer(hop_s=p.hop_s, baseline_s=p.baseline_s, k_mad=p.k_mad, flux_floor=p.flux_floor,
                                      novelty_s=p.novelty_s)

    def analyze(self, chunk: AudioChunk, t_media: float) -> Features:
        return Features(name="audio", values=self.analyzer.update(chunk.samples, chunk.sample_rate))
