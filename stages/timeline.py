"""The session timeline stage: everything seen and said, written down as facts for questions later.

Active when the run option named by ``option`` (``session``, set by ``--session DIR``) names a
directory; without it the stage takes its inputs and writes nothing.  It writes
``<DIR>/timeline.sqlite`` (:mod:`stages.timeline_db`) and keyframe JPEGs in ``<DIR>/keyframes/``.

Inputs (by payload type, whatever links carry them): ``Event`` (the trigger's events), ``GameState``
(the HUD values read by OCR), ``Transcript`` (speech), ``Advice`` (the reasoner's final advice; partial
advice is skipped) and ``VideoFrame`` (only to keep keyframes).  Each becomes facts with a
plain-English ``text``:

* an event: ``03:12 critical event hud_revert (score 0.50): a HUD area went back to what it showed
  6.6 s ago; likely a life lost or death``.  ``critical`` is the trigger's death-like priority (the
  truth's life-lost moments are critical), and the text says so in words for the search;
* a game-state change: ``03:13 lives 3 -> 2 (down 1: a life lost)``, and a ``state`` row per value
  (the first reading of the HUD is one ``HUD read: ...`` fact); text fields that are not numbers
  (``GAME OVER`` read on screen) are ``ocr`` facts;
* a transcript: its words; advice: its text, the analysis behind it and the question it answered;
* ``Entities`` (SAM3 on a keyframe): ``03:12 seen on the keyframe of critical event life_lost: player
  (0.91, lower left, 2% of the screen), enemy x3 (best 0.80)``, the labels, boxes, scores and mask
  areas in its data;
* a **link**: a value of ``link_keys`` (lives, health ...) going down from ``link_before_s`` before to
  ``link_window_s`` after an event is linked to the highest-priority (then nearest) such event:
  ``03:13 lives 3 -> 2, 1.2 s after the critical event hud_revert at 03:12 (life lost)``.  Events are
  decided up to 0.5 s after their moment and may come after the state change they caused, so a drop
  waits ``link_hold_s`` of media time for its cause before it is linked; an event that comes later
  still links to a drop left without a cause.

Keyframes: a bounded ring keeps recent frames (``keyframe_fps`` a second for ``keyframe_keep_s``,
downscaled by an integer stride on arrival); each event of priority ``keyframe_priority`` or higher gets
the frame nearest its ``t`` as ``keyframes/<MMmSS.sss>_<kind>.jpg`` (``keyframe_width`` px wide, Pillow),
named in the event's row.  When the newest frame is still before the event, the keyframe waits for a
later frame (at most ``2 s`` of media, and the end of the run).

The database and the JPEGs are written on the stage's worker thread; rows are committed in batches
(``batch_rows`` or ``batch_s`` of wall time) by a small ticker, so a reader (``gamecopilot ask``) sees a
live run within about a second and a killed run keeps every committed row.  A write that fails is
one warning and a count (``notes.write_errors``), never the end of the group: the timeline is a
record, perception goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import re
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import (
    PRIORITY_RANK,
    Advice,
    Entities,
    Envelope,
    Event,
    GameState,
    Priority,
    Transcript,
    VideoFrame,
)
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from stages.timeline_db import KEYFRAMES_DIR, TimelineWriter, keyframe_name

# What each priority means, in words a person and a text search find ("when did I lose a life?").
PRIORITY_MEANING: dict[str, str] = {
    "critical": "likely a life lost or death",
    "high": "a major moment",
    "normal": "",
    "low": "",
}
DEFAULT_LINK_KEYS = r"live|life|lifes|ships|men|health|hp|energy|shield|armou?r|stamina"
_LIFE_KEYS = re.compile(r"live|life|lifes|ships|men|balls|tries", re.I)
_HEALTH_KEYS = re.compile(r"health|hp|energy|shield|armou?r|stamina|oxygen|fuel", re.I)


class TimelineParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    option: str = "session"  # the run option naming the session directory (--session DIR)
    keyframe_priority: Priority = "normal"  # events this important or more get a keyframe
    keyframes: bool = True
    keyframe_width: Annotated[int, msgspec.Meta(ge=32, le=1920)] = 320
    keyframe_fps: Annotated[float, msgspec.Meta(gt=0.0, le=30.0)] = 4.0
    keyframe_keep_s: Annotated[float, msgspec.Meta(gt=0.0, le=30.0)] = 4.0
    keyframe_quality: Annotated[int, msgspec.Meta(ge=10, le=100)] = 80
    link_window_s: Annotated[float, msgspec.Meta(ge=0.0, le=60.0)] = 5.0
    link_before_s: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.5
    link_hold_s: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] = 2.0
    link_keys: str = DEFAULT_LINK_KEYS  # a regex over state keys: which values going down are linked
    batch_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    batch_s: Annotated[float, msgspec.Meta(gt=0.0, le=60.0)] = 0.5
    max_pending: Annotated[int, msgspec.Meta(ge=64)] = 20_000


def clock_text(t: float) -> str:
    """``MM:SS`` (minutes may pass 59: ``75:03``)."""
    whole = max(0, math.floor(t + 1e-6))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def num(v: float) -> str:
    return f"{v:g}"


def change_meaning(key: str, old: float, new: float) -> tuple[str, str]:
    """``(words, link kind)`` for ``key`` going from ``old`` to ``new``."""
    if new < old:
        if _LIFE_KEYS.search(key):
            return f"down {num(old - new)}: a life lost", "life_lost"
        if _HEALTH_KEYS.search(key):
            return f"down {num(old - new)}: damage taken", "damage"
        return f"down {num(old - new)}", "decrease"
    if _LIFE_KEYS.search(key):
        return f"up {num(new - old)}: a life gained", "increase"
    return f"up {num(new - old)}", "increase"


def describe_event(ev: Event) -> str:
    """An event in a line: when, how important, what fired it (the cues' reasons, else the signal
    families), what the HUD did, and what its priority means."""
    head = f"{clock_text(ev.t)} {ev.priority} event {ev.event_kind} (score {ev.score:.2f})"
    evidence = ev.evidence if isinstance(ev.evidence, dict) else {}
    reasons = evidence.get("reasons")
    parts = list(dict.fromkeys(str(r) for r in reasons if r))[:3] if isinstance(reasons, list) else []
    if not parts:
        fams = evidence.get("families")
        if isinstance(fams, dict) and fams:
            parts.append("signals: " + ", ".join(str(k) for k in list(fams)[:4]))
    before, after = evidence.get("state_before"), evidence.get("state_after")
    if isinstance(before, dict) and isinstance(after, dict):
        moved = [f"{k} {_fmt(before.get(k))} -> {_fmt(v)}" for k, v in after.items() if before.get(k) != v]
        if moved:
            parts.append("HUD " + ", ".join(moved[:4]))
    meaning = PRIORITY_MEANING.get(ev.priority, "")
    if meaning:
        parts.append(meaning)
    return head + (": " + "; ".join(parts) if parts else "")


def _where_on_screen(box: tuple[float, float, float, float]) -> str:
    """``upper left`` ... ``lower right`` (or ``centre``) for a box given as fractions of the frame."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "centre"


