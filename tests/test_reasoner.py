"""The reasoner stage through the real stage runner: advice streams (partial, then final), the
rules backend, preemption, failures that leave the pipeline running, and a model that never
answers not slowing what feeds the stage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np
import pytest

from copilot.advice import AdviceRequest, BackendError, BackendOptions, parse_advice
from copilot.clock import VirtualClock
from copilot.errors import UsageError
from copilot.messages import Advice, Context, Event, GameState, Question, TraceStamp, VideoFrame
from copilot.testing import make_envelope, run_stage

ANSWER = ['{"game_state": "lives 3", ', '"analysis": "the ball fell", ', '"advice": "Move ', 'early."}']


class ScriptedBackend:
    """Answers every request with the same advice, in pieces; records what it was asked."""

    name: ClassVar[str] = "scripted"
    requests: ClassVar[list[AdviceRequest]] = []

    def __init__(self, options: BackendOptions) -> None:
        self.model = "scripted-model"
        self.takes_images = options.images

    async def start(self) -> None:
        type(self).requests.clear()

    async def close(self) -> None:
        return None

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        type(self).requests.append(request)
        for piece in ANSWER:
            await asyncio.sleep(0)
            yield piece


class CriticalOnlyBackend(ScriptedBackend):
    """Never answers a high event (it hangs until cancelled); answers a critical one at once."""

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        if request.event.get("priority") != "critical":
            await asyncio.Event().wait()
        for piece in ANSWER:
            yield piece


class SilentBackend(ScriptedBackend):
    """A model that never answers anything."""

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield ""


class DownBackend(ScriptedBackend):
    """A server that is down: every call fails with one line."""

    async def start(self) -> None:
        raise BackendError("cannot reach the LLM server at http://127.0.0.1:9/v1 (connection refused)", "unreachable")

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        raise BackendError("cannot reach the LLM server at http://127.0.0.1:9/v1 (connection refused)", "unreachable")
        yield ""


class ProseBackend(ScriptedBackend):
    """Answers in prose first; the repair attempt gets JSON."""

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        if "previous answer was not valid" in request.prompt:
            for piece in ANSWER:
                yield piece
        else:
            yield "Sure! You should move early."


def backend(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


def event_env(t: float, priority: str, clock: VirtualClock, kind: str = "life_lost",
              evidence: dict[str, Any] | None = None, at_ns: int | None = None) -> Any:
    """An event as the trigger emits it (at ``at_ns``, default now): its trace ends with the trigger's stamp."""
    now = clock.now_ns() if at_ns is None else at_ns
    ev = Event(t=t, event_kind=kind, priority=priority, score=2.0, evidence=evidence or {"reasons": ["lives 4 -> 3"]})
    return make_envelope(ev, t_media=t, source="trigger", t_capture_ns=now - 300_000_000,
                         trace=[TraceStamp("trigger", now - 1_000_000, now)])


def run(inputs: list[Any], backend_cls: type, clock: VirtualClock, **params: Any) -> Any:
    return run_stage("reasoner", inputs, params={"backend": backend(backend_cls), **params}, clock=clock,
                     timeout_s=30)


def finals(res: Any) -> list[Advice]:
    return [a for a in res["advice"] if a.final]


def test_an_event_gets_streamed_advice_then_the_validated_final_answer() -> None:
    clock = VirtualClock()
    state = make_envelope(GameState(values={"lives": 3.0}, previous={"lives": 4.0}, changed_at={"lives": 9.9}),
                          t_media=9.9, clock=clock)
    res = run([state, event_env(10.0, "critical", clock)], ScriptedBackend, clock, partial_every_ms=0)
    advice = res["advice"]
    assert [a.final for a in advice][-1] is True and any(not a.final for a in advice)
    partials = [a.text for a in advice if not a.final]
    assert partials == sorted(partials, key=len) and partials[0].startswith("Move")  # the advice as it grows
    final = finals(res)[0]
    assert final.structured == {"game_state": "lives 3", "analysis": "the ball fell", "advice": "Move early."}
    assert final.text == "Move early." and final.event_kind == "life_lost" and final.priority == "critical"
    assert final.backend == "scripted" and final.model == "scripted-model"
    assert final.latency_ms["event_to_first"] <= final.latency_ms["event_to_final"]
    assert final.latency_ms["event_to_final"] >= 1.0  # counted from the trigger's emission (1 ms before the feed)
    rec = final.record()
    assert set(rec) >= {"t_event", "t_media", "event_kind", "priority", "backend", "model", "text", "structured",
                        "latency_ms"}
    prompt = ScriptedBackend.requests[0].prompt
    assert "life_lost" in prompt and "lives 3 (was 4" in prompt and "lives 4 -> 3" in prompt  # (a reason given)
    assert res.metrics.notes["advised"] == 1 and res.metrics.notes["wakes"] == 1


