"""The recorder stage writes what a source produced to an MP4 that replays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copilot.messages import AudioChunk
from copilot.testing import make_envelope, run_stage, video_frame

pytestmark = pytest.mark.usefixtures("leak_check")


@pytest.mark.parametrize("rate", [30720, 48000])
def test_audio_at_any_source_rate_is_recorded_at_an_aac_rate(tmp_path: Path, rate: int) -> None:
    """The emulated Atari console sounds at 30720 Hz, a rate AAC does not have: the file gets
    48 kHz audio of the same length and tone instead of failing to open its encoder."""
    import av

    out = tmp_path / "rec.mp4"
    envs = []
    n = rate // 30  # one video frame's worth of audio
    for i in range(60):  # 2 s
        t = i / 30
        envs.append(make_envelope(video_frame(96, 128, value=(i * 4) % 256), t_media=t, seq=2 * i + 1))
        tone = (0.3 * np.sin(2 * np.pi * 440.0 * (np.arange(n) + i * n) / rate)).astype(np.float32)
        envs.append(make_envelope(AudioChunk(samples=tone.reshape(-1, 1), sample_rate=rate, chunk_index=i),
                                  t_media=t, seq=2 * i + 2))
    run_stage("recorder", envs, params={"path": str(out)}, timeout_s=60)
    with av.open(str(out)) as c:
        audio = c.streams.audio[0]
        assert audio.rate in (48000, rate) and audio.rate == (48000 if rate == 30720 else rate)
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    seconds = pcm.size / audio.rate
    assert seconds == pytest.approx(2.0, abs=0.1)
    spectrum = np.abs(np.fft.rfft(pcm[audio.rate // 2 : audio.rate // 2 + audio.rate]))
    assert np.argmax(spectrum) == pytest.approx(440, abs=3)  # 1 s window: bins are 1 Hz


def _tone(i: int, n: int = 1600) -> AudioChunk:
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * (np.arange(n) + i * n) / 48000)).astype(np.float32)
    return AudioChunk(samples=tone.reshape(-1, 1), sample_rate=48000, chunk_index=i)


def _tracks(path: Path) -> tuple[int, float]:
    import av

    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0)) if c.streams.video else 0
    with av.open(str(path)) as c:
        seconds = sum(f.samples for f in c.decode(audio=0)) / 48000 if c.streams.audio else 0.0
    return frames, seconds


def test_audio_that_comes_before_the_first_picture_is_recorded_with_it(tmp_path: Path) -> None:
    """Live loopback audio often starts before the first screen grab: the video track must still get
    into the file (it failed with 'Cannot rebase to zero time' once audio packets had started it)."""
    out = tmp_path / "rec.mp4"
    envs = [make_envelope(_tone(i), t_media=i / 30, seq=i + 1) for i in range(30)]  # 1 s of sound first
    for i in range(30, 90):
        envs.append(make_envelope(video_frame(96, 128, value=(i * 4) % 256), t_media=i / 30, seq=2 * i + 1))
        envs.append(make_envelope(_tone(i), t_media=i / 30, seq=2 * i + 2))
    run_stage("recorder", envs, params={"path": str(out)}, timeout_s=60)
    frames, seconds = _tracks(out)
    assert frames == 60
    assert seconds == pytest.approx(3.0, abs=0.1)


def test_a_track_that_first_shows_up_after_the_file_started_is_left_out(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """With no picture for longer than the recorder waits, the file starts with its sound alone; a
    picture coming later is left out with one warning, and the sound goes on being recorded."""
    from stages.recorder import HOLD_S

    out = tmp_path / "rec.mp4"
    late = int((HOLD_S + 1) * 30)
    envs = [make_envelope(_tone(i), t_media=i / 30, seq=i + 1) for i in range(late)]
    for i in range(late, late + 30):
        envs.append(make_envelope(video_frame(96, 128, value=i % 256), t_media=i / 30, seq=2 * i + 1))
        envs.append(make_envelope(_tone(i), t_media=i / 30, seq=2 * i + 2))
    with caplog.at_level("WARNING"):
        run_stage("recorder", envs, params={"path": str(out)}, timeout_s=60)
    frames, seconds = _tracks(out)
    assert frames == 0
    assert seconds == pytest.approx((late + 30) / 30, abs=0.1)
    assert sum("first video came" in r.getMessage() for r in caplog.records) == 1
