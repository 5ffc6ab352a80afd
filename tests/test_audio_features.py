"""Audio features: loudness, spectral-flux onsets with adaptive baselines, on synthetic and real audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from copilot.messages import Features
from copilot.testing import audio_chunk, run_stage
from stages.audio_features import SILENCE_DB, AudioAnalyzer

RATE = 48000
CHUNK = 1024


def chunks(signal: np.ndarray) -> list[tuple[float, np.ndarray]]:
    return [(i / RATE, signal[i : i + CHUNK]) for i in range(0, len(signal) - CHUNK + 1, CHUNK)]


def beeps(times: list[float], seconds: float, freq: float = 880.0, dur: float = 0.12) -> np.ndarray:
    x = np.zeros(int(seconds * RATE), np.float32)
    for t0 in times:
        i = int(t0 * RATE)
        n = int(dur * RATE)
        x[i : i + n] = 0.4 * np.sin(2 * np.pi * freq * np.arange(n) / RATE)
    return x


def onsets(a: AudioAnalyzer, signal: np.ndarray, min_onset: float = 0.5) -> list[float]:
    out = []
    for t, c in chunks(signal):
        v = a.update(c, RATE)
        if v["onset"] > min_onset:
            out.append(t + v["offset"])
    return out


def test_silence_is_quiet_and_has_no_onsets() -> None:
    a = AudioAnalyzer()
    for _, c in chunks(np.zeros(RATE * 2, np.float32)):
        v = a.update(c, RATE)
        assert v["rms_db"] == SILENCE_DB and v["onset"] == 0.0 and v["flux"] == 0.0


def test_a_beep_out_of_silence_is_an_onset_placed_within_30_ms() -> None:
    found = onsets(AudioAnalyzer(), beeps([1.0, 2.5], 4.0))
    assert any(abs(t - 1.0) <= 0.03 for t in found), found
    assert any(abs(t - 2.5) <= 0.03 for t in found), found
    assert all(min(abs(t - 1.0), abs(t - 2.5)) <= 0.05 for t in found), found


def test_baseline_adapts_to_a_steady_noise_bed() -> None:
    rng = np.random.default_rng(0)
    noise = (0.05 * rng.standard_normal(RATE * 6)).astype(np.float32)
    found = onsets(AudioAnalyzer(), noise)
    assert not [t for t in found if t > 0.5], "steady noise is the baseline, not a stream of onsets"
    a = AudioAnalyzer()
    strength = []
    for t, c in chunks(noise + beeps([4.0], 6.0)):
        v = a.update(c, RATE)
        strength.append((t + v["offset"], v["onset"], v["rise"]))
    at_beep = [s for s in strength if abs(s[0] - 4.0) <= 0.03]
    elsewhere = [s for s in strength if s[0] > 0.5 and abs(s[0] - 4.0) > 0.2]
    assert max(s[1] for s in at_beep) > max(s[1] for s in elsewhere), "the beep stands out of the noise bed"
    assert max(s[2] for s in at_beep) > 10.0, "and its loudness rises over the running median"


def novelty_at(a: AudioAnalyzer, signal: np.ndarray, times: list[float]) -> list[float]:
    """The strongest ``novelty`` within 0.1 s after each of ``times``."""
    seen = [(t, a.update(c, RATE)["novelty"]) for t, c in chunks(signal)]
    return [max(v for t, v in seen if t0 - 0.03 <= t <= t0 + 0.1) for t0 in times]


def test_a_sound_heard_before_is_not_novel_a_new_timbre_is() -> None:
    """The same shot every second stops being novel; a different tune stands out even at equal
    loudness and equal onset strength."""
    shots = [0.5 + i for i in range(8)]
    signal = beeps(shots, 10.0, freq=880.0) + beeps([9.0], 10.0, freq=2500.0)
    first, *again, new = novelty_at(AudioAnalyzer(), signal, [*shots, 9.0])
    assert first > 0.5, "nothing was heard before the first shot"
    assert max(again) < 0.01, again
    assert new > 20 * max(again), (new, again)
    # silence is neither judged nor remembered
    assert AudioAnalyzer().update(np.zeros(CHUNK, np.float32), RATE)["novelty"] == 0.0


def test_the_timbre_memory_forgets_after_novelty_s() -> None:
    signal = beeps([0.5, 4.0], 5.0)
    short = novelty_at(AudioAnalyzer(novelty_s=2.0), signal, [0.5, 4.0])
    long_ = novelty_at(AudioAnalyzer(novelty_s=30.0), signal, [0.5, 4.0])
    assert short[1] > 0.5 and long_[1] < 0.01, (short, long_)
    off = AudioAnalyzer(novelty_s=0.0)
    assert max(off.update(c, RATE)["novelty"] for _, c in chunks(signal)) == 0.0


def test_loudness_matches_the_signal() -> None:
    a = AudioAnalyzer()
    v = a.update(np.full(CHUNK, 0.5, np.float32), RATE)
    assert abs(v["rms_db"] - 20 * np.log10(0.5)) < 0.1 and abs(v["peak_db"] - 20 * np.log10(0.5)) < 0.1
    stereo = np.stack([np.full(CHUNK, 0.5, np.float32)] * 2, axis=1)
    assert abs(AudioAnalyzer().update(stereo, RATE)["rms_db"] - v["rms_db"]) < 0.1


def test_real_game_audio_onsets_at_the_moments(atari_clip: Path) -> None:
    """Breakout beeps when a ball is lost: every life_lost has an onset within 0.2 s."""
    import av

    truth = [json.loads(x) for x in atari_clip.with_suffix("").with_suffix(".truth.jsonl").read_text().splitlines()]
    a = AudioAnalyzer()
    found = []
    with av.open(str(atari_clip)) as c:
        res = av.AudioResampler(format="flt", layout="mono")
        for frame in c.decode(audio=0):
            for r in res.resample(frame):
                v = a.update(r.to_ndarray().reshape(-1), r.sample_rate)
                if v["onset"] > 0.5:
                    found.append(float(frame.time) + v["offset"])
    lost = [e["t"] for e in truth[1:] if e["kind"] == "life_lost"]
    assert lost
    for t in lost:
        assert any(-0.1 <= f - t <= 0.2 for f in found), (t, found)


def test_stage_emits_audio_features() -> None:
    inputs = [audio_chunk(CHUNK, RATE, amplitude=0.0)] * 20 + [audio_chunk(CHUNK, RATE, amplitude=0.5)] * 5
    res = run_stage("audio_features", inputs, step_s=CHUNK / RATE)
    feats = res["features"]
    assert len(feats) == 25 and all(isinstance(f, Features) and f.name == "audio" for f in feats)
    assert feats[0].values["rms_db"] == SILENCE_DB
    assert max(f.values["onset"] for f in feats[20:]) > 0.5
