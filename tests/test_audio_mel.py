"""audio_mel: log-mel band energies every hop, the loudest band where the tone is."""

from __future__ import annotations

import numpy as np

from copilot.messages import AudioChunk
from copilot.testing import run_stage
from stages.audio_mel import MelAnalyzer, mel_filterbank


def tone(freq: float, seconds: float, rate: int = 48000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_the_band_holding_a_tone_is_the_loudest_and_moves_up_with_it() -> None:
    loudest = []
    for freq in (200.0, 1000.0, 5000.0):
        a = MelAnalyzer(hop_s=0.1, bands=16)
        out = a.update(tone(freq, 0.1), 48000)
        assert out is not None
        bands = [out[f"b{i:02d}"] for i in range(16)]
        loudest.append(int(np.argmax(bands)))
        assert max(bands) - float(np.median(bands)) > 20.0  # a pure tone stands far above the rest
    assert loudest[0] < loudest[1] < loudest[2]


def test_silence_is_the_floor_and_a_louder_sound_is_more_db() -> None:
    a = MelAnalyzer()
    quiet = a.update(np.zeros(4800, np.float32), 48000)
    assert quiet is not None and quiet["db"] == -100.0 and quiet["b05"] == -100.0
    soft, loud = a.update(tone(440, 0.1, amplitude=0.05), 48000), a.update(tone(440, 0.1, amplitude=0.5), 48000)
    assert soft is not None and loud is not None
    assert abs((loud["db"] - soft["db"]) - 20.0) < 0.5  # ten times the amplitude: +20 dB


def test_chunks_shorter_than_a_hop_add_up_and_stereo_is_mixed() -> None:
    a = MelAnalyzer(hop_s=0.1)
    stereo = np.stack([tone(1000, 0.25), tone(1000, 0.25)], axis=1)
    outs = [a.update(stereo[i:i + 1024], 48000) for i in range(0, len(stereo), 1024)]
    assert sum(o is not None for o in outs) == 2  # 0.25 s of audio: two whole 0.1 s blocks


def test_every_filter_of_the_bank_sums_to_one_even_at_a_low_rate() -> None:
    bank = mel_filterbank(8000, 800, 16, 60.0, 8000.0)
    assert bank.shape == (16, 401)
    assert np.allclose(bank.sum(axis=1), 1.0, atol=1e-5)


def test_the_stage_emits_mel_features_once_per_hop() -> None:
    chunks = [AudioChunk(samples=tone(1000, 0.05)[:, None], sample_rate=48000, chunk_index=i) for i in range(20)]
    res = run_stage("audio_mel", chunks, params={"hop_s": 0.1}, step_s=0.05)
    feats = res["features"]
    assert len(feats) == 10 and all(f.name == "mel" for f in feats)
    assert set(feats[0].values) == {f"b{i:02d}" for i in range(16)} | {"db"}