def describe_entities(es: Entities) -> str:
    """One sentence for a keyframe's entities, grouped by label, best score first."""
    why = es.reason
    if why.startswith("event:"):
        why = f"the keyframe of event {why.split(':', 1)[1]}"
    elif why == "periodic":
        why = "a periodic keyframe"
    groups: dict[str, list[Any]] = {}
    for e in sorted(es.entities, key=lambda e: -e.score):
        groups.setdefault(e.label, []).append(e)
    parts = []
    for label, items in groups.items():
        best = items[0]
        if len(items) == 1:
            parts.append(f"{label} ({best.score:.2f}, {_where_on_screen(best.box)}, "
                         f"{best.mask_area * 100:.0f}% of the screen)")
        else:
            parts.append(f"{label} x{len(items)} (best {best.score:.2f})")
    return f"{clock_text(es.t)} seen on {why or 'a keyframe'}: " + ", ".join(parts)


def _fmt(v: Any) -> str:
    return num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def describe_advice(a: Advice) -> str:
    about = f"{a.priority} {a.event_kind} at {clock_text(a.t_event)}" if a.event_kind else clock_text(a.t_event)
    text = a.text.strip()
    if a.question:
        head = f"{clock_text(a.t_event)} answer to the question {a.question.strip()!r}: {text}"
    else:
        head = f"{clock_text(a.t_event)} advice on the {about}: {text}"
    why = a.structured.get("analysis") if isinstance(a.structured, dict) else None
    if isinstance(why, str) and why.strip() and why.strip() != text:
        head += f" (why: {why.strip()})"
    return head


