"""The ``hico`` stage (stages/hico.py) through the stage harness: Context after a key event and
every ``every_s`` of media, a text that names the events in their spans, bounded inputs."""

from __future__ import annotations

import re
from itertools import pairwise

import msgspec
import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Context, Envelope, Event, Features
from copilot.testing import make_envelope, run_stage
from stages.hico import CUT_JUMP, HicoParams, HicoStage, change_word, mmss

pytestmark = pytest.mark.usefixtures("leak_check")

FPS = 30
DIM = 8
LINE = re.compile(r"^\d\d:\d\d-\d\d:\d\d: \d+ frames?, (steady|changing|cut)(, events: .+)?$")


def thumb(k: int, scene: int, seed: int = 0) -> np.ndarray:
    """A frame of ``scene``: the scene's direction and a little noise, unit norm."""
    centre = np.random.default_rng(1000 + scene).normal(size=DIM)
    v = centre + 0.02 * np.random.default_rng(seed * 100_000 + k).normal(size=DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def stream(seconds: float, events: dict[int, Event], *, cut_at: float = 10.0,
           extra: dict[int, list[Envelope]] | None = None) -> list[Envelope]:
    """Features at 30 fps (scene 0, then scene 1 from ``cut_at``) with events after some frames,
    stamped a little after their ``t`` as the trigger decides them."""
    out: list[Envelope] = []
    for k in range(round(seconds * FPS)):
        t = round(k / FPS, 6)
        out.append(make_envelope(Features(name="thumb", values={"novelty": 0.0},
                                          vector=thumb(k, 0 if t < cut_at else 1)),
                                 t_media=t, source="thumbnail", t_capture_ns=int(t * 1e9)))
        for env in (extra or {}).get(k, []):
            out.append(env)
        if k in events:
            ev = events[k]
            out.append(make_envelope(ev, t_media=t, source="trigger", t_capture_ns=int(t * 1e9)))
    return out


def contexts(res: object) -> list[Context]:
    ctxs = res["context"]  # type: ignore[index]
    assert all(isinstance(c, Context) for c in ctxs)
    return list(ctxs)


def test_context_after_a_high_event_and_every_every_s() -> None:
    events = {
        96: Event(t=3.0, event_kind="life_lost", priority="high"),  # decided at 3.2 s
        126: Event(t=4.1, event_kind="reward", priority="normal"),  # below min_priority: no context of its own
        250: Event(t=8.3, event_kind="game_over", priority="critical"),
    }
    res = run_stage(HicoStage, stream(15.0, events), params={"every_s": 5.0, "text_spans": 4, "context_tokens": 16})
    ctxs = contexts(res)
    # after the high event (3.2), every 5 s (5.0, 10.0), after the critical one (8.333), at the end (15.0)
    assert [round(c.t, 2) for c in ctxs] == [3.2, 5.0, 8.33, 10.0, 15.0]
    first = ctxs[0]
    assert "life_lost (high) at 00:03" in first.text
    assert "reward" not in first.text  # it had not happened yet
    assert all(LINE.match(line) for c in ctxs for line in c.text.splitlines()), [c.text for c in ctxs]
    last = ctxs[-1]
    lines = last.text.splitlines()
    assert len(lines) <= 4
    # each event is named on the line of the span that holds it
    for kind, prio, t in (("life_lost", "high", 3.0), ("reward", "normal", 4.1), ("game_over", "critical", 8.3)):
        holding = [line for line in lines if f"{kind} ({prio}) at {mmss(t)}" in line]
        assert len(holding) == 1, (kind, last.text)
        start, end = holding[0].split(": ")[0].split("-")
        assert start <= mmss(t) <= end
    # the screen changed at 10 s: the summary keeps that boundary (the merge across it would cost most)
    assert any("-00:10: " in line for line in lines), last.text
    assert [c.source for c in ctxs] == ["thumb"] * 5
    assert [sum(s[2] for s in c.spans) for c in ctxs] == [97, 151, 251, 301, 450]  # frames seen so far
    for c in ctxs:
        assert c.tokens is not None and c.tokens.dtype == np.float32 and c.tokens.shape[1] == DIM
        assert c.tokens.shape[0] == len(c.spans) <= 16
        assert all(a[1] == b[0] for a, b in pairwise(c.spans))
    # the context after an event carries the event's trace forward (latency counts from its capture)
    env = res.envelopes("context")[0]
    assert env.t_capture_ns == int(3.2 * 1e9)
    m = res.metrics
    assert m.extra_ms["update_ms"].p50 >= 0 and "context_ms" in m.extra_ms


def test_the_text_summarises_the_whole_session_in_text_spans_lines() -> None:
    res = run_stage(HicoStage, stream(40.0, {}, cut_at=20.0),
                    params={"every_s": 100.0, "text_spans": 3, "budget": 80, "recent": 10, "context_tokens": 8})
    (only,) = contexts(res)  # (every_s is longer than the stream: only the final one)
    lines = only.text.splitlines()
    assert 1 <= len(lines) <= 3
    assert lines[0].startswith("00:00-") and lines[-1].split(": ")[0].endswith("-00:40")
    assert sum(int(line.split(": ")[1].split()[0]) for line in lines) == 40 * FPS
    assert only.tokens is not None and only.tokens.shape == (8, DIM)
    assert len(res.stage.hico) <= 80  # type: ignore[attr-defined]


def test_other_streams_and_vectorless_features_are_ignored() -> None:
    extra = {
        5: [make_envelope(Features(name="motion", values={"diff": 1.0}), t_media=0.2, source="motion")],
        6: [make_envelope(Features(name="thumb", values={}), t_media=0.2, source="thumbnail")],
    }
    res = run_stage(HicoStage, stream(2.0, {}, extra=extra), params={"every_s": 1.0})
    ctxs = contexts(res)
    assert [c.t for c in ctxs] == pytest.approx([1.0, 2.0])  # at 1 s, then at the end of the stream
    assert sum(s[2] for s in ctxs[-1].spans) == 2 * FPS
    assert res.metrics.notes.get("no_vector") == 1


def test_an_event_before_any_frame_emits_nothing_but_is_kept() -> None:
    early = make_envelope(Event(t=0.0, event_kind="start", priority="critical"), t_media=0.0, source="trigger")
    res = run_stage(HicoStage, [early, *stream(1.0, {})], params={"every_s": 100.0})
    (ctx,) = contexts(res)
    assert "start (critical) at 00:00" in ctx.text
    assert res.metrics.notes.get("no_frames_yet") == 1


def test_a_late_or_misshapen_vector_is_dropped_and_counted() -> None:
    empty = make_envelope(Features(name="thumb", vector=np.zeros(0, np.float32)), t_media=0.0, source="thumbnail")
    envs = [empty, *stream(1.0, {})]
    envs.append(make_envelope(Features(name="thumb", vector=np.ones(DIM + 1, np.float32)), t_media=1.5,
                              source="thumbnail"))
    envs.append(make_envelope(Features(name="thumb", vector=np.ones(DIM, np.float32)), t_media=0.1,
                              source="thumbnail"))
    res = run_stage(HicoStage, envs, params={"every_s": 100.0})
    assert res.metrics.dropped_by_reason == {"bad_vector": 2, "late": 1}
    assert sum(s[2] for s in contexts(res)[-1].spans) == FPS


@pytest.mark.parametrize(("params", "message"), [
    ({"budget": 65}, r"^hico: budget must be at least recent \+ 2 = 66 tokens, got 65$"),
    ({"budget": 100, "context_tokens": 101}, r"^hico: context_tokens \(101\) cannot exceed budget \(100\)$"),
    ({"source": ""}, r"^hico: source must name a Features stream"),
])
def test_bad_params_are_one_line(params: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        HicoStage.check(msgspec.convert(params, HicoParams))
    with pytest.raises(UsageError, match=message):
        run_stage(HicoStage, [], params=params)


@pytest.mark.parametrize("params", [{"min_priority": "urgent"}, {"every_s": 0}, {"text_spans": 0}, {"bogus": 1}])
def test_params_out_of_range_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(params, HicoParams)


def test_change_words_and_time_format() -> None:
    assert change_word(0.999, 0.001) == "steady"
    assert change_word(0.8, 0.01) == "changing"
    assert change_word(0.99, CUT_JUMP) == "cut"
    assert mmss(0.0) == "00:00" and mmss(61.9) == "01:01" and mmss(4503.0) == "75:03" and mmss(-1) == "00:00"


def test_registered_as_the_hico_kind() -> None:
    from copilot.registry import resolve

    assert resolve("hico") is HicoStage
    assert HicoStage.output_ports == ("context",)
