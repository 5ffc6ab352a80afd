"""Silero VAD: streaming equals whole-signal scoring, resampling, segment rules, and speech
placed within 0.3 s where it was mixed into real game audio.

Speech comes from espeak-ng (Debian package ``espeak-ng``); the tests that need it skip with
that reason when it is missing.  Game audio comes from a real Atari recording (the session
``atari_clip`` fixture).
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave
from pathlib import Path

import msgspec
import numpy as np
import pytest

from copilot.messages import AudioChunk
from copilot.testing import run_stage
from engines.silero_vad import SAMPLE_RATE, WINDOW, SileroVad, SpeechSegmenter, StreamResampler

pytestmark = pytest.mark.usefixtures("leak_check")

pytest.importorskip("onnxruntime")
pytest.importorskip("faster_whisper")

SENTENCE = "the player lost a life near the bottom of the screen"
MIX_AT_S = 4.0
RATE = 48_000
CHUNK = 1024

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install -y espeak-ng)"
)


def espeak(sentence: str, rate: int = RATE) -> np.ndarray:
    """``sentence`` spoken by espeak-ng, at ``rate`` Hz, silence trimmed from both ends."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", sentence],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    rs = StreamResampler(rate)
    y = np.concatenate([rs(x, sr), rs.flush()])
    loud = np.flatnonzero(np.abs(y) > 0.02)
    return y[loud[0] : loud[-1] + 1]


def game_audio(video: Path, rate: int = RATE) -> np.ndarray:
    """The decoded soundtrack of a recording, mono float32 at ``rate``."""
    import av

    with av.open(str(video)) as c:
        rs = av.AudioResampler(format="flt", layout="mono", rate=rate)
        parts = [f.to_ndarray().reshape(-1) for fr in c.decode(audio=0) for f in rs.resample(fr)]
    return np.concatenate(parts)


@functools.lru_cache(maxsize=2)
def speech_in_game(video: Path) -> tuple[np.ndarray, float, float]:
    """Game audio with espeak speech mixed in at ``MIX_AT_S``: (mono 48 kHz, start s, end s)."""
    game = game_audio(video)
    speech = espeak(SENTENCE)
    i0 = int(MIX_AT_S * RATE)
    assert game.size > i0 + speech.size, "the recording is too short for the speech"
    mix = game.copy()
    mix[i0 : i0 + speech.size] += 0.6 * speech
    return mix, MIX_AT_S, MIX_AT_S + speech.size / RATE


def chunks_of(mix: np.ndarray, channels: int = 2) -> list[AudioChunk]:
    """Stereo 1024-sample chunks at 48 kHz, as the replay stage delivers AAC audio."""
    x = np.stack([mix, mix * 0.8], axis=1) if channels == 2 else mix[:, None]
    return [
        AudioChunk(samples=np.ascontiguousarray(x[i : i + CHUNK]), sample_rate=RATE, chunk_index=k)
        for k, i in enumerate(range(0, x.shape[0] - CHUNK + 1, CHUNK))
    ]


# -- the engine ---------------------------------------------------------------------------------


def test_streaming_equals_whole_signal() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 1) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    whole = SileroVad()(x)
    vad = SileroVad()
    parts, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 3000))
        parts.append(vad(x[i : i + n]))
        i += n
    streamed = np.concatenate(parts)
    assert whole.size == x.size // WINDOW == streamed.size
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    vad.reset()
    np.testing.assert_allclose(vad(x), whole, atol=1e-5)


@pytest.mark.parametrize(("rate", "channels", "dtype"), [(44_100, 2, np.int16), (48_000, 1, np.float32),
                                                        (30_720, 1, np.float32), (16_000, 2, np.float32)])
def test_resampler_any_rate_and_layout(rate: int, channels: int, dtype: type) -> None:
    seconds = 2.0
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    x = np.repeat(tone[:, None], channels, axis=1)
    x = (x * 32767).astype(np.int16) if dtype is np.int16 else x.astype(np.float32)
    rs = StreamResampler()
    out = np.concatenate([rs(x[i : i + 777], rate) for i in range(0, x.shape[0], 777)] + [rs.flush()])
    assert abs(out.size - seconds * SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(out[2000:-2000]))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / (out.size - 4000)
    assert abs(peak_hz - 1000) < 5
    assert 0.3 < np.abs(out[2000:-2000]).max() < 0.7


