"""``--audio pyaudio:DEVICE``: PortAudio through PyAudio beside soundcard's loopback.

The device tests record a private PulseAudio server's null sink through ALSA's ``pulse`` PCM (the
sink's monitor is the server's only source, and ``PULSE_SOURCE`` names it too) while ``paplay``
plays a tone into the sink.  Skipped when PulseAudio, Xvfb or PyAudio is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from copilot.clock import SYSTEM_CLOCK
from copilot.errors import UsageError
from stages.capture_audio import (
    AUDIO_QUEUE_BLOCKS,
    AudioBackend,
    AudioReader,
    AudioStream,
    PortAudioInput,
    _PyAudioStream,
    audio_backend,
    find_pyaudio_input,
    measure_start,
)
from tests.test_window_game import ROOT, display, needs_pulse, needs_xvfb, pulse

__all__ = ["display", "pulse"]  # fixtures used below

needs_pyaudio = pytest.mark.skipif(importlib.util.find_spec("pyaudio") is None, reason="PyAudio is not installed")


def _tone_wav(path: Path, seconds: float, rate: int = 48000, freq: float = 440.0) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture
def pulse_env(pulse: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The private PulseAudio server for this process too (PortAudio's ALSA pulse plugin reads the env)."""
    env = dict(pulse, PULSE_SOURCE="copilot_test.monitor")
    for key in ("HOME", "XDG_RUNTIME_DIR", "PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE"):
        monkeypatch.setenv(key, env[key])
    return env