@dataclass
class _Drop:
    """A linkable value that went down, waiting for (or done looking for) its cause."""

    t: float
    key: str
    old: float
    new: float
    fact: int
    kind: str
    resolved: bool = False
    linked: bool = False


@dataclass
class _SeenEvent:
    t: float
    rank: int
    priority: str
    kind: str
    fact: int


class KeyframeRing:
    """Recent frames, ``fps`` a second for ``keep_s`` seconds, each downscaled on arrival by an integer
    stride to between ``width`` and twice that (bounded: ``keep_s * fps + 2`` small frames)."""

    def __init__(self, fps: float = 4.0, keep_s: float = 4.0, width: int = 320) -> None:
        self.step_s = 1.0 / fps
        self.width = width
        self.frames: deque[tuple[float, np.ndarray]] = deque(maxlen=max(2, int(keep_s * fps) + 2))

    @property
    def newest_t(self) -> float | None:
        return self.frames[-1][0] if self.frames else None

    def offer(self, t: float, image: np.ndarray, pixel_format: str = "rgb24") -> bool:
        if self.frames and t - self.frames[-1][0] < self.step_s - 1e-6 and t >= self.frames[-1][0]:
            return False
        if self.frames and t < self.frames[-1][0]:  # the media went back (a new replay): start afresh
            self.frames.clear()
        self.frames.append((t, to_rgb_small(image, pixel_format, self.width)))
        return True

    def nearest(self, t: float) -> tuple[float, np.ndarray] | None:
        if not self.frames:
            return None
        return min(self.frames, key=lambda f: abs(f[0] - t))


