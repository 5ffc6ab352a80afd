"""HUD semantics as cues: what a HUD step *means*, decided where the HUD is understood.

The HUD encoder (:mod:`stages.hud`) measures step changes in still screen areas; this policy
turns its per-frame figures into :class:`copilot.messages.Cue` news for the trigger:

* ``hud_revert`` (``revert_priority``, critical): a small HUD area went back to a content it
  showed before (a lives counter after a game over, a score reset), but only when the area has
  shown few contents (``revert_max_states``).  A gauge, a timer or a score shows dozens and goes
  back routinely (an oxygen bar refilled, a countdown restarted), so its reverts are only
  ``hud_change`` annotations; an area that steps like a clock never reverts.
* ``hud_quiet_change`` (``quiet_priority``, high): a step in a HUD cell that had been still for
  ``quiet_s`` (a lives icon that goes away, found without knowing where the lives are), when
  it is small (``quiet_max_cells``), mostly pixels going to the background (``quiet_min_lost``:
  an icon lost, not a digit gained) and not one of a run of such steps (``quiet_gap_s``: a sprite
  creeping over still cells).  Early in a session, or soon after a game over redrew the icons,
  no cell has been still that long, so a cell still for only ``quiet_icon_s`` also counts when
  nearly all its stepped pixels went to the background (``quiet_icon_lost``).
* ``hud_change`` (low, ``weak``): a step in a small HUD area to a content it never showed
  (``annotate_fresh``: a score gone up, not a blink or a gauge going back and forth), when its
  cell had not stepped for ``annotate_min_novel_s``.  So score changes are annotated even once
  routine; on its own such a step is weak news (the trigger's ``annotate_need_steps``).

Nothing is cued before ``warmup_s`` of media.  The settings are the game profile's ``hud``
section (validated here, by the HUD stage that owns it).  The class is pure (no I/O, no clock)
so tests and the tuner drive it directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from copilot.config import msgspec_error
from copilot.errors import UsageError
from copilot.messages import Cue, Priority

# the reason of a fresh-step annotation (weak news: see the module docstring)
HUD_NEWS = "a HUD area changed"


class HudCueSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The profile's ``hud`` section (see the module docstring for what each does)."""

    warmup_s: float = 1.0  # no cue before this much media time has been seen
    annotate_hud: bool = True  # a step in a small HUD area is a low-priority hud_change cue
    annotate_min_novel_s: float = 0.5  # ... when its cell had not stepped for this long (a gauge ticking is not)
    annotate_fresh: bool = True  # ... and the area shows a content it never showed before (not a blink, a gauge)
    revert_priority: Priority = "critical"  # a HUD area going back to an earlier state (a counter reset)
    # ... but only an area that has shown at most this many contents (0: no limit)
    revert_max_states: int = 6
    quiet_s: float = 20.0  # a step in a HUD cell that had been still this long (s) is a quiet_priority cue (0: off)
    quiet_priority: Priority = "high"
    quiet_by_area: bool = False  # judge the stepped cell with its row neighbours (the rest of its number), not alone
    quiet_min_lost: float = 0.3  # ... and at least this share of its stepped pixels went to the background (0: any)
    quiet_icon_s: float = 8.0  # ... or still this long (0: off) when nearly all its pixels went to the background
    quiet_icon_lost: float = 0.8  # ... at least this share (an icon gone, not a digit changed)
    quiet_max_cells: int = 8  # ... when at most this many such cells stepped (more is a redraw, not a HUD)
    quiet_gap_s: float = 3.0  # ... and no other quiet step came this soon before (a sprite creeping over still cells)


_FRACTIONS = frozenset({"quiet_min_lost", "quiet_icon_lost"})


def hud_cue_settings(data: Mapping[str, Any] | None, source: str = "<profile>") -> HudCueSettings:
    """Validate a profile's ``hud`` section; every error names ``source`` and ``hud.KEY``."""
    try:
        s = msgspec.convert(dict(data or {}), HudCueSettings)
    except msgspec.ValidationError as exc:
        raise msgspec_error(source, exc, prefix="hud") from exc
    for f in msgspec.structs.fields(HudCueSettings):
        value = getattr(s, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{source}: hud.{f.name}: expected a finite number >= 0, got {value}")
        if f.name in _FRACTIONS and value > 1:
            raise UsageError(f"{source}: hud.{f.name}: expected a share in [0, 1], got {value}")
    return s


class HudCuePolicy:
    """Per-frame HUD figures (:class:`stages.hud.HudAnalyzer` values) -> cues (module docstring)."""

    def __init__(self, settings: HudCueSettings | None = None) -> None:
        self.s = settings or HudCueSettings()
        self._t0: float | None = None
        self._last_quiet = -math.inf  # media time of the last step in a long-still HUD cell

    def update(self, t: float, values: Mapping[str, float]) -> list[Cue]:
        """The cues of one frame at media time ``t`` (the step itself happened ``age`` s before)."""
        if self._t0 is None:
            self._t0 = t
        t_step = t - float(values.get("age", 0.0))
        if t_step - self._t0 < self.s.warmup_s:
            return []
        s = self.s
        cues: list[Cue] = []
        if (s.annotate_hud and values.get("small", 0.0) > 0
                and values.get("novel", math.inf) >= s.annotate_min_novel_s
                and (not s.annotate_fresh or values.get("fresh", 0.0) > 0)):
            cues.append(Cue(t=t_step, kind="hud_change", priority="low", reason=HUD_NEWS, weak=True))
        if values.get("revert", 0.0) > 0:
            n = int(values.get("revert_states", 0.0))
            age = values.get("revert_age", 0.0)
            evidence = {"states": n, "age": age}
            if s.revert_max_states <= 0 or n <= s.revert_max_states:  # 0 states: not reported
                cues.append(Cue(t=t_step, kind="hud_revert", priority=s.revert_priority, evidence=evidence,
                                reason=f"a HUD area went back to what it showed {age:.1f} s ago"))
            elif s.annotate_hud:  # a gauge or a timer cycling: routine, an annotation only
                cues.append(Cue(t=t_step, kind="hud_change", priority="low", evidence=evidence,
                                reason=f"a HUD area with {n} states went back to an earlier one"))
        quiet = self._quiet(t_step, values)
        if quiet is not None:
            cues.append(quiet)
        return cues

    def _quiet(self, t: float, values: Mapping[str, float]) -> Cue | None:
        """A long-still HUD cell stepping like a lost icon, or None."""
        s = self.s
        quiet = values.get("quiet_area" if s.quiet_by_area else "quiet", 0.0)
        lost = values.get("quiet_lost", 1.0)
        if not (s.quiet_s > 0 and quiet >= min(x for x in (s.quiet_s, s.quiet_icon_s) if x > 0)):  # quiet_s 0: off
            return None
        # two ways to look like a lost icon: a cell still for long that changes in any way that
        # mostly clears it, or a cell still for a while whose pixels nearly all went to the background
        long_still = quiet >= s.quiet_s and lost >= s.quiet_min_lost
        icon_gone = s.quiet_icon_s > 0 and quiet >= s.quiet_icon_s and lost >= s.quiet_icon_lost
        lone = t - self._last_quiet >= s.quiet_gap_s
        self._last_quiet = t
        cells = values.get("quiet_cells", 0.0)
        if lone and cells <= s.quiet_max_cells and (long_still or icon_gone):
            return Cue(t=t, kind="hud_quiet_change", priority=s.quiet_priority,
                       evidence={"still_s": quiet, "cells": cells, "lost": lost},
                       reason=f"a HUD area still for {quiet:.0f} s changed")
        return None
