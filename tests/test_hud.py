"""HUD change encoder: step changes in still areas, automatic HUD areas, reverts, real footage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from copilot.messages import Features, VideoFrame
from copilot.profile import Region
from copilot.testing import make_envelope, run_stage
from stages.hud import HudAnalyzer

H, W = 240, 320


def digit(value: int) -> np.ndarray:
    """A crude 7-segment digit (40x24, white on black) so each value has its own pixels."""
    seg = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg",
           9: "abcdfg", -1: ""}[value]
    d = np.zeros((40, 24), np.uint8)
    boxes = {"a": (0, 4, 0, 24), "b": (0, 20, 20, 24), "c": (20, 40, 20, 24), "d": (36, 40, 0, 24),
             "e": (20, 40, 0, 4), "f": (0, 20, 0, 4), "g": (18, 22, 0, 24)}
    for s in seg:
        y0, y1, x0, x1 = boxes[s]
        d[y0:y1, x0:x1] = 255
    return d


def scene(t: float, value: int, ball: bool = True) -> np.ndarray:
    img = np.full((H, W, 3), 30, np.uint8)
    img[8:48, 280:304] = digit(value)[..., None]
    if ball:  # a ball bouncing over the play area, never resting
        x = int(40 + (t * 200) % 200)
        y = int(80 + 60 * abs(np.sin(t * 3)))
        img[y : y + 6, x : x + 6] = 250
    return img


def feed(h: HudAnalyzer, values_at: list[int], seconds: float, fps: int = 30) -> list[tuple[float, dict]]:
    out = []
    for i in range(int(seconds * fps)):
        t = i / fps
        v = values_at[min(len(values_at) - 1, int(t // 2))]
        vals, _ = h.update(scene(t, v), t)
        out.append((t - vals["age"], vals))
    return out


def test_digit_steps_are_found_and_a_moving_ball_is_not() -> None:
    h = HudAnalyzer()
    # the digit changes about every 2 s (not exactly: a change every 2.000 s is a clock's tick)
    at = [0.0, 2.0, 4.3, 6.1, 8.4, 10.2]
    out = feed_times(h, list(zip(at, [0, 1, 2, 3, 4, 5], strict=True)), 12)
    small = [t for t, v in out if v["small"] > 0]
    # the first change makes the area known; every later one is a HUD step, at its own time
    for k in range(2, 6):
        assert any(abs(t - at[k]) <= 0.07 for t in small), (k, small)
    assert all(min(abs(t - a) for a in at[1:]) <= 0.07 for t in small), small
    assert h.hud_cells()[1, 28], "the digit's cell is a still (HUD) cell"


def test_a_counter_going_back_to_an_earlier_value_is_a_revert_and_a_blink_is_not() -> None:
    h = HudAnalyzer()
    # blank -> 8 (the area becomes known) -> 3 -> 2 -> 8: back to a state it showed at 2-4 s
    # (at irregular times: a counter that steps at exactly equal intervals is a clock, see below)
    out = feed_times(h, [(0.0, -1), (2.0, 8), (4.3, 3), (5.9, 2), (8.0, 8)], 10)
    reverts = [t for t, v in out if v["revert"] > 0]
    assert reverts and all(abs(t - 8.0) <= 0.07 for t in reverts), reverts
    blink = HudAnalyzer()
    out = feed_times(blink, [(0.0, -1), (2.0, 8), (4.3, 3), (5.9, 8), (8.0, 3), (10.4, 8)], 12)
    assert not [t for t, v in out if v["revert"] > 0], "toggling between two states is a blink"


def test_profile_regions_report_their_changed_fraction() -> None:
    h = HudAnalyzer(regions=[Region(name="digit", box=[280 / W, 8 / H, 24 / W, 40 / H])])
    out = feed(h, [0, 1], 3)
    changes = [(t, v["region.digit"]) for t, v in out if v.get("region.digit", 0) > 0]
    assert changes and all(abs(t - 2.0) < 0.2 for t, _ in changes)


def _frames(path: Path, until: float) -> list[tuple[float, np.ndarray]]:
    import av

    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            if f.time > until:
                break
            out.append((float(f.time), f.to_ndarray(format="rgb24")))
    return out


def test_real_breakout_lives_and_score_changes_are_hud_steps(atari_clip: Path) -> None:
    truth_path = atari_clip.with_suffix("").with_suffix(".truth.jsonl")
    truth = [json.loads(line) for line in truth_path.read_text().splitlines()]
    events = [e for e in truth[1:] if e["kind"] in ("life_lost", "reward") and e["t"] >= 1.0]
    assert events
    h = HudAnalyzer()
    steps, reverts = [], []
    for t, img in _frames(atari_clip, 12):
        v, _ = h.update(img, t)
        if v["small"] > 0:
            steps.append(t - v["age"])
        if v["revert"] > 0:
            reverts.append(t - v["age"])
    for e in events:  # every lives drop and score change shows in the HUD within 0.1 s
        assert any(abs(t - e["t"]) <= 0.1 for t in steps), (e, steps)
    overs = [e["t"] for e in truth[1:] if e["kind"] == "game_over"]
    # after a game over the lives counter shows 5 again: a revert, at that moment
    for t_over in overs:
        assert any(abs(t - t_over) <= 0.1 for t in reverts), (t_over, reverts)


def test_hud_stage_emits_hud_features(atari_clip: Path) -> None:
    frames = _frames(atari_clip, 2.0)
    envs = [make_envelope(VideoFrame(image=img, frame_index=i), t_media=t, seq=i + 1)
            for i, (t, img) in enumerate(frames)]
    res = run_stage("hud", envs)
    feats = res["features"]
    assert len(feats) == len(frames)
    assert all(isinstance(f, Features) and f.name == "hud" for f in feats)
    assert {"steps", "small", "revert", "age"} <= set(feats[-1].values)


@pytest.mark.parametrize("fmt", ["rgb24", "bgra"])
def test_pixel_formats(fmt: str) -> None:
    h = HudAnalyzer()
    img = scene(0.0, 1)
    if fmt == "bgra":
        img = np.concatenate([img[..., ::-1], np.full((H, W, 1), 255, np.uint8)], axis=2)
    vals, _ = h.update(img, 0.0, fmt)
    assert vals["steps"] == 0.0


def feed_times(h: HudAnalyzer, changes: list[tuple[float, int]], seconds: float, fps: int = 30) -> list:
    """Like :func:`feed`, with the digit's value changing at the given media times."""
    out = []
    for i in range(int(seconds * fps)):
        t = i / fps
        v = [val for at, val in changes if at <= t + 1e-9][-1]
        vals, _ = h.update(scene(t, v), t)
        out.append((t - vals["age"], vals))
    return out