def to_rgb_small(image: np.ndarray, pixel_format: str, width: int) -> np.ndarray:
    """An RGB copy of ``image`` shrunk by an integer stride so it is less than twice ``width`` wide."""
    img = image
    if img.ndim == 2:
        img = img[..., None]
    stride = max(1, img.shape[1] // max(1, width))
    img = img[::stride, ::stride]
    if pixel_format == "bgra" and img.shape[2] >= 3:
        img = img[..., 2::-1]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    else:
        img = img[..., :3]
    return np.ascontiguousarray(img, dtype=np.uint8)


def save_jpeg(image: np.ndarray, path: Path, width: int, quality: int) -> None:
    """Write ``image`` (RGB) as a JPEG ``width`` px wide at most (atomically: a reader never sees half)."""
    from PIL import Image

    img = Image.fromarray(image)
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    img.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


@register_stage("timeline")
class TimelineStage(Stage[TimelineParams]):
    Params = TimelineParams
    accepts = (Event, GameState, Transcript, Advice, Entities, VideoFrame)

    @classmethod
    def check(cls, params: TimelineParams) -> object:
        try:
            re.compile(params.link_keys)
        except re.error as exc:
            raise UsageError(f"timeline: link_keys is not a regular expression ({exc})") from None
        return None

    def __init__(self, ctx: StageContext, params: TimelineParams) -> None:
        super().__init__(ctx, params)
        p = params
        value = ctx.options.get(p.option)
        self.directory: Path | None = Path(str(value)) if value else None
        self.writer: TimelineWriter | None = None
        self.ring = KeyframeRing(p.keyframe_fps, p.keyframe_keep_s, p.keyframe_width)
        self._keyframes = p.keyframes
        self._keyframe_rank = PRIORITY_RANK[p.keyframe_priority]
        self._link_keys = re.compile(p.link_keys, re.I)
        self._values: dict[str, float] = {}
        self._texts: dict[str, str] = {}
        self._events: deque[_SeenEvent] = deque(maxlen=256)
        self._drops: deque[_Drop] = deque(maxlen=256)
        self._waiting: deque[tuple[float, int, str]] = deque()  # (event t, fact id, kind) awaiting a frame
        self._names: set[str] = set()
        self._media = 0.0
        self._ticker: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.writer is not None

    async def start(self) -> None:
        if self.directory is None:
            return
        p = self.params
        self.writer = await self.run_blocking(lambda: TimelineWriter(
            self.directory or Path("."), batch_rows=p.batch_rows, batch_s=p.batch_s, max_pending=p.max_pending))
        if self._keyframes and importlib.util.find_spec("PIL") is None:
            self._keyframes = False
            self.warn_once("pillow", "timeline: keyframes need Pillow (pip install pillow); facts are written without "
                                 "them")
        opts = self.ctx.options
        info: dict[str, Any] = {k: opts[k] for k in ("input", "source", "profile", "pipeline_name", "reasoner",
                                                     "llm_model", "game") if opts.get(k)}
        inc = self.ctx.incarnation
        info["started" if inc == 0 else f"restarted_{inc}"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.writer.set_session(info)
        await self._commit()
        self._ticker = asyncio.create_task(self._tick(), name=f"{self.name}-commit")

    # -- arrivals -----------------------------------------------------------------------------
    async def process(self, msg: Envelope) -> None:
        if self.writer is None:
            return
        self._media = max(self._media, msg.t_media)
        p = msg.payload
        try:
            if isinstance(p, VideoFrame):
                if self._keyframes and self.ring.offer(msg.t_media, p.image, p.pixel_format):
                    await self._keyframes_due(final=False)
                return
            if isinstance(p, Event):
                await self._on_event(p)
            elif isinstance(p, GameState):
                self._on_state(p, msg.t_media)
            elif isinstance(p, Transcript):
                self._on_transcript(p)
            elif isinstance(p, Advice) and p.final:
                self._on_advice(p)
            elif isinstance(p, Entities):
                self._on_entities(p)
            self._resolve_drops(final=False)
            if self._keyframes and self._waiting:
                await self._keyframes_due(final=False)
        except (OSError, sqlite3.Error, ValueError) as exc:
            self._failed(exc)
        if self.writer.pending >= self.writer.batch_rows:
            await self._commit()

    async def _on_event(self, ev: Event) -> None:
        assert self.writer is not None
        keyframe: str | None = None
        wants_frame = self._keyframes and PRIORITY_RANK.get(ev.priority, 9) <= self._keyframe_rank
        newest = self.ring.newest_t
        if wants_frame and newest is not None and newest >= ev.t:
            keyframe = await self._write_keyframe(ev.t, ev.event_kind)
            wants_frame = False
        data = {"event_kind": ev.event_kind, "score": ev.score, "evidence": ev.evidence}
        fid = self.writer.add_fact(ev.t, "event", describe_event(ev), priority=ev.priority, data=data,
                                   keyframe=keyframe)
        if wants_frame:
            self._waiting.append((ev.t, fid, ev.event_kind))
            while len(self._waiting) > 32:  # bounded: the oldest takes the nearest frame there is
                t, f, kind = self._waiting.popleft()
                await self._keyframe_for(t, f, kind)
        seen = _SeenEvent(t=ev.t, rank=PRIORITY_RANK.get(ev.priority, 9), priority=ev.priority, kind=ev.event_kind,
                          fact=fid)
        self._events.append(seen)
        # a drop already past its hold with no cause found: this event (decided late) may be it
        for d in self._drops:
            if d.resolved and not d.linked and seen.t - self.params.link_before_s <= d.t <= \
                    seen.t + self.params.link_window_s:
                self._link(seen, d)

    def _on_state(self, st: GameState, t_msg: float) -> None:
        assert self.writer is not None
        first: list[str] = []
        for key, value in st.values.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            old = self._values.get(key)
            if old == v:
                continue
            self._values[key] = v
            t = float(st.changed_at.get(key, t_msg)) if old is not None else t_msg
            if old is None:
                first.append(f"{key} {num(v)}")
                self.writer.add_state(t_msg, key, v)
                continue
            words, kind = change_meaning(key, old, v)
            prio = "high" if kind == "life_lost" else "normal"
            text = f"{clock_text(t)} {key} {num(old)} -> {num(v)} ({words})"
            fid = self.writer.add_fact(t, "state", text, priority=prio,
                                       data={"key": key, "from": old, "to": v, "change": kind})
            self.writer.add_state(t, key, v, fact=fid)
            if v < old and self._link_keys.search(key):
                self._drops.append(_Drop(t=t, key=key, old=old, new=v, fact=fid, kind=kind))
        if first:
            self.writer.add_fact(t_msg, "state", f"{clock_text(t_msg)} HUD read: " + ", ".join(first),
                                 data={"values": {k: self._values[k] for k in st.values if k in self._values}})
        for key, text in st.text.items():
            if key in st.values or not isinstance(text, str) or not text.strip():
                continue
            text = text.strip()
            if self._texts.get(key) == text:
                continue
            self._texts[key] = text
            t = float(st.changed_at.get(key, t_msg))
            self.writer.add_fact(t, "ocr", f"{clock_text(t)} on screen: {key} reads {text!r}",
                                 data={"key": key, "text": text})

    def _on_transcript(self, tr: Transcript) -> None:
        assert self.writer is not None
        words = " ".join(tr.text.split())
        if not words:
            return
        self.writer.add_fact(tr.t_start, "transcript", f"{clock_text(tr.t_start)} speech: {words}",
                             t_end=max(tr.t_start, tr.t_end), data={"language": tr.language} if tr.language else None)

    def _on_advice(self, a: Advice) -> None:
        assert self.writer is not None
        data: dict[str, Any] = {"backend": a.backend, "model": a.model, "event_kind": a.event_kind,
                                "structured": a.structured, "wake": a.wake}
        if a.question:
            data["question"] = a.question
        self.writer.add_fact(a.t_event, "advice", describe_advice(a), t_end=max(a.t_event, a.t_media),
                             priority=a.priority, data=data)

    def _on_entities(self, es: Entities) -> None:
        assert self.writer is not None
        if not es.entities:
            return
        self.writer.add_fact(es.t, "entities", describe_entities(es), data={
            "reason": es.reason, "event_t": es.event_t, "model": es.model, "frame_index": es.frame_index,
            "entities": [{"label": e.label, "box": list(e.box), "score": e.score, "mask_area": e.mask_area}
                         for e in es.entities]})

    # -- links --------------------------------------------------------------------------------
    def _resolve_drops(self, final: bool) -> None:
        p = self.params
        for d in self._drops:
            if d.resolved or (not final and self._media < d.t + p.link_hold_s):
                continue
            d.resolved = True
            causes = [e for e in self._events if d.t - p.link_window_s <= e.t <= d.t + p.link_before_s]
            if causes:
                self._link(min(causes, key=lambda e: (e.rank, abs(d.t - e.t))), d)
        horizon = self._media - (p.link_window_s + p.link_hold_s + 5.0)
        while self._events and self._events[0].t < horizon:
            self._events.popleft()
        while self._drops and self._drops[0].resolved and self._drops[0].t < horizon:
            self._drops.popleft()

    def _link(self, ev: _SeenEvent, d: _Drop) -> None:
        assert self.writer is not None
        d.linked = True
        gap = d.t - ev.t
        when = f"{abs(gap):.1f} s after" if gap >= 0 else f"{abs(gap):.1f} s before"
        label = {"life_lost": "life lost", "damage": "damage taken"}.get(d.kind, d.kind.replace("_", " "))
        text = (f"{clock_text(d.t)} {d.key} {num(d.old)} -> {num(d.new)}, {when} the {ev.priority} event {ev.kind} "
                f"at {clock_text(ev.t)} ({label})")
        prio = "critical" if d.kind == "life_lost" else ev.priority
        fid = self.writer.add_fact(min(ev.t, d.t), "link", text, t_end=max(ev.t, d.t), priority=prio,
                                   data={"cause": ev.fact, "effect": d.fact, "kind": d.kind, "key": d.key,
                                         "from": d.old, "to": d.new, "gap_s": round(gap, 3)})
        self.writer.add_link(ev.fact, d.fact, d.kind, fact=fid)

    # -- keyframes ----------------------------------------------------------------------------
    async def _keyframes_due(self, final: bool) -> None:
        newest = self.ring.newest_t
        while self._waiting:
            t, fid, kind = self._waiting[0]
            if not final and (newest is None or newest < t) and self._media - t < 2.0:
                break
            self._waiting.popleft()
            await self._keyframe_for(t, fid, kind)

    async def _keyframe_for(self, t: float, fid: int, kind: str) -> None:
        rel = await self._write_keyframe(t, kind)
        if rel is not None and self.writer is not None:
            self.writer.set_keyframe(fid, rel)

    async def _write_keyframe(self, t: float, kind: str) -> str | None:
        """The frame nearest ``t`` written as a JPEG; its path relative to the session directory."""
        got = self.ring.nearest(t)
        if got is None or self.directory is None:
            return None
        name = keyframe_name(t, kind)
        n = 2
        while name in self._names or (self.directory / KEYFRAMES_DIR / name).exists():  # (after a restart too)
            name = keyframe_name(t, kind)[:-4] + f"_{n}.jpg"
            n += 1
        self._names.add(name)
        path = self.directory / KEYFRAMES_DIR / name
        p = self.params
        try:
            await self.run_blocking(save_jpeg, got[1], path, p.keyframe_width, p.keyframe_quality)
        except (OSError, ValueError) as exc:
            self._failed(exc, what="keyframe")
            return None
        self.recorder.note("keyframes")
        return f"{KEYFRAMES_DIR}/{name}"

    # -- committing -----------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Commits what waited ``batch_s`` of wall time (a plain sleep: on a virtual clock, sleeping
        on the clock would move it)."""
        while True:
            await asyncio.sleep(self.params.batch_s / 2)
            if self.writer is not None and self.writer.due():
                await self._commit()

    async def _commit(self) -> None:
        w = self.writer
        if w is None or not w.pending:
            return
        try:
            n = await self.run_blocking(w.flush)
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)
            return
        self.recorder.note("rows", n)
        self.recorder.notes["batches"] = w.batches

    def _failed(self, exc: BaseException, what: str = "write") -> None:
        self.recorder.note("write_errors")
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.warn_once(what, f"timeline: cannot {'write a keyframe in' if what == 'keyframe' else 'write'} "
                         f"{self.directory} ({text}); the run goes on, and what could not be written is lost")


    # -- end ------------------------------------------------------------------------------------
    async def flush(self) -> None:
        if self.writer is None:
            return
        try:
            self._resolve_drops(final=True)
            if self._keyframes:
                await self._keyframes_due(final=True)
            self.writer.set_session({"ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "media_s": f"{self._media:.3f}"})
        except (OSError, sqlite3.Error, ValueError) as exc:
            self._failed(exc)
        await self._commit()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        w, self.writer = self.writer, None
        if w is not None:
            try:
                await self.run_blocking(w.close)
            except (OSError, sqlite3.Error) as exc:
                self._failed(exc)
            self.recorder.notes["rows"] = w.committed
            if w.dropped:
                self.recorder.notes["dropped_rows"] = w.dropped
            if w.lost:
                self.recorder.notes["lost_rows"] = w.lost
