"""The ``segment`` stage (stages/segment.py): SAM3 runs only on the frames its cascade chooses.

The exact-count tests inject a counting fake engine through the stage's ``load_engine`` seam and
replay 45 s at 30 fps with the events of the bundled clip's ground truth (bench/data/breakout_s0:
20 lives lost, 4 games over, 4 rewards) plus low-priority noise; one end-to-end test runs a tiny
random SAM3 on real frames of the clip."""

from __future__ import annotations

import json
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Entities, Entity, Envelope, Event, Priority, VideoFrame
from copilot.profile import Profile
from copilot.testing import make_envelope, run_stage
from stages import segment as segment_mod
from stages.segment import SegmentParams, SegmentStage, profile_prompts

pytestmark = pytest.mark.usefixtures("leak_check")

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "bench" / "data" / "breakout_s0.mp4"
TRUTH = ROOT / "bench" / "data" / "breakout_s0.truth.jsonl"
FPS = 30
DECIDE_S = 0.4  # the trigger decides an event this long after its moment
PRIORITY: dict[str, Priority] = {"life_lost": "high", "game_over": "critical", "reward": "normal"}


class CountingEngine:
    """Stands in for SAM3: counts calls and remembers which frames it saw."""

    model_id = "fake-sam3"
    runtime = "torch"
    device = "cpu"
    fallback = ""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.frames: list[int] = []  # the frame index painted into each frame it was given
        self.prompts: list[list[str]] = []
        self.delay_s = delay_s
        self.gate = gate

    def segment(self, image: np.ndarray, prompts: list[str]) -> list[Entity]:
        if self.gate is not None:
            assert self.gate.wait(10.0), "the test never opened the gate"
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls += 1
        self.frames.append(frame_number(image))
        self.prompts.append(list(prompts))
        return [Entity(label=prompts[0], box=(0.1, 0.2, 0.3, 0.4), score=0.9, mask_area=0.02)]


def frame_number(image: np.ndarray) -> int:
    """The frame index a synthetic frame carries in its first pixels (see :func:`frame`)."""
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def frame(k: int) -> VideoFrame:
    img = np.zeros((12, 16, 3), np.uint8)
    img[0, 0, 0], img[0, 0, 1] = k % 256, k // 256
    return VideoFrame(image=img, frame_index=k)


def truth_events() -> list[Event]:
    out = []
    for line in TRUTH.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in PRIORITY:
            out.append(Event(t=rec["t"], event_kind=rec["kind"], priority=PRIORITY[rec["kind"]], score=1.0))
    return out


def replay(seconds: float, events: list[Event], *, decide_s: float = DECIDE_S) -> list[Envelope]:
    """Frames at 30 fps with each event arriving ``decide_s`` after its moment, as from the trigger."""
    envs: list[Envelope] = []
    due = sorted(events, key=lambda e: e.t)
    i = 0
    for k in range(round(seconds * FPS)):
        t = round(k / FPS, 6)
        envs.append(make_envelope(frame(k), t_media=t, source="replay", t_capture_ns=int(t * 1e9)))
        while i < len(due) and due[i].t + decide_s <= t + 1e-9:
            ev = due[i]
            envs.append(make_envelope(ev, t_media=ev.t, source="trigger", t_capture_ns=int(t * 1e9)))
            i += 1
    return envs


def keyframe(t: float) -> int:
    return round(t * FPS)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> CountingEngine:
    eng = CountingEngine()
    monkeypatch.setattr(segment_mod, "load_engine", lambda p: eng)
    return eng


def mixed_events() -> list[Event]:
    """The clip's truth (high, critical, normal) and low-priority noise every 3 s."""
    noise = [Event(t=1.5 + 3 * i, event_kind="motion", priority="low") for i in range(15)]
    return truth_events() + noise


