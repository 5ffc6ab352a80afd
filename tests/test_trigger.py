"""The TriggerDetector: rarity baselines, adaptation, fusion, timing rules, rules and evidence.

The detector is pure, so these tests feed it synthetic signal streams at 30 Hz (video-like
features) and check what it decides and when.  The last test runs the real stage through
``copilot.testing.run_stage`` to check the ``decision_delay_ms`` metric.
"""

from __future__ import annotations

from typing import Any

import pytest

from copilot.errors import UsageError
from copilot.messages import PRIORITIES, Cue, Event, Features, GameState, Heartbeat
from copilot.profile import OcrField, Profile, Region, Rule
from copilot.signals import SignalTable
from copilot.testing import make_envelope, run_stage
from stages.asr import spoken_keyword_cue
from stages.audio_features import AudioFeaturesStage
from stages.hud import HudStage
from stages.hud_cues import HudCuePolicy, HudCueSettings, hud_cue_settings
from stages.hud_ocr import rule_cues
from stages.motion import MotionStage
from stages.thumbnail import ThumbnailStage
from stages.trigger import RarityBaseline, TriggerDetector
from stages.trigger_settings import TriggerParams, trigger_settings
from stages.vad import VadStage

FPS = 30


HUD_KEYS = frozenset(HudCueSettings.__struct_fields__)


def profile(**settings: object) -> Profile:
    """A default profile with these ``trigger`` (or, for HUD cue settings, ``hud``) settings."""
    return Profile(trigger={k: v for k, v in settings.items() if k not in HUD_KEYS},
                   hud={k: v for k, v in settings.items() if k in HUD_KEYS})


BUILTIN = [(cls.kind, sig) for cls in (MotionStage, ThumbnailStage, HudStage, AudioFeaturesStage, VadStage)
           for sig in cls.signals]


class Fed:
    """A TriggerDetector fed as the default pipeline feeds it: the built-in encoders' declared
    signals, the HUD stage's cues beside its features, the OCR stage's game state and rule cues,
    and keywords read or heard as late cues.  Tests speak in encoder outputs (``hud``, ``audio``,
    ``hud_ocr``, ``keywords``, ``transcript``) and check the events."""

    def __init__(self, prof: Profile | None = None) -> None:
        self.profile = prof or Profile()
        self.det = TriggerDetector(self.profile, SignalTable(BUILTIN))
        self.hud = HudCuePolicy(hud_cue_settings(self.profile.hud))
        self.state: dict[str, float] = {}
        self.previous: dict[str, float] = {}

    @property
    def p(self) -> TriggerParams:
        return self.det.p

    def observe(self, t: float, name: str, values: dict[str, float], text: dict[str, str] | None = None) -> list:
        det, out = self.det, []
        if name == "hud":
            for cue in self.hud.update(t, values):
                out += det.observe_cue(t, cue)
        elif name == "hud_ocr":
            after = {**self.state, **values}
            for cue in rule_cues(t, self.state, after, list(self.profile.rules)):
                out += det.observe_cue(t, cue)
            self.previous.update({k: v for k, v in self.state.items() if after.get(k, v) != v})
            self.state = after
            return out + det.observe_state(t, GameState(values=dict(after), previous=dict(self.previous)))
        elif name == "keywords":
            best = next(p for p in PRIORITIES if values.get(p, 0.0) > 0)
            cue = Cue(t=t, kind="keyword", priority=best, reason=f"keyword {(text or {}).get('matched', '')!r}",
                      late=True)
            return out + det.observe_cue(t, cue)
        elif name == "transcript":
            heard = spoken_keyword_cue(t, (text or {}).get("text", ""), dict(self.profile.keywords))
            return out + (det.observe_cue(t, heard) if heard is not None else [])
        return out + det.observe(t, name, values)

    def finish(self) -> list:
        return self.det.finish()


def run(det: Fed, seconds: float, signal_at: dict[int, list[tuple[str, dict[str, float]]]]) -> list:
    """Feed ``seconds`` of quiet 30 Hz hud/audio features, with extra signals at some frames."""
    out = []
    for i in range(int(seconds * FPS)):
        t = i / FPS
        extra = dict(signal_at.get(i, []))
        out += det.observe(t, "hud", {"steps": 0.0, "small": 0.0, "revert": 0.0, **extra.get("hud", {})})
        out += det.observe(t, "audio", {"onset": 0.0, "rise": 0.0, **extra.get("audio", {})})
    out += det.finish()
    return out


