"""The event scorer stage: the learned tier between the TriggerDetector and everything that wakes.

Every candidate the trigger emits (every priority) waits here until the pipeline's signals have
covered ``LOOKAHEAD_S`` after its moment; then the model (:mod:`engines.event_scorer_model`)
reads the window and how it compares with the session's earlier candidates
(:func:`engines.event_scorer.candidate_features`) and its calibrated probabilities
of death, reward and neither go into the event's evidence as ``"scorer"``; the final priority
follows :func:`engines.event_scorer.decide` (a trusted cue, a profile rule, keeps the cheap
tier's priority).  With ``adapt`` the session's confirmed deaths raise similar later candidates
(:class:`engines.event_scorer.SessionSignature`).  Events leave in the order they came.

``--scorer none`` (the run option ``scorer``; what ``configs/default.yaml`` sets) passes the
trigger's events through untouched: the cheap tier alone.  ``--scorer default`` loads the model
shipped in ``engines/models/``; ``--scorer PATH`` another one (``gamecopilot train scorer`` writes them).

Waiting is bounded: at real time an event leaves once the slowest stream that fed the scorer has
passed its window's end, or ``max_wait_s`` after the fastest did (a stalled encoder never holds
a wake); in a lossless run (``annotate``) it waits for every stream, so the scores equal those
computed offline from a features file.  Buffers keep ``WINDOW_S`` plus a margin of each stream.
Costs: ``score_ms`` per candidate, ``delay_ms`` (media time from the moment to the decision) per
wake, and counts of ``promoted``/``demoted`` candidates, in the stage's metrics.
"""

from __future__ import annotations

import math
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar

import msgspec

from copilot.errors import UsageError
from copilot.messages import PRIORITY_RANK, Envelope, Event, Features
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from engines.event_scorer import (
    LOOKAHEAD_S,
    SIGNAL_VERSION,
    STREAMS,
    WINDOW_S,
    Cascade,
    Sample,
    SessionSignature,
    Thresholds,
    candidate_features,
)
from engines.event_session import SessionContext

DEFAULT_MODEL = "event_scorer.npz"
WAKES = ("critical", "high")


class EventScorerParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str = "default"  # none | default | PATH (the run option ``scorer`` wins)
    max_wait_s: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.4  # at real time: after the fastest stream
    keep_s: Annotated[float, msgspec.Meta(gt=0.0, le=60.0)] = WINDOW_S + 2.0
    # raise candidates like this session's confirmed deaths (engines.event_scorer.SessionSignature)
    adapt: bool = True


def default_model_path() -> Path:
    return Path(str(resources.files("engines") / "models" / DEFAULT_MODEL))


def model_path(choice: str) -> Path | None:
    """The model file a ``--scorer`` choice names (None for ``none``)."""
    if choice == "none":
        return None
    if choice == "default":
        return default_model_path()
    return Path(choice).expanduser()


def load_model(choice: str) -> Any:
    """The :class:`~engines.event_scorer_model.EventScorerModel` of a ``--scorer`` choice, checked
    against this build's signals (one line, :class:`UsageError`, when it cannot be used)."""
    from engines.event_scorer import feature_names
    from engines.event_scorer_model import EventScorerModel

    path = model_path(choice)
    if path is None:
        return None
    if choice == "default" and not path.exists():
        raise UsageError(f"--scorer default: the shipped model {path} is missing; reinstall the package, "
                         "train one with `gamecopilot train scorer`, or run with --scorer none")
    return EventScorerModel.load(path, signal_version=SIGNAL_VERSION, available=set(feature_names()))


