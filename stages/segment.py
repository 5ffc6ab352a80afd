"""Segment stage: SAM3 on the keyframes the cascade chooses, never on every frame.

SAM3 names and outlines the things a profile cares about ("enemy", "health bar"), at a cost of
seconds per frame on a CPU and tens of milliseconds on a GPU: far too much for 30 frames a
second, and not needed.  The cheap tier already says when something happened, so this stage runs
SAM3 only

* on the **keyframe of each event** at or above ``min_priority`` (``high`` by default): the frame
  of its recent ring nearest the event's ``t``.  An event is decided after its moment (the
  trigger up to ~0.5 s later, the event scorer ~1 s), so the stage keeps the last ``ring_s``
  (3) seconds of frames, thinned to ``ring_fps`` (15: the keyframe is within 1/30 s of the moment,
  and 45 frames of 640x480 hold 41 MB, of 1080p 280 MB; 0 keeps every frame); an event whose
  moment is newer than the newest frame waits for the frame at its moment (kept whatever the
  thinning).  No frame within ``max_gap_s`` of ``t`` (the
  ring has moved past it): no segmentation, counted (``no_keyframe``);
* at a **low rate**, when ``every_s`` > 0: one frame every ``every_s`` seconds of media (off by
  default).

Both are capped: at most ``max_per_min`` calls in any minute of media (the rest dropped and
counted, ``rate_cap``), and never more than one call in flight.  While one runs, one request
waits; a newer request replaces it (the older counted as ``superseded``), except that a periodic
request never replaces a waiting event keyframe (the periodic one is dropped instead).  In a
lossless run (``--speed max``) every chosen frame is segmented in turn (the stage waits for each
call), so such a run gives the same entities every time.

Prompts: the game profile's ``segment.prompts`` (what to look for in this game), else
``params.prompts`` (the pipeline's generic default)::

    segment:
      prompts: [enemy, player, health bar]

Output ``entities``: one :class:`~copilot.messages.Entities` per segmented frame (``reason``
``event:<kind>`` or ``periodic``, the event's ``t``, the model).  Notes: ``frames_seen`` and
``frames_segmented`` (their ratio is the fraction of frames SAM3 saw), ``events_seen``,
``events_chosen``; timings ``segment_ms`` (the engine's call) and ``event_to_entities_ms`` (from an
event's arrival to its entities, wall clock).  The engine (:mod:`engines.sam3`) is made by
:func:`load_engine`, the seam tests replace with a counting fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from copilot.errors import UsageError
from copilot.messages import PRIORITY_RANK, Entities, Envelope, Event, Priority, VideoFrame
from copilot.profile import Profile, profile_from_options
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from engines.model_registry import DEFAULT_MODELS
from stages._placed import check_export, placed_params, report_device
from stages.motion import rgb_view

MEDIA_MINUTE_S = 60.0


class SegmentParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str = DEFAULT_MODELS["sam3"]  # a model id (Hugging Face cache) or a local directory
    runtime: str = "auto"  # auto | torch | onnxruntime (the vision backbone; the heads run in torch)
    device: str = "auto"  # auto | cpu | cuda
    onnx_dir: str | None = None  # the files of `gamecopilot export sam3` (runtime onnxruntime)
    allow_download: bool = False
    threads: int = 0  # intra-op threads of ONNX Runtime and torch (torch: process-wide); 0: one per core
    prompts: list[str] = []  # used when the profile has no segment.prompts
    threshold: float = 0.5  # instance score over which an entity is kept
    max_entities: int = 5  # per prompt, best first
    min_priority: Priority = "high"  # events at or above this get their keyframe segmented
    every_s: float = 0.0  # > 0: also one frame every this many media seconds
    max_per_min: int = 12  # calls in any minute of media, at most (0: no cap)
    ring_s: float = 3.0  # media seconds of recent frames kept to find an event's keyframe
    ring_fps: float = 15.0  # frames per media second kept in the ring (0: all of them)
    max_gap_s: float = 0.5  # the keyframe must be this close to the event's t

    def __post_init__(self) -> None:
        if self.runtime not in ("auto", "torch", "onnxruntime"):
            raise ValueError(f"runtime must be auto, torch or onnxruntime, got {self.runtime!r}")
        if self.every_s < 0 or self.max_per_min < 0 or self.ring_fps < 0 or self.threads < 0:
            raise ValueError("every_s, max_per_min, ring_fps and threads must be >= 0")
        if self.ring_s <= 0 or self.max_gap_s <= 0:
            raise ValueError("ring_s and max_gap_s must be > 0")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.max_entities < 1:
            raise ValueError(f"max_entities must be >= 1, got {self.max_entities}")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("prompts: expected words or phrases, got an empty one")


def profile_prompts(prof: Profile, source: str = "profile") -> list[str]:
    """The concept prompts of a profile's ``segment`` section (validated; errors name the key)."""
    section = dict(prof.segment)
    raw = section.pop("prompts", [])
    if section:
        raise UsageError(f"{source}: segment: unknown key {sorted(section)[0]!r} (known: prompts)")
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.strip() for p in raw):
        raise UsageError(f"{source}: segment.prompts: expected a list of words or phrases")
    return [p.strip() for p in raw]