@pytest.fixture
def tone(pulse_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A 440 Hz tone playing into the null sink (low latency, as a game plays) for up to 40 s."""
    wav = _tone_wav(tmp_path / "tone.wav", 40.0)
    proc = subprocess.Popen(["paplay", "--latency-msec=20", str(wav)], env=pulse_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        assert proc.poll() is None, "paplay exited"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# --- without a sound server ---------------------------------------------------------------------

def test_a_pyaudio_device_is_found_by_index_then_whole_name_then_part_of_it() -> None:
    inputs = [PortAudioInput(0, "HDA Intel: ALC892 Analog (hw:0,0)", 2, 44100.0, "ALSA"),
              PortAudioInput(2, "pulse", 32, 44100.0, "ALSA"),
              PortAudioInput(3, "pulse monitor", 32, 44100.0, "ALSA"),
              PortAudioInput(4, "default", 32, 44100.0, "ALSA")]
    assert find_pyaudio_input("2", inputs) == inputs[1]
    assert find_pyaudio_input("1", inputs) is None  # an index that is no input device
    assert find_pyaudio_input("PULSE", inputs) == inputs[1]  # the whole name beats a longer one
    assert find_pyaudio_input("monitor", inputs) == inputs[2]
    assert find_pyaudio_input("alc892", inputs) == inputs[0]
    assert find_pyaudio_input("nosuch", inputs) is None


def test_pyaudio_not_installed_is_one_line_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyaudio", None)  # import pyaudio raises ImportError
    with pytest.raises(UsageError) as err:
        audio_backend("pyaudio:pulse").check(48000, 1)
    assert str(err.value) == "--audio pyaudio:pulse: needs PyAudio: pip install 'gameplay-copilot[pyaudio]'"


def test_a_mono_device_asked_for_stereo_gives_the_same_samples_on_both_channels() -> None:
    class Fake:
        def read(self, frames: int, exception_on_overflow: bool = True) -> bytes:
            return np.arange(frames, dtype=np.float32).tobytes()

    data = _PyAudioStream(None, Fake(), opened=1, channels=2).read(4)
    assert data.dtype == np.float32 and data.shape == (4, 2)
    assert data[:, 0].tolist() == data[:, 1].tolist() == [0, 1, 2, 3]


class _Counting:
    """A backend whose stream never waits: block k holds the value k."""

    spec = "fake"

    def __init__(self) -> None:
        self.closed = False

    def check(self, rate: int, channels: int) -> None:
        pass

    def open(self, rate: int, channels: int, block: int) -> AudioStream:
        backend = self

        class Stream:
            k = 0

            def read(self, frames: int) -> np.ndarray:
                time.sleep(0.001)
                self.k += 1
                return np.full((frames, channels), self.k - 1, dtype=np.float32)

            def close(self) -> None:
                backend.closed = True

        return Stream()


def test_the_reader_keeps_the_newest_blocks_in_order_and_counts_what_it_dropped() -> None:
    backend: AudioBackend = _Counting()

    async def run() -> AudioReader:
        reader = AudioReader(backend, rate=1000, channels=2, block_ms=10, loop=asyncio.get_running_loop(),
                             clock=SYSTEM_CLOCK)
        reader.start()
        await asyncio.sleep(0.5)  # a stalled pipeline: nobody takes blocks
        reader.stop.set()
        await asyncio.to_thread(reader.join, 2)
        await asyncio.sleep(0)  # deliveries already scheduled land
        return reader

    reader = asyncio.run(run())
    assert reader.error is None and not reader.is_alive() and backend.closed  # type: ignore[attr-defined]
    items = [reader.queue.get_nowait() for _ in range(reader.queue.qsize())]
    assert len(items) == AUDIO_QUEUE_BLOCKS
    assert reader.overflow > 0 and reader.overflow + len(items) == reader.frames_read // 10
    starts = [start for start, _, _ in items]
    assert starts == sorted(starts) and np.all(np.diff(starts) == 10)  # in order, none missing among the kept
    assert all(s.shape == (10, 2) and s.dtype == np.float32 and s[0, 0] == start // 10 for start, s, _ in items)
    assert starts[-1] == reader.frames_read - 10  # the newest kept, the oldest dropped


# --- PulseAudio ----------------------------------------------------------------------------------

@needs_xvfb
@needs_pulse
@needs_pyaudio
def test_an_unknown_pyaudio_device_is_refused_before_the_run(display: str, pulse_env: dict[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.capture import CaptureParams, CaptureStage

    monkeypatch.setenv("DISPLAY", display)
    with pytest.raises(UsageError) as err:
        CaptureStage.check(CaptureParams(region=[0, 0, 64, 48], audio="pyaudio:nosuch"))
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("--audio pyaudio:nosuch: no PortAudio input device 'nosuch'"), msg
    assert "'pulse'" in msg and msg.endswith("or --audio none)"), msg  # lists the devices there are
    CaptureStage.check(CaptureParams(region=[0, 0, 64, 48], audio="pyaudio:pulse"))  # a real one passes


@needs_pulse
@needs_pyaudio
def test_the_pyaudio_reader_records_the_tone_played_into_the_sink(tone: subprocess.Popen[bytes],
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    async def record(seconds: float) -> tuple[list[tuple[int, np.ndarray, int]], AudioReader]:
        loop = asyncio.get_running_loop()
        reader = AudioReader(audio_backend("pyaudio:pulse"), rate=48000, channels=2, block_ms=50, loop=loop,
                             clock=SYSTEM_CLOCK)
        reader.start()
        got: list[tuple[int, np.ndarray, int]] = []
        deadline = loop.time() + 3.0 + seconds  # up to 2 s of start-up loss, then `seconds` of sound
        try:
            while len(got) < seconds / 0.05 and loop.time() < deadline:
                try:
                    got.append(await asyncio.wait_for(reader.queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
        finally:
            reader.stop.set()
            await asyncio.to_thread(reader.join, 2)
        return got, reader

    chunks, reader = asyncio.run(record(1.0))
    assert reader.error is None, reader.error
    assert len(chunks) >= 15, f"{len(chunks)} blocks in 4 s"
    for _, samples, _ in chunks:
        assert samples.dtype == np.float32 and samples.shape == (2400, 2)
    assert [c[0] for c in chunks] == [i * 2400 for i in range(len(chunks))]
    arrivals = [c[2] for c in chunks]
    assert arrivals == sorted(arrivals)
    rms = [float(np.sqrt(np.mean(np.square(s)))) for _, s, _ in chunks]
    # the tone is 0.3 peak (0.21 rms); the first blocks may be the sink's silence before it
    assert max(rms) > 0.1, rms
    loud = [r for r in rms if r > 0.1]
    assert len(loud) >= len(rms) // 2 and float(np.median(loud)) == pytest.approx(0.212, abs=0.03)
    assert "ALSA lib" not in capfd.readouterr().err  # PortAudio's probing noise stays hidden


@needs_pulse
@needs_pyaudio
def test_measure_start_finds_the_first_sound_and_no_sound_in_silence(pulse_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    quiet = measure_start("pyaudio:pulse", seconds=1.0)
    assert quiet.first_sound_s is None  # nothing plays: the sink's monitor is silent
    wav = _tone_wav(tmp_path / "tone.wav", 10.0)
    with subprocess.Popen(["paplay", "--latency-msec=20", str(wav)], env=pulse_env) as player:
        try:
            time.sleep(0.5)
            loud = measure_start("pyaudio:pulse", seconds=2.5)
        finally:
            player.terminate()
    assert loud.first_sound_s is not None and loud.first_block_s is not None
    assert 0 < loud.open_s <= loud.first_block_s <= loud.first_sound_s < 2.5
    assert loud.recorded_s > 0.5 and loud.lost_s == pytest.approx(loud.elapsed_s - loud.recorded_s)


@needs_xvfb
@needs_pulse
@needs_pyaudio
def test_live_with_pyaudio_produces_audio_features(display: str, tone: subprocess.Popen[bytes],
                                                   pulse_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(pulse_env, DISPLAY=display)
    metrics, features = tmp_path / "m.json", tmp_path / "f.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "live", "--region", "0,0,320,240", "--audio", "pyaudio:pulse",
         "--until", "6", "-q", "--metrics-out", str(metrics), "--features-out", str(features)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ALSA lib" not in proc.stderr and "audio capture stopped" not in proc.stderr, proc.stderr
    m = json.loads(metrics.read_text())
    assert m["stages"]["capture"]["count"] > 60
    lines = [json.loads(line) for line in features.read_text().splitlines()]
    audio = [r for r in lines if r.get("kind") == "features" and r.get("name") == "audio"]
    assert len(audio) > 20, "the pyaudio capture delivered little or nothing"
    levels = [v for r in audio for k, v in r["values"].items() if k in ("rms_db", "loudness_db")]
    assert levels and max(levels) > -30.0, "the tone did not reach the copilot"  # 0.21 rms is about -13.5 dB