def test_only_events_at_the_wake_priority_reach_the_model() -> None:
    clock = VirtualClock()
    res = run([event_env(1.0, "normal", clock), event_env(5.0, "low", clock), event_env(9.0, "high", clock)],
              ScriptedBackend, clock)
    assert [a.t_event for a in finals(res)] == [9.0]
    assert res.metrics.notes["below_priority"] == 2


def test_the_keyframe_and_frames_before_it_reach_a_model_that_takes_images() -> None:
    clock = VirtualClock()
    frames = [make_envelope(VideoFrame(image=np.full((48, 64, 3), i, np.uint8)), t_media=i * 0.25, clock=clock)
              for i in range(16)]
    res = run([*frames, event_env(3.0, "critical", clock)], ScriptedBackend, clock,
              llm={"images": True, "image_size": 32}, frames_before=2, frame_step_s=0.5)
    req = ScriptedBackend.requests[0]
    assert req.image_times == [2.0, 2.5, 3.0]  # the keyframe last
    assert req.images[-1].shape == (24, 32, 3) and int(req.images[-1][0, 0, 0]) == 12
    assert finals(res)[0].saw_images


def test_a_text_only_model_is_told_it_sees_no_images() -> None:
    clock = VirtualClock()
    frame = make_envelope(VideoFrame(image=np.zeros((8, 8, 3), np.uint8)), t_media=0.5, clock=clock)
    res = run([frame, event_env(1.0, "critical", clock)], ScriptedBackend, clock)
    assert ScriptedBackend.requests[0].images == []
    assert "No images" in ScriptedBackend.requests[0].prompt
    assert not finals(res)[0].saw_images


def test_a_more_urgent_event_cancels_the_generation_in_progress() -> None:
    clock = VirtualClock()
    res = run([event_env(5.0, "high", clock), event_env(20.0, "critical", clock)], CriticalOnlyBackend, clock,
              coalesce_s=1.0)
    assert [a.t_event for a in finals(res)] == [20.0]
    assert res.metrics.notes["preempted"] == 1 and res.metrics.notes["advised"] == 1


def test_a_model_that_never_answers_does_not_hold_up_what_feeds_the_reasoner() -> None:
    clock = VirtualClock()
    inputs: list[Any] = []
    for i in range(600):  # 20 s of frames at 30 fps, a wake every second
        t = i / 30
        inputs.append(make_envelope(VideoFrame(image=np.zeros((48, 64, 3), np.uint8)), t_media=t, clock=clock,
                                    t_capture_ns=clock.now_ns() + int(t * 1e9)))
        if i % 30 == 0:
            inputs.append(event_env(t, "critical", clock, at_ns=clock.now_ns() + int(t * 1e9)))
    res = run(inputs, SilentBackend, clock, drain_s=1.0, coalesce_s=0.0, max_wakes_per_min=60)
    m = res.metrics
    assert m.count == len(inputs)  # every message taken in ...
    assert m.queue_age_ms is not None and m.queue_age_ms.p99 == 0.0  # ... the moment it arrived
    assert finals(res) == []
    notes = m.notes
    assert notes["wakes"] == 20 and notes["started"] >= 1
    # every wake is accounted for: running at the end, dropped as stale, or by the queue bound
    assert notes["started"] + notes.get("stale", 0) + notes.get("queue_full", 0) + notes["unfinished_at_end"] >= 20