def test_sam3_runs_exactly_on_the_keyframes_of_high_and_critical_events(fake: CountingEngine) -> None:
    events = mixed_events()
    chosen = sorted((e for e in events if e.priority in ("high", "critical")), key=lambda e: e.t)
    assert len(chosen) == 24 and len(events) == 43
    res = run_stage(SegmentStage, replay(45.0, events),
                    params={"prompts": ["ball", "paddle"], "max_per_min": 0, "ring_fps": 0}, speed=None)
    assert fake.calls == len(chosen)
    assert fake.frames == [keyframe(e.t) for e in chosen]  # the frame nearest each event's moment
    out = res["entities"]
    assert all(isinstance(o, Entities) for o in out)
    assert [(o.reason, o.event_t, o.frame_index) for o in out] == [
        (f"event:{e.event_kind}", e.t, keyframe(e.t)) for e in chosen]
    assert [o.t for o in out] == pytest.approx([keyframe(e.t) / FPS for e in chosen])
    assert out[0].entities[0].label == "ball" and out[0].model == "fake-sam3"
    assert fake.prompts[0] == ["ball", "paddle"]
    notes = res.metrics.notes
    assert notes["frames_seen"] == 45 * FPS
    assert notes["frames_segmented"] == notes["segmented_event"] == 24
    assert notes["events_seen"] == 43 and notes["events_chosen"] == 24
    assert res.metrics.dropped == 0


def test_periodic_frames_come_on_top_of_the_event_keyframes(fake: CountingEngine) -> None:
    events = mixed_events()
    chosen = sorted((e for e in events if e.priority in ("high", "critical")), key=lambda e: e.t)
    res = run_stage(SegmentStage, replay(45.0, events),
                    params={"prompts": ["ball"], "max_per_min": 0, "every_s": 5.0, "ring_fps": 0}, speed=None)
    periodic = [keyframe(5.0 * i) for i in range(1, 9)]  # 5 s, 10 s ... 40 s
    assert fake.calls == len(chosen) + len(periodic)
    assert sorted(fake.frames) == sorted([keyframe(e.t) for e in chosen] + periodic)
    reasons = [o.reason for o in res["entities"]]
    assert reasons.count("periodic") == 8 and all(o.event_t is None for o in res["entities"] if o.reason == "periodic")
    assert res.metrics.notes["segmented_periodic"] == 8


def test_default_settings_segment_at_most_5_percent_of_the_frames(fake: CountingEngine) -> None:
    """The acceptance figure: at the defaults (high+ events, at most 12 per minute, no periodic frames)
    the fraction of frames SAM3 sees over the clip's replay."""
    events = mixed_events()
    res = run_stage(SegmentStage, replay(45.0, events), params={"prompts": ["ball"]}, speed=None)
    notes = res.metrics.notes
    fraction = notes["frames_segmented"] / notes["frames_seen"]
    print(f"\nsegment: {notes['frames_segmented']} of {notes['frames_seen']} frames ({fraction:.2%}) "
          f"for {notes['events_chosen']} high+ events of {notes['events_seen']}")
    assert fraction <= 0.05
    # 24 high+ events inside one minute of media: the first 12 run, the rest meet the cap
    assert fake.calls == 12 == notes["frames_segmented"]
    assert res.metrics.dropped_by_reason == {"rate_cap": 12}
    chosen = sorted((e for e in events if e.priority in ("high", "critical")), key=lambda e: e.t)
    # the ring keeps 15 of the 30 frames a second: each keyframe is within a frame of the moment
    assert [abs(k - keyframe(e.t)) <= 1 for k, e in zip(fake.frames, chosen, strict=False)] == [True] * 12


def test_the_cap_counts_a_sliding_minute_of_media(fake: CountingEngine) -> None:
    events = [Event(t=1.0 + 10.0 * i, event_kind="life_lost", priority="high") for i in range(12)]  # 0..111 s
    res = run_stage(SegmentStage, replay(115.0, events), params={"prompts": ["ball"], "max_per_min": 3, "ring_fps": 0},
                    speed=None)
    # calls at 1, 11, 21 s; 31, 41, 51 capped; 61 (1 s left the minute), 71, 81; 91, 101, 111 capped
    assert fake.frames == [keyframe(t) for t in (1.0, 11.0, 21.0, 61.0, 71.0, 81.0)]
    assert res.metrics.dropped_by_reason == {"rate_cap": 6}


