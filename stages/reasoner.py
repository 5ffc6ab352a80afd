"""The reasoner stage: woken by significant events (and questions), it streams structured advice.

It runs in its own placement group (``reason`` in configs/default.yaml), so a model that takes
seconds never shares an event loop or a core's queue with perception.  ``process`` only files what
arrives: an event becomes a :class:`~stages.reasoner_queue.Wake` in the stage's own bounded,
coalescing :class:`~stages.reasoner_queue.WakeSchedule` (the trigger's emit never waits on a model);
a ``GameState`` becomes the state the next prompt shows; a video frame may join the small ring of
frames a wake shows the model.  A dispatcher task starts generations (at most ``max_in_flight``),
cancels a running one for a more urgent event, and each generation streams ``Advice``: partial
messages while the model writes (the advice so far, every ``partial_every_ms``), then one final
message whose ``structured`` field is the validated advice JSON.  An answer that is not valid gets
one repair attempt; advice that would come later than ``stale_s`` after its event is dropped.
Every merge, cancel, drop and failure is counted in the stage's metrics ``notes``; the latencies
``event_to_first`` and ``event_to_final`` (from the trigger's emission of the event) in its
``extra_ms``.

The backend (``rules``, ``openai``, ``transformers``: ``gamecopilot.reasoners`` entry points) is
chosen by the run option ``reasoner`` (``--reasoner``) or the ``backend`` param; ``auto`` takes a
configured local model, else a configured endpoint, else rules (:func:`copilot.advice.choose_backend`).
A backend that cannot be reached is one warning line; the stage keeps counting and trying, and
perception never notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import Annotated, Any, ClassVar

import msgspec

from copilot.advice import (
    AdviceBackend,
    AdviceRequest,
    BackendError,
    BackendOptions,
    choose_backend,
    parse_advice,
    repair_request,
    streamed_field,
)
from copilot.errors import UsageError
from copilot.messages import Advice, Context, Envelope, Event, GameState, Priority, Question, VideoFrame
from copilot.profile import Profile, profile_from_options
from copilot.registry import available, register_stage, resolve
from copilot.stage import Stage, StageContext
from stages.reasoner_budget import PromptBudget
from stages.reasoner_prompt import FrameRing, build_request
from stages.reasoner_queue import ScheduleSettings, Wake, WakeSchedule


class ReasonerParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backend: str = "auto"  # auto | rules | openai | transformers (the run option ``reasoner`` wins)
    # the backend's settings (--llm-url / --llm-model win)
    llm: BackendOptions = msgspec.field(default_factory=BackendOptions)
    min_priority: Priority = "high"  # events at or above this wake the model
    coalesce_s: Annotated[float, msgspec.Meta(ge=0.0)] = 2.0  # events this close (media s) share a wake
    stale_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0  # advice later than this after its event is dropped
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    max_pending: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    max_wakes_per_min: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0  # as the trigger's wake budget
    partial_every_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 150.0
    recent_events: Annotated[int, msgspec.Meta(ge=0, le=50)] = 5
    frames_before: Annotated[int, msgspec.Meta(ge=0, le=16)] = 2
    frame_step_s: Annotated[float, msgspec.Meta(gt=0.0)] = 0.5
    max_tokens: Annotated[int, msgspec.Meta(ge=16, le=4096)] = 128
    drain_s: Annotated[float, msgspec.Meta(ge=0.0)] = 30.0  # at the end of input, wait this long for advice
    # HiCo sends its snapshot right after the event that wakes us: wait this long for one as new as the event
    context_wait_ms: Annotated[float, msgspec.Meta(ge=0.0, le=2000.0)] = 150.0
    # the newest lines of HiCo's summary that fit: a long prompt costs a small CPU model seconds per wake
    context_chars: Annotated[int, msgspec.Meta(ge=0, le=20000)] = 400
    # an answer should take at most this long (default: half of stale_s, so a wake waiting behind one
    # answer is still fresh after its own); a slower backend gets less context (stages/reasoner_budget.py)
    answer_budget_s: Annotated[float, msgspec.Meta(gt=0.0)] | None = None


def effective_backend(params: ReasonerParams, options: dict[str, Any]) -> tuple[str, BackendOptions, str]:
    """(backend kind, its options, why it was chosen) from the params and the run options."""
    llm = params.llm
    url = options.get("llm_url") or llm.url
    model = options.get("llm_model") or llm.model
    llm = msgspec.structs.replace(llm, url=url, model=model)
    kind, why = choose_backend(str(options.get("reasoner") or params.backend), url, model)
    return kind, llm, why


def backend_class(kind: str) -> type[AdviceBackend]:
    """The backend class registered for ``kind``; one line naming the extra to install if its
    libraries are missing."""
    try:
        cls: type[AdviceBackend] = resolve(kind, "reasoners")
    except ImportError as exc:
        raise UsageError(f"--reasoner {kind}: its libraries are not installed ({exc}); "
                         f"pip install 'gameplay-copilot[{kind}]'") from None
    return cls


@register_stage("reasoner")
class ReasonerStage(Stage[ReasonerParams]):
    Params = ReasonerParams
    accepts = (Event, GameState, VideoFrame, Question, Context)
    output_ports = ("advice",)

    _wake_ids: ClassVar[itertools.count[int]] = itertools.count(1)

    @classmethod
    def check(cls, params: ReasonerParams) -> object:
        if ":" not in params.backend and params.backend not in ("auto", "none", *_known()):
            raise UsageError(f"reasoner: unknown backend {params.backend!r} (auto, none, {', '.join(_known())})")
        return None

    @classmethod
    def announce(cls, params: ReasonerParams, options: dict[str, Any]) -> str | None:
        kind, _llm, why = effective_backend(params, options)
        if kind == "none":
            return None
        backend_class(kind)  # its libraries are there (else one line naming the extra)
        line = f"reasoner: {kind} ({why})"
        if kind == "rules" and (options.get("reasoner") or params.backend) == "auto":
            line += ("; for a model's advice: `gamecopilot llm-server` (a small CPU model), then add "
                     "--reasoner openai --llm-url http://127.0.0.1:8080/v1")
        return line

    @classmethod
    def check_profile(cls, prof: Any, source: str, cfg: Any, name: str) -> None:
        from engines.llm_rules import parse_rules  # (a light module: no model behind it)

        parse_rules(prof.advice, f"{source}: advice")

    def __init__(self, ctx: StageContext, params: ReasonerParams) -> None:
        super().__init__(ctx, params)
        p = params
        self.schedule = WakeSchedule(ScheduleSettings(
            min_priority=p.min_priority, coalesce_s=p.coalesce_s, stale_s=p.stale_s, max_in_flight=p.max_in_flight,
            max_pending=p.max_pending, max_wakes_per_min=p.max_wakes_per_min))
        self.backend_kind, self.llm_options, self.why = effective_backend(p, ctx.options)
        self.backend: AdviceBackend | None = None
        self.profile: Profile = Profile()
        self.ring = FrameRing(keep_s=max(2.0, (p.frames_before + 2) * p.frame_step_s), step_s=p.frame_step_s,
                              size=self.llm_options.image_size)
        self.state: GameState | None = None
        self.context: Context | None = None  # HiCo's newest snapshot of the session (the prompt's context slot)
        self._context_came = asyncio.Event()
        self.recent: deque[dict[str, Any]] = deque(maxlen=max(1, p.recent_events))
        self.media_t = 0.0
        self._kick = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._preempted: set[int] = set()
        self.budget = PromptBudget(budget_s=p.answer_budget_s or p.stale_s / 2, max_chars=p.context_chars)

    async def start(self) -> None:
        self.profile = profile_from_options(self.ctx.options)
        if self.backend_kind == "none":
            return
        cls = backend_class(self.backend_kind)
        opts = self.llm_options
        if self.backend_kind == "rules":
            opts = msgspec.structs.replace(opts, rules=list(self.profile.advice))
        self.backend = cls(opts)
        self.log.info("reasoner: %s (%s)", self.backend_kind, self.why)
        try:
            await self.backend.start()
        except ImportError as exc:
            raise UsageError(f"--reasoner {self.backend_kind}: its libraries are not installed ({exc}); "
                             f"pip install 'gameplay-copilot[{self.backend_kind}]'") from None
        except BackendError as exc:  # a server that is down now may be up at the first wake
            self.warn_once(exc.why, f"reasoner: {exc}; perception goes on, and each wake tries again")
            self.recorder.note(f"failed_{exc.why}")
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"{self.name}-dispatch")

    # -- arrivals (never wait on the model) ---------------------------------------------------
    async def process(self, msg: Envelope) -> None:
        self.media_t = max(self.media_t, msg.t_media)
        p = msg.payload
        if isinstance(p, VideoFrame):
            if self.backend is not None and self.backend.takes_images:
                self.ring.offer(msg.t_media, p.image)
            return
        if isinstance(p, GameState):
            self.state = p
            return
        if isinstance(p, Context):
            self.context = p
            self._context_came.set()
            return
        if self.backend is None:
            return
        now = self.clock.now_ns()
        if isinstance(p, Event):
            emitted = next((s.t_out_ns for s in reversed(msg.trace) if s.stage == msg.source), msg.t_capture_ns)
            record = p.record()
            wake = Wake(id=next(self._wake_ids), t=p.t, priority=p.priority, kind=p.event_kind, emitted_ns=emitted,
                        event=record, envelope=msg)
            self.schedule.offer(wake, now)
            self.recent.append(record)
        elif isinstance(p, Question):
            t = p.t if p.t is not None else self.media_t
            self.schedule.offer(Wake(id=next(self._wake_ids), t=t, priority="critical", kind="question",
                                     emitted_ns=now, envelope=msg, question=p.text), now)
        self._sync_notes()
        self._kick.set()

    # -- generations --------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            victim = self.schedule.to_preempt()
            if victim is not None and victim.id in self._tasks:
                self._preempted.add(victim.id)
                self._tasks[victim.id].cancel()
                continue  # its task's end frees the slot and kicks again
            while (wake := self.schedule.take(self.clock.now_ns())) is not None:
                self._tasks[wake.id] = asyncio.create_task(self._generate(wake), name=f"{self.name}-wake{wake.id}")
            self._sync_notes()

    async def _generate(self, wake: Wake) -> None:
        outcome = "failed"
        try:
            outcome = await self._answer(wake)
        except asyncio.CancelledError:
            outcome = "preempted" if wake.id in self._preempted else "cancelled"
            raise
        except BackendError as exc:
            self.warn_once(exc.why, f"reasoner: {exc}")
            self.recorder.note(f"failed_{exc.why}")
        except Exception as exc:  # a backend bug must not end the stage: perception goes on
            self.log.exception("reasoner: the %s backend failed", self.backend_kind)
            self.recorder.note(f"failed_{type(exc).__name__}")
        finally:
            self._preempted.discard(wake.id)
            self._tasks.pop(wake.id, None)
            self.schedule.finished(wake, outcome)
            self._sync_notes()
            self._kick.set()

    def _request(self, wake: Wake) -> AdviceRequest:
        assert self.backend is not None
        recent = [r for r in self.recent if r is not wake.event][-self.params.recent_events:]
        frames = self.ring.around(wake.t, self.params.frames_before) if self.backend.takes_images else []
        ctx = self.context

        def build(context: str) -> AdviceRequest:
            return build_request(
                event=wake.event, question=wake.question, merged=wake.merged, state=self.state, recent=recent,
                game=self.profile.description or self.profile.name, notes=self.profile.notes, context=context,
                frames=frames, takes_images=self.backend is not None and self.backend.takes_images,
                max_tokens=self.params.max_tokens)

        request = build("")
        if ctx is not None and ctx.text:
            whole = newest_lines(ctx.text, self.params.context_chars)
            allowed = self.budget.context_chars(prompt_chars(request))
            context = whole if allowed >= self.params.context_chars else newest_lines(ctx.text, allowed)
            if len(context) < len(whole):
                self.recorder.note("context_trimmed")  # the backend is too slow for the whole slot
            if context:
                request = build(context)
        if ctx is not None and ctx.tokens is not None and self.llm_options.projectors:
            # HiCo's tokens reach a model only through trained projector weights (an untrained bank is noise)
            request.embeddings = {f"hico_{ctx.source or 'tokens'}": ctx.tokens}
        return request

    async def _fresh_context(self, wake: Wake) -> None:
        """Wait (at most ``context_wait_ms``) for a context snapshot as new as the wake's moment, when
        a context stream feeds this stage and the backend reads it (rules do not)."""
        assert self.backend is not None
        if self.context is None or self.backend.name == "rules" or self.params.context_wait_ms <= 0:
            return
        deadline_ns = self.clock.now_ns() + int(self.params.context_wait_ms * 1e6)
        while self.context.t < wake.t:
            if self.clock.now_ns() >= deadline_ns:
                self.recorder.note("context_late")
                return
            self._context_came.clear()
            came = asyncio.ensure_future(self._context_came.wait())
            timer = asyncio.ensure_future(self.clock.sleep_until_ns(deadline_ns))
            _, pending = await asyncio.wait({came, timer}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _answer(self, wake: Wake) -> str:
        backend = self.backend
        assert backend is not None
        await self._fresh_context(wake)
        request = self._request(wake)
        asked_ns = self.clock.now_ns()
        text, first_ms = await self._stream(wake, request)
        if backend.name != "rules" and first_ms is not None:  # what this backend's answers cost
            first_s = (wake.emitted_ns + first_ms * 1e6 - asked_ns) / 1e9
            self.budget.observe(prompt_chars(request), first_s, (self.clock.now_ns() - asked_ns) / 1e9)
        advice = parse_advice(text)
        if advice is None and backend.name != "rules":
            self.recorder.note("repairs")
            text2, _ = await self._stream(wake, repair_request(request, text), partials=False)
            advice = parse_advice(text2)
            if advice is not None:
                self.recorder.note("repaired")
        if advice is None:
            self.warn_once("invalid", f"reasoner: the {backend.name} backend's answer was not valid advice JSON "
                       f"({text[:80]!r}...)")
            return "invalid"
        now = self.clock.now_ns()
        if self.schedule.is_stale(wake, now):
            return "stale_advice"
        final_ms = (now - wake.emitted_ns) / 1e6
        self.recorder.observe_extra("event_to_final", final_ms)
        latency = {"event_to_first": round(first_ms if first_ms is not None else final_ms, 1),
                   "event_to_final": round(final_ms, 1)}
        await self._emit(wake, advice["advice"], structured=advice, latency=latency, final=True,
                         saw_images=bool(request.images))
        return "advised"

    async def _stream(self, wake: Wake, request: AdviceRequest, partials: bool = True) -> tuple[str, float | None]:
        """The backend's whole answer; partial Advice on the way.  (first piece latency ms)"""
        assert self.backend is not None
        parts: list[str] = []
        first_ms: float | None = None
        last_partial_ns = 0
        shown = ""
        every_ns = int(self.params.partial_every_ms * 1e6)
        agen = self.backend.stream(request)
        try:
            async for piece in agen:
                if not piece:
                    continue
                parts.append(piece)
                now = self.clock.now_ns()
                if first_ms is None:
                    first_ms = (now - wake.emitted_ns) / 1e6
                    self.recorder.observe_extra("event_to_first", first_ms)
                if partials and now - last_partial_ns >= every_ns:
                    so_far = streamed_field("".join(parts), "advice")
                    if so_far and so_far != shown:
                        shown, last_partial_ns = so_far, now
                        await self._emit(wake, so_far, final=False)
        finally:
            await _aclose(agen)
        return "".join(parts), first_ms

    async def _emit(self, wake: Wake, text: str, *, structured: dict[str, Any] | None = None,
                    latency: dict[str, float] | None = None, final: bool, saw_images: bool = False) -> None:
        assert self.backend is not None
        advice = Advice(
            t_event=wake.t, t_media=round(self.media_t, 4), event_kind=wake.kind, priority=wake.priority,
            backend=self.backend.name, model=self.backend.model, text=text, structured=structured or {},
            latency_ms=latency or {}, final=final, wake=wake.id, question=wake.question, saw_images=saw_images)
        await self.emit("advice", advice, parent=wake.envelope, t_media=self.media_t)

    # -- end ----------------------------------------------------------------------------------
    async def flush(self) -> None:
        """End of input: let the advice being written (and the wakes waiting) finish, up to ``drain_s``."""
        deadline = self.clock.now_ns() + int(self.params.drain_s * 1e9)
        while (self.schedule.pending or self._tasks) and self.clock.now_ns() < deadline:
            self._kick.set()
            await self.clock.sleep_until_ns(self.clock.now_ns() + 20_000_000)
        left = len(self.schedule.pending) + len(self._tasks)
        if left:
            self.recorder.note("unfinished_at_end", left)
            self.log.warning("reasoner: %d wake(s) still unanswered after %.0f s at the end of the input", left,
                             self.params.drain_s)
        self.schedule.pending.clear()

    async def close(self) -> None:
        tasks = [t for t in [self._dispatcher, *self._tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._sync_notes()
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()

    def _sync_notes(self) -> None:
        for k, v in self.schedule.counts.items():
            self.recorder.notes[k] = v



def prompt_chars(request: AdviceRequest) -> int:
    """The characters a backend prefills for ``request`` (system and user text)."""
    return len(request.system) + len(request.prompt)


def newest_lines(text: str, max_chars: int) -> str:
    """The last whole lines of ``text`` that fit in ``max_chars`` (HiCo's summary is oldest first)."""
    kept: list[str] = []
    size = 0
    for line in reversed(text.splitlines()):
        size += len(line) + 1
        if size > max_chars:
            break
        kept.append(line)
    return "\n".join(reversed(kept))


def _known() -> list[str]:
    return available("reasoners")


async def _aclose(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