def test_a_server_that_is_down_is_counted_and_the_stage_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    res = run([event_env(1.0, "critical", clock), event_env(9.0, "critical", clock)], DownBackend, clock)
    assert finals(res) == []
    assert res.metrics.notes["failed_unreachable"] == 3  # at start, then once per wake
    assert res.metrics.notes["failed"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if "cannot reach" in w]) == 1  # one line, not one per wake
    assert all("\n" not in w for w in warnings)


def test_an_answer_that_is_not_json_gets_one_repair_attempt() -> None:
    clock = VirtualClock()
    res = run([event_env(1.0, "critical", clock)], ProseBackend, clock)
    assert parse_advice(ANSWER[0] + "".join(ANSWER[1:])) == finals(res)[0].structured
    assert res.metrics.notes["repairs"] == 1 and res.metrics.notes["repaired"] == 1


def test_a_question_is_answered_with_its_text() -> None:
    clock = VirtualClock()
    res = run([make_envelope(Question(text="why did I die?", t=12.0), t_media=12.0, clock=clock)],
              ScriptedBackend, clock)
    final = finals(res)[0]
    assert final.question == "why did I die?" and final.event_kind == "question"
    assert "The player asks: why did I die?" in ScriptedBackend.requests[0].prompt


def test_the_rules_backend_says_it_is_rules_and_uses_the_profile() -> None:
    clock = VirtualClock()
    ev = event_env(8.0, "critical", clock, evidence={"state_before": {"lives": 4.0}, "state_after": {"lives": 3.0}})
    res = run_stage("reasoner", [ev], params={"backend": "rules"}, clock=clock, options={"profile": "breakout"})
    final = finals(res)[0]
    assert final.backend == "rules" and final.model == "rules"
    assert final.text.startswith("(rules) ") and "paddle" in final.text  # configs/profiles/breakout.yaml's rule
    assert final.structured["game_state"] == "lives 4 -> 3"
    assert parse_advice(__import__("json").dumps(final.structured)) is not None


def test_a_backend_asked_for_without_what_it_needs_is_one_line() -> None:
    with pytest.raises(UsageError, match="--llm-url"):
        run_stage("reasoner", [], options={"reasoner": "openai"})
    with pytest.raises(UsageError, match="--llm-model"):
        run_stage("reasoner", [], options={"reasoner": "transformers"})


def test_hicos_context_fills_the_prompts_context_slot_and_a_late_one_is_waited_for_briefly() -> None:
    """HiCo sends its snapshot right after the event that wakes the reasoner: the prompt shows the newest
    context as of that event (the one before it only when none came within ``context_wait_ms``)."""
    clock = VirtualClock()
    older = make_envelope(Context(t=4.0, text="00:00-00:04: 120 frames, steady"), t_media=4.0, clock=clock)
    newer = make_envelope(Context(t=10.0, text="00:04-00:10: 180 frames, cut, events: life_lost (critical) at 00:10",
                                  spans=[(0.0, 10.0, 300)], tokens=np.ones((2, 4), np.float32), source="thumb"),
                          t_media=10.0, clock=clock)
    res = run([older, event_env(10.0, "critical", clock), newer], ScriptedBackend, clock)
    assert finals(res)
    prompt = ScriptedBackend.requests[0].prompt
    assert "Context: 00:04-00:10: 180 frames, cut, events: life_lost (critical) at 00:10" in prompt
    assert ScriptedBackend.requests[0].embeddings == {}  # tokens reach a model only through projector weights
    res = run([older, event_env(10.0, "critical", clock)], ScriptedBackend, clock, context_wait_ms=20)
    assert "Context: 00:00-00:04: 120 frames, steady" in ScriptedBackend.requests[0].prompt
    assert res.metrics.notes["context_late"] == 1


def test_with_projector_weights_hicos_tokens_go_into_the_request_as_embeddings() -> None:
    clock = VirtualClock()
    tokens = np.arange(8, dtype=np.float32).reshape(2, 4)
    ctx = make_envelope(Context(t=10.0, text="00:00-00:10: 300 frames, steady", tokens=tokens, source="thumb"),
                        t_media=10.0, clock=clock)
    run([ctx, event_env(10.0, "critical", clock)], ScriptedBackend, clock, llm={"projectors": "bank.safetensors"})
    sent = ScriptedBackend.requests[0].embeddings
    assert list(sent) == ["hico_thumb"] and np.array_equal(sent["hico_thumb"], tokens)


