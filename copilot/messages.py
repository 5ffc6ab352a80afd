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

from typing import Any, ClassVar, Literal, TypeVar

import msgspec
import numpy as np

# 2: control messages became one Struct per action (they were Control(action, detail))
# 3: Question; Advice streams (final, wake) and names its event, priority and model
# 4: Entities (concept segmentation's labelled regions on a keyframe)
WIRE_VERSION = 4

T = TypeVar("T")

Priority = Literal["critical", "high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "normal", "low")
PRIORITY_RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}  # critical 0 ... low 3: lower is more urgent


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

    def record(self) -> dict[str, Any]:
        """The event as one line of an events JSONL file (``t``, ``kind``, ``priority``, ``score``,
        ``evidence``): the one place that format is built."""
        return {"t": self.t, "kind": self.event_kind, "priority": self.priority, "score": self.score,
                "evidence": self.evidence}


class Cue(msgspec.Struct, tag="cue", kw_only=True):
    """Discrete news from a producer: something happened at ``t`` that may deserve an event.

    Graded signals (``Features``) say *how unusual* a moment looks; a cue says *what*
    happened: a HUD area went back to an earlier content, a lives icon went away, an OCR rule
    fired, a keyword was read on screen or heard.  The producer names the event ``kind`` it
    would make and suggests a ``priority``; the trigger opens (or joins) an episode with it
    and fuses it with the graded signals around ``t``.  ``reason`` is the human sentence that
    goes into the event's evidence.  ``weak`` news (a score digit stepping) is not enough on
    its own to emit an annotation; ``late`` news (keyword spotting, ASR) comes long after
    ``t``, so the trigger's media-time merge never waits for it.
    """

    t: float
    kind: str
    priority: Priority = "normal"
    reason: str = ""
    evidence: dict[str, Any] = {}
    weak: bool = False
    late: bool = False


class GameState(msgspec.Struct, tag="state", kw_only=True):
    """The parsed HUD/OCR values, published when they change.

    ``values`` are the numbers (``score``, ``health``, ``health_ratio`` ...), ``text`` the text
    read for each field, ``previous`` each number's value before its latest change and
    ``changed_at`` the media time of that change: enough for a reader (the trigger's evidence,
    later the reasoner and the timeline) to say "health 100 -> 40 at 12.3 s" without keeping
    its own history.
    """

    values: dict[str, float] = {}
    text: dict[str, str] = {}
    previous: dict[str, float] = {}
    changed_at: dict[str, float] = {}


class Transcript(msgspec.Struct, tag="transcript", kw_only=True):
    """Speech recognised in a span of audio."""

    text: str
    t_start: float
    t_end: float
    language: str = ""


class Question(msgspec.Struct, tag="question", kw_only=True):
    """A player's question for the reasoner (``ask`` sends these): answered whatever the wake
    budget, about the media time ``t`` (None: now)."""

    text: str
    t: float | None = None
    id: str = ""


class Advice(msgspec.Struct, tag="advice", kw_only=True):
    """What the reasoning core said about an event (or a question), streamed.

    A wake's advice comes as partial messages while the model writes (``final`` False, ``text``
    the advice so far) and then one final message with the whole structured answer.  ``wake``
    numbers the wake, so a reader replaces a partial with the next message of the same wake.
    ``latency_ms`` (``event_to_first``, ``event_to_final``) counts from the event's emission by
    the trigger.  ``saw_images``: whether the model was shown the event's frames (a text-only
    model gets the text evidence, and says so).
    """

    t_event: float
    backend: str
    text: str
    t_media: float = 0.0  # how far the media had got when the advice was final
    event_kind: str = ""
    priority: Priority = "normal"
    model: str = ""
    structured: dict[str, Any] = {}
    latency_ms: dict[str, float] = {}
    final: bool = True
    wake: int = 0
    question: str = ""
    saw_images: bool = False

    def record(self) -> dict[str, Any]:
        """The advice as one line of an advice JSONL file: the one place that format is built."""
        rec: dict[str, Any] = {
            "t_event": self.t_event, "t_media": self.t_media, "event_kind": self.event_kind,
            "priority": self.priority, "backend": self.backend, "model": self.model, "text": self.text,
            "structured": self.structured, "latency_ms": self.latency_ms, "saw_images": self.saw_images,
        }
        if self.question:
            rec["question"] = self.question
        return rec


