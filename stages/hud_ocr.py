"""HUD OCR stage: read the game's numbers (score, health, ammo, lives) into named state.

A game profile says where its HUD is (``regions``) and what each region shows
(``ocr_fields``: name, region, type).  This stage crops those regions from frames and reads
them with the PP-OCR recogniser alone (no detector: the place is known; the recogniser
upscales small crops to its 48 px line height with cubic interpolation), which costs a
few milliseconds per crop.  To stay cheap it reads at most every ``interval_s`` of media
time, and only the regions whose pixels changed since their last read (enough pixels by
enough: a single digit of a score must count, video compression noise must not).  Values are parsed
by type (``int``, ``float``, ``percent`` like "75%", ``fraction`` like "75/100",
``text``) and published as the whole current state on the ``state`` port::

    GameState(values={"score": 1200, "health": 75, "health_ratio": 0.75},
              text={"score": "SCORE 1200", "health": "75%"}, previous={"health": 100}, changed_at={...})

``percent`` fields add ``<name>_ratio`` (value / 100); ``fraction`` fields add
``<name>_max`` and ``<name>_ratio``; ``text`` fields appear in ``text`` only.  A read that
does not parse (the HUD blinked, a flash covered it) keeps the last good value, so a flash
never looks like a health drop.  State goes out when it changed, and the profile's ``rules``
on those values (a health drop of more than 30%) go out as :class:`copilot.messages.Cue` news on
the ``cues`` port when they fire.

Keyword spotting (the profile's ``keywords``: text -> priority) reads the whole frame with
detector + recogniser, which costs 0.1-1 s on a busy CPU.  It is off unless the profile has
keywords; it runs every ``keyword_interval_s`` of media time on its own worker thread,
never holding up frames (latest wins: frames that arrive while a read runs are not
queued), and emits a late ``Cue(kind="keyword", priority=..., reason="keyword 'GAME OVER'")`` on
``cues`` when a keyword appears that the previous read did not see.

With the default profile (no regions, no keywords) the stage loads no model and returns at
once for every frame.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np

from copilot.keywords import match_keywords
from copilot.messages import PRIORITIES, Cue, Envelope, GameState, Priority, VideoFrame
from copilot.profile import OcrField, Profile, Region, Rule, profile_from_options
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from copilot.worker import StageWorker

FieldType = Literal["int", "float", "percent", "fraction", "text"]

# --------------------------------------------------------------------------------------------
# Parsing OCR text into values
# --------------------------------------------------------------------------------------------

# Letters OCR confuses with digits, fixed only inside tokens that are mostly digits already
# ("1O5" -> "105", "I2" -> "12"), so labels such as "SCORE" or "LIVES" stay letters.
_CONFUSIONS = str.maketrans(
    {"O": "0", "o": "0", "Q": "0", "D": "0", "I": "1", "l": "1", "|": "1", "i": "1", "!": "1",
     "S": "5", "s": "5", "B": "8", "Z": "2", "z": "2"}
)
_CONFUSABLE = set("OoQDIl|i!SsBZz")
_INT_RE = re.compile(r"(?<![\d.,])-?\d{1,3}(?:[,.']\d{3})+(?![\d])|-?\d+")
_FLOAT_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:[.,]\d+)?")
_PERCENT_RE = re.compile(r"(\d+(?:[.,]\d+)?)\s*%")
_FRACTION_RE = re.compile(r"(\d+(?:[.,]\d+)?)\s*[/\\|]\s*(\d+(?:[.,]\d+)?)")


@dataclass(frozen=True)
class Parsed:
    """A parsed HUD value.  ``value`` is None for text fields."""

    value: float | None
    ratio: float | None = None
    maximum: float | None = None


def normalize_digits(text: str, keep: str = "") -> str:
    """Fix letter/digit confusions inside mostly-numeric tokens (characters in ``keep`` stay)."""
    out = []
    for tok in re.split(r"(\s+)", text):
        digits = sum(c.isdigit() for c in tok)
        confusable = sum(c in _CONFUSABLE and c not in keep for c in tok)
        if digits and digits >= confusable and digits + confusable >= len(tok.strip("/%:.,-+()[]")) * 0.6:
            table = {k: v for k, v in _CONFUSIONS.items() if chr(k) not in keep}
            tok = tok.translate(table)
        out.append(tok)
    return "".join(out)


def _num(s: str) -> float:
    return float(s.replace(",", "."))


def parse_int(text: str) -> int | None:
    """The last integer in ``text`` ("SCORE 12,450" -> 12450, "x3" -> 3, "1O5" -> 105)."""
    found = _INT_RE.findall(normalize_digits(text).replace("\u2212", "-"))
    if not found:
        return None
    return int(re.sub(r"[,.']", "", found[-1]))


def parse_float(text: str) -> float | None:
    """The last decimal number ("12.5", "12,5" and "1,234.5" all read as meant)."""
    found = _FLOAT_RE.findall(normalize_digits(text).replace("\u2212", "-"))
    if not found:
        return None
    s = found[-1]
    if "," in s and "." in s:
        s = s.replace(",", "")
    return _num(s)


def parse_percent(text: str) -> Parsed | None:
    """"75%" -> 75 (ratio 0.75); a bare number is taken as a percentage (OCR drops "%")."""
    t = normalize_digits(text, keep="%")
    m = _PERCENT_RE.findall(t)
    value = _num(m[-1]) if m else parse_float(t)
    if value is None:
        return None
    return Parsed(value, ratio=value / 100.0)


def parse_fraction(text: str) -> Parsed | None:
    """"75/100" -> 75 of 100 (ratio 0.75); one number alone gives the value without a ratio."""
    t = normalize_digits(text, keep="|/")
    m = _FRACTION_RE.findall(t)
    if m:
        a, b = _num(m[-1][0]), _num(m[-1][1])
        return Parsed(a, ratio=(a / b) if b > 0 else None, maximum=b)
    v = parse_float(t)
    return None if v is None else Parsed(v)


def parse_value(text: str, kind: FieldType) -> Parsed | None:
    """Parse OCR ``text`` as ``kind``; None when it holds no such value."""
    text = text.strip()
    if not text:
        return None
    if kind == "int":
        i = parse_int(text)
        return None if i is None else Parsed(float(i))
    if kind == "float":
        f = parse_float(text)
        return None if f is None else Parsed(f)
    if kind == "percent":
        return parse_percent(text)
    if kind == "fraction":
        return parse_fraction(text)
    return Parsed(None)


def field_values(name: str, parsed: Parsed) -> dict[str, float]:
    """The ``values`` entries of one parsed field (see the module docstring for the names)."""
    out: dict[str, float] = {}
    if parsed.value is None:
        return out
    v = parsed.value
    out[name] = float(int(v)) if float(v).is_integer() else round(float(v), 4)
    if parsed.maximum is not None:
        out[f"{name}_max"] = float(parsed.maximum)
    if parsed.ratio is not None:
        out[f"{name}_ratio"] = round(float(parsed.ratio), 4)
    return out


# --------------------------------------------------------------------------------------------
# Keyword spotting
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class HudOcrParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    interval_s: float = 0.25  # media seconds between reads of a region (a changed value is late by at most this)
    change_threshold: float = 40.0  # luma difference (0..255) that marks a pixel as changed; 0: read every interval
    change_fraction: float = 0.002  # a region changed when this fraction of its pixels (and >= 4) did
    min_score: float = 0.6  # recogniser confidence under which a read is ignored
    keyword_interval_s: float = 2.0  # media seconds between full-frame keyword reads
    keyword_max_side: int = 960  # the detector sees the frame shrunk to this long side
    keyword_min_score: float = 0.6
    keyword_similarity: float = 0.85
    threads: int = 1  # ONNX Runtime intra-op threads per model
    device: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    rec_model: str | None = None  # default: the PP-OCR models inside the rapidocr wheel
    det_model: str | None = None

    def __post_init__(self) -> None:
        if self.interval_s < 0 or self.keyword_interval_s < 0 or self.change_threshold < 0:
            raise ValueError("interval_s, keyword_interval_s and change_threshold must be >= 0")
        if not 0 <= self.change_fraction < 1:
            raise ValueError(f"change_fraction must be in [0, 1), got {self.change_fraction}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.keyword_max_side < 64:
            raise ValueError(f"keyword_max_side must be >= 64, got {self.keyword_max_side}")
        if not 0 < self.keyword_similarity <= 1:
            raise ValueError(f"keyword_similarity must be in (0, 1], got {self.keyword_similarity}")
        for key in ("rec_model", "det_model"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{key}: no OCR model file at {path}")


def rule_cues(t: float, before: dict[str, float], after: dict[str, float], rules: list[Rule]) -> list[Cue]:
    """A cue for each profile rule that the state going from ``before`` to ``after`` at ``t`` fires
    (a value seen for the first time fires nothing: there is no move to judge)."""
    cues: list[Cue] = []
    for key, value in after.items():
        prev = before.get(key)
        if prev is None or prev == value:
            continue
        cues.extend(Cue(t=t, kind=rule.event_kind(), priority=rule.priority, reason=rule.reason(prev, value),
                        evidence={"field": key, "before": prev, "after": value})
                    for rule in rules if rule.field == key and rule.fires(prev, value))
    return cues


def _gray(crop: np.ndarray) -> np.ndarray:
    if crop.ndim == 2:
        return crop.astype(np.int16)
    c = crop[..., :3].astype(np.int16)
    return (c[..., 0] + 2 * c[..., 1] + c[..., 2]) >> 2


@register_stage("hud_ocr")
class HudOcrStage(Stage[HudOcrParams]):
    """RapidOCR (PP-OCR) on the profile's HUD regions and, at a low rate, keywords on the frame."""

    Params = HudOcrParams
    accepts = (VideoFrame,)
    output_ports = ("state", "cues")
    # state goes out only when it changes: heartbeats tell the trigger that nothing changed, so it
    # need not wait for this stage (field reads finish within process; keywords are late inputs).
    # One per frame: the trigger's watermark moves only as fast as the heartbeats (0.1 s steps
    # cost 40 ms of emit lag at p99)
    progress_s = 0.02

    def __init__(self, ctx: StageContext, params: HudOcrParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.profile: Profile | None = None
        self._regions: list[tuple[Region, list[OcrField]]] = []
        self._keywords: dict[str, Priority] = {}
        self._rec: Any = None
        self._full: Any = None
        self._prev: dict[str, np.ndarray] = {}
        self._next_read = -float("inf")
        self._last_t = -float("inf")
        self.values: dict[str, float] = {}
        self.text: dict[str, str] = {}
        self._field_order: list[str] = []
        self._field_values: dict[str, dict[str, float]] = {}
        self._field_text: dict[str, str] = {}
        self._emitted: tuple[Any, ...] | None = None
        self._rules: list[Rule] = []
        self._previous: dict[str, float] = {}  # each value before its latest change
        self._changed_at: dict[str, float] = {}
        self._kw_exec: StageWorker | None = None  # keyword spotting's own thread, beside the regions' one
        self._kw_task: asyncio.Task[None] | None = None
        self._kw_next = -float("inf")
        self._kw_seen: set[str] = set()
        self.reads = 0
        self.keyword_reads = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        prof = profile_from_options(self.ctx.options)
        self.profile = prof
        by_region: dict[str, list[OcrField]] = {}
        for f in prof.ocr_fields:
            by_region.setdefault(f.region, []).append(f)
        self._regions = [(prof.region(name), fields) for name, fields in by_region.items()]
        self._field_order = [f.name for f in prof.ocr_fields]
        self._keywords = dict(prof.keywords)
        self._rules = list(prof.rules)
        if not self._regions and not self._keywords:
            return  # nothing to read: no model is loaded and every frame returns at once
        from engines.onnx_session import SessionConfig

        sess = SessionConfig(device=self.p.device, intra_op_threads=self.p.threads)
        if self._regions:
            from engines.ocr import TextRecognizer

            self._rec = await self.run_blocking(lambda: TextRecognizer(self.p.rec_model, sess))
        if self._keywords:
            from engines.ocr import FullFrameOcr

            self._kw_exec = StageWorker(f"{self.name}-kw")
            loop = asyncio.get_running_loop()
            self._full = await loop.run_in_executor(
                self._kw_exec,
                lambda: FullFrameOcr(det_model=self.p.det_model, rec_model=self.p.rec_model, session=sess,
                                     max_side=self.p.keyword_max_side, min_score=self.p.keyword_min_score),
            )

    async def process(self, msg: Envelope) -> None:
        frame = msg.payload_as(VideoFrame)
        if self._rec is None and self._full is None:
            return
        t = msg.t_media
        if t < self._last_t - 1.0:  # the media went backwards (a new replay, a seek): read afresh
            self._next_read = self._kw_next = -float("inf")
            self._prev.clear()
        self._last_t = t
        if self._full is not None and t >= self._kw_next and (self._kw_task is None or self._kw_task.done()):
            self._kw_next = t + self.p.keyword_interval_s
            self._kw_task = asyncio.ensure_future(self._read_keywords(frame, msg))
        if self._rec is not None and t >= self._next_read:
            self._next_read = t + self.p.interval_s
            await self._read_fields(frame, msg)

    async def flush(self) -> None:
        if self._kw_task is not None:
            await asyncio.gather(self._kw_task, return_exceptions=True)

    async def close(self) -> None:
        if self._kw_task is not None and not self._kw_task.done():
            self._kw_task.cancel()
            await asyncio.gather(self._kw_task, return_exceptions=True)
        if self._kw_exec is not None:
            self._kw_exec.stop()
            self._kw_exec = None

    # -- HUD fields --------------------------------------------------------------------------
    def _changed_regions(self, image: np.ndarray) -> list[tuple[Region, list[OcrField], np.ndarray]]:
        h, w = image.shape[:2]
        out = []
        for region, fields in self._regions:
            x0, y0, x1, y1 = region.pixels(w, h)
            crop = image[y0:y1, x0:x1]
            g = _gray(crop)
            prev = self._prev.get(region.name)
            if prev is not None and prev.shape == g.shape and not self._differs(g, prev):
                continue
            self._prev[region.name] = g
            out.append((region, fields, crop))
        return out

    def _differs(self, g: np.ndarray, prev: np.ndarray) -> bool:
        """Enough pixels changed by enough: one digit of a score changes a few dozen pixels a
        lot, while video compression moves many pixels a little (a mean would miss the first
        or fire on the second)."""
        if self.p.change_threshold <= 0:
            return True
        changed = int(np.count_nonzero(np.abs(g - prev) > self.p.change_threshold))
        return changed >= max(4, self.p.change_fraction * g.size)

    async def _read_fields(self, frame: VideoFrame, msg: Envelope) -> None:
        changed = self._changed_regions(frame.image)
        if not changed:
            return
        from engines.ocr import to_bgr

        crops = [to_bgr(crop, frame.pixel_format) for _, _, crop in changed]
        t0 = time.perf_counter_ns()
        lines = await self.run_blocking(self._rec, crops)
        self.recorder.observe_extra("ocr_ms", (time.perf_counter_ns() - t0) / 1e6)
        self.reads += 1
        for (_region, fields, _), line in zip(changed, lines, strict=True):
            if line.score < self.p.min_score or not line.text.strip():
                continue
            for f in fields:
                parsed = parse_value(line.text, f.type)
                if parsed is None:
                    continue
                self._field_values[f.name] = field_values(f.name, parsed)
                self._field_text[f.name] = line.text.strip()
        # the state in the profile's field order, whatever order the fields were last read in
        before = self.values
        self.values = {k: v for name in self._field_order for k, v in self._field_values.get(name, {}).items()}
        self.text = {name: self._field_text[name] for name in self._field_order if name in self._field_text}
        state = (tuple(sorted(self.values.items())), tuple(sorted(self.text.items())))
        if state != self._emitted and (self.values or self.text):
            self._emitted = state
            await self._publish(before, msg)

    async def _publish(self, before: dict[str, float], msg: Envelope) -> None:
        """The new state on ``state``, and a cue on ``cues`` for each profile rule its changes fire."""
        for key, value in self.values.items():
            prev = before.get(key)
            if prev is not None and prev != value:
                self._previous[key] = prev
                self._changed_at[key] = round(msg.t_media, 4)
        for cue in rule_cues(msg.t_media, before, self.values, self._rules):
            await self.emit("cues", cue, parent=msg)
        await self.emit("state", GameState(values=dict(self.values), text=dict(self.text),
                                           previous={k: v for k, v in self._previous.items() if k in self.values},
                                           changed_at=dict(self._changed_at)), parent=msg)

    # -- keywords ----------------------------------------------------------------------------
    async def _read_keywords(self, frame: VideoFrame, msg: Envelope) -> None:
        from engines.ocr import to_bgr

        full = self._full
        assert self._kw_exec is not None

        def job() -> list[Any]:
            return list(full(to_bgr(frame.image, frame.pixel_format)))

        t0 = time.perf_counter_ns()
        try:
            lines = await asyncio.get_running_loop().run_in_executor(self._kw_exec, job)
        except Exception:
            self.log.exception("keyword OCR failed on one frame")
            return
        self.recorder.observe_extra("keywords_ms", (time.perf_counter_ns() - t0) / 1e6)
        self.keyword_reads += 1
        texts = [ln.text for ln in lines]
        matched = match_keywords(texts, self._keywords, self.p.keyword_similarity)
        new = [k for k in matched if k not in self._kw_seen]
        self._kw_seen = set(matched)
        if not new:
            return
        prios = {self._keywords[k] for k in new}
        best = next(p for p in PRIORITIES if p in prios)
        matched_text = "; ".join(new)
        # late: read off a frame up to a second ago, so the trigger's merge must not wait for it
        await self.emit("cues", Cue(t=msg.t_media, kind="keyword", priority=best, reason=f"keyword {matched_text!r}",
                                    late=True, evidence={"matched": matched_text, "lines": " | ".join(texts)}),
                        parent=msg)
