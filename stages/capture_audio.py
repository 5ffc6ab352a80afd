"""Live audio for the capture stage: two recording backends, one reader thread, arrival-anchored stamps.

``--audio`` picks the backend:

- ``default`` or a soundcard device (its id or part of its name): soundcard records the default
  output's monitor (PulseAudio/PipeWire loopback, WASAPI loopback on Windows) or the named device;
- ``pyaudio:DEVICE``: PortAudio through PyAudio records an input device, DEVICE being its index or
  (part of) its name (``pyaudio:pulse``, ``pyaudio:default``, ``pyaudio:3``; ``pyaudio:`` alone is
  PortAudio's default input): a microphone, or a device soundcard does not offer.
  ``gamecopilot devices`` lists both kinds with the id ``--audio`` takes.

A backend only opens a stream (:class:`AudioBackend`: ``check``, ``open(rate, channels, block) ->``
:class:`AudioStream` with ``read(frames)`` giving float32 ``(frames, channels)`` and ``close``); the
:class:`AudioReader` thread is the same for both: blocks of ``audio_block_ms`` go to the event loop
through a bounded queue, in order, the oldest dropped and counted (``overflow``) when the pipeline
stalls long enough to fill it.  :class:`AudioTimeline` stamps them from their sample counts, anchored
to when they arrive.

PortAudio writes pages of ALSA and JACK probing noise to stderr when it starts; file descriptor 2 is
pointed at /dev/null while it starts and while it opens a stream (:func:`quiet_stderr`), so a user
sees one-line errors only (anything else the process writes to stderr in those milliseconds is lost
with it).

Start-up loss, measured with :func:`measure_start` (PulseAudio 16.1, a null sink with a 440 Hz
tone playing into it, its monitor recorded at 48 kHz in 50 ms blocks, one fresh process per try,
7 tries at random moments, median and range), from asking for the stream to the first sound:

- a player asking for low latency (``paplay --latency-msec=20``): ``pyaudio:pulse`` 0.12 s
  (0.11-0.61), soundcard's loopback 0.17 s (0.13-0.20);
- a player at PulseAudio's default latency (``paplay``): ``pyaudio:pulse`` 0.82 s (0.23-1.68),
  soundcard's loopback 1.65 s (0.31-1.83).

Opening takes 0.07 s (PyAudio) and 0.12 s (soundcard) of that; the audio played before the first
block is never delivered.  The long case is PulseAudio's, not PyAudio's: a sink serving only
default-latency players renders blocks of about 2 s (``pactl list sinks``: configured latency
1.96 s) and a new monitor stream waits for the block in progress, so either backend loses 0 to 2 s
(the windowed Atari game plays at 15 ms: its sink answers in 0.15-0.25 s).  :class:`AudioTimeline`
stamps the blocks right either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from copilot.clock import Clock
from copilot.errors import UsageError, first_line

AUDIO_QUEUE_BLOCKS = 64
PYAUDIO_PREFIX = "pyaudio:"
PYAUDIO_INSTALL = "pip install 'gameplay-copilot[pyaudio]'"


class AudioTimeline:
    """Media times of audio blocks from their sample counts, anchored to their arrival.

    The first block anchors the count (its last sample is taken to have been heard when the
    block arrived).  Sample clocks drift against the monotonic clock and blocks arrive with
    jitter, so the lag of arrival behind the stamp is watched over ``window`` blocks: when
    even the smallest lag in that window is off by more than ``tolerance_s`` either way, the
    anchor moves by it (counted in ``reanchored``).
    """

    def __init__(self, rate: int, *, window: int = 100, tolerance_s: float = 0.04) -> None:
        self.rate = rate
        self.tolerance_s = tolerance_s
        self.offset_s: float | None = None
        self.reanchored = 0
        self._lags: deque[float] = deque(maxlen=window)

    def stamp(self, start_frame: int, frames: int, arrival_s: float) -> float:
        """Media time of the block of ``frames`` samples from ``start_frame``, which arrived at
        ``arrival_s`` (media seconds on the capture's clock)."""
        end_s = (start_frame + frames) / self.rate
        if self.offset_s is None:
            self.offset_s = arrival_s - end_s
        self._lags.append(arrival_s - (self.offset_s + end_s))
        if len(self._lags) == self._lags.maxlen:
            least = min(self._lags)
            if abs(least) > self.tolerance_s:
                self.offset_s += least
                self._lags.clear()
                self.reanchored += 1
        return self.offset_s + start_frame / self.rate


class AudioStream(Protocol):
    """An open recording: ``read`` blocks until ``frames`` samples are there."""

    def read(self, frames: int) -> np.ndarray:
        """The next ``frames`` samples as float32 shaped ``(frames, channels)``."""
        ...

    def close(self) -> None: ...


class AudioBackend(Protocol):
    """What records one ``--audio`` choice."""

    spec: str

    def check(self, rate: int, channels: int) -> None:
        """A one-line UsageError when the device cannot be used (before anything runs)."""
        ...

    def open(self, rate: int, channels: int, block: int) -> AudioStream: ...


def audio_backend(spec: str) -> AudioBackend:
    """The backend for an ``--audio`` value (not ``none``)."""
    if spec.startswith(PYAUDIO_PREFIX):
        return PyAudioBackend(spec)
    return SoundcardBackend(spec)


# --- soundcard ---------------------------------------------------------------------------------

class _SoundcardStream:
    def __init__(self, recorder: Any) -> None:
        self._recorder = recorder
        self._rec = recorder.__enter__()

    def read(self, frames: int) -> np.ndarray:
        return np.ascontiguousarray(self._rec.record(numframes=frames), dtype=np.float32)

    def close(self) -> None:
        self._recorder.__exit__(None, None, None)


class SoundcardBackend:
    """soundcard: ``default`` is the loopback of the default output; otherwise a device id or name."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    @property
    def is_default(self) -> bool:
        return self.spec in ("", "default")

    def microphone(self) -> Any:
        import soundcard as sc

        if self.is_default:
            return sc.get_microphone(id=str(sc.default_speaker().name), include_loopback=True)
        return sc.get_microphone(id=self.spec, include_loopback=True)

    def check(self, rate: int, channels: int) -> None:
        """A device the user named must exist: a typo would otherwise record nothing, with one warning.

        (The default device is not checked: without a sound server the run goes on without audio.)
        """
        if self.is_default:
            return
        try:
            self.microphone()
        except Exception:
            try:
                import soundcard as sc

                names = [m.name for m in sc.all_microphones(include_loopback=True)]
            except Exception:
                names = []
            found = "; ".join(names) if names else "none found"
            raise UsageError(f"--audio: no audio device {self.spec!r} (devices: {found}; or --audio none)") from None

    def open(self, rate: int, channels: int, block: int) -> AudioStream:
        return _SoundcardStream(self.microphone().recorder(samplerate=rate, channels=channels, blocksize=block))


# --- PyAudio (PortAudio) -----------------------------------------------------------------------

@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null meanwhile (C libraries' noise: ALSA, JACK)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_pyaudio(spec: str = PYAUDIO_PREFIX + "...") -> Any:
    try:
        import pyaudio
    except ImportError:
        raise UsageError(f"--audio {spec}: needs PyAudio: {PYAUDIO_INSTALL}") from None
    return pyaudio


@contextlib.contextmanager
def portaudio(spec: str = PYAUDIO_PREFIX + "...") -> Iterator[Any]:
    """A started ``pyaudio.PyAudio`` (quietly), terminated afterwards."""
    pyaudio = import_pyaudio(spec)
    with quiet_stderr():
        pa = pyaudio.PyAudio()
    try:
        yield pa
    finally:
        pa.terminate()


@dataclass(frozen=True)
class PortAudioInput:
    """A PortAudio device that records."""

    index: int
    name: str
    channels: int  # the most input channels it offers
    rate: float  # its default sample rate
    host_api: str  # ALSA, JACK, WASAPI, ...


def pyaudio_inputs(pa: Any) -> list[PortAudioInput]:
    """The input devices of a started PyAudio, in index order."""
    found = []
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        if int(info.get("maxInputChannels", 0)) <= 0:
            continue
        try:
            api = str(pa.get_host_api_info_by_index(info["hostApi"])["name"])
        except Exception:
            api = "?"
        found.append(PortAudioInput(i, str(info["name"]), int(info["maxInputChannels"]),
                                    float(info.get("defaultSampleRate", 0.0)), api))
    return found


def pyaudio_id(device: PortAudioInput, inputs: list[PortAudioInput]) -> str:
    """The ``--audio`` value for a device: by name when that names only it, else by index."""
    if find_pyaudio_input(device.name, inputs) == device:
        return PYAUDIO_PREFIX + device.name
    return f"{PYAUDIO_PREFIX}{device.index}"


def find_pyaudio_input(device: str, inputs: list[PortAudioInput]) -> PortAudioInput | None:
    """An index, else a name (case-insensitive: the whole name first, then a part of it, the lowest
    index winning); ``None`` when nothing matches."""
    text = device.strip()
    if text.isdigit():
        return next((d for d in inputs if d.index == int(text)), None)
    low = text.lower()
    for d in inputs:
        if d.name.lower() == low:
            return d
    return next((d for d in inputs if low in d.name.lower()), None)


def _default_input(pa: Any, inputs: list[PortAudioInput]) -> PortAudioInput | None:
    try:
        index = int(pa.get_default_input_device_info()["index"])
    except Exception:
        return None
    return next((d for d in inputs if d.index == index), None)


class _PyAudioStream:
    def __init__(self, pa: Any, stream: Any, opened: int, channels: int) -> None:
        self._pa = pa
        self._stream = stream
        self._opened = opened
        self._channels = channels

    def read(self, frames: int) -> np.ndarray:
        raw = self._stream.read(frames, exception_on_overflow=False)
        data = np.frombuffer(raw, dtype=np.float32).reshape(-1, self._opened)
        if self._opened < self._channels:  # a mono microphone asked for stereo: the same on each
            data = data[:, np.arange(self._channels) % self._opened]
        return np.ascontiguousarray(data)

    def close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pa.terminate()


class PyAudioBackend:
    """PortAudio through PyAudio: ``pyaudio:INDEX`` or ``pyaudio:NAME`` (``pyaudio:`` the default input)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.device = spec[len(PYAUDIO_PREFIX):]

    def _find(self, pa: Any) -> PortAudioInput:
        inputs = pyaudio_inputs(pa)
        found = find_pyaudio_input(self.device, inputs) if self.device.strip() else _default_input(pa, inputs)
        if found is None:
            listed = "; ".join(f"{d.index} {d.name!r}" for d in inputs) or "none found"
            what = f"no PortAudio input device {self.device!r}" if self.device.strip() else "no default input device"
            raise UsageError(f"--audio {self.spec}: {what} (input devices: {listed}; or --audio none)")
        return found

    def check(self, rate: int, channels: int) -> None:
        pyaudio = import_pyaudio(self.spec)
        with portaudio(self.spec) as pa:
            device = self._find(pa)
            opened = min(channels, device.channels)
            try:
                with quiet_stderr():
                    pa.is_format_supported(rate, input_device=device.index, input_channels=opened,
                                           input_format=pyaudio.paFloat32)
            except ValueError as exc:
                raise UsageError(f"--audio {self.spec}: {device.name!r} cannot record {opened} channel(s) at "
                                 f"{rate} Hz ({first_line(exc)})") from None

    def open(self, rate: int, channels: int, block: int) -> AudioStream:
        pyaudio = import_pyaudio(self.spec)
        with quiet_stderr():
            pa = pyaudio.PyAudio()
        try:
            device = self._find(pa)
            opened = min(channels, device.channels)
            with quiet_stderr():
                stream = pa.open(format=pyaudio.paFloat32, channels=opened, rate=rate, input=True,
                                 input_device_index=device.index, frames_per_buffer=block)
        except BaseException:
            pa.terminate()
            raise
        return _PyAudioStream(pa, stream, opened, channels)


# --- the reader thread -------------------------------------------------------------------------

class AudioReader(threading.Thread):
    """Records from a backend on its own thread into a bounded, ordered queue of
    ``(start_frame, samples, arrival_ns)``."""

    def __init__(self, backend: AudioBackend, *, rate: int, channels: int, block_ms: float,
                 loop: asyncio.AbstractEventLoop, clock: Clock) -> None:
        super().__init__(name="capture-audio", daemon=True)
        self.backend = backend
        self.rate = rate
        self.channels = channels
        self.block = max(1, int(rate * block_ms / 1000))
        self.loop = loop
        self.clock = clock
        self.queue: asyncio.Queue[tuple[int, np.ndarray, int]] = asyncio.Queue(AUDIO_QUEUE_BLOCKS)
        self.stop = threading.Event()
        self.overflow = 0
        self.error: str | None = None
        self.frames_read = 0

    def _deliver(self, item: tuple[int, np.ndarray, int]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.overflow += 1
        self.queue.put_nowait(item)

    def run(self) -> None:
        try:
            stream = self.backend.open(self.rate, self.channels, self.block)
            try:
                while not self.stop.is_set():
                    data = stream.read(self.block)
                    arrival_ns = self.clock.now_ns()
                    self.loop.call_soon_threadsafe(self._deliver, (self.frames_read, data, arrival_ns))
                    self.frames_read += data.shape[0]
            finally:
                stream.close()
        except Exception as exc:
            self.error = first_line(exc)


# --- start-up loss -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StartDelay:
    """How a fresh stream starts, seconds from asking it to open (while sound plays)."""

    open_s: float  # until open() returned
    first_block_s: float | None  # until the first block was read
    first_sound_s: float | None  # until the first block louder than the threshold was read
    recorded_s: float  # audio the stream delivered
    elapsed_s: float  # wall time it was read over

    @property
    def lost_s(self) -> float:
        """Wall time with no audio delivered for it."""
        return max(0.0, self.elapsed_s - self.recorded_s)


def measure_start(spec: str, *, seconds: float = 4.0, rate: int = 48000, channels: int = 1,
                  block_ms: float = 50.0, threshold_db: float = -50.0,
                  now: Callable[[], float] = time.monotonic) -> StartDelay:
    """Open ``--audio spec`` the way capture does and read it for ``seconds``; something must be
    playing into it (a tone) for ``first_sound_s`` to mean the start-up loss."""
    block = max(1, int(rate * block_ms / 1000))
    floor = 10 ** (threshold_db / 20)
    t0 = now()
    stream = audio_backend(spec).open(rate, channels, block)
    open_s = now() - t0
    first_block = first_sound = None
    frames = 0
    try:
        while now() - t0 < seconds:
            data = stream.read(block)
            t = now() - t0
            frames += data.shape[0]
            if first_block is None:
                first_block = t
            if first_sound is None and data.size and float(np.sqrt(np.mean(np.square(data)))) > floor:
                first_sound = t
        elapsed = now() - t0
    finally:
        stream.close()
    return StartDelay(open_s, first_block, first_sound, frames / rate, elapsed)