def test_one_call_in_flight_and_the_newest_request_replaces_a_waiting_one(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    eng = CountingEngine(gate=gate)
    monkeypatch.setattr(segment_mod, "load_engine", lambda p: eng)
    last_frame = 20 * FPS - 1

    class Gated(SegmentStage):
        """Holds SAM3's first call until every input has been handed to the stage."""

        async def process(self, msg: Envelope) -> None:
            await super().process(msg)
            if isinstance(msg.payload, VideoFrame) and msg.payload.frame_index == last_frame:
                gate.set()

    events = [Event(t=1.0 + 2.0 * i, event_kind=f"e{i}", priority="high") for i in range(9)]  # 1, 3 ... 17 s
    res = run_stage(Gated, replay(20.0, events), params={"prompts": ["ball"], "max_per_min": 0, "ring_fps": 0},
                    speed=1.0)
    # the first runs; each later one replaces the one waiting; the last waiting one runs when the first ends
    assert eng.frames == [keyframe(1.0), keyframe(17.0)]
    assert [o.reason for o in res["entities"]] == ["event:e0", "event:e8"]
    assert res.metrics.dropped_by_reason == {"superseded": 7}
    assert res.metrics.notes["frames_segmented"] == 2


def test_a_periodic_frame_never_displaces_a_waiting_event_keyframe(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    eng = CountingEngine(gate=gate)
    monkeypatch.setattr(segment_mod, "load_engine", lambda p: eng)

    class Gated(SegmentStage):
        async def process(self, msg: Envelope) -> None:
            await super().process(msg)
            if isinstance(msg.payload, VideoFrame) and msg.payload.frame_index == 10 * FPS - 1:
                gate.set()

    events = [Event(t=2.2, event_kind="life_lost", priority="high")]
    res = run_stage(Gated, replay(10.0, events),
                    params={"prompts": ["ball"], "max_per_min": 0, "every_s": 2.0, "ring_fps": 0}, speed=1.0)
    # periodic at 2 s runs (held); the event's keyframe waits; periodic 4, 6, 8 s are dropped, not it
    assert eng.frames == [keyframe(2.0), keyframe(2.2)]
    assert res.metrics.dropped_by_reason == {"superseded": 3}


def test_an_event_ahead_of_its_frame_waits_for_it_and_a_stale_one_is_counted(fake: CountingEngine) -> None:
    early = Event(t=2.0, event_kind="early", priority="critical")
    stale = Event(t=0.5, event_kind="stale", priority="high")
    envs = replay(10.0, [])
    # the early event arrives at 1 s (before its frame); the stale one at 8 s, 7.5 s after its moment
    envs.insert(keyframe(1.0) + 1, make_envelope(early, t_media=early.t, source="trigger"))
    envs.insert(keyframe(8.0) + 2, make_envelope(stale, t_media=stale.t, source="trigger"))
    res = run_stage(SegmentStage, envs, params={"prompts": ["ball"], "ring_s": 3.0}, speed=None)
    assert fake.frames == [keyframe(2.0)]
    assert res.metrics.dropped_by_reason == {"no_keyframe": 1}


def test_the_ring_keeps_ring_s_of_frames_thinned_to_ring_fps(fake: CountingEngine) -> None:
    res = run_stage(SegmentStage, replay(10.0, []), params={"prompts": ["ball"], "ring_s": 2.0, "ring_fps": 10.0},
                    speed=None)
    ring = res.stage.ring  # type: ignore[attr-defined]
    ts = [e.t_media for e in ring]
    assert 20 <= len(ring) <= 21 and ts[-1] - ts[0] <= 2.0
    assert all(0.09 < b - a < 0.11 for a, b in pairwise(ts))
    assert fake.calls == 0 and res["entities"] == []


def test_prompts_come_from_the_profile_when_the_params_have_none(fake: CountingEngine, tmp_path: Path) -> None:
    prof = tmp_path / "game.yaml"
    prof.write_text("name: game\nsegment:\n  prompts: [enemy, health bar]\n")
    events = [Event(t=1.0, event_kind="life_lost", priority="high")]
    res = run_stage(SegmentStage, replay(2.0, events), options={"profile": str(prof)}, speed=None)
    assert fake.prompts == [["enemy", "health bar"]]
    assert res["entities"][0].entities[0].label == "enemy"
    line = SegmentStage.announce(SegmentParams(), {"profile": str(prof)})
    assert line is not None and "prompts: enemy, health bar" in line and "high+ events" in line


def test_the_profile_prompts_win_over_the_pipeline_default(fake: CountingEngine, tmp_path: Path) -> None:
    prof = tmp_path / "game.yaml"
    prof.write_text("name: game\nsegment:\n  prompts: [boss]\n")
    events = [Event(t=1.0, event_kind="life_lost", priority="high")]
    run_stage(SegmentStage, replay(2.0, events), params={"prompts": ["player"]}, options={"profile": str(prof)},
              speed=None)
    run_stage(SegmentStage, replay(2.0, events), params={"prompts": ["player"]}, speed=None)
    assert fake.prompts == [["boss"], ["player"]]


def test_no_prompts_anywhere_is_one_line(fake: CountingEngine) -> None:
    with pytest.raises(UsageError, match=r"^segment: no prompts: set the stage's prompts param or the profile's"):
        run_stage(SegmentStage, replay(1.0, []))
    assert fake.calls == 0


def test_the_profile_section_is_validated_with_the_key_named() -> None:
    assert profile_prompts(Profile(segment={"prompts": ["a", " b "]})) == ["a", "b"]
    with pytest.raises(UsageError, match=r"^g\.yaml: segment: unknown key 'prompt' \(known: prompts\)$"):
        SegmentStage.check_profile(Profile(segment={"prompt": ["a"]}), "g.yaml", None, "segment")
    with pytest.raises(UsageError, match=r"^g\.yaml: segment\.prompts: expected a list of words or phrases$"):
        SegmentStage.check_profile(Profile(segment={"prompts": "enemy"}), "g.yaml", None, "segment")


@pytest.mark.parametrize("params", [{"runtime": "tensorflow"}, {"every_s": -1}, {"threshold": 1.0},
                                    {"min_priority": "urgent"}, {"prompts": [""]}, {"bogus": 1}])
def test_bad_params_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(params, SegmentParams)


def test_check_names_a_model_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError, match=r"^model facebook/sam3 not found locally or in the Hugging Face cache"):
        SegmentStage.check(SegmentParams())
    with pytest.raises(UsageError, match=r"not found: no such file or directory"):
        SegmentStage.check(SegmentParams(model=str(tmp_path / "nope")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # (the default export folder: empty)
    with pytest.raises(UsageError, match=r"^segment: runtime onnxruntime, but .* holds no sam3 export"):
        SegmentStage.check(SegmentParams(model=str(tmp_path), runtime="onnxruntime"))


def clip_frames(seconds: float) -> list[tuple[float, VideoFrame]]:
    """The bundled clip's first ``seconds`` of video, decoded with PyAV."""
    import av

    out = []
    with av.open(str(CLIP)) as container:
        for k, fr in enumerate(container.decode(video=0)):
            t = float(fr.time) if fr.time is not None else k / FPS
            if t >= seconds:
                break
            out.append((t, VideoFrame(image=fr.to_ndarray(format="rgb24"), frame_index=k)))
    return out


def test_tiny_sam3_end_to_end_on_the_bundled_clip(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from engines.sam3 import tiny_sam3

    model = tiny_sam3(tmp_path / "sam3")
    frames = clip_frames(4.0)
    events = [e for e in truth_events() if e.t < 3.5] + [Event(t=2.5, event_kind="reward", priority="normal")]
    envs: list[Envelope] = []
    pending = sorted(events, key=lambda e: e.t)
    for t, fr in frames:
        envs.append(make_envelope(fr, t_media=t, source="replay", t_capture_ns=int(t * 1e9)))
        while pending and pending[0].t + DECIDE_S <= t:
            ev = pending.pop(0)
            envs.append(make_envelope(ev, t_media=ev.t, source="trigger", t_capture_ns=int(t * 1e9)))
    res = run_stage(SegmentStage, envs, speed=None,
                    params={"model": str(model), "runtime": "torch", "device": "cpu", "prompts": ["ball", "paddle"],
                            "threshold": 0.0, "max_entities": 2})
    out = res["entities"]
    high = [e for e in events if e.priority == "high"]
    assert len(high) == 2 and [o.reason for o in out] == ["event:life_lost"] * 2
    assert [abs(o.frame_index - keyframe(e.t)) <= 1 for o, e in zip(out, high, strict=True)] == [True, True]
    for o in out:
        assert o.model == str(model)
        assert [e.label for e in o.entities] == ["ball", "ball", "paddle", "paddle"]  # max_entities per prompt
        for e in o.entities:
            x0, y0, x1, y1 = e.box
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 and 0 <= e.mask_area <= 1 and 0 < e.score < 1
    assert res.stage.engine.calls == 2  # type: ignore[attr-defined]
    m = res.metrics
    assert m.notes["frames_segmented"] == 2 and m.notes["frames_seen"] == len(frames)
    assert m.notes["runtime_torch_cpu"] == 1 and m.extra_ms["segment_ms"].p50 > 0