def beep_and_digit(t_frame: int) -> dict[int, list[tuple[str, dict[str, float]]]]:
    """A sound onset and a HUD digit step on the same frame (two families agreeing)."""
    return {t_frame: [("hud", {"steps": 0.002, "small": 0.002}), ("audio", {"onset": 80.0, "rise": 40.0})]}


# -- rarity ---------------------------------------------------------------------------------
def test_rarity_is_zero_for_what_the_past_reached_and_high_for_what_it_never_did() -> None:
    b = RarityBaseline(history_s=10.0, block_s=0.5, floor=0.0)
    for i in range(600):  # 20 s of exact duplicates: value 0 (the case a MAD z-score breaks on)
        b.update(i / 30, 0.0)
    assert b.rarity(0.0) == 0.0
    assert b.rarity(0.5) == pytest.approx(b.max_rarity)  # never seen in the last 10 s
    for i in range(600, 900):  # now 0.5 in every block
        b.update(i / 30, 0.5 if i % 15 == 0 else 0.0)
    assert b.rarity(0.5) < 0.1
    assert b.rarity(0.9) > 1.0


def test_values_under_the_floor_never_count() -> None:
    b = RarityBaseline(floor=0.01)
    for i in range(300):
        b.update(i / 30, 0.0)
    assert b.rarity(0.005) == 0.0


# -- adaptation ------------------------------------------------------------------------------
def test_a_change_repeated_every_second_stops_firing() -> None:
    det = Fed(profile())
    signals: dict[int, list] = {}
    for k in range(10, 50):  # from 10 s on, the same HUD step + beep every second
        signals.update(beep_and_digit(k * FPS))
    events = run(det, 50, signals)
    fused = [e for e in events if e.event.priority != "low"]  # low: the plain HUD-change annotation
    first = [e for e in fused if e.event.t < 13]
    late = [e for e in fused if e.event.t > 30]
    assert first, "the first occurrences are surprising and must fire"
    assert not late, f"after 20 s of the same thing every second it is routine: {[e.event.t for e in late]}"
    assert max(e.event.score for e in first) > max((e.event.score for e in late), default=0.0)


def test_a_rare_moment_fires_again_after_routine_ones() -> None:
    det = Fed(profile())
    signals = beep_and_digit(20 * FPS)
    events = [e for e in run(det, 25, signals) if e.event.priority != "low"]
    assert len(events) == 1
    assert abs(events[0].event.t - 20.0) <= 0.05


# -- agreement, coalescing, priorities -------------------------------------------------------
def test_agreement_of_two_families_scores_more_than_one_loud_signal() -> None:
    prof = profile(annotate_need_hud=False)  # so that the sound alone is emitted and scored
    alone = run(Fed(prof), 15, {10 * FPS: [("audio", {"onset": 500.0, "rise": 80.0})]})
    both = run(Fed(prof), 15, beep_and_digit(10 * FPS))
    assert alone, "a loud sound alone is an event"
    best_alone = max(e.event.score for e in alone)
    best_both = max(e.event.score for e in both)
    assert best_both > best_alone


def test_under_wake_priority_a_sound_alone_is_not_emitted_but_one_with_a_hud_step_is() -> None:
    sound = {10 * FPS: [("audio", {"onset": 500.0, "rise": 80.0})]}
    shown = run(Fed(profile(annotate_need_hud=False)), 15, sound)
    assert [(e.event.event_kind, e.event.priority) for e in shown] == [("sound", "normal")]
    assert not run(Fed(profile()), 15, sound), "annotate_need_hud (the default) drops it"
    both = run(Fed(profile()), 15, beep_and_digit(10 * FPS))
    assert [e.event.event_kind for e in both] == ["hud_change+sound"]


def test_signals_close_together_coalesce_into_one_event_with_both_in_evidence() -> None:
    det = Fed(profile())
    signals = {300: [("hud", {"steps": 0.002, "small": 0.002})], 303: [("audio", {"onset": 80.0, "rise": 40.0})]}
    events = run(det, 15, signals)
    assert len(events) == 1
    ev = events[0].event
    assert {"hud", "audio"} <= set(ev.evidence["families"])
    assert "audio.onset" in ev.evidence["signals"] and "hud.small" in ev.evidence["signals"]
    assert ev.t == pytest.approx(10.0, abs=0.05)