def test_segmenter_rules() -> None:
    seg = SpeechSegmenter(threshold=0.5, min_speech_s=0.25, min_silence_s=0.3, pad_s=0.0)
    w = WINDOW / SAMPLE_RATE
    probs = [0.0] * 10 + [0.9] * 3 + [0.0] * 20 + [0.9] * 40 + [0.4] * 3 + [0.9] * 10 + [0.0] * 20
    edges = []
    for k, p in enumerate(probs):
        edges += seg.update(p, k * w, (k + 1) * w)
    # the 3-window blip (96 ms) is dropped; the dip to 0.4 (above neg_threshold 0.35) does not split
    assert [e.edge for e in edges] == ["start", "end"]
    assert edges[0].t_start == pytest.approx(33 * w)
    assert edges[1].t_end == pytest.approx((33 + 40 + 3 + 10) * w)


def test_segmenter_cuts_long_speech_and_closes_at_end() -> None:
    seg = SpeechSegmenter(max_speech_s=1.0, pad_s=0.0)
    w = WINDOW / SAMPLE_RATE
    edges = []
    for k in range(100):  # 3.2 s of speech
        edges += seg.update(0.95, k * w, (k + 1) * w)
    edges += seg.finish(100 * w)
    kinds = [e.edge for e in edges]
    assert kinds.count("start") == kinds.count("end") >= 3
    spans = [(e.t_start, e.t_end) for e in edges if e.edge == "end"]
    assert all(b is not None and b - a <= 1.0 + w + 1e-9 for a, b in spans)  # cut within a window
    assert spans[-1][1] == pytest.approx(100 * w)


def test_params_are_validated() -> None:
    from stages.vad import VadParams

    with pytest.raises(msgspec.ValidationError, match="threshold"):
        msgspec.convert({"threshold": 1.5}, VadParams)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"thresold": 0.5}, VadParams)
    with pytest.raises(msgspec.ValidationError, match="no Silero VAD model"):
        msgspec.convert({"model": "/nonexistent/vad.onnx"}, VadParams)


# -- the stage on real game audio ------------------------------------------------------------------


def test_game_audio_alone_has_no_speech(atari_clip: Path) -> None:
    game = game_audio(atari_clip)
    res = run_stage("vad", chunks_of(game), step_s=CHUNK / RATE)
    speech = [f for f in res["features"] if f.name == "speech"]
    assert speech == []
    windows = [f for f in res["features"] if f.name == "vad"]
    assert abs(len(windows) - game.size / RATE * SAMPLE_RATE / WINDOW) < 3


@needs_espeak
def test_vad_places_speech_mixed_into_game_audio(atari_clip: Path) -> None:
    mix, t_start, t_end = speech_in_game(atari_clip)
    res = run_stage("vad", chunks_of(mix), step_s=CHUNK / RATE)
    feats = res["features"]
    ends = [f for f in feats if f.name == "speech" and f.text["edge"] == "end"]
    starts = [f for f in feats if f.name == "speech" and f.text["edge"] == "start"]
    assert ends and len(starts) == len(ends)
    # no speech found in the game audio around it
    for f in ends:
        assert t_start - 0.3 <= f.values["t_start"] and f.values["t_end"] <= t_end + 0.3, f.values
    assert abs(ends[0].values["t_start"] - t_start) <= 0.3
    assert abs(ends[-1].values["t_end"] - t_end) <= 0.3
    # the per-window signal agrees, with media times on the window grid
    envs = [e for e in res.envelopes("features") if e.payload.name == "vad"]
    inside = [e.payload.values["speech"] for e in envs if t_start + 0.3 < e.t_media < t_end - 0.3]
    outside = [e.payload.values["speech"] for e in envs if e.t_media < t_start - 0.5 or e.t_media > t_end + 0.8]
    assert np.mean(inside) > 0.9 and max(outside) == 0.0
    # edges carry their own media time
    edge_envs = [e for e in res.envelopes("features") if e.payload.name == "speech"]
    assert edge_envs[0].t_media == pytest.approx(starts[0].values["t_start"])


@needs_espeak
def test_vad_is_independent_of_chunking_and_rate(atari_clip: Path) -> None:
    mix, t_start, t_end = speech_in_game(atari_clip)
    # the same audio as mono 16 kHz in 100 ms chunks (no resampling path)
    rs = StreamResampler()
    x16 = np.concatenate([rs(mix, RATE), rs.flush()])
    n = 1600
    chunks = [AudioChunk(samples=x16[i : i + n, None], sample_rate=SAMPLE_RATE) for i in range(0, x16.size - n + 1, n)]
    res = run_stage("vad", chunks, step_s=0.1, params={"emit_windows": False})
    feats = res["features"]
    assert all(f.name == "speech" for f in feats)
    ends = [f for f in feats if f.text["edge"] == "end"]
    assert abs(ends[0].values["t_start"] - t_start) <= 0.3
    assert abs(ends[-1].values["t_end"] - t_end) <= 0.3
