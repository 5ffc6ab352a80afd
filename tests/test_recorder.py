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