def test_the_prompt_keeps_the_newest_lines_of_the_context_that_fit() -> None:
    from stages.reasoner import newest_lines

    text = "00:00-00:10: old\n00:10-00:20: middle\n00:20-00:30: newest"
    assert newest_lines(text, 1000) == text
    assert newest_lines(text, 45) == "00:10-00:20: middle\n00:20-00:30: newest"
    assert newest_lines(text, 10) == ""


class SlowPrefillBackend(ScriptedBackend):
    """A model on a slow CPU, on the test's virtual clock: its first piece comes ``PREFILL_S_PER_CHAR``
    seconds per prompt character after the request, the rest ``GENERATE_S`` later."""

    clock: ClassVar[VirtualClock | None] = None
    PREFILL_S_PER_CHAR: ClassVar[float] = 0.005
    GENERATE_S: ClassVar[float] = 1.0

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        from stages.reasoner import prompt_chars

        clock = type(self).clock
        assert clock is not None
        type(self).requests.append(request)
        await clock.sleep_until_ns(clock.now_ns() + int(prompt_chars(request) * self.PREFILL_S_PER_CHAR * 1e9))
        yield ANSWER[0]
        await clock.sleep_until_ns(clock.now_ns() + int(self.GENERATE_S * 1e9))
        for piece in ANSWER[1:]:
            yield piece


def long_context(t: float, clock: VirtualClock) -> Any:
    lines = [f"00:{s:02d}-00:{s + 1:02d}: 30 frames, steady, events: score_up (normal) at 00:{s:02d}"
             for s in range(40)]
    return make_envelope(Context(t=t, text="\n".join(lines)), t_media=t, clock=clock)


def test_a_backend_too_slow_for_the_whole_context_gets_the_context_that_fits_its_answer_budget() -> None:
    """The first wake carries the full context slot (nothing is known of the backend yet); once an
    answer has been timed, a slow backend's next prompt carries only the context that keeps its
    expected answer within ``answer_budget_s``, and the cut is counted.  A fast backend keeps it all."""
    from stages.reasoner import prompt_chars

    clock = VirtualClock()
    SlowPrefillBackend.clock = clock
    inputs = [long_context(10.0, clock), event_env(10.0, "critical", clock),
              long_context(30.0, clock), event_env(30.0, "critical", clock, kind="game_over")]
    budget = 6.0
    res = run(inputs, SlowPrefillBackend, clock, stale_s=60.0, answer_budget_s=budget, context_chars=2000)
    first, second = SlowPrefillBackend.requests
    assert len(first.context) > 1500  # the whole slot: nothing measured yet
    assert 0 < len(second.context) < len(first.context)
    expected = prompt_chars(second) * SlowPrefillBackend.PREFILL_S_PER_CHAR + SlowPrefillBackend.GENERATE_S
    assert expected <= budget + 0.05
    assert res.metrics.notes["context_trimmed"] == 1
    assert len(finals(res)) == 2
    # a backend that answers at once keeps the whole slot on every wake
    res = run(inputs, ScriptedBackend, clock, stale_s=60.0, answer_budget_s=budget, context_chars=2000)
    assert [len(r.context) > 1500 for r in ScriptedBackend.requests] == [True, True]
    assert "context_trimmed" not in res.metrics.notes


def test_the_prompt_budget_learns_a_backends_costs_and_gives_back_context_when_answers_speed_up() -> None:
    from stages.reasoner_budget import PromptBudget

    budget = PromptBudget(budget_s=5.0, max_chars=400)
    assert budget.context_chars(1000) == 400  # unknown backend: the whole slot
    budget.observe(prompt_chars=1000, first_s=3.0, total_s=5.0)  # 3 ms a char, 2 s to generate
    assert budget.context_chars(1000) == 0  # 3 + 2 s: nothing to spare
    budget.observe(prompt_chars=1000, first_s=0.1, total_s=1.1)  # the server got faster
    spare = budget.context_chars(1000)
    assert spare == 400
    assert PromptBudget(budget_s=5.0, max_chars=400).context_chars(0) == 400
