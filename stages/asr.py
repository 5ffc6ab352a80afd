"""ASR stage: speech on the audio link, transcribed by Whisper when a segment ends.

Whisper is the most expensive audio model in the cascade, so it only ever sees speech:
this stage runs its own Silero VAD (:mod:`engines.silero_vad`, cheap, the same code as the
``vad`` stage) to cut the stream into speech segments, keeps the last few seconds of
16 kHz audio in a buffer, and when a segment ends hands that segment (with a little audio
either side, which Whisper needs to catch the first and last syllable) to faster-whisper
on the stage's worker thread.  The event loop keeps taking audio meanwhile; segments are
transcribed one at a time, in order, and each result goes out on ``transcripts`` as a
:class:`copilot.messages.Transcript` stamped with the segment's start.

The model is ``params.model`` (a local CTranslate2 Whisper directory, or ``package:NAME``),
else the run option ``asr_model`` (the CLI's ``--asr-model``).  Without either the stage
says so once in the log and passes nothing, which is how the default pipeline runs it: a
model is never downloaded.  A model that does not exist is a usage error (one line, exit
code 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any, Literal

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.keywords import match_keywords
from copilot.messages import PRIORITIES, AudioChunk, Cue, Envelope, Priority, Transcript
from copilot.profile import profile_from_options
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from engines.onnx_session import SessionConfig
from engines.silero_vad import SAMPLE_RATE, SileroVad, SpeechEdge, SpeechSegmenter, VadStream


class AsrParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None  # CTranslate2 Whisper directory or "package:NAME"; None: the stage is off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "default"  # default: int8 on CPU, float16 on CUDA
    threads: int = 1  # CPU threads for Whisper
    beam_size: int = 1
    language: str | None = None  # None: English for .en models, detected otherwise
    # speech segmentation (its own Silero VAD)
    vad_threshold: float = 0.5
    min_speech_s: float = 0.25
    min_silence_s: float = 0.4
    max_speech_s: float = 25.0
    pre_roll_s: float = 0.25  # audio kept before a segment's start
    post_roll_s: float = 0.25  # and after its end (at most min_silence_s is buffered then)
    max_pending: int = 8  # segments waiting for Whisper; beyond this the oldest is dropped and counted

    def __post_init__(self) -> None:
        if self.model is not None:
            from engines.whisper_asr import resolve_model_path

            try:
                resolve_model_path(self.model)
            except UsageError as exc:
                raise ValueError(f"model: {exc}") from None
        if self.threads < 1 or self.beam_size < 1 or self.max_pending < 1:
            raise ValueError("threads, beam_size and max_pending must be >= 1")
        if not 0 < self.max_speech_s <= 30:
            raise ValueError(f"max_speech_s must be in (0, 30] (Whisper reads 30 s), got {self.max_speech_s}")
        if self.post_roll_s > self.min_silence_s:
            raise ValueError("post_roll_s must be <= min_silence_s (audio after the end is not buffered longer)")


def spoken_keyword_cue(t: float, said: str, keywords: dict[str, Priority]) -> Cue | None:
    """A late cue when speech that started at ``t`` says one of the profile's keywords (the most
    urgent one names it), else None.  Late: a transcript comes after its segment ended and Whisper
    ran, seconds after ``t``, so the trigger's merge must never wait for it."""
    found = match_keywords([said], keywords) if keywords and said else []
    if not found:
        return None
    best = min(found, key=lambda kw: PRIORITIES.index(keywords[kw]))
    return Cue(t=t, kind="spoken_keyword", priority=keywords[best], reason=f"heard {best!r}: {said.strip()!r}",
               late=True, evidence={"keyword": best, "text": said.strip()})