def stage_prompts(params: SegmentParams, options: dict[str, Any]) -> list[str]:
    """The prompts a run uses: the profile's (the game's own), else the params' (the pipeline's
    generic default); none at all is a UsageError."""
    prof = profile_from_options(options)
    prompts = profile_prompts(prof, str(options.get("profile") or prof.name))
    if not prompts:
        prompts = [p.strip() for p in params.prompts]
    if not prompts:
        raise UsageError("segment: no prompts: set the stage's prompts param or the profile's segment.prompts")
    return prompts


def load_engine(p: SegmentParams) -> Any:
    """The SAM3 engine the params ask for (the seam tests replace with a counting fake)."""
    from engines.sam3 import load_sam3

    return load_sam3(p.model, runtime=p.runtime, device=p.device, allow_download=p.allow_download,
                     onnx_dir=None if p.onnx_dir is None else Path(p.onnx_dir), threshold=p.threshold,
                     max_entities=p.max_entities, threads=p.threads)


@dataclass
class Request:
    """A frame chosen for SAM3, and why."""

    env: Envelope  # the frame's envelope
    reason: str  # event:<kind> | periodic
    event_t: float | None = None
    arrived_ns: int | None = None  # when the event that asked for it arrived (wall clock)

    @property
    def t(self) -> float:
        return self.env.t_media

    @property
    def is_event(self) -> bool:
        return self.event_t is not None