def test_a_revert_reports_how_many_states_the_area_has_shown() -> None:
    h = HudAnalyzer()
    values = [-1, 8, 0, 1, 2, 3, 4, 5, 8]  # seven contents, then back to 8
    out = feed_times(h, [(2.0 * k + 0.3 * (k % 2), v) for k, v in enumerate(values)], 18)
    rev = [v for _, v in out if v["revert"] > 0]
    assert rev and rev[0]["revert_states"] >= 7, rev
    few = HudAnalyzer()
    out = feed_times(few, [(0.0, -1), (2.0, 8), (4.3, 3), (5.9, 2), (8.0, 8)], 10)
    assert [v["revert_states"] for _, v in out if v["revert"] > 0] == [4.0]  # blank, 8, 3, 2


def test_an_area_ticking_like_a_clock_does_not_revert() -> None:
    # a countdown 5 4 3 2 1 5 4 ... stepping every 1.0 s to the frame: its wrap is no revert
    ticks = [(0.0, -1)] + [(1.0 + k, [5, 4, 3, 2, 1][k % 5]) for k in range(14)]
    out = feed_times(HudAnalyzer(), ticks, 15)
    assert not [t for t, v in out if v["revert"] > 0]
    assert [t for t, v in out if v["revert_clock"] > 0], "the wraps are seen, as a clock"
    # the same values at irregular times (a lives counter) do revert
    irregular = [(0.0, -1)] + [(1.0 + 1.1 * k + 0.2 * (k % 3), [5, 4, 3, 2, 1][k % 5]) for k in range(12)]
    out = feed_times(HudAnalyzer(), irregular, 16)
    assert [t for t, v in out if v["revert"] > 0]


def test_a_step_in_a_hud_cell_still_for_long_is_quiet() -> None:
    h = HudAnalyzer()
    out = feed_times(h, [(0.0, 8), (30.0, 3), (32.0, 8)], 34)
    at30 = [v for t, v in out if abs(t - 30.0) <= 0.07 and v["quiet"] > 0]
    assert at30 and at30[0]["quiet"] >= 29.0 and at30[0]["quiet_cells"] >= 1, at30
    assert at30[0]["quiet_area"] <= at30[0]["quiet"]
    # 3 -> 8 steps the same cells again: they had been still for two seconds only
    at32 = [v for t, v in out if abs(t - 32.0) <= 0.07 and v["quiet"] > 0]
    assert at32 and max(v["quiet"] for v in at32) <= 2.5, at32