def test_a_hud_area_going_back_to_an_earlier_state_is_critical() -> None:
    det = Fed(profile())
    events = run(det, 12, {300: [("hud", {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 8.0})]})
    assert [e.event.priority for e in events] == ["critical"]
    assert events[0].event.event_kind == "hud_revert"


def test_a_revert_of_an_area_with_many_states_is_only_an_annotation() -> None:
    # a gauge or a timer (dozens of contents) goes back routinely: no wake, a low event
    gauge = {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 8.0, "revert_states": 30.0}
    events = run(Fed(profile(revert_max_states=8)), 12, {300: [("hud", gauge)]})
    assert [e.event.priority for e in events] in (["low"], ["normal"])
    counter = dict(gauge, revert_states=4.0)  # a lives counter: a handful of contents
    events = run(Fed(profile(revert_max_states=8)), 12, {300: [("hud", counter)]})
    assert [e.event.priority for e in events] == ["critical"]


def test_a_step_in_a_long_still_hud_cell_wakes_once() -> None:
    quiet = {"steps": 0.001, "small": 0.001, "quiet": 40.0, "quiet_area": 40.0, "quiet_cells": 2.0}
    prof = profile(quiet_s=15.0, quiet_gap_s=3.0, quiet_max_cells=8)
    events = run(Fed(prof), 14, {300: [("hud", quiet)], 330: [("hud", quiet)]})
    wakes = [e.event for e in events if e.event.priority in ("critical", "high")]
    assert [(e.event_kind, round(e.t)) for e in wakes] == [("hud_quiet_change", 10)], "the second is 1 s later"
    redraw = dict(quiet, quiet_cells=60.0)  # many cells at once: a redraw, not a HUD
    events = run(Fed(prof), 14, {300: [("hud", redraw)]})
    assert not [e for e in events if e.event.priority in ("critical", "high")]
    off = run(Fed(profile(quiet_s=0.0)), 14, {300: [("hud", quiet)]})
    assert not [e for e in off if e.event.event_kind == "hud_quiet_change"]


def test_an_icon_gone_after_a_short_stillness_wakes_but_a_changed_digit_does_not() -> None:
    """Early in a session (or soon after a game over redrew the lives) no cell has been still for
    ``quiet_s``; a cell still for ``quiet_icon_s`` whose stepped pixels nearly all went to the
    background is still a lost icon, while the same step that mostly redraws pixels is a digit."""
    prof = profile(quiet_s=20.0, quiet_icon_s=8.0, quiet_icon_lost=0.8)
    icon = {"steps": 0.001, "small": 0.001, "quiet": 10.0, "quiet_area": 10.0, "quiet_cells": 1.0, "quiet_lost": 0.95}
    events = run(Fed(prof), 14, {300: [("hud", icon)]})
    assert [(e.event.event_kind, e.event.priority) for e in events if e.event.priority == "high"] == [
        ("hud_quiet_change", "high")]
    digit = dict(icon, quiet_lost=0.4)
    events = run(Fed(prof), 14, {300: [("hud", digit)]})
    assert not [e for e in events if e.event.event_kind == "hud_quiet_change"]
    events = run(Fed(profile(quiet_s=20.0, quiet_icon_s=0.0)), 14, {300: [("hud", icon)]})
    assert not [e for e in events if e.event.event_kind == "hud_quiet_change"], "quiet_icon_s 0 turns it off"


def test_a_hud_step_is_annotated_unless_its_cell_ticks_all_the_time_or_it_shows_nothing_new() -> None:
    prof = profile(annotate_min_novel_s=2.0)
    fresh = {"steps": 0.001, "small": 0.001, "fresh": 0.001, "novel": 30.0}

    def annotated(values: dict[str, float], p: Profile = prof) -> list:
        events = run(Fed(p), 12, {300: [("hud", values)]})
        return [e for e in events if "a HUD area changed" in e.event.evidence.get("reasons", [])]

    found = annotated(fresh)
    assert [e.event.event_kind for e in found] == ["hud_change"]  # low, or normal when the step is rare too
    assert abs(found[0].event.t - 10.0) <= 0.05
    assert not annotated(dict(fresh, novel=0.5)), "the same cell stepped half a second ago: a gauge"
    assert not annotated(dict(fresh, fresh=0.0)), "back to a content it showed before: a blink"
    assert annotated(dict(fresh, fresh=0.0), profile(annotate_min_novel_s=2.0, annotate_fresh=False))



