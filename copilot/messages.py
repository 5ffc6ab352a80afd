"""The envelope and the message kinds that travel between stages.

Every message is one :class:`Envelope`: who sent it (``source``), its per-link sequence number
(``seq``), when in the media it happened (``t_media``, seconds), when it was captured or
decoded (``t_capture_ns``, monotonic ns, taken once at the source and never rewritten) and a
``trace`` of ``(stage, t_in_ns, t_out_ns)`` stamps appended by every stage it passed.  Latency
from capture to any stage is therefore computable anywhere downstream, off the hot path.

Payloads are msgspec Structs tagged by kind.  Numpy arrays inside them never go through
msgpack: the codec (:mod:`copilot.codec`) moves them as separate ZeroMQ frames, zero-copy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec
import numpy as np

WIRE_VERSION = 1

Priority = Literal["critical", "high", "normal", "low"]
PRIORITIES: tuple[str, ...] = ("critical", "high", "normal", "low")


class TraceStamp(msgspec.Struct, array_like=True, frozen=True):
    """One stage's passage: when the message came in and when its result went out."""

    stage: str
    t_in_ns: int
    t_out_ns: int


class VideoFrame(msgspec.Struct, tag="video", kw_only=True):
    """One picture.  ``image`` is HxWxC uint8; ``pixel_format`` says how to read C."""

    image: np.ndarray
    pixel_format: Literal["rgb24", "bgra", "gray"] = "rgb24"
    frame_index: int = 0


class AudioChunk(msgspec.Struct, tag="audio", kw_only=True):
    """A run of audio samples, ``samples`` float32 shaped (n, channels), in order."""

    samples: np.ndarray
    sample_rate: int
    chunk_index: int = 0


class Features(msgspec.Struct, tag="features", kw_only=True):
    """Scalar signals from an encoder, optionally with an embedding vector and text fields."""

    name: str
    values: dict[str, float] = {}
    text: dict[str, str] = {}
    vector: np.ndarray | None = None


class Event(msgspec.Struct, tag="event", kw_only=True):
    """A significant moment found by the trigger detector, with the evidence that fired it."""

    t: float
    event_kind: str
    priority: Priority = "normal"
    score: float = 0.0
    evidence: dict[str, Any] = {}


class Transcript(msgspec.Struct, tag="transcript", kw_only=True):
    """Speech recognised in a span of audio."""

    text: str
    t_start: float
    t_end: float
    language: str = ""


class Advice(msgspec.Struct, tag="advice", kw_only=True):
    """What the reasoning core said about an event."""

    t_event: float
    backend: str
    text: str
    structured: dict[str, Any] = {}
    latency_ms: dict[str, float] = {}


class LatencySummary(msgspec.Struct, kw_only=True):
    p50: float
    p95: float
    p99: float


class StageMetrics(msgspec.Struct, kw_only=True):
    """One stage's figures over a reporting window (or the whole run)."""

    stage: str
    count: int
    fps: float
    dropped: int
    dropped_by_reason: dict[str, int] = {}
    latency_ms: LatencySummary | None = None
    queue_age_ms: LatencySummary | None = None
    busy_ms: LatencySummary | None = None
    media_s: float = 0.0
    slow: bool = False
    extra_ms: dict[str, LatencySummary] = {}  # stage-specific timings, e.g. a detector's decision delay
    video_frames: int = 0  # video frames a source emitted: its fps counts these, not its audio chunks


class Metrics(msgspec.Struct, tag="metrics", kw_only=True):
    """A stage group's periodic metrics report (cumulative since the group started)."""

    group: str
    stages: list[StageMetrics]


class Control(msgspec.Struct, tag="control", kw_only=True):
    """Lifecycle and liveness: heartbeat, ready, end-of-stream, stop.

    ``inputs_ended`` (supervisor to group, ``detail["links"]``): the groups producing those
    links have finished, so a consumer restarted after their end of stream went out stops
    waiting for it.
    """

    action: Literal["heartbeat", "ready", "start", "eos", "stop", "done", "error", "inputs_ended"]
    detail: dict[str, Any] = {}


Payload = VideoFrame | AudioChunk | Features | Event | Transcript | Advice | Metrics | Control

PAYLOAD_TYPES: tuple[type, ...] = (
    VideoFrame,
    AudioChunk,
    Features,
    Event,
    Transcript,
    Advice,
    Metrics,
    Control,
)
KIND_OF: dict[type, str] = {t: t.__struct_config__.tag for t in PAYLOAD_TYPES}  # type: ignore[attr-defined]
KINDS: tuple[str, ...] = tuple(KIND_OF.values())


class Envelope(msgspec.Struct, kw_only=True):
    """The one message type on every link."""

    v: int = WIRE_VERSION
    kind: str
    seq: int
    source: str
    t_media: float
    t_capture_ns: int
    trace: list[TraceStamp] = []
    payload: Payload

    VERSION: ClassVar[int] = WIRE_VERSION

    @classmethod
    def wrap(
        cls,
        payload: Payload,
        *,
        source: str,
        seq: int,
        t_media: float,
        t_capture_ns: int,
        trace: list[TraceStamp] | None = None,
    ) -> Envelope:
        return cls(
            kind=KIND_OF[type(payload)],
            seq=seq,
            source=source,
            t_media=t_media,
            t_capture_ns=t_capture_ns,
            trace=list(trace) if trace else [],
            payload=payload,
        )