class Entity(msgspec.Struct, kw_only=True):
    """One thing a segmenter found on a frame: what (``label``, the prompt that found it), where
    (``box`` x0, y0, x1, y1 as fractions of the frame's width and height), how sure (``score``)
    and how big (``mask_area``, the mask's fraction of the frame)."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask_area: float = 0.0


class Entities(msgspec.Struct, tag="entities", kw_only=True):
    """What concept segmentation (SAM3) found on one keyframe, and why that frame was chosen.

    ``t`` is the frame's media time; ``reason`` the cascade's choice (``event:death`` for a
    keyframe of a high-priority event, ``periodic`` for the low-rate sampling); ``event_t`` the
    moment of the event that asked for it (None for periodic frames).  Masks stay in the
    segmenter's process: only their area travels, so the timeline and the reasoner get the
    facts without megabytes of pixels."""

    t: float
    frame_index: int = 0
    entities: list[Entity] = []
    reason: str = ""
    event_t: float | None = None
    model: str = ""


class Context(msgspec.Struct, tag="context", kw_only=True):
    """The session so far, compressed for the reasoner's context slot (HiCo's snapshot).

    ``spans`` are ``(t_start, t_end, frames)`` per token, in time order, disjoint; ``tokens`` the
    token vectors (n x dim float32, travelling as their own frame) for a backend that takes
    embeddings (the transformers backend through a ProjectorBank); ``text`` the same spans as
    words, for any backend.  ``source`` names the embedding stream compressed (``thumb``,
    ``siglip`` ...)."""

    t: float
    text: str
    spans: list[tuple[float, float, int]] = []
    tokens: np.ndarray | None = None
    source: str = ""


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
    notes: dict[str, int] = {}  # stage-specific counts, e.g. events a restarted detector decided while warming up
    video_frames: int = 0  # video frames a source emitted: its fps counts these, not its audio chunks
    active_s: float = 0.0  # wall seconds from its first output to its last (a source's pace)
    device: str = ""  # where the stage says it really runs (Stage.device_actual): cpu, cuda:0, tensorrt; "" unsaid


class Metrics(msgspec.Struct, tag="metrics", kw_only=True):
    """A stage group's periodic metrics report (cumulative since the group started)."""

    group: str
    stages: list[StageMetrics]


# -- control: lifecycle and liveness, one Struct per action ---------------------------------------
# On the wire each is its own payload tag; the envelope's ``kind`` is "control" for all of them, so
# a link or a runner tells control from data with one string test and the codec keeps one rule
# (``kind`` must match the payload's type).  Who sends what is in copilot/group.py's docstring.


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True):
    """Liveness.  Group to supervisor every ``heartbeat_s`` (``pid``: the group's process).
    On a data link (see :attr:`copilot.stage.Stage.progress_s`): its producer has nothing more
    to say before the envelope's ``t_media``."""

    pid: int | None = None


class Ready(msgspec.Struct, tag="ready"):
    """Group to supervisor: every stage started and every output link sees its consumers."""


class Start(msgspec.Struct, tag="start"):
    """Supervisor to group: every group is ready, sources may begin."""


class EndOfStream(msgspec.Struct, tag="eos", kw_only=True):
    """On a data link: ``stage`` has sent everything it will on it."""

    stage: str = ""


class Stop(msgspec.Struct, tag="stop"):
    """Supervisor to group: end gracefully (sources stop, end of stream flows, stages flush)."""


class Done(msgspec.Struct, tag="done", kw_only=True):
    """Group to supervisor: every stage of the group has finished.

    ``metrics``: the group's final figures; ``lost_inputs``: input links that ended while the
    group was down; ``signal``: the signal sent to the group itself that cut it short, if any.
    """

    metrics: Metrics | None = None
    lost_inputs: list[str] = []
    signal: int | None = None


class Error(msgspec.Struct, tag="error", kw_only=True):
    """Group to supervisor: why the group fails, in one line.  ``usage``: bad input (a
    :class:`copilot.errors.UsageError`), not worth a restart."""

    message: str
    usage: bool = False


class InputsEnded(msgspec.Struct, tag="inputs_ended", kw_only=True):
    """Supervisor to group: the groups producing ``links`` have finished, so a consumer restarted
    after their end of stream went out stops waiting for it."""

    links: list[str]


Control = Heartbeat | Ready | Start | EndOfStream | Stop | Done | Error | InputsEnded
CONTROL_TYPES: tuple[type[msgspec.Struct], ...] = (Heartbeat, Ready, Start, EndOfStream, Stop, Done, Error, InputsEnded)

Payload = (VideoFrame | AudioChunk | Features | Cue | GameState | Event | Transcript | Question | Advice | Entities
           | Context | Metrics | Control)

DATA_TYPES: tuple[type[msgspec.Struct], ...] = (VideoFrame, AudioChunk, Features, Cue, GameState, Event, Transcript,
                                                 Question, Advice, Entities, Context, Metrics)
PAYLOAD_TYPES: tuple[type[msgspec.Struct], ...] = DATA_TYPES + CONTROL_TYPES
# the envelope's kind: a data payload's own tag, "control" for every control struct
KIND_OF: dict[type, str] = {
    **{t: str(t.__struct_config__.tag) for t in DATA_TYPES},
    **dict.fromkeys(CONTROL_TYPES, "control"),
}
KINDS: tuple[str, ...] = tuple(dict.fromkeys(KIND_OF.values()))


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

    def payload_as(self, typ: type[T]) -> T:
        """The payload as a ``typ``, for a stage whose ``accepts`` lets only that through (the
        runner has dropped anything else); a TypeError names the mismatch if one gets here."""
        p = self.payload
        if not isinstance(p, typ):
            raise TypeError(f"a {type(p).__name__} payload from {self.source} where a {typ.__name__} was expected")
        return p