def test_a_hud_step_too_small_for_hud_steps_is_annotated_only_with_other_evidence() -> None:
    tiny = {"steps": 0.0002, "small": 0.0002, "fresh": 0.0002, "novel": 30.0}  # under the hud.steps floor

    def kinds(signals: list[tuple[str, dict[str, float]]], p: Profile) -> list[str]:
        return [e.event.event_kind for e in run(Fed(p), 12, {300: signals})]

    assert kinds([("hud", tiny)], profile(annotate_need_steps=False)) == ["hud_change"]
    assert not kinds([("hud", tiny)], profile()), "a few pixels and nothing else: not emitted by default"
    with_sound = kinds([("hud", tiny), ("audio", {"onset": 80.0, "rise": 40.0})], profile())
    assert with_sound == ["hud_change+sound"], "a sound with it is evidence enough"
    big = kinds([("hud", dict(tiny, steps=0.002, small=0.002))], profile())
    assert big == ["hud_change"], "a step that counts as hud.steps is still annotated alone"

def test_the_reasons_of_an_episode_do_not_depend_on_the_order_its_cues_arrived_in() -> None:
    """Cues come over their own link, beside the features: two cues of one moment may arrive
    either way round, and the event written must be the same both times."""
    cues = [Cue(t=2.0, kind="hud_change", priority="high", reason="a HUD area changed"),
            Cue(t=2.0, kind="hud_change", priority="high", reason="a lives icon went away"),
            Cue(t=2.1, kind="hud_change", priority="normal", reason="a HUD area still for 11 s changed")]

    def reasons(order: list[int]) -> list[list[str]]:
        det = TriggerDetector(Profile(), SignalTable(BUILTIN))
        out = []
        for i in range(int(6 * FPS)):
            t = i / FPS
            if i == int(2.2 * FPS):
                for k in order:
                    out += det.observe_cue(t, cues[k])
            out += det.observe(t, "hud", {"steps": 0.0, "small": 0.0, "revert": 0.0})
        out += det.finish()
        return [e.event.evidence.get("reasons", []) for e in out]

    forward, backward = reasons([0, 1, 2]), reasons([2, 1, 0])
    assert forward == backward
    assert forward == [["a HUD area changed", "a lives icon went away", "a HUD area still for 11 s changed"]]


def test_a_second_critical_cue_right_after_a_wake_is_only_an_annotation() -> None:
    revert = {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 5.0, "revert_states": 4.0}
    close = run(Fed(profile(critical_gap_s=1.5)), 14, {300: [("hud", revert)], 330: [("hud", revert)]})
    assert [e.event.priority for e in close] == ["critical", "normal"], "1 s apart: one death, one wake"
    assert "demoted from critical" in close[1].event.evidence["notes"][0]
    apart = run(Fed(profile(critical_gap_s=1.5)), 14, {300: [("hud", revert)], 360: [("hud", revert)]})
    assert [e.event.priority for e in apart] == ["critical", "critical"]


def test_ocr_rule_health_drop_is_critical_and_carries_state_before_and_after() -> None:
    prof = Profile(
        regions=[Region(name="hp", box=[0.0, 0.0, 0.2, 0.1])],
        ocr_fields=[OcrField(name="health", region="hp", type="int")],
        rules=[Rule(field="health", op="drop_pct", value=30, priority="critical", kind="big_hit")],
    )
    det = Fed(prof)
    out = []
    for i in range(12 * FPS):
        t = i / FPS
        health = 100.0 if t < 8 else (90.0 if t < 10 else 50.0)  # -10% (no rule), then -44%
        out += det.observe(t, "hud_ocr", {"health": health}, {"health": str(int(health))})
    out += det.finish()
    assert [(e.event.event_kind, e.event.priority) for e in out] == [("big_hit", "critical")]
    ev = out[0].event
    assert ev.t == pytest.approx(10.0, abs=0.05)
    assert ev.evidence["state_before"]["health"] == 90.0 and ev.evidence["state_after"]["health"] == 50.0


