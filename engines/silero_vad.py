"""Streaming voice activity detection: Silero VAD (ONNX) on any audio stream.

Three small pieces, each testable alone:

* :class:`StreamResampler`: any sample rate and channel count to 16 kHz mono float32,
  chunk by chunk, with the resampler's filter state kept across chunks (libswresample
  through PyAV, which the replay stage already needs), so chunk boundaries leave no clicks
  and the sample count stays exact over a long stream.
* :class:`SileroVad`: the Silero model that ships inside faster-whisper
  (``faster_whisper/assets/silero_vad_v6.onnx``), run through :mod:`engines.onnx_session`.
  It reads 512-sample windows (32 ms at 16 kHz) with the previous window's last 64
  samples as context and carries its LSTM state ``h``/``c`` across calls, so a stream
  fed in pieces gives exactly the probabilities of the whole signal at once.  All complete
  windows of a chunk go through in one ``run`` (the model loops over them internally).
* :class:`SpeechSegmenter`: hysteresis on the per-window probabilities, with the rules of
  Silero's own ``VADIterator`` (start above ``threshold``; end after ``min_silence_s``
  below ``threshold - 0.15``; segments shorter than ``min_speech_s`` are dropped), so speech
  start and end come out as events with their media times.

Nothing here is downloaded: a missing model file is a :class:`UsageError`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from copilot.errors import UsageError
from engines.onnx_session import SessionConfig, create_session

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees before each window
STATE_SHAPE = (1, 1, 128)


def bundled_model_path() -> Path:
    """The Silero VAD ONNX file inside the installed faster-whisper package (not imported)."""
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("faster-whisper is not installed: it carries the Silero VAD model "
                         "(pip install 'gameplay-copilot[perception]')")
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
    found = sorted(assets.glob("silero_vad*.onnx"))
    if not found:
        raise UsageError(f"no silero_vad*.onnx in {assets}")
    return found[-1]


class StreamResampler:
    """Any rate and channel layout -> 16 kHz mono float32, streaming, state kept across chunks."""

    def __init__(self, out_rate: int = SAMPLE_RATE) -> None:
        self.out_rate = out_rate
        self._rs: Any = None
        self._key: tuple[int, int] | None = None

    def __call__(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """``samples`` shaped (n,) or (n, channels), float or int PCM; returns (m,) float32."""
        x = np.asarray(samples)
        if x.ndim == 1:
            x = x[:, None]
        if x.dtype.kind in "iu":
            info = np.iinfo(x.dtype)
            scale = float(max(abs(info.min), info.max))
            offset = 0.0 if x.dtype.kind == "i" else (info.max + 1) / 2
            x = (x.astype(np.float32) - offset) / scale
        x = x.astype(np.float32, copy=False)
        if x.shape[0] == 0:
            return np.zeros(0, np.float32)
        mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        if rate == self.out_rate:
            return np.ascontiguousarray(mono, dtype=np.float32)
        import av

        key = (int(rate), 1)
        if self._key != key:
            self._rs = av.AudioResampler(format="flt", layout="mono", rate=self.out_rate)
            self._key = key
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono[None, :]), format="flt", layout="mono")
        frame.sample_rate = int(rate)
        frame.pts = None
        out = [f.to_ndarray().reshape(-1) for f in self._rs.resample(frame)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        """What the resampler still holds (its filter delay), at end of stream."""
        if self._rs is None:
            return np.zeros(0, np.float32)
        out = [f.to_ndarray().reshape(-1) for f in self._rs.resample(None)]
        self._rs, self._key = None, None
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


class SileroVad:
    """Streaming Silero VAD: feed 16 kHz mono float32, get one speech probability per window."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, session: SessionConfig | None = None) -> None:
        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_file():
            raise UsageError(f"Silero VAD model not found: {path}")
        self.model_path = path
        self.session = create_session(path, session or SessionConfig(device="cpu"))
        names = {i.name for i in self.session.get_inputs()}
        if not {"input", "h", "c"} <= names:
            raise UsageError(f"{path}: not a Silero VAD v5/v6 model (inputs {sorted(names)})")
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self.windows = 0  # windows scored since the last reset

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of every window completed by ``samples`` (possibly none)."""
        buf = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = buf.size // WINDOW
        self._pending = buf[n * WINDOW :]
        if n == 0:
            return np.zeros(0, np.float32)
        wins = buf[: n * WINDOW].reshape(n, WINDOW)
        ctx = np.empty((n, CONTEXT), np.float32)
        ctx[0] = self._context
        ctx[1:] = wins[:-1, -CONTEXT:]
        batch = np.concatenate([ctx, wins], axis=1)
        probs, self._h, self._c = self.session.run(None, {"input": batch, "h": self._h, "c": self._c})
        self._context = wins[-1, -CONTEXT:].copy()
        self.windows += n
        return np.asarray(probs, np.float32).reshape(-1)


Edge = Literal["start", "end"]


@dataclass(frozen=True)
class SpeechEdge:
    """A speech segment opened (``start``) or closed (``end``, with its start) at media time ``t``."""

    edge: Edge
    t_start: float
    t_end: float | None = None

    @property
    def t(self) -> float:
        return self.t_start if self.edge == "start" else float(self.t_end or self.t_start)


class SpeechSegmenter:
    """Speech start/end from per-window probabilities (the rules of Silero's VADIterator).

    A segment opens at the first window at or above ``threshold`` and is reported once it
    has lasted ``min_speech_s`` (shorter blips, a game's beep, are dropped).  It closes when
    the probability stays under ``neg_threshold`` for ``min_silence_s``; its end is where
    that silence began.  Segments longer than ``max_speech_s`` are cut (Whisper reads 30 s).
    ``pad_s`` widens each segment on both sides, as Silero's ``speech_pad_ms`` does.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        min_speech_s: float = 0.25,
        min_silence_s: float = 0.3,
        max_speech_s: float = 30.0,
        pad_s: float = 0.03,
    ) -> None:
        self.threshold = threshold
        self.neg_threshold = max(0.01, threshold - 0.15) if neg_threshold is None else neg_threshold
        self.min_speech_s = min_speech_s
        self.min_silence_s = min_silence_s
        self.max_speech_s = max_speech_s
        self.pad_s = pad_s
        self.state: Literal["idle", "pending", "speech"] = "idle"
        self._start = 0.0
        self._silence_from: float | None = None
        self._last_speech_end = 0.0
        self._floor = 0.0  # no segment starts before the end of the previous one

    @property
    def active(self) -> bool:
        """Inside a (possibly not yet confirmed) speech segment."""
        return self.state != "idle"

    def update(self, prob: float, t0: float, t1: float) -> list[SpeechEdge]:
        """Feed the probability of the window ``[t0, t1)``; returns the edges it decided."""
        out: list[SpeechEdge] = []
        if self.state == "idle":
            if prob >= self.threshold:
                self.state = "pending"
                self._start = max(self._floor, t0 - self.pad_s)
                self._silence_from = None
                self._last_speech_end = t1
        else:
            if prob >= self.threshold:
                self._silence_from = None
            if prob >= self.neg_threshold:
                self._last_speech_end = t1
            elif self._silence_from is None:
                self._silence_from = t0
            if self._silence_from is not None and t1 - self._silence_from >= self.min_silence_s:
                end = min(t1, self._silence_from + self.pad_s)
                if self.state == "speech":
                    out.append(SpeechEdge("end", self._start, end))
                self.state = "idle"
                self._floor = end
                return out
        if self.state == "pending" and t1 - self._start >= self.min_speech_s and self._silence_from is None:
            self.state = "speech"
            out.append(SpeechEdge("start", self._start))
        if self.state == "speech" and t1 - self._start >= self.max_speech_s:
            out.append(SpeechEdge("end", self._start, t1))
            out.append(SpeechEdge("start", t1))
            self._start = t1
        return out

    def finish(self, t_end: float) -> list[SpeechEdge]:
        """End of stream: close an open segment (at its last speech, padded, within ``t_end``)."""
        out: list[SpeechEdge] = []
        if self.state == "speech":
            last = self._silence_from if self._silence_from is not None else self._last_speech_end
            end = min(t_end, last + self.pad_s)
            out.append(SpeechEdge("end", self._start, max(end, self._start)))
        self.state = "idle"
        return out


@dataclass(frozen=True)
class VadWindow:
    """One scored window: media time span, speech probability, inside a speech segment or not."""

    t0: float
    t1: float
    prob: float
    active: bool


@dataclass
class VadResult:
    """What one pushed chunk produced: its audio at 16 kHz (and the media time of its first
    sample), the windows it completed and the speech edges they decided."""

    audio: np.ndarray
    t_audio: float
    windows: list[VadWindow]
    edges: list[SpeechEdge]


class VadStream:
    """Resampler + Silero + segmenter over a stream of chunks stamped with media time.

    Media time of every 16 kHz sample is counted from the first chunk's ``t_media``, so
    window times do not jitter with chunk timestamps.  If a chunk arrives more than
    ``resync_s`` away from where the count says it should (a seek, a gap in live capture),
    the stream closes any open segment and starts counting afresh from that chunk.
    """

    def __init__(self, vad: SileroVad, segmenter: SpeechSegmenter, resync_s: float = 0.25) -> None:
        self.vad = vad
        self.segmenter = segmenter
        self.resync_s = resync_s
        self.resampler = StreamResampler()
        self._t0: float | None = None  # media time of 16 kHz sample 0 since the last (re)sync
        self._n_out = 0  # 16 kHz samples produced since the last (re)sync
        self._n_in = 0  # input samples since the last (re)sync
        self._rate = 0

    def _expected_t(self) -> float | None:
        if self._t0 is None or not self._rate:
            return None
        return self._t0 + self._n_in / self._rate

    def push(self, samples: np.ndarray, rate: int, t_media: float) -> VadResult:
        edges: list[SpeechEdge] = []
        expected = self._expected_t()
        if self._t0 is None or rate != self._rate or (expected is not None and abs(t_media - expected) > self.resync_s):
            if self._t0 is not None:
                edges.extend(self.segmenter.finish(self._t0 + self._n_out / SAMPLE_RATE))
                self.resampler = StreamResampler()
                self.vad.reset()
            self._t0, self._n_out, self._n_in, self._rate = t_media, 0, 0, int(rate)
        n_in = int(np.asarray(samples).shape[0])
        audio = self.resampler(samples, rate)
        self._n_in += n_in
        return self._score(audio, edges)

    def _score(self, audio: np.ndarray, edges: list[SpeechEdge]) -> VadResult:
        assert self._t0 is not None
        t_audio = self._t0 + self._n_out / SAMPLE_RATE
        first_window = self.vad.windows
        self._n_out += audio.size
        probs = self.vad(audio)
        windows = []
        for k, p in enumerate(probs):
            t0 = self._t0 + (first_window + k) * WINDOW / SAMPLE_RATE
            t1 = t0 + WINDOW / SAMPLE_RATE
            edges.extend(self.segmenter.update(float(p), t0, t1))
            windows.append(VadWindow(t0, t1, float(p), self.segmenter.active))
        return VadResult(audio, t_audio, windows, edges)

    def finish(self) -> VadResult:
        """End of stream: drain the resampler and close an open segment."""
        if self._t0 is None:
            return VadResult(np.zeros(0, np.float32), 0.0, [], [])
        res = self._score(self.resampler.flush(), [])
        res.edges.extend(self.segmenter.finish(self._t0 + self._n_out / SAMPLE_RATE))
        return res
