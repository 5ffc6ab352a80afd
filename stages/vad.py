"""VAD stage: is someone speaking, and when did speech start and end.

Speech over game audio (a streamer's voice, a game's dialogue) is a signal of its own for
the trigger, and ASR needs its boundaries.  The Silero model reads 32 ms windows at 16 kHz;
this stage takes the audio link at whatever rate and channel count it comes in, keeps the
model's state across chunks (see :mod:`engines.silero_vad`) and emits on ``features``:

* per window: ``Features(name="vad", values={"speech_prob": p, "speech": 0|1})`` where
  ``speech`` is 1 inside a speech segment (hysteresis, not the raw threshold), stamped with
  the window's start in media time;
* per segment edge: ``Features(name="speech", text={"edge": "start"}, values={"t_start": s})``
  and ``Features(name="speech", text={"edge": "end"}, values={"t_start": s, "t_end": e,
  "duration": e - s})``, stamped with the edge's media time.

The model costs well under a millisecond per window, so it runs inline on the event loop.
"""

from __future__ import annotations

import os

import msgspec

from copilot.messages import AudioChunk, Envelope, Features
from copilot.registry import register_stage
from copilot.signals import SPEECH, Signal
from copilot.stage import Stage, StageContext
from engines.onnx_session import SessionConfig
from engines.silero_vad import SileroVad, SpeechEdge, SpeechSegmenter, VadResult, VadStream


class VadParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    threshold: float = 0.5  # speech probability that opens a segment
    neg_threshold: float | None = None  # under this for min_silence_s closes it (default threshold - 0.15)
    min_speech_s: float = 0.25  # shorter segments are dropped
    min_silence_s: float = 0.3  # silence that ends a segment
    max_speech_s: float = 30.0  # longer segments are cut here
    pad_s: float = 0.03  # each segment widened by this on both sides
    emit_windows: bool = True  # per-window probabilities (about 31 a second); edges are always emitted
    model: str | None = None  # a Silero VAD ONNX file; default: the one inside faster-whisper
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0 < self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be in (0, threshold], got {self.neg_threshold}")
        for key in ("min_speech_s", "min_silence_s", "pad_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_speech_s <= 0:
            raise ValueError(f"max_speech_s must be > 0, got {self.max_speech_s}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.model is not None and not os.path.isfile(self.model):
            raise ValueError(f"model: no Silero VAD model file at {self.model}")


def make_vad_stream(p: VadParams) -> VadStream:
    """A :class:`engines.silero_vad.VadStream` configured by ``p`` (loads the model)."""
    vad = SileroVad(p.model, SessionConfig(device="cpu", intra_op_threads=p.threads))
    seg = SpeechSegmenter(
        threshold=p.threshold, neg_threshold=p.neg_threshold, min_speech_s=p.min_speech_s,
        min_silence_s=p.min_silence_s, max_speech_s=p.max_speech_s, pad_s=p.pad_s,
    )
    return VadStream(vad, seg)


def edge_features(edge: SpeechEdge) -> Features:
    if edge.edge == "start":
        return Features(name="speech", text={"edge": "start"}, values={"t_start": round(edge.t_start, 4)})
    t_end = float(edge.t_end if edge.t_end is not None else edge.t_start)
    return Features(
        name="speech",
        text={"edge": "end"},
        values={
            "t_start": round(edge.t_start, 4),
            "t_end": round(t_end, 4),
            "duration": round(t_end - edge.t_start, 4),
        },
    )


@register_stage("vad")
class VadStage(Stage[VadParams]):
    """Silero VAD on the audio link: per-window speech probability and speech segment edges."""

    Params = VadParams
    accepts = (AudioChunk,)
    output_ports = ("features",)
    # kept under the trigger's agree_min by its default weight: no tuning data has speech, so it is evidence
    signals = (Signal("vad.speech_prob", SPEECH, floor=0.5),)

    def __init__(self, ctx: StageContext, params: VadParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self._stream: VadStream | None = None  # built in start()
        self._last: Envelope | None = None

    async def start(self) -> None:
        # the silero model is a 1-2 MB file: loading it inline takes tens of milliseconds
        self._stream = make_vad_stream(self.p)

    async def process(self, msg: Envelope) -> None:
        chunk = msg.payload_as(AudioChunk)
        if self._stream is None:
            return
        self._last = msg
        res = self._stream.push(chunk.samples, chunk.sample_rate, msg.t_media)
        await self._emit_result(res, msg)

    async def _emit_result(self, res: VadResult, msg: Envelope) -> None:
        edges = list(res.edges)
        for w in res.windows:
            # edges decided before or by this window go out first, in time order
            while edges and edges[0].t <= w.t1:
                e = edges.pop(0)
                await self.emit("features", edge_features(e), parent=msg, t_media=e.t)
            if self.p.emit_windows:
                await self.emit(
                    "features",
                    Features(name="vad", values={"speech_prob": round(w.prob, 4), "speech": 1.0 if w.active else 0.0}),
                    parent=msg,
                    t_media=w.t0,
                )
        for e in edges:
            await self.emit("features", edge_features(e), parent=msg, t_media=e.t)

    async def flush(self) -> None:
        if self._stream is not None and self._last is not None:
            await self._emit_result(self._stream.finish(), self._last)