def test_keywords_set_their_priority() -> None:
    det = Fed(Profile(keywords={"GAME OVER": "high"}))
    out = det.observe(5.0, "keywords", {"high": 1.0}, {"matched": "GAME OVER"})
    out += det.observe(5.5, "audio", {"onset": 0.0})
    out += det.finish()
    assert [(e.event.priority, e.event.event_kind) for e in out] == [("high", "keyword")]


def test_a_keyword_heard_in_speech_opens_an_event_at_the_start_of_the_speech() -> None:
    det = Fed(Profile(keywords={"GAME OVER": "critical", "bonus": "normal"}))
    out = det.observe(5.0, "audio", {"onset": 0.0})
    out += det.observe(3.2, "transcript", {}, {"text": " Bonus! And... that is game over."})
    out += det.observe(5.1, "audio", {"onset": 0.0})
    out += det.finish()
    assert [(e.event.priority, e.event.event_kind, e.event.t) for e in out] == [("critical", "spoken_keyword", 3.2)]
    assert out[0].event.evidence["reasons"] == ["heard 'GAME OVER': 'Bonus! And... that is game over.'"]
    assert out[0].delay_s == pytest.approx(1.8)  # decided at 5.0, when the transcript came, and says so


def test_a_late_keyword_is_judged_against_the_wakes_near_its_own_time() -> None:
    """A transcript decided after later wakes: the wake gap and refractory time compare it with
    the wakes nearest its moment, so a later wake neither demotes nor drops it."""
    revert = {"steps": 0.002, "small": 0.002, "revert": 1.0, "revert_age": 4.0}
    det = Fed(Profile(keywords={"you died": "critical"}))
    out = []
    for i in range(14 * FPS):
        t = i / FPS
        out += det.observe(t, "hud", revert if i == 10 * FPS else {"steps": 0.0, "small": 0.0, "revert": 0.0})
        if i == 12 * FPS:
            out += det.observe(3.0, "transcript", {}, {"text": "You died."})
        if i == 13 * FPS:  # said at the revert: the same moment has its event (refractory time) ...
            out += det.observe(10.2, "transcript", {}, {"text": "you died"})
            # ... and a second after it: one wake per death, so an annotation
            out += det.observe(11.0, "transcript", {}, {"text": "you died"})
    out += det.finish()
    got = [(e.event.t, e.event.event_kind, e.event.priority) for e in out]
    assert got == [(10.0, "hud_revert", "critical"), (3.0, "spoken_keyword", "critical"),
                   (11.0, "spoken_keyword", "normal")], got
    assert out[2].event.evidence["notes"] == ["demoted from critical: 1.00 s from another wake"]


def test_speech_without_a_keyword_or_without_keywords_is_no_event() -> None:
    for prof, text in ((Profile(keywords={"GAME OVER": "critical"}), "the gamer is over there"),
                       (Profile(), "game over")):
        det = Fed(prof)
        out = det.observe(3.0, "transcript", {}, {"text": text})
        out += det.observe(4.0, "audio", {"onset": 0.0})
        assert out + det.finish() == []


# -- refractory time and wake budget ---------------------------------------------------------
def test_refractory_time_drops_a_second_event_of_the_same_priority() -> None:
    sig = {"hud": {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 5.0}}
    signals = {300: [("hud", sig["hud"])], 312: [("hud", sig["hud"])]}  # 0.4 s apart
    near = run(Fed(profile(refractory_s=1.0, coalesce_s=0.1)), 14, signals)
    assert len(near) == 1
    far = run(Fed(profile(refractory_s=0.2, coalesce_s=0.1)), 14, signals)
    assert len(far) == 2


def test_wake_budget_demotes_wakes_past_max_per_minute() -> None:
    revert = {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 5.0}
    signals = {int((5 + 5 * k) * FPS): [("hud", revert)] for k in range(6)}  # a critical cue every 5 s
    events = run(Fed(profile(max_wakes_per_min=3.0)), 40, signals)
    prios = [e.event.priority for e in events]
    assert prios[:3] == ["critical"] * 3
    assert prios[3:] and all(p == "normal" for p in prios[3:])
    assert "wake budget" in events[3].event.evidence["notes"][0]


