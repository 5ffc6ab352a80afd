"""HiCo stage: the whole session so far, compressed, for the reasoner's context slot.

A woken reasoner sees the event, the game state and a few frames around it; what led there (a
long quiet stretch, a string of lost lives, a new level a minute ago) is lost unless something
remembers the session.  This stage feeds one embedding stream (``Features`` named
``params.source``, the thumbnails by default) into :class:`stages.hico_tokens.HiCo`, which keeps
every frame of the session in at most ``budget`` tokens however long it runs, and files the
trigger's events beside it.

On port ``context`` it emits a :class:`~copilot.messages.Context`:

* right after each event of priority ``min_priority`` or above, so the reasoner that the same
  event wakes has the session up to it (the event is already in the text);
* every ``every_s`` seconds of media, so a reasoner woken by a question, or a timeline, has a
  recent one;
* once more at the end of the stream if frames came since the last one.

``tokens`` is the session at ``context_tokens`` tokens (float32, for a backend that takes
embeddings through a projector); ``text`` the same session at ``text_spans`` spans, one line each::

    00:00-02:41: 4830 frames, steady, events: life_lost (high) at 01:12
    02:41-02:52: 330 frames, cut, events: game_over (critical) at 02:50, reward (normal) at 02:51

The middle word says how much the picture changed inside the span: ``cut`` when two consecutive
frames differ as much as a change of screen does, ``changing`` when the frames drift away from
the span's mean, ``steady`` otherwise.  Events are matched to the span that holds their ``t`` (one
later than the newest frame goes to the last span, which the snapshot stretches to it).

Memory is bounded: the compressor's arrays are allocated once for ``budget`` tokens and the
events are a deque of the last ``events_kept``.  The cost of every push is the stage's
``update_ms`` timing, a context's ``context_ms``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Annotated, ClassVar

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import PRIORITY_RANK, Context, Envelope, Event, Features, Priority
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from stages.hico_tokens import DEFAULT_BUDGET, DEFAULT_RECENT, ContextSnapshot, HiCo

# 1 - cos between two consecutive frames above which a span holds a cut: a change of screen (River
# Raid's crash flashes: 0.33 to 0.68 between thumbnails), where ongoing play stays under 0.03 (the
# 99th percentile over random play of Breakout, Seaquest, Ms. Pac-Man and River Raid)
CUT_JUMP = 0.25
# the mean cosine of a span's frames to its own mean below which the picture is called changing
STEADY_COHERENCE = 0.95
EVENTS_PER_LINE = 6  # events named on one line; more are counted ("+3 more")


class HicoParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    source: str = "thumb"  # the Features name of the embedding stream compressed
    budget: Annotated[int, msgspec.Meta(ge=3)] = DEFAULT_BUDGET  # tokens held, at most
    recent: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_RECENT  # newest frames kept as they are
    every_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0  # a context every this many media seconds
    min_priority: Priority = "high"  # events at or above this get a context right after them
    text_spans: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8  # lines of the text summary
    context_tokens: Annotated[int, msgspec.Meta(ge=1)] = 64  # token vectors in each context
    events_kept: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200  # events remembered for the text


def mmss(t: float) -> str:
    """``MM:SS`` of a media time (minutes go past 59 in a long session: ``75:03``)."""
    m, s = divmod(int(max(0.0, t)), 60)
    return f"{m:02d}:{s:02d}"


def change_word(coherence: float, max_jump: float) -> str:
    """How much the picture changed inside a span: ``cut``, ``changing`` or ``steady``."""
    if max_jump >= CUT_JUMP:
        return "cut"
    if coherence < STEADY_COHERENCE:
        return "changing"
    return "steady"


def summary(snap: ContextSnapshot, events: list[Event] | deque[Event]) -> str:
    """One line per span of ``snap``: its time, frames, change word and the events inside it."""
    if not len(snap):
        return ""
    starts = [s[0] for s in snap.spans]
    per_span: list[list[Event]] = [[] for _ in starts]
    for ev in events:
        k = int(np.searchsorted(starts, ev.t, side="right")) - 1
        per_span[min(max(k, 0), len(starts) - 1)].append(ev)
    lines = []
    for (t0, t1, n), coh, jump, evs in zip(snap.spans, snap.coherence, snap.max_jump, per_span, strict=True):
        line = f"{mmss(t0)}-{mmss(t1)}: {n} frame{'s' if n != 1 else ''}, {change_word(float(coh), float(jump))}"
        if evs:
            named = [f"{e.event_kind} ({e.priority}) at {mmss(e.t)}" for e in sorted(evs, key=lambda e: e.t)]
            more = len(named) - EVENTS_PER_LINE
            line += ", events: " + ", ".join(named[:EVENTS_PER_LINE]) + (f", +{more} more" if more > 0 else "")
        lines.append(line)
    return "\n".join(lines)


@register_stage("hico")
class HicoStage(Stage[HicoParams]):
    """Compresses an embedding stream with HiCo; emits ``Context`` after key events and every ``every_s``."""

    Params = HicoParams
    accepts = (Features, Event)
    output_ports: ClassVar[tuple[str, ...]] = ("context",)

    @classmethod
    def check(cls, params: HicoParams) -> None:
        if params.budget < params.recent + 2:
            raise UsageError(f"hico: budget must be at least recent + 2 = {params.recent + 2} tokens, "
                             f"got {params.budget}")
        if params.context_tokens > params.budget:
            raise UsageError(f"hico: context_tokens ({params.context_tokens}) cannot exceed budget ({params.budget})")
        if not params.source:
            raise UsageError("hico: source must name a Features stream (thumb, ...)")

    def __init__(self, ctx: StageContext, params: HicoParams) -> None:
        super().__init__(ctx, params)
        self.check(params)
        self.hico: HiCo | None = None  # made at the first vector, when its width is known
        self.events: deque[Event] = deque(maxlen=params.events_kept)
        self._min_rank = PRIORITY_RANK[params.min_priority]
        self._next_t: float | None = None  # the media time the next periodic context is due
        self._fresh = 0  # frames since the last context

    async def process(self, msg: Envelope) -> None:
        p = msg.payload
        if isinstance(p, Event):
            self.events.append(p)
            if PRIORITY_RANK.get(p.priority, len(PRIORITY_RANK)) <= self._min_rank:
                await self._emit(msg, max(p.t, msg.t_media))
            return
        if not isinstance(p, Features) or p.name != self.params.source:
            return
        if p.vector is None:
            self.recorder.note("no_vector")
            return
        t = msg.t_media
        if not self._push(t, p.vector):
            return
        if self._next_t is None:
            self._next_t = t + self.params.every_s
        if t >= self._next_t - 1e-9:
            await self._emit(msg, t)
            every = self.params.every_s
            self._next_t += every * max(1, math.floor((t - self._next_t) / every) + 1)

    async def flush(self) -> None:
        if self._fresh and self.hico is not None:
            await self._emit(None, self.hico.end or 0.0)

    def _push(self, t: float, vector: np.ndarray) -> bool:
        """Push one frame; a vector HiCo refuses (another width, time going back) is counted and dropped."""
        t0 = time.perf_counter_ns()
        try:
            if self.hico is None:
                self.hico = HiCo(int(np.asarray(vector).size), self.params.budget, self.params.recent)
            self.hico.push(t, vector)
        except ValueError as exc:
            reason = "late" if "backwards" in str(exc) else "bad_vector"
            self.recorder.drop(reason)
            self.warn_once(reason, f"hico: {exc} (dropped; counted as {reason})")
            return False
        self.recorder.observe_extra("update_ms", (time.perf_counter_ns() - t0) / 1e6)
        self._fresh += 1
        return True

    async def snapshot(self, t_now: float) -> Context | None:
        """The Context as of media time ``t_now``, or None before the first frame.

        The tokens are copied here; the merging down to ``context_tokens`` and ``text_spans`` (tens
        of ms for a full budget) runs on the stage's worker thread, so the group's event loop (the
        reasoner shares it) keeps receiving meanwhile."""
        h = self.hico
        if h is None or not len(h):
            return None
        p = self.params
        t0 = time.perf_counter_ns()
        frozen = h.freeze(t_now)
        tokens, spans = await self.run_blocking(frozen.contexts, [p.context_tokens, p.text_spans])
        text = summary(spans, self.events)
        self.recorder.observe_extra("context_ms", (time.perf_counter_ns() - t0) / 1e6)
        return Context(t=t_now, text=text, spans=tokens.spans,
                       tokens=np.ascontiguousarray(tokens.vectors, np.float32), source=p.source)

    async def _emit(self, parent: Envelope | None, t_now: float) -> None:
        ctx = await self.snapshot(t_now)
        if ctx is None:
            self.recorder.note("no_frames_yet")
            return
        self._fresh = 0
        await self.emit("context", ctx, parent=parent, t_media=ctx.t)
