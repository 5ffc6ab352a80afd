"""HUD change encoder: changes in the parts of the screen that rarely change.

Scores, lives icons, health bars and timers sit in screen areas that stay still while the
game moves around them, and when they change they change *in steps*: a digit flips to
another digit and stays.  A ball or a bullet crossing a still background changes pixels
too, but they revert a frame or two later.  So this encoder looks for step changes:

* a pixel *steps* when it held one value for at least ``stable_before`` frames, changed,
  and then held the new value for ``settle`` frames (so the signal comes ``settle`` frames,
  about 0.1 s, after the change: still causal and well within the detector's 0.5 s);
* the screen is cut into a grid of cells; each cell keeps a slow running rate of how often
  any of its pixels changes at all.  Cells that rarely change are the automatic HUD (and
  still background); steps in busy cells (a paddle that stops, marching invaders) count
  for less.  Profile regions are tracked as named areas on top.

Per frame it emits ``Features(name="hud")`` with ``steps`` (fraction of sampled pixels that
stepped, weighted by how still their cell is), ``cells`` (how many cells stepped), ``novel``
(seconds since the stepping cell last stepped, capped: a lives icon that changes once a
minute is more surprising than a score that ticks every second), ``quiet`` (the same, only
for cells nothing ever passed through, counted from the start: a lives icon that steps for
the first time after a minute scores 60) with ``quiet_cells``, ``quiet_area`` (the same
with the cell's row neighbours, the rest of its number) and ``quiet_lost`` (the share of
those cells' stepped pixels that went to the background: an icon lost, not a digit
gained), ``revert`` / ``revert_age`` / ``revert_states`` / ``revert_clock`` / ``clock`` / ``fresh`` (see
:class:`HudMemory`), ``region.NAME`` (changed fraction of each profile region) and, in
``text["where"]``, the stepped cells' box.  The cells of a clock (a timer's digits, see
:meth:`HudMemory._ticks`) count in none of these step figures: a timer ticking is no news.
The numeric core is :class:`HudAnalyzer`.  What a step *means* (a counter going back, a lives
icon going away, a score gone up) goes out as :class:`copilot.messages.Cue` news on the ``cues``
port, decided by :class:`stages.hud_cues.HudCuePolicy` from the profile's ``hud`` section.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from copilot.messages import Cue, Envelope, Features, VideoFrame
from copilot.profile import Profile, Region, profile_from_options
from copilot.registry import register_stage
from copilot.signals import HUD, Signal
from copilot.stage import StageContext
from stages._analyzer import AnalyzerStage
from stages.hud_cues import HudCuePolicy, hud_cue_settings
from stages.motion import gray_thumbnail


class HudParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stride: int = 2  # sample every 2nd pixel each way (320x240 of a 640x480 frame)
    threshold: int = 24  # luma change that counts (above video-codec noise)
    settle: int = 3  # frames the new value must hold
    stable_before: int = 6  # frames the old value must have held
    grid_cols: int = 32  # the screen is cut into grid_cols x grid_rows cells
    grid_rows: int = 24
    min_cell_px: int = 3  # sampled pixels that must step for a cell to count
    activity_tau_s: float = 20.0  # time constant of each cell's change rate
    busy_rate: float = 0.05  # a cell changing in this fraction of frames counts as busy
    novel_cap_s: float = 60.0
    auto: bool | None = None  # None: the profile's auto_hud


_KNOWN_MIN = 0.65  # share of an area a remembered state must know to match (see HudMemory._match)


class HudMemory:
    """What each HUD area has shown, to tell progress from a return to an earlier state.

    Cells that changed only in steps form the HUD map; its groups of nearby cells are the
    HUD areas (a score, a lives counter, a row of icons).  For each area the distinct
    contents it has settled on are remembered (coarsely quantised, so codec noise does not
    matter).  A counter that only goes up (a score) keeps showing new contents; one that
    goes back to a content it showed before, other than the one or two it just showed (a
    blink), has *reverted*: a life counter going down again after a game over, a score reset
    to zero, a level redrawn.  ``revert`` is then 1 and ``revert_age`` says how long ago that
    content was last seen.  An area's memory starts when it is first recognised, so its very
    first contents can be missed; when its box grows (more of its cells found), it keeps
    what the smaller areas inside it showed, with the new part unknown.  ``revert_states`` says how
    many contents the area has shown (the detector trusts reverts of areas with few).  Cells
    that step on a clock's beat are a clock (a countdown, a timer; see :meth:`_ticks`); an
    area whose step is only such cells reports its returns to earlier contents as
    ``revert_clock``, never as ``revert``, and its steps are left out of ``small`` and
    ``areas`` (``clock`` is 1 instead).  ``clock_cells`` are the clock's cells in the last step.
    ``fresh`` is the part of ``small`` in areas that now show a content they never showed
    before (a score gone up, a life lost for the first time), not one they go back and forth
    between (a blinking marker, a gauge).
    """

    def __init__(self, grid_hw: tuple[int, int], max_states: int = 64, min_gap_s: float = 1.0, gap: int = 1,
                 max_area_frac: float = 0.04) -> None:
        self.gy, self.gx = grid_hw
        self.gap = gap
        self.max_area_cells = max(4, int(max_area_frac * grid_hw[0] * grid_hw[1]))
        self.max_areas = 256  # areas remembered; past this the one that stepped longest ago is forgotten
        self.map = np.zeros(grid_hw, bool)
        self.max_states = max_states
        self.min_gap_s = min_gap_s
        self._labels: np.ndarray | None = None
        self.clock_cells = np.zeros(grid_hw, bool)  # the cells that ticked as a clock's in the last step
        # area key (cell box) -> [[snapshot, last seen t], ...]; and the area's recent state indices
        self._states: dict[tuple[int, int, int, int], list[list[Any]]] = {}
        self._recent: dict[tuple[int, int, int, int], list[int]] = {}
        self._times: dict[tuple[int, int, int, int], float] = {}  # the area's last step time
        self.clock_tol_s = 0.02  # intervals this close are equal (under a frame at 30 fps)
        self.clock_max_s = 3.0  # a clock ticks every 1, 2 or 3 s
        self.clock_max_skip = 3  # a gap may span this many periods (ticks the encoder missed)
        self.clock_ticks = 4  # intervals in a row that make a clock
        self._cell_times = np.full((*grid_hw, self.clock_ticks + 1), np.nan)  # each cell's last step times
        self._beat: tuple[float, float] | None = None  # a clock's last tick and its period
        self._ticked = np.zeros(grid_hw, bool)  # cells that ever ticked as a clock's

    def _label(self) -> np.ndarray:
        """Connected groups of HUD cells (0 = not HUD); gaps of up to ``gap`` cells join."""
        labels = np.zeros(self.map.shape, np.int32)
        n = 0
        reach = [(dy, dx) for dy in (-1, 0, 1) for dx in range(-self.gap - 1, self.gap + 2) if (dy, dx) != (0, 0)]
        for y0, x0 in zip(*np.nonzero(self.map), strict=True):
            if labels[y0, x0]:
                continue
            n += 1
            stack = [(int(y0), int(x0))]
            labels[y0, x0] = n
            while stack:
                y, x = stack.pop()
                for dy, dx in reach:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < self.gy and 0 <= xx < self.gx and self.map[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        stack.append((yy, xx))
        return labels

    def _ticks(self, stepped: np.ndarray, t: float) -> np.ndarray:
        """Note the steps of the ``stepped`` cells at ``t``; the cells among them that tick like a clock.

        A timer or a countdown steps every second (or every few) to the frame (a tick whose
        change this encoder missed makes a gap of two intervals); a lives counter or a score
        steps when something happens, and its gaps are not whole multiples of one another time
        after time.  The interval must be a whole number of seconds: a game's own cycle can be
        regular too (Pong's opponent scoring every 2.33 s when nobody plays), and those
        steps are events, not a clock.  This is judged per cell, not per area: a score right
        above a timer often joins it in one area, and its steps must not hide the timer.  A cell
        that steps on a tick (a ticking cell stepped, or the clock's beat, kept for up to
        ``clock_max_skip`` periods, since a 9 -> 0 change can be too small to see), its last step
        on that beat too, is the clock as well: the tens digit, which changes every ten seconds
        (a minute for the minutes).  So is a cell stepping for the first time on a tick when a
        ticking cell stepped with it or its area ticked before.
        """
        ys, xs = np.nonzero(stepped)
        times = self._cell_times[ys, xs]
        last = times[:, -1].copy()
        times = np.concatenate([times[:, 1:], np.full((ys.size, 1), t)], axis=1)
        self._cell_times[ys, xs] = times
        gaps = np.diff(times, axis=1)
        known = ~np.isnan(gaps).any(axis=1)
        period = np.where(known, gaps.min(axis=1, initial=np.inf), 0.0)
        tol = self.clock_tol_s
        ok = known & (period >= 1.0 - tol) & (period <= self.clock_max_s + tol)
        ok &= np.abs(period - np.round(period)) <= tol
        with np.errstate(invalid="ignore", divide="ignore"):
            k = np.round(gaps / np.where(ok, period, 1.0)[:, None])
        ok &= k.max(axis=1, initial=0) <= self.clock_max_skip
        ok &= np.all(np.abs(gaps - k * period[:, None]) <= tol * k, axis=1)
        tick = bool(ok.any())  # this is a tick of a clock
        if tick:
            self._beat = (t, float(period[ok].min()))
        elif self._beat is not None:  # no ticking cell stepped (9 -> 0 can be too small a change): on the beat?
            d = t - self._beat[0]
            n = round(d / self._beat[1])
            if n > self.clock_max_skip:
                self._beat = None  # the clock stopped
            else:
                tick = n >= 1 and abs(d - n * self._beat[1]) <= tol * n
        if tick and self._beat is not None and not ok.all():
            beat = self._beat[1]
            since = t - last
            with np.errstate(invalid="ignore"):
                beats = np.round(since / beat)
                on = (beats >= 1) & (np.abs(since - beats * beat) <= tol)  # to the frame: the carry is the tick's
            # a cell stepping for the first time goes with the tick when a ticking cell stepped too,
            # or when it lies in an area that ticked before (the minutes digit's first change)
            first = np.isnan(since)
            if not ok.any() and first.any():
                labels = self._labels if self._labels is not None else np.zeros(stepped.shape, np.int32)
                first &= np.isin(labels[ys, xs], np.unique(labels[self._ticked & (labels > 0)]))
            ok |= on | first
            self._beat = (t, beat)
        out = np.zeros(stepped.shape, bool)
        out[ys[ok], xs[ok]] = True
        self._ticked |= out
        return out

    @staticmethod
    def _snap(img: np.ndarray) -> np.ndarray:
        return (img >> 5).astype(np.int8)

    @staticmethod
    def _match(states: list[list[Any]], snap: np.ndarray) -> int:
        """Index of the state ``snap`` shows again, or -1.  Pixels a state does not know (-1: an
        area that grew since) are left out, but a state must know most of the area (``_KNOWN_MIN``)."""
        for i, (s, _) in enumerate(states):
            if s.shape != snap.shape:
                continue
            known = s >= 0
            n = int(np.count_nonzero(known))
            if n < _KNOWN_MIN * snap.size:
                continue
            if np.count_nonzero((np.abs(s - snap) > 1) & known) <= max(2, n // 100):
                return i
        return -1

    def _inherit(self, key: tuple[int, int, int, int], h: int, w: int) -> list[list[Any]]:
        """The states of earlier, smaller areas inside ``key`` (the area grew as more of its cells
        were found), placed in the new box with the rest unknown; those areas are forgotten.

        Without this an area's memory would start again whenever its box grows, and a lives
        counter that grew that way would miss its return to full at the next game over.
        """
        y0, x0 = key[0] * h // self.gy, key[2] * w // self.gx
        shape = (key[1] * h // self.gy - y0, key[3] * w // self.gx - x0)
        out: list[list[Any]] = []
        for old in [k for k in self._states if k != key and key[0] <= k[0] and k[1] <= key[1]
                    and key[2] <= k[2] and k[3] <= key[3]]:
            oy, ox = old[0] * h // self.gy - y0, old[2] * w // self.gx - x0
            for snap, seen in self._states.pop(old):
                full = np.full(shape, -1, np.int8)
                full[oy:oy + snap.shape[0], ox:ox + snap.shape[1]] = snap
                out.append([full, seen])
            self._recent.pop(old, None)
            self._times.pop(old, None)
        out.sort(key=lambda st: st[1])
        return out[-(self.max_states - 1):] if self.max_states > 1 else []

    def step(self, stepped: np.ndarray, hudmap: np.ndarray, before: np.ndarray, after: np.ndarray,
             t: float, counts: np.ndarray | None = None, moved: np.ndarray | None = None) -> dict[str, float]:
        """Note the step of the HUD cells ``stepped`` at ``t``; ``moved`` (default ``stepped``) is
        every cell that stepped, HUD or not, for the clocks: a timer's digit that ticks every
        second can be too busy to count as HUD, and its ticks are still no news."""
        out = {"revert": 0.0, "revert_age": 0.0, "revert_states": 0.0, "revert_clock": 0.0, "areas": 0.0, "small": 0.0,
               "clock": 0.0, "fresh": 0.0}
        moved = stepped if moved is None else moved
        ticking = self._ticks(moved, t) if moved.any() else np.zeros(self.map.shape, bool)
        self.clock_cells = ticking
        if not stepped.any():
            return out
        if self._labels is None or not np.array_equal(hudmap, self.map):
            self.map = hudmap.copy()
            self._labels = self._label()
        labels = self._labels
        h, w = before.shape
        for lab in np.unique(labels[stepped]):
            if lab == 0:
                continue
            ys, xs = np.nonzero(labels == lab)
            if ys.size > self.max_area_cells:  # a big block of still cells is scenery, not a HUD
                continue
            key = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
            self._times[key] = t
            mine = (labels == lab) & stepped
            clock = bool(ticking[mine].all())  # the area's step is a clock's tick (and nothing else)
            px = 0.0 if counts is None else float(counts[mine & ~ticking].sum()) / before.size
            if clock:  # a timer ticking is no news: not counted as a step of a small area
                out["clock"] = 1.0
            else:
                out["areas"] += 1
                out["small"] += px
            y0, y1 = key[0] * h // self.gy, key[1] * h // self.gy
            x0, x1 = key[2] * w // self.gx, key[3] * w // self.gx
            states = self._states.setdefault(key, [])
            recent = self._recent.setdefault(key, [])
            if not states:
                states.append([self._snap(before[y0:y1, x0:x1]), t])
                recent.append(0)
                states.extend(self._inherit(key, h, w))
            new = self._snap(after[y0:y1, x0:x1])
            i = self._match(states, new)
            if i >= 0:
                back = i not in recent[-2:] and t - states[i][1] >= self.min_gap_s  # not a blink
                if back and clock:
                    out["revert_clock"] = 1.0  # a timer ticking over: not a revert of interest
                elif back:
                    # how many contents the area has shown: a lives counter a handful, a gauge or
                    # a timer dozens (the detector only trusts reverts of areas with few states)
                    n = float(len(states))
                    out["revert_states"] = n if not out["revert"] else min(out["revert_states"], n)
                    out["revert"] = 1.0
                    out["revert_age"] = max(out["revert_age"], round(t - states[i][1], 3))
                states[i][1] = t
            else:
                if not clock:  # a content the area never showed: a score gone up, a life lost the first time
                    out["fresh"] += px
                if len(states) >= self.max_states:
                    oldest = min(range(len(states)), key=lambda j: states[j][1])
                    states.pop(oldest)
                    recent[:] = [r - (r > oldest) for r in recent if r != oldest]
                states.append([new, t])
                i = len(states) - 1
            if not recent or recent[-1] != i:
                recent.append(i)
                del recent[:-3]
        self._forget_stale()
        return out

    def _forget_stale(self) -> None:
        """Keep at most ``max_areas`` areas, so hours of play (sprites resting on ever new
        still cells make new areas) cannot grow the memory without bound."""
        excess = len(self._times) - self.max_areas
        if excess <= 0:
            return
        for key in sorted(self._times, key=self._times.__getitem__)[:excess]:
            self._times.pop(key, None)
            self._states.pop(key, None)
            self._recent.pop(key, None)


def _min_filter(a: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Minimum over the ``(2 ry + 1) x (2 rx + 1)`` neighbourhood of each cell (edges padded)."""
    p = np.pad(a, ((ry, ry), (rx, rx)), mode="edge")
    h, w = a.shape
    out = a.copy()
    for dy in range(2 * ry + 1):
        for dx in range(2 * rx + 1):
            np.minimum(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


class HudAnalyzer:
    """Step changes in still screen areas (see the module docstring)."""

    def __init__(
        self,
        *,
        stride: int = 2,
        threshold: int = 24,
        settle: int = 3,
        stable_before: int = 6,
        grid: tuple[int, int] = (32, 24),
        activity_tau_s: float = 20.0,
        busy_rate: float = 0.05,
        novel_cap_s: float = 60.0,
        regions: list[Region] | None = None,
        auto: bool = True,
        min_cell_px: int = 3,
        hud_tau_s: float = 60.0,
        rate_tau_s: float = 10.0,
        max_step_rate: float = 1.0,
    ) -> None:
        self.stride = max(1, stride)
        self.threshold = threshold
        self.settle = max(1, settle)
        self.stable_before = max(1, stable_before)
        self.gx, self.gy = grid
        self.tau = activity_tau_s
        self.busy_rate = busy_rate
        self.novel_cap = novel_cap_s
        self.regions = list(regions or [])
        self.auto = auto
        self.min_cell_px = min_cell_px
        self.hud_tau = hud_tau_s
        self.rate_tau = rate_tau_s
        self.max_step_rate = max_step_rate
        self._memory = HudMemory((self.gy, self.gx))
        self._ring: list[np.ndarray] = []  # the last settle + 2 thumbnails
        self._times: list[float] = []
        self._held: np.ndarray | None = None  # frames each pixel has held its value (at ring[0])
        self._shape: tuple[int, int] | None = None
        self._activity: np.ndarray | None = None  # per cell, EMA of "changed this frame"
        self._last_step: np.ndarray | None = None  # per cell, media time of its last step
        self._cell_of_row: np.ndarray | None = None
        self._cell_of_col: np.ndarray | None = None
        self._row_starts = self._col_starts = np.zeros(0, np.intp)  # first row / column of each cell
        self._region_px: list[tuple[str, tuple[int, int, int, int]]] = []
        self._t_prev: float | None = None
        self._t_first: float | None = None
        self.frames = 0

    def _setup(self, shape: tuple[int, int], full_hw: tuple[int, int]) -> None:
        h, w = shape
        self._shape = shape
        self._held = np.zeros(shape, np.int32)
        self._activity = np.zeros((self.gy, self.gx), np.float32)
        self._last_step = np.full((self.gy, self.gx), -np.inf, np.float64)
        self._n_trans = np.zeros((self.gy, self.gx), np.float32)  # decayed count of passing changes
        self._n_steps = np.zeros((self.gy, self.gx), np.float32)  # count of steps
        self._act_norm = 0.0
        self._n_recent = np.zeros((self.gy, self.gx), np.float32)  # steps, decayed over rate_tau
        self._cell_of_row = np.minimum(np.arange(h) * self.gy // h, self.gy - 1)
        self._cell_of_col = np.minimum(np.arange(w) * self.gx // w, self.gx - 1)
        self._row_starts = np.searchsorted(self._cell_of_row, np.arange(self.gy))
        self._col_starts = np.searchsorted(self._cell_of_col, np.arange(self.gx))
        fh, fw = full_hw
        self._region_px = []
        for r in self.regions:
            x0, y0, x1, y1 = r.pixels(fw, fh)
            s = self.stride
            self._region_px.append((r.name, (y0 // s, max(y0 // s + 1, y1 // s), x0 // s, max(x0 // s + 1, x1 // s))))
        self._ring = []
        self._times = []
        self._memory = HudMemory((self.gy, self.gx))

    def hud_cells(self) -> np.ndarray:
        """Boolean (rows, cols) map of the cells currently judged still (HUD or background)."""
        if self._activity is None:
            return np.zeros((self.gy, self.gx), bool)
        return self._activity < self.busy_rate * max(self._act_norm, 1e-6)

    def _lost(self, step: np.ndarray, cells: np.ndarray, before: np.ndarray, after: np.ndarray) -> float:
        """Share of the stepped pixels in ``cells`` that went to the background (an icon lost).

        The background is the most common luma in those cells, before and after.  A lives icon or a marker that
        disappears loses its pixels to it; a digit that turns into another mostly does not.
        """
        assert self._cell_of_row is not None and self._cell_of_col is not None
        area = cells[self._cell_of_row][:, self._cell_of_col]
        in_cells = area & step
        n = int(np.count_nonzero(in_cells))
        if not n:
            return 0.0
        both = np.concatenate([before[area], after[area]])  # what the cells show before and after
        bg = int(np.argmax(np.bincount(np.clip(both, 0, 255), minlength=256)))
        gone = (np.abs(after - bg) <= self.threshold // 2) & (np.abs(before - bg) > self.threshold)
        return round(float(np.count_nonzero(gone & in_cells)) / n, 3)

    def _cell_sums(self, mask: np.ndarray) -> np.ndarray:
        """How many pixels of ``mask`` (bool, thumbnail-sized) are set in each grid cell.

        Runs two to three times a frame, so it avoids widening the mask: the bools are read as
        bytes and summed along the contiguous rows first, each cell's run into int16 (no cell is
        32,767 px wide), then down the columns into int32.
        """
        assert self._cell_of_row is not None and self._cell_of_col is not None
        h, w = mask.shape
        if h < self.gy or w < self.gx:
            # a frame smaller than the grid (a tiny window): some cells hold no pixel, which
            # reduceat cannot express; slower, but such frames are tiny
            sums = np.zeros((self.gy, self.gx), np.int64)
            np.add.at(sums, (self._cell_of_row[:, None], self._cell_of_col[None, :]), mask.astype(np.int64))
            return sums
        cols = np.add.reduceat(mask.view(np.uint8), self._col_starts, axis=1, dtype=np.int16)
        return np.add.reduceat(cols, self._row_starts, axis=0, dtype=np.int32)

    def _news(self, news: np.ndarray, weighted: np.ndarray, step: np.ndarray, before: np.ndarray,
              after: np.ndarray, t_at: float, cell_px: float) -> dict[str, float]:
        """Figures of the cells that stepped with news (not a clock's): how long the main one and
        the quiet ones had been still, and how much of the quiet ones went to the background."""
        assert self._last_step is not None and self._t_first is not None
        values: dict[str, float] = {}
        since = np.minimum(self.novel_cap, t_at - self._last_step)
        # novelty of the cell that carries most of the still-area step
        top = np.unravel_index(int(np.argmax(weighted)), weighted.shape)
        values["novel"] = round(float(since[top]), 3)
        # quiet: the longest any stepped cell had been still, among cells nothing ever
        # passed through (a lives icon, a level counter); 0 when none such stepped
        quiet_cells = news & (self._n_trans < 1.0)
        if quiet_cells.any():
            waited = np.minimum(self.novel_cap, t_at - np.maximum(self._last_step, self._t_first))
            values["quiet"] = round(float(waited[quiet_cells].max()), 3)
            values["quiet_cells"] = float(np.count_nonzero(quiet_cells))
            # the same for the cell's neighbourhood (a digit's neighbours are the rest
            # of its number): a score whose units tick often is not quiet, a lives icon is
            near = _min_filter(waited, 0, 1)
            values["quiet_area"] = round(float(near[quiet_cells].max()), 3)
            values["quiet_lost"] = self._lost(step, quiet_cells, before, after)
        values["peak"] = round(float(weighted.max()) / cell_px, 6)
        return values

    def update(self, image: np.ndarray, t: float, pixel_format: str = "rgb24") -> tuple[dict[str, float], str]:
        gray = gray_thumbnail(image, self.stride, pixel_format)
        if self._shape != gray.shape:
            self._setup(gray.shape, image.shape[:2])
        assert self._held is not None and self._activity is not None and self._last_step is not None
        values: dict[str, float] = {"steps": 0.0, "cells": 0.0, "novel": 0.0}
        where = ""
        dt = 1 / 30 if self._t_prev is None else max(1e-3, min(1.0, t - self._t_prev))
        self._t_prev = t
        if self._t_first is None:
            self._t_first = t
        ring = self._ring
        if ring:
            prev = ring[-1]
            changed = np.abs(gray - prev) > self.threshold
            cell_changed = self._cell_sums(changed) > 0
            alpha = 1.0 - float(np.exp(-dt / self.tau))
            self._activity += alpha * (cell_changed.astype(np.float32) - self._activity)
            self._act_norm += alpha * (1.0 - self._act_norm)  # bias correction of the EMA's start
            decay = float(np.exp(-dt / self.hud_tau))
            self._n_trans *= decay
            self._n_recent *= float(np.exp(-dt / self.rate_tau))
            for name, (y0, y1, x0, x1) in self._region_px:
                values[f"region.{name}"] = round(float(changed[y0:y1, x0:x1].mean()), 6)
        ring.append(gray)
        self._times.append(t)
        if len(ring) > self.settle + 2:
            # ring = [before, changed_at, ..., now]: a step happened at ring[1]
            before, at = ring[0], ring[1]
            jumped = np.abs(at - before) > self.threshold
            steady = np.ones_like(jumped)
            for later in ring[2:]:
                steady &= np.abs(later - at) <= self.threshold // 2
            step = jumped & steady & (self._held >= self.stable_before)
            # a change that did not hold is something passing by: such cells are not HUD
            passing = self._cell_sums(jumped & ~steady) >= self.min_cell_px
            if passing.mean() < 0.25:  # a flash over the whole screen says nothing about any one cell
                self._n_trans += passing
            # how long each pixel has held its value, as of ring[1]
            self._held = np.where(jumped, 0, self._held + 1)
            ring.pop(0)
            t_at = self._times[1]
            self._times.pop(0)
            if step.any():
                counts = self._cell_sums(step)
                still = np.clip(1.0 - self._activity / (self.busy_rate * self._act_norm), 0.0, 1.0)
                if not self.auto:
                    still = np.zeros_like(still)
                weighted = counts.astype(np.float64) * still
                stepped = weighted >= self.min_cell_px
                moved = counts >= self.min_cell_px  # a clock's busy digits too, for its beat
                cell_px = step.size / (self.gx * self.gy)
                if moved.any():
                    self._n_steps += stepped
                    self._n_recent += stepped
                    # HUD: cells that changed only in steps, never by something passing, and not
                    # more than about once a second (marching sprites step too, but all the time)
                    hudlike = ((self._n_steps > 0) & (self._n_trans < 1.0) & (still > 0)
                               & (self._n_recent <= self.max_step_rate * self.rate_tau))
                    values.update(self._memory.step(stepped & hudlike, hudlike, before, ring[-1], t_at, counts, moved))
                    values["small"] = round(values["small"], 6)
                    values["fresh"] = round(values["fresh"], 6)
                    # a clock ticking is no news: its cells count in none of the step figures
                    # (its tens digit, still for ten seconds, would look like a lives icon going)
                    weighted = np.where(self._memory.clock_cells, 0.0, weighted)
                    news = stepped & ~self._memory.clock_cells
                    values["cells"] = float(np.count_nonzero(news))
                    if news.any():
                        values.update(self._news(news, weighted, step, before, ring[-1], t_at, cell_px))
                        rows, cols = np.nonzero(news)
                        where = (
                            f"{cols.min() / self.gx:.3f},{rows.min() / self.gy:.3f},"
                            f"{(cols.max() + 1) / self.gx:.3f},{(rows.max() + 1) / self.gy:.3f}"
                        )
                    self._last_step[stepped] = t_at
                values["steps"] = round(float(weighted.sum()) / step.size, 6)
                values["age"] = round(t - t_at, 4)
        else:
            self._held += 1 if len(ring) > 1 else 0
        self.frames += 1
        for key in ("peak", "age", "revert", "revert_age", "revert_states", "areas", "small", "quiet", "quiet_cells",
                    "quiet_area", "quiet_lost", "revert_clock", "clock", "fresh"):
            values.setdefault(key, 0.0)
        return values, where


@register_stage("hud")
class HudStage(AnalyzerStage[HudParams, VideoFrame]):
    """Step changes in still screen areas and profile regions: ``Features(name="hud")``."""

    Params = HudParams
    accepts = (VideoFrame,)
    output_ports = ("features", "cues")
    signals = (
        # step changes in still areas; "small" is the part inside small HUD areas (scores, lives), judged by
        # how often it happens, not how big it is (a digit flip is a few pixels or many depending on the digits)
        Signal("hud.small", HUD, floor=0.00003, binary=True, weak=True),
        Signal("hud.steps", HUD, floor=0.0004),
        Signal("hud.areas", HUD, floor=1.5, weak=True),
    )

    def __init__(self, ctx: StageContext, params: HudParams) -> None:
        super().__init__(ctx, params)
        self.analyzer: HudAnalyzer | None = None
        self.cues: HudCuePolicy | None = None
        self._cues: list[Cue] = []

    @classmethod
    def check_profile(cls, prof: Profile, source: str, cfg: object, name: str) -> None:
        """The profile's ``hud`` section belongs to this stage: validated before anything runs."""
        hud_cue_settings(prof.hud, source)

    async def start(self) -> None:
        p = self.params
        prof: Profile = profile_from_options(self.ctx.options)
        self.analyzer = HudAnalyzer(
            stride=p.stride,
            threshold=p.threshold,
            settle=p.settle,
            stable_before=p.stable_before,
            grid=(p.grid_cols, p.grid_rows),
            activity_tau_s=p.activity_tau_s,
            busy_rate=p.busy_rate,
            novel_cap_s=p.novel_cap_s,
            regions=prof.regions,
            auto=prof.auto_hud if p.auto is None else p.auto,
            min_cell_px=p.min_cell_px,
        )
        self.cues = HudCuePolicy(hud_cue_settings(prof.hud, str(self.ctx.options.get("profile") or prof.name)))

    def analyze(self, frame: VideoFrame, t_media: float) -> Features | None:
        if self.analyzer is None:
            return None
        values, where = self.analyzer.update(frame.image, t_media, frame.pixel_format)
        if self.cues is not None:
            self._cues = self.cues.update(t_media, values)
        return Features(name="hud", values=values, text={"where": where} if where else {})

    async def process(self, msg: Envelope) -> None:
        """The features as every encoder sends them, and what the step means as cues on ``cues``
        (the trigger takes a producer's cues of one media time before its features of that time)."""
        await super().process(msg)
        cues, self._cues = self._cues, []
        for cue in cues:
            await self.emit("cues", cue, parent=msg)