def test_a_wake_demoted_by_the_budget_is_kept_even_without_hud_evidence() -> None:
    # a big picture change (a flash, the screen redrawn) every 5 s: high wakes with no HUD step
    # (each bigger than any before, so each is as rare as can be)
    det = Fed(profile(max_wakes_per_min=2.0))
    events = []
    for i in range(60 * FPS):
        t = i / FPS
        k = (i - 20 * FPS) // (5 * FPS)
        big = i >= 20 * FPS and i % (5 * FPS) == 0
        values = {"flash": 0.1 + 0.05 * k, "reset": 0.6 + 0.04 * k} if big else {"flash": 0.0, "reset": 0.0}
        events += det.observe(t, "motion", values)
    events += det.finish()
    prios = [e.event.priority for e in events]
    assert prios[:2] == ["high", "high"] and len(prios) >= 6, prios
    assert all(p == "normal" for p in prios[2:]), "past the budget: demoted, and still emitted"
    assert all("wake budget" in e.event.evidence["notes"][0] for e in events[2:])


def test_high_wake_budget_demotes_high_wakes_but_lets_critical_ones_through() -> None:
    """``max_high_per_min`` bounds the wakes of a game that scores all the time; a death still wakes."""
    quiet = {"steps": 0.001, "small": 0.001, "quiet": 40.0, "quiet_area": 40.0, "quiet_cells": 1.0}
    revert = {"steps": 0.001, "small": 0.001, "revert": 1.0, "revert_age": 5.0, "revert_states": 3.0}
    signals = {int((5 + 5 * k) * FPS): [("hud", quiet)] for k in range(4)}  # a high cue every 5 s
    signals[int(27 * FPS)] = [("hud", revert)]
    events = run(Fed(profile(max_high_per_min=2.0, quiet_s=15.0)), 30, signals)
    got = [(round(e.event.t), e.event.priority) for e in events if e.event.priority in ("critical", "high", "normal")]
    assert got == [(5, "high"), (10, "high"), (15, "normal"), (20, "normal"), (27, "critical")]
    demoted = next(e for e in events if round(e.event.t) == 15)
    assert "high-wake budget" in demoted.event.evidence["notes"][0]
    unlimited = run(Fed(profile(quiet_s=15.0)), 30, signals)
    assert sum(e.event.priority == "high" for e in unlimited) == 4, "0 (the default) is no limit"


# -- causality --------------------------------------------------------------------------------
def test_every_event_is_decided_within_half_a_second_of_its_time() -> None:
    import random

    rng = random.Random(0)
    det = Fed(profile())
    events = []
    for i in range(60 * FPS):
        t = i / FPS
        hud = {"steps": 0.0, "small": 0.0, "revert": 0.0, "age": 0.1}
        if rng.random() < 0.02:
            hud.update(steps=rng.random() * 0.01, small=rng.random() * 0.005, revert=float(rng.random() < 0.2))
        events += det.observe(t, "hud", hud)
        events += det.observe(t, "audio", {"onset": rng.random() * 100 if rng.random() < 0.05 else 0.0,
                                           "offset": rng.random() * 0.02})
        events += det.observe(t, "motion", {"diff": rng.random() * 0.02, "flash": rng.random() * 0.05})
    assert len(events) > 5
    assert all(0.0 <= e.delay_s <= 0.5 for e in events), max(e.delay_s for e in events)


# -- the stage --------------------------------------------------------------------------------
def hud_with_a_revert_at_9s(i: int) -> dict[str, float]:
    """Frame ``i`` (30 fps) of a HUD stream that is quiet but for a counter going back at 9 s."""
    if i == 9 * FPS:
        return {"steps": 0.002, "small": 0.002, "revert": 1.0, "revert_age": 4.0}
    return {"steps": 0.0, "small": 0.0, "revert": 0.0}


def hud_envelopes(policy: HudCuePolicy, i: int) -> list[Any]:
    """What the HUD stage sends for frame ``i``: its cues, then its features."""
    t, values = i / FPS, hud_with_a_revert_at_9s(i)
    cues = [make_envelope(c, t_media=t, source="hud") for c in policy.update(t, values)]
    return [*cues, make_envelope(Features(name="hud", values=values), t_media=t, source="hud")]