@register_stage("segment")
class SegmentStage(Stage[SegmentParams]):
    """SAM3 on event keyframes (and optionally every ``every_s``); emits ``Entities`` on ``entities``."""

    Params = SegmentParams
    accepts = (VideoFrame, Event)
    output_ports: ClassVar[tuple[str, ...]] = ("entities",)

    @classmethod
    def check(cls, params: SegmentParams) -> None:
        """The model and the ONNX folder exist before anything runs (no download unless allowed)."""
        from engines.model_registry import resolve_model, stage_hint

        if not params.allow_download:
            resolve_model(params.model, hint=stage_hint("segment"))
        if params.onnx_dir is not None and not Path(params.onnx_dir).is_dir():
            raise UsageError(f"segment: onnx_dir {params.onnx_dir} is not a directory")
        check_export(params, "segment", "sam3")

    @classmethod
    def check_profile(cls, prof: Any, source: str, cfg: Any, name: str) -> None:
        profile_prompts(prof, source)

    @classmethod
    def announce(cls, params: SegmentParams, options: dict[str, Any]) -> str | None:
        prompts = stage_prompts(params, options)
        when = f"keyframes of {params.min_priority}+ events"
        if params.every_s > 0:
            when += f" and every {params.every_s:g} s"
        cap = f"at most {params.max_per_min}/min" if params.max_per_min else "no cap"
        return f"segment: SAM3 {params.model} on {when} ({cap}); prompts: {', '.join(prompts)}"

    def __init__(self, ctx: StageContext, params: SegmentParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.engine: Any = None
        self.prompts: list[str] = []
        self.ring: deque[Envelope] = deque()
        self.waiting: list[tuple[Event, Envelope, int]] = []  # events newer than the newest frame
        self.pending: Request | None = None
        self.calls_t: deque[float] = deque()  # media times of the calls started, for max_per_min
        self._task: asyncio.Task[None] | None = None
        self._min_rank = PRIORITY_RANK[params.min_priority]
        self._next_periodic: float | None = None
        self._last_t = -math.inf

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.prompts = stage_prompts(self.p, self.ctx.options)
        self.engine = await self.run_blocking(load_engine, placed_params(self, self.p))
        report_device(self, self.engine)
        eng = self.engine
        self.log.info("%s on %s (backbone: %s)%s; prompts: %s", getattr(eng, "label", eng.model_id), eng.device,
                      eng.runtime, f": {eng.fallback}" if getattr(eng, "fallback", "") else "", ", ".join(self.prompts))
        self.recorder.note(f"runtime_{eng.runtime}_{eng.device}")

    async def process(self, msg: Envelope) -> None:
        p = msg.payload
        if isinstance(p, Event):
            await self._on_event(p, msg)
        elif isinstance(p, VideoFrame):
            await self._on_frame(msg)

    async def flush(self) -> None:
        for ev, env, arrived in self.waiting:  # the stream ended before the frame at their moment
            await self._keyframe(ev, env, arrived)
        self.waiting.clear()
        if self._task is not None:
            await self._task

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- inputs ------------------------------------------------------------------------------
    async def _on_frame(self, msg: Envelope) -> None:
        t = msg.t_media
        self.recorder.note("frames_seen")
        if t < self._last_t - 1.0:  # the media went back (a new replay): start afresh
            self.ring.clear()
            self.calls_t.clear()
            self._next_periodic = None
        self._last_t = t
        gap = 1.0 / self.p.ring_fps if self.p.ring_fps > 0 else 0.0
        # thinned to ring_fps, but a frame an event waits for is always kept
        if not self.ring or t - self.ring[-1].t_media >= gap - 1e-6 or self.waiting:
            self.ring.append(msg)
        while self.ring and self.ring[0].t_media < t - self.p.ring_s:
            self.ring.popleft()
        if self.waiting:
            due = [w for w in self.waiting if w[0].t <= t]
            self.waiting = [w for w in self.waiting if w[0].t > t]
            for ev, env, arrived in due:
                await self._keyframe(ev, env, arrived)
        if self.p.every_s > 0:
            if self._next_periodic is None:
                self._next_periodic = t + self.p.every_s
            elif t >= self._next_periodic - 1e-9:
                every = self.p.every_s
                self._next_periodic += every * max(1, math.floor((t - self._next_periodic) / every) + 1)
                await self._submit(Request(env=msg, reason="periodic"))

    async def _on_event(self, ev: Event, msg: Envelope) -> None:
        self.recorder.note("events_seen")
        if PRIORITY_RANK.get(ev.priority, len(PRIORITY_RANK)) > self._min_rank:
            return
        self.recorder.note("events_chosen")
        arrived = self.clock.now_ns()
        if not self.ring or ev.t > self.ring[-1].t_media:
            self.waiting.append((ev, msg, arrived))  # its frame has not come yet
            return
        await self._keyframe(ev, msg, arrived)

    async def _keyframe(self, ev: Event, msg: Envelope, arrived: int) -> None:
        if not self.ring:
            self.recorder.drop("no_keyframe")
            return
        best = min(self.ring, key=lambda e: abs(e.t_media - ev.t))
        if abs(best.t_media - ev.t) > self.p.max_gap_s:
            self.recorder.drop("no_keyframe")
            self.warn_once("no_keyframe", f"segment: no frame within {self.p.max_gap_s:g} s of the {ev.event_kind} "
                                          f"event at {ev.t:.2f} s (ring_s {self.p.ring_s:g} too short?); not segmented")
            return
        await self._submit(Request(env=best, reason=f"event:{ev.event_kind}", event_t=ev.t, arrived_ns=arrived))

    # -- scheduling --------------------------------------------------------------------------
    def _capped(self, t: float) -> bool:
        cap = self.p.max_per_min
        while self.calls_t and self.calls_t[0] <= t - MEDIA_MINUTE_S:
            self.calls_t.popleft()
        return cap > 0 and len(self.calls_t) >= cap

    async def _submit(self, req: Request) -> None:
        if self._capped(req.t):
            self.recorder.drop("rate_cap")
            return
        if self.ctx.speed is None:  # lossless: segment every chosen frame, in turn
            self.calls_t.append(req.t)
            await self._segment(req)
            return
        if self._task is None or self._task.done():
            self.calls_t.append(req.t)
            self._task = asyncio.ensure_future(self._work(req))
            return
        if self.pending is not None:
            self.recorder.drop("superseded")  # one of the two waiting requests goes
            if self.pending.is_event and not req.is_event:
                return  # a periodic frame never displaces an event's keyframe: it is the one dropped
        self.pending = req

    async def _work(self, req: Request | None) -> None:
        while req is not None:
            await self._segment(req)
            req, self.pending = self.pending, None
            if req is not None:
                if self._capped(req.t):
                    self.recorder.drop("rate_cap")
                    req = None
                else:
                    self.calls_t.append(req.t)

    async def _segment(self, req: Request) -> None:
        frame = req.env.payload_as(VideoFrame)
        image = rgb_view(frame.image, frame.pixel_format)
        t0 = time.perf_counter_ns()
        try:
            entities = await self.run_blocking(self.engine.segment, image, self.prompts)
        except Exception:
            self.recorder.note("failures")
            self.log.exception("segment: SAM3 failed on the frame at %.2f s", req.t)
            return
        self.recorder.observe_extra("segment_ms", (time.perf_counter_ns() - t0) / 1e6)
        self.recorder.note("frames_segmented")
        self.recorder.note("segmented_event" if req.is_event else "segmented_periodic")
        await self.emit("entities", Entities(t=req.t, frame_index=frame.frame_index, entities=list(entities),
                                             reason=req.reason, event_t=req.event_t, model=str(self.engine.model_id)),
                        parent=req.env, t_media=req.t)
        if req.arrived_ns is not None:
            self.recorder.observe_extra("event_to_entities_ms", (self.clock.now_ns() - req.arrived_ns) / 1e6)