def test_quiet_lost_tells_an_icon_going_away_from_one_appearing() -> None:
    out = feed_times(HudAnalyzer(), [(0.0, 8), (30.0, 1), (32.0, 8)], 34)
    lost = {round(t): v["quiet_lost"] for t, v in out if v["quiet"] > 0}
    assert lost[30] > 0.9, "8 -> 1: the segments that went off went to the background"
    assert lost[32] < 0.1, "1 -> 8: segments appeared, nothing was lost"


def test_a_timer_is_a_clock_even_when_a_tick_is_missed_and_its_steps_are_not_small() -> None:
    # a countdown stepping every 1.0 s to the frame; at 6 s its value does not change (a tick
    # this encoder cannot see), so one gap is 2 s
    values = [5, 4, 3, 2, 2, 1, 5, 4, 3, 2, 1, 5, 4, 3, 2]
    ticks = [(0.0, -1)] + [(1.0 + k, v) for k, v in enumerate(values)]
    out = feed_times(HudAnalyzer(), ticks, 16)
    # from 7 s on (the area is known from 2 s, and a clock takes four intervals) every tick is a
    # clock's, the ones whose last intervals include the missed tick too
    late = [(round(t, 2), v) for t, v in out if t >= 6.9 and (v["clock"] > 0 or v["small"] > 0)]
    assert [t for t, _ in late][:3] == [7.0, 8.0, 9.0], late
    assert all(v["clock"] == 1.0 and v["small"] == 0.0 and v["fresh"] == 0.0 for _, v in late), late