def test_trigger_stage_emits_events_and_records_decision_delay() -> None:
    policy = HudCuePolicy()
    envs = [env for i in range(12 * FPS) for env in hud_envelopes(policy, i)]
    res = run_stage("trigger", envs, input_signals=BUILTIN)
    events = res["events"]
    assert len(events) == 1 and isinstance(events[0], Event)
    assert events[0].priority == "critical"
    assert res.envelopes("events")[0].t_media == pytest.approx(9.0, abs=0.05)
    delay = res.metrics.extra_ms["decision_delay_ms"]
    assert 0 <= delay.p99 <= 500


def test_a_restarted_trigger_marks_the_events_it_decides_while_its_baselines_refill() -> None:
    """A restarted detect group loses the detector's history, so real deaths can come out low or
    normal for a while: the events say so (and the metrics count them) instead of passing silently."""
    policy = HudCuePolicy()
    envs = [env for i in range(12 * FPS) for env in hud_envelopes(policy, i)]
    first = run_stage("trigger", envs, input_signals=BUILTIN)
    assert "notes" not in first["events"][0].evidence and first.metrics.notes == {}
    again = run_stage("trigger", envs, input_signals=BUILTIN, restart={"incarnation": 1})
    ev = again["events"][0]
    assert [n.split(":")[0] for n in ev.evidence["notes"]] == ["warming_up"], ev.evidence
    assert "hold 9.3 s of the 18 s" in ev.evidence["notes"][0]  # decided at 9.3 s, 9.3 s after its first input
    assert again.metrics.notes == {"warming_up": 1}


def test_trigger_stage_turns_a_late_transcript_with_a_keyword_into_an_event(tmp_path: Any) -> None:
    """A transcript comes well after its speech (the segment, then Whisper): it does not hold
    back the picture and HUD events, and its keyword still becomes an event at the speech."""
    prof = tmp_path / "kw.yaml"
    prof.write_text("name: kw\nkeywords: {mission failed: critical}\n")
    envs, policy = [], HudCuePolicy()
    for i in range(12 * FPS):
        envs += hud_envelopes(policy, i)
        if i == 6 * FPS:  # said from 2.5 s to 4 s, transcribed by 6 s: the ASR stage's late cue
            heard = spoken_keyword_cue(2.5, "Mission failed.", {"mission failed": "critical"})
            envs.append(make_envelope(heard, t_media=2.5, source="asr"))
    res = run_stage("trigger", envs, options={"profile": str(prof)}, input_signals=BUILTIN)
    got = [(e.event_kind, e.priority, e.t) for e in res["events"]]
    assert got == [("spoken_keyword", "critical", 2.5), ("hud_revert", "critical", pytest.approx(9.0, abs=0.05))]


def test_stage_overrides_validate_against_trigger_params() -> None:
    with pytest.raises(UsageError, match=r"trigger\.refractory_s"):
        trigger_settings({}, "p.yaml", {"refractory_s": "soon"})


def test_inputs_of_equal_media_time_give_the_same_events_whatever_order_they_come_in() -> None:
    # one frame's motion, HUD and audio features reach the detector from different processes
    def feed(order: list[str]) -> list[dict]:
        det = Fed(profile())
        out = []
        for i in range(15 * FPS):
            t = i / FPS
            step = i in (6 * FPS, 10 * FPS)
            inputs = {
                "motion": {"diff": 0.3 if step else 0.0, "flash": 0.2 if step else 0.0},
                "hud": {key: 0.002 if step else 0.0 for key in ("steps", "small", "fresh")} | {"novel": 30.0},
                "audio": {"onset": 80.0 if step else 0.0, "rise": 40.0 if step else 0.0},
            }
            for name in order:
                out += det.observe(t, name, inputs[name])
        out += det.finish()
        return [e.record() for e in out]

    first = feed(["motion", "hud", "audio"])
    assert len(first) >= 2
    assert feed(["audio", "hud", "motion"]) == first
    assert feed(["hud", "audio", "motion"]) == first