class _AudioBuffer:
    """The last ``keep_s`` seconds of 16 kHz audio with media times, cut by time span."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._chunks: deque[tuple[float, np.ndarray]] = deque()

    def add(self, t: float, audio: np.ndarray) -> None:
        if audio.size:
            self._chunks.append((t, audio))
        end = t + audio.size / SAMPLE_RATE
        while self._chunks and self._chunks[0][0] + self._chunks[0][1].size / SAMPLE_RATE < end - self.keep_s:
            self._chunks.popleft()

    def cut(self, t0: float, t1: float) -> np.ndarray:
        parts = []
        for t, a in self._chunks:
            a_end = t + a.size / SAMPLE_RATE
            if a_end <= t0 or t >= t1:
                continue
            i0 = max(0, round((t0 - t) * SAMPLE_RATE))
            i1 = min(a.size, round((t1 - t) * SAMPLE_RATE))
            if i1 > i0:
                parts.append(a[i0:i1])
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@register_stage("asr")
class AsrStage(Stage[AsrParams]):
    """faster-whisper on VAD-cut speech segments; emits Transcript messages."""

    Params = AsrParams
    accepts = (AudioChunk,)
    output_ports = ("transcripts", "cues")

    @classmethod
    def resolve_model(cls, model: str) -> str:
        """The model directory ``model`` names (a path or ``package:NAME``), checked before the
        run starts (the CLI's ``--asr-model``); a :class:`UsageError` saying what is missing."""
        from engines.whisper_asr import resolve_model_path

        return str(resolve_model_path(model))

    def __init__(self, ctx: StageContext, params: AsrParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.asr: Any = None
        self._vad: VadStream | None = None
        self._buffer = _AudioBuffer(self.p.max_speech_s + self.p.pre_roll_s + 2.0)
        self._queue: asyncio.Queue[tuple[np.ndarray, float, float, Envelope] | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._last: Envelope | None = None
        self.transcribed = 0
        self._keywords: dict[str, Priority] = {}
        self.dropped_segments = 0

    async def start(self) -> None:
        p = self.p
        self._keywords = dict(profile_from_options(self.ctx.options).keywords)
        model = p.model or self.ctx.options.get("asr_model")
        if not model:
            self.log.info("asr: no model configured (params.model or --asr-model); passing nothing")
            return
        from engines.whisper_asr import WhisperAsr

        self.asr = await self.run_blocking(
            lambda: WhisperAsr(str(model), device=p.device, compute_type=p.compute_type, cpu_threads=p.threads,
                               beam_size=p.beam_size, language=p.language)
        )
        vad = SileroVad(None, SessionConfig(device="cpu", intra_op_threads=1))
        seg = SpeechSegmenter(threshold=p.vad_threshold, min_speech_s=p.min_speech_s, min_silence_s=p.min_silence_s,
                              max_speech_s=p.max_speech_s, pad_s=0.0)
        self._vad = VadStream(vad, seg)
        self._worker = asyncio.ensure_future(self._work())

    async def process(self, msg: Envelope) -> None:
        chunk = msg.payload_as(AudioChunk)
        if self._vad is None:
            return
        self._last = msg
        res = self._vad.push(chunk.samples, chunk.sample_rate, msg.t_media)
        self._buffer.add(res.t_audio, res.audio)
        for edge in res.edges:
            self._segment_done(edge, msg)

    def _segment_done(self, edge: SpeechEdge, msg: Envelope) -> None:
        if edge.edge != "end" or edge.t_end is None:
            return
        audio = self._buffer.cut(edge.t_start - self.p.pre_roll_s, edge.t_end + self.p.post_roll_s)
        if self._queue.qsize() >= self.p.max_pending:
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped_segments += 1
            self.recorder.dropped["asr_backlog"] += 1
            self.log.warning("asr: Whisper is behind; dropped the oldest waiting speech segment (%d so far)",
                             self.dropped_segments)
        self._queue.put_nowait((audio, edge.t_start, edge.t_end, msg))

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if item is None:
                    return
                audio, t0, t1, parent = item
                t_busy = time.perf_counter_ns()
                text, language = await self.run_blocking(self.asr.transcribe, audio)
                self.recorder.observe_extra("whisper_ms", (time.perf_counter_ns() - t_busy) / 1e6)
                if text:
                    self.transcribed += 1
                    await self.emit(
                        "transcripts",
                        Transcript(text=text, t_start=round(t0, 4), t_end=round(t1, 4), language=language),
                        parent=parent,
                        t_media=t0,
                    )
                    cue = spoken_keyword_cue(t0, text, self._keywords)
                    if cue is not None:
                        await self.emit("cues", cue, parent=parent, t_media=t0)
            except Exception:
                self.log.exception("asr: transcription failed; segment skipped")
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        if self._vad is None:
            return
        res = self._vad.finish()
        self._buffer.add(res.t_audio, res.audio)
        if self._last is not None:
            for edge in res.edges:
                self._segment_done(edge, self._last)
        self._queue.put_nowait(None)
        if self._worker is not None:
            await self._worker

    async def close(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