def timer_scene(t: float) -> np.ndarray:
    """A score (top) that changes now and then, over a two-digit countdown ticking every second
    from 39 at 1 s, with a ball bouncing over the play area."""
    img = scene(t, [v for at, v in ((0.0, 0), (13.4, 1), (17.7, 2), (26.3, 3)) if at <= t + 1e-9][-1])
    if t >= 1.0:
        left = 39 - int(t - 1.0 + 1e-9)
        img[52:72, 276:288] = digit(left // 10)[::2, ::2, None]
        img[52:72, 292:304] = digit(left % 10)[::2, ::2, None]
    return img


def test_a_timers_tens_digit_is_the_clock_too_and_a_score_beside_it_is_news() -> None:
    h = HudAnalyzer()
    out = []
    for i in range(34 * 30):
        vals, _ = h.update(timer_scene(i / 30), i / 30)
        out.append((round(i / 30 - vals["age"], 2), vals))
    # the tens digit changes at 11, 21 and 31 s, with the units (30 -> 29): once the units tick
    # like a clock, that is the clock too: no step of a small area, no long-still cell, and of
    # the steps only the few pixels of cells too little changed to judge (a score step has ten
    # times as many)
    score = max(v["steps"] for t, v in out if abs(t - 17.7) <= 0.07)
    for at in (21.0, 31.0):
        tick = [v for t, v in out if t == at and v["clock"] > 0]
        assert tick, (at, [(t, v) for t, v in out if abs(t - at) < 0.2 and (v["steps"] or v["clock"])])
        assert tick[0]["small"] == 0.0 and tick[0]["quiet"] == 0.0 and tick[0]["cells"] == 0.0, tick
        assert tick[0]["steps"] < 0.1 * score, (tick, score)
    # the score above the timer still makes news, at its own times
    news = [t for t, v in out if v["small"] > 0 and v["fresh"] > 0]
    for at in (17.7, 26.3):
        assert any(abs(t - at) <= 0.07 for t in news), (at, news)
    late = [t for t, v in out if t >= 10.5 and v["small"] > 0]
    assert all(min(abs(t - at) for at in (13.4, 17.7, 26.3)) <= 0.07 for t in late), late


def test_a_regular_cycle_that_is_not_whole_seconds_is_not_a_clock() -> None:
    # a game's own cycle (Pong's opponent scoring every 2.33 s when nobody plays) is events
    ticks = [(0.0, -1)] + [(1.0 + k * 70 / 30, [0, 1, 2, 3, 4, 5][k % 6]) for k in range(7)]
    out = feed_times(HudAnalyzer(), ticks, 17)
    steps = [t for t, v in out if v["small"] > 0]
    assert len(steps) >= 5 and not [t for t, v in out if v["clock"] > 0], steps


def test_fresh_is_a_step_to_a_content_the_area_never_showed() -> None:
    out = feed_times(HudAnalyzer(), [(0.0, -1), (2.0, 8), (4.3, 3), (5.9, 2), (8.0, 8)], 10)
    fresh = [round(t, 1) for t, v in out if v["fresh"] > 0]
    small = [round(t, 1) for t, v in out if v["small"] > 0]
    assert 4.3 in fresh and 5.9 in fresh, fresh
    assert 8.0 in small and 8.0 not in fresh, "back to 8: a step, but nothing new"


def test_an_area_that_grows_keeps_what_it_showed_and_still_reverts() -> None:
    # a digit (the area) is joined later by a small marker beside it, so the area's box grows;
    # when the digit goes back to a value it showed before the growth, that is still a revert
    def frame(t: float) -> np.ndarray:
        value = [v for at, v in [(0.0, -1), (2.0, 8), (4.3, 3), (9.5, 8)] if at <= t + 1e-9][-1]
        img = scene(t, value)
        if t >= 6.1:  # the marker: blank -> lit at 6.1, off at 7.4, lit again at 8.3
            lit = t < 7.4 or t >= 8.3
            img[8:16, 270:276] = 250 if lit else 30
        return img

    h = HudAnalyzer()
    reverts = []
    for i in range(11 * 30):
        t = i / 30
        v, _ = h.update(frame(t), t)
        if v["revert"] > 0:
            reverts.append(round(t - v["age"], 2))
    assert any(abs(t - 9.5) <= 0.07 for t in reverts), reverts


def test_the_area_memory_is_bounded_and_forgets_the_area_that_stepped_longest_ago() -> None:
    from stages.hud import HudMemory

    mem = HudMemory((24, 32))
    mem.max_areas = 5
    hudmap = np.zeros((24, 32), bool)
    hudmap[::3, ::3] = True  # 64 separate one-cell areas
    cells = list(zip(*np.nonzero(hudmap), strict=True))
    before = np.zeros((120, 160), np.int16)
    after = np.full((120, 160), 200, np.int16)
    for k, (y, x) in enumerate(cells[:12]):
        stepped = np.zeros_like(hudmap)
        stepped[y, x] = True
        mem.step(stepped, hudmap, before, after, t=float(k))
        assert len(mem._states) <= 5 and len(mem._times) <= 5
    last = cells[11]
    assert any(key[0] == last[0] and key[2] == last[1] for key in mem._states), "the newest area is kept"
    first = cells[0]
    assert not any(key[0] == first[0] and key[2] == first[1] for key in mem._states), "the oldest is gone"


@pytest.mark.parametrize(("w", "h"), [(32, 24), (17, 9), (2, 2), (16, 48)])
def test_a_frame_smaller_than_the_cell_grid_is_handled(w: int, h: int) -> None:
    """Frames under ~48 px (a tiny window) left cells without pixels: an IndexError in every
    frame crashed the group, and the run hung after its restart."""
    hud = HudAnalyzer()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(90):
        img = base.copy()
        if i >= 45:
            img[: max(1, h // 4), : max(1, w // 4)] = 255  # a corner steps and stays
        values, _ = hud.update(img, i / 30)
        assert all(np.isfinite(v) for v in values.values()), values


@pytest.mark.parametrize(("w", "h", "stride", "grid"), [(640, 480, 2, (32, 24)), (1920, 1080, 2, (32, 24)),
                                                   (1000, 700, 3, (32, 24)), (640, 480, 1, (2, 2))])
def test_cell_sums_count_every_set_pixel_in_its_cell(w: int, h: int, stride: int, grid: tuple[int, int]) -> None:
    """The fast per-cell sums (bytes summed into int16 along rows, then down columns) equal a
    plain scatter-add, on grids that divide the thumbnail evenly and unevenly, and with cells
    too big for int16 (a 2x2 grid on 640x480 at stride 1: 76,800 px a cell, all set)."""
    hud = HudAnalyzer(stride=stride, grid=grid)
    hud.update(np.zeros((h, w, 3), np.uint8), 0.0)  # sets the grid up for this size
    th, tw = -(-h // stride), -(-w // stride)
    rng = np.random.default_rng(w)
    for mask in (rng.random((th, tw)) < 0.3, np.ones((th, tw), bool), np.zeros((th, tw), bool)):
        want = np.zeros((hud.gy, hud.gx), np.int64)
        assert hud._cell_of_row is not None and hud._cell_of_col is not None
        np.add.at(want, (hud._cell_of_row[:, None], hud._cell_of_col[None, :]), mask.astype(np.int64))
        got = hud._cell_sums(mask)
        assert got.shape == want.shape and np.array_equal(got, want)
        assert int(got.sum()) == int(np.count_nonzero(mask))
