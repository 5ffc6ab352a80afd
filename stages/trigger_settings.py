"""The TriggerDetector's settings: the game profile's ``trigger`` section, owned and validated here.

The core keeps the profile's generic parts (regions, OCR fields, rules, keywords, weights by
family); each stage that owns a section validates it.  What each setting does is explained in
:mod:`stages.trigger`; the HUD's own semantics (reverts, quiet cells, fresh steps) are the
profile's ``hud`` section (:mod:`stages.hud_cues`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from copilot.config import msgspec_error
from copilot.errors import UsageError
from stages.hud_cues import HudCueSettings


class TriggerParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TriggerDetector settings (see :mod:`stages.trigger` for what each does)."""

    # adaptive baselines
    history_s: float = 18.0  # how far back the rarity of a signal value is judged
    block_s: float = 0.7  # the past is kept as the peak of each block this long
    warmup_s: float = 1.0  # no episode opens before this much media time has been seen
    rarity_margin: float = 1.1  # a value is compared with past peaks divided by this (>1: must clearly exceed)
    solo_factor: float = 0.9  # the score of an episode that only one signal family saw is scaled by this
    min_score: float = 0.35  # episodes scoring under this emit nothing (cues always do)
    rarity_ref: float = 1.2  # rarity at which a signal counts fully (1 = reached once in ~10 blocks)
    # fusion and hysteresis
    fire_threshold: float = 0.55  # fused significance to open an episode
    release_threshold: float = 0.3  # it must fall under this before another can open
    agreement_bonus: float = 0.75  # extra score per additional independent signal family
    agree_min: float = 0.33  # a further family adds to the score only from this score on
    window_s: float = 0.4  # signals this close together count as simultaneous
    # timing
    coalesce_s: float = 0.25  # signals within this window after the onset join one event
    refractory_s: float = 0.45  # no new event of the same priority class this soon after one
    max_wakes_per_min: float = 30.0  # wake budget (critical + high events), sliding minute
    # budget of the high wakes alone: a game scoring all the time must not wake the model all the
    # time; critical events (a death, a game over) are limited only by max_wakes_per_min (0: no limit)
    max_high_per_min: float = 0.0
    critical_gap_s: float = 1.5  # a critical event this soon after a wake is only an annotation (normal)
    wake_gap_s: float = 3.2  # a high event this soon after a wake is only an annotation (normal)
    budget_window_s: float = 60.0
    max_delay_s: float = 0.45  # an event is decided at most this long after its t
    # priorities from the fused score (cues set theirs directly)
    critical_score: float = 2.5
    high_score: float = 1.15
    normal_score: float = 0.55
    # an event under wake priority (normal, low) is emitted only with evidence from an annotating
    # family (the HUD) or a cue that is not weak: a sound or a picture change alone is rarely a reward
    # or a death
    annotate_need_hud: bool = True
    # ... and one whose only evidence is weak (a HUD step too small to count as ``hud.steps``, a few
    # pixels, and the weak cue of that step) is not emitted either: it is rarely a score change
    annotate_need_steps: bool = True


# settings that must be over 0 (a history, a block or a budget window of 0 s divides by zero; a
# rarity margin or reference of 0 makes every value count fully); every other number is >= 0
_POSITIVE = frozenset({"history_s", "block_s", "rarity_margin", "rarity_ref", "max_wakes_per_min", "budget_window_s"})


def check_trigger(t: TriggerParams, source: str) -> None:
    """:class:`UsageError` naming ``source`` and the key for a trigger setting out of its range."""
    for f in msgspec.structs.fields(TriggerParams):
        value = getattr(t, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            what = "a finite number"
        elif f.name in _POSITIVE and value <= 0:
            what = "a number > 0"
        elif value < 0:
            what = "a number >= 0"
        else:
            continue
        raise UsageError(f"{source}: trigger.{f.name}: expected {what}, got {value}")
    checks = [
        ("max_delay_s", t.max_delay_s <= 0.5, "seconds in [0, 0.5] (events must be causal)"),
        ("release_threshold", t.release_threshold <= t.fire_threshold, "a value <= fire_threshold"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise UsageError(f"{source}: trigger.{key}: expected {what}, got {getattr(t, key)}")


def trigger_settings(data: Mapping[str, Any] | None, source: str = "<profile>",
                     overrides: Mapping[str, Any] | None = None) -> TriggerParams:
    """Validate a profile's ``trigger`` section (with ``overrides`` on top): one line per problem."""
    merged = {**(data or {}), **(overrides or {})}
    moved = sorted(set(merged) & set(HudCueSettings.__struct_fields__) - set(TriggerParams.__struct_fields__))
    if moved:  # the HUD's semantics were trigger settings before they became the hud stage's cues
        raise UsageError(f"{source}: trigger.{moved[0]}: a HUD cue setting: put it in the profile's hud section")
    try:
        params = msgspec.convert(merged, TriggerParams)
    except msgspec.ValidationError as exc:
        raise msgspec_error(source, exc, prefix="trigger") from exc
    check_trigger(params, source)
    return params