@register_stage("event_scorer")
class EventScorerStage(Stage[EventScorerParams]):
    """Rescores the trigger's candidates with the learned model (see the module docstring)."""

    Params = EventScorerParams
    accepts = (Event, Features)
    output_ports: ClassVar[tuple[str, ...]] = ("events",)

    @classmethod
    def announce(cls, params: EventScorerParams, options: dict[str, Any]) -> str | None:
        choice = str(options.get("scorer") or params.model)
        load_model(choice)  # a bad file ends the run before it starts, in one line
        return None

    def __init__(self, ctx: StageContext, params: EventScorerParams) -> None:
        super().__init__(ctx, params)
        self.choice = str(ctx.options.get("scorer") or params.model)
        self.model: Any = None
        self.thresholds = Thresholds()
        self.cascade = Cascade(self.thresholds, "")
        self.model_name = ""
        self.buffers: dict[str, deque[Sample]] = {s: deque(maxlen=4096) for s in STREAMS}
        self.progress: dict[str, float] = {}  # media time each stream has reached
        self.pending: deque[tuple[Envelope, Event]] = deque()
        self.lossless = ctx.speed is None
        self.signature = SessionSignature() if params.adapt else None
        self.session = SessionContext()

    async def start(self) -> None:
        self.model = await self.run_blocking(load_model, self.choice)
        if self.model is not None:
            self.thresholds = Thresholds.from_dict(self.model.thresholds)
            self.model_name = str(self.model.card.get("name") or Path(str(model_path(self.choice))).name)
            self.cascade = Cascade(self.thresholds, self.model_name)
            self.log.info("event scorer: %s (thresholds %s)", self.model_name, self.thresholds)

    async def process(self, msg: Envelope) -> None:
        p = msg.payload
        if isinstance(p, Features):
            if p.name in self.buffers and self.model is not None:
                buf = self.buffers[p.name]
                buf.append((msg.t_media, p.values))
                while buf and buf[0][0] < msg.t_media - self.params.keep_s:
                    buf.popleft()
                self.progress[p.name] = max(self.progress.get(p.name, msg.t_media), msg.t_media)
                await self._release(final=False)
            return
        if isinstance(p, Event):
            if self.model is None:
                await self.emit("events", p, parent=msg)
                return
            self.pending.append((msg, p))
            await self._release(final=False)

    async def flush(self) -> None:
        await self._release(final=True)

    def _ready(self, t: float) -> bool:
        if not self.progress:
            return False
        end = t + LOOKAHEAD_S
        if min(self.progress.values()) >= end:
            return True
        newest = max(self.progress.values())
        if self.lossless:
            return newest >= end + 30.0  # a stream that went quiet for good: do not hold everything
        return newest >= end + self.params.max_wait_s

    async def _release(self, *, final: bool) -> None:
        while self.pending and (final or self._ready(self.pending[0][1].t)):
            msg, ev = self.pending.popleft()
            await self.emit("events", self._scored(ev), parent=msg, t_media=max(msg.t_media, self._now_media()))

    def _now_media(self) -> float:
        return max(self.progress.values(), default=0.0)

    def _scored(self, ev: Event) -> Event:
        t0 = time.perf_counter()
        record = ev.record()
        lo = ev.t + LOOKAHEAD_S - WINDOW_S
        hi = ev.t + LOOKAHEAD_S + 1e-9
        window = {name: [s for s in buf if lo < s[0] <= hi] for name, buf in self.buffers.items()}
        x = self.model.vector(candidate_features(record, window, self.session))
        probs = self.model.predict_proba(x)[0]
        if self.signature is not None:
            probs = self.signature.adjust(record, x, probs)
        out = self.cascade.rescore(record, probs)
        self.recorder.observe_extra("score_ms", (time.perf_counter() - t0) * 1e3)
        priority = out["priority"]
        if priority != ev.priority:
            self.recorder.note("promoted" if PRIORITY_RANK[priority] < PRIORITY_RANK[ev.priority] else "demoted")
        if priority in WAKES:
            delay = self._now_media() - ev.t
            if math.isfinite(delay):
                self.recorder.observe_extra("delay_ms", max(0.0, delay) * 1e3)
        return msgspec.structs.replace(ev, priority=priority, evidence=out["evidence"])