def trigger_run_with_a_sparse_producer(*, heartbeats: bool) -> Any:
    """12 s of per-frame HUD features with one revert at 9 s, and an OCR stage that says
    something only when the score changes (at 2 s and just before the revert), with or
    without its heartbeats."""
    envs, policy = [], HudCuePolicy()
    for i in range(12 * FPS):
        t = i / FPS
        envs += hud_envelopes(policy, i)
        if i in (2 * FPS, 9 * FPS - 3):
            envs.append(make_envelope(GameState(values={"score": float(i)}), t_media=t, source="hud_ocr"))
        elif heartbeats and i % 3 == 0:
            envs.append(make_envelope(Heartbeat(), t_media=t, source="hud_ocr"))
    return run_stage("trigger", envs, input_signals=BUILTIN)


def test_heartbeats_of_a_producer_that_emits_rarely_keep_events_on_time() -> None:
    """Without heartbeats the trigger cannot tell a quiet OCR stage from a slow one: it waits
    until the stage falls ``idle_s`` behind, and every event goes out a second late."""
    late = trigger_run_with_a_sparse_producer(heartbeats=False)
    on_time = trigger_run_with_a_sparse_producer(heartbeats=True)
    for res in (late, on_time):
        assert [(e.priority, round(e.t, 1)) for e in res["events"]] == [("critical", 9.0)]
    # emit lag: media time already seen on the newest input when the event went out, minus its t
    assert on_time.metrics.extra_ms["emit_lag_ms"].p99 <= 500
    assert late.metrics.extra_ms["emit_lag_ms"].p99 >= 800


def test_a_moment_decided_once_is_not_decided_again_when_its_sound_comes_after() -> None:
    """A HUD step opens a (forced) episode, decided 0.25 s later; its sound comes one frame after
    that.  The score then crosses the threshold with the step still in its window, which opened a
    second episode with the same onset: the same moment twice (``live --game Breakout`` wrote the
    event near 11.03 s twice, and a replay whose decode group was restarted did the same)."""
    det = Fed()
    out = []
    for k in range(30 * 12):
        t = k / 30
        hit = k == 300  # a score digit steps at 10.0 s ...
        hud = {"steps": 0.002 if hit else 0.0, "small": float(hit), "fresh": float(hit), "novel": 10.0 * hit}
        out += det.observe(t, "hud", hud)
        out += det.observe(t, "audio", {"onset": 50.0 if k == 309 else 0.0})  # ... its sound at 10.3 s
    out += det.finish()
    assert [e.event.t for e in out] == [10.0], [(e.event.t, e.event.event_kind, e.decided_at) for e in out]


def _events_with_the_hud_lagging(lag_frames: int, speed: float | None) -> list[dict[str, Any]]:
    """The HUD (with its revert at 9 s) and an audio encoder, both running from the start; then the
    HUD falls ``lag_frames`` behind the audio, as a slow encoder does in a run at max speed."""
    policy = HudCuePolicy()
    hud = [hud_envelopes(policy, i) for i in range(12 * FPS)]
    audio = [[make_envelope(Features(name="audio", values={"onset": 40.0 if i == 9 * FPS + 2 else 1.0}),
                            t_media=i / FPS, source="audio_features")] for i in range(12 * FPS)]
    envs: list[Any] = []
    for i in range(12 * FPS):
        envs += audio[i]
        if i >= lag_frames:
            envs += hud[i - lag_frames]
    for i in range(12 * FPS - lag_frames, 12 * FPS):
        envs += hud[i]
    res = run_stage("trigger", envs, input_signals=BUILTIN, speed=speed)
    return [e.record() for e in res["events"]]


def test_a_lossless_run_waits_for_a_slow_encoder_however_far_behind_so_it_decides_the_same_every_time() -> None:
    """At max speed an encoder seconds of media behind the others is slower, not gone: the tuner's
    replay of what annotate sent the trigger differed from annotate's own events when the HUD
    stage fell more than ``idle_s`` behind on a loaded CI machine (one reason more or less)."""
    in_step = _events_with_the_hud_lagging(0, speed=None)
    assert [e["priority"] for e in in_step] == ["critical"]
    assert _events_with_the_hud_lagging(3 * FPS, speed=None) == in_step
    # at real-time speed a producer a second of media behind has stalled: the others go on without it
    assert _events_with_the_hud_lagging(3 * FPS, speed=1.0) != in_step
