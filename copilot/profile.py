"""Game profiles: what a game's screen holds and what in it matters.

A profile is a YAML file under ``configs/profiles/`` (or anywhere, given by path).  The
``default`` profile names no game and works on any: the detector relies on the signals it
finds by itself (motion, HUD changes found from pixels that rarely change, audio onsets).
A game profile adds knowledge the pixels cannot give: where the HUD regions are, which OCR
fields to read there and how to parse them, rules on those values (a health drop of more
than 30% is critical), keywords to spot on screen or in speech, signal weights and detector settings.

Validation is strict, like the pipeline config: an unknown key, a wrong type, a box outside
the screen or a rule on a field that is not read ends in one :class:`UsageError` line that
names the file, the key and what was expected.

``resolve_profile`` turns what the user typed (``None``, a bare name, a path) into a path;
``load_profile`` reads and validates it.  Stages receive the resolved path as the run
option ``profile`` (a str) and call :func:`profile_from_options`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from copilot.config import config_dir, load_yaml, msgspec_error
from copilot.errors import UsageError

Priority = Literal["critical", "high", "normal", "low"]
FieldType = Literal["int", "float", "percent", "fraction", "text"]
RuleOp = Literal["drop_pct", "drop", "rise", "below", "above", "change"]

DEFAULT_PROFILE = "default"


class Region(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named screen area; ``box`` is ``[x, y, w, h]`` as fractions of the frame (0..1)."""

    name: str
    box: list[float]

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in pixels of a ``width`` x ``height`` frame, never empty."""
        x, y, w, h = self.box
        x0 = min(width - 1, max(0, round(x * width)))
        y0 = min(height - 1, max(0, round(y * height)))
        x1 = max(x0 + 1, min(width, round((x + w) * width)))
        y1 = max(y0 + 1, min(height, round((y + h) * height)))
        return x0, y0, x1, y1


class OcrField(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A value read by OCR in ``region`` and parsed as ``type`` into named game state."""

    name: str
    region: str
    type: FieldType = "int"


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """When an OCR field moves like this, emit an event ``kind`` with ``priority``.

    ``drop_pct``: fell by more than ``value`` percent of its previous value; ``drop`` /
    ``rise``: fell / rose by at least ``value``; ``below`` / ``above``: crossed under / over
    ``value``; ``change``: changed by at least ``value`` either way (0: any change).
    """

    field: str
    op: RuleOp
    value: float = 0.0
    priority: Priority = "high"
    kind: str = ""  # event kind; empty: "<field>_<op>"

    def event_kind(self) -> str:
        return self.kind or f"{self.field}_{self.op}"


class TriggerParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TriggerDetector settings (see :mod:`stages.trigger` for what each does)."""

    # adaptive baselines
    history_s: float = 18.0  # how far back the rarity of a signal value is judged
    block_s: float = 0.7  # the past is kept as the peak of each block this long
    warmup_s: float = 1.0  # no events before this much media time has been seen
    rarity_margin: float = 1.1  # a value is compared with past peaks divided by this (>1: must clearly exceed)
    solo_factor: float = 0.9  # the score of an episode that only one signal family saw is scaled by this
    min_score: float = 0.35  # episodes scoring under this emit nothing (rules and keywords always do)
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
    # priorities from the fused score (rules and keywords set theirs directly)
    critical_score: float = 2.5
    high_score: float = 1.15
    normal_score: float = 0.55
    annotate_hud: bool = True  # a step in a small HUD area is at least a low-priority event
    annotate_min_novel_s: float = 0.5  # ... when its cell had not stepped for this long (a gauge ticking is not)
    annotate_fresh: bool = True  # ... and the area shows a content it never showed before (not a blink, a gauge)
    # an event under wake priority (normal, low) is emitted only with HUD evidence or a reason (a rule, a
    # keyword, a HUD revert): a sound or a picture change alone is rarely a reward or a death
    annotate_need_hud: bool = True
    # ... and one whose only evidence is a HUD step too small to count as ``hud.steps`` (a few pixels,
    # nothing else moved, sounded or went back) is not emitted either: it is rarely a score change
    annotate_need_steps: bool = True
    revert_priority: Priority = "critical"  # a HUD area going back to an earlier state (a counter reset)
    # ... but only an area that has shown at most this many contents: a lives or level counter
    # shows a handful, a gauge, a timer or a score dozens and goes back routinely (0: no limit)
    revert_max_states: int = 6
    quiet_s: float = 20.0  # a step in a HUD cell that had been still this long (s) is a quiet_priority event (0: off)
    quiet_priority: Priority = "high"
    quiet_by_area: bool = False  # judge the stepped cell with its row neighbours (the rest of its number), not alone
    quiet_min_lost: float = 0.3  # ... and at least this share of its stepped pixels went to the background (0: any)
    quiet_icon_s: float = 8.0  # ... or still this long (0: off) when nearly all its pixels went to the background
    quiet_icon_lost: float = 0.8  # ... at least this share (an icon gone, not a digit changed)
    quiet_max_cells: int = 8  # ... when at most this many such cells stepped (more is a redraw, not a HUD)
    quiet_gap_s: float = 3.0  # ... and no other quiet step came this soon before (a sprite creeping over still cells)


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A game profile.  Every field is optional; the default profile sets almost none."""

    name: str = DEFAULT_PROFILE
    description: str = ""
    regions: list[Region] = []
    ocr_fields: list[OcrField] = []
    rules: list[Rule] = []
    keywords: dict[str, Priority] = {}  # text on screen (full-frame OCR) or in speech (ASR) -> priority
    weights: dict[str, float] = {}
    trigger: TriggerParams = msgspec.field(default_factory=TriggerParams)
    auto_hud: bool = True  # find static HUD areas from pixels (besides the profile regions)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def weight(self, signal: str, default: float = 1.0) -> float:
        """The weight of ``signal`` (``family.name``), else of its family, else ``default``."""
        if signal in self.weights:
            return self.weights[signal]
        family = signal.split(".", 1)[0]
        return self.weights.get(family, default)


def profiles_dir() -> Path:
    return config_dir() / "profiles"


def resolve_profile(name_or_path: str | os.PathLike[str] | None) -> Path:
    """``None`` -> the default profile; a bare name -> ``configs/profiles/NAME.yaml``; else a path."""
    if name_or_path is None or str(name_or_path) == "":
        return profiles_dir() / f"{DEFAULT_PROFILE}.yaml"
    text = str(name_or_path)
    is_bare = os.sep not in text and "/" not in text and not text.endswith((".yaml", ".yml"))
    if is_bare:
        path = profiles_dir() / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in profiles_dir().glob("*.yaml"))) or "none"
            raise UsageError(f"unknown profile {text!r} (known: {known}; or give a path to a YAML file)")
        return path
    return Path(text)


def parse_profile(data: Any, source: str = "<profile>") -> Profile:
    """Validate a profile mapping; every error names ``source`` and the offending key."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: expected a mapping of profile keys, got {type(data).__name__}")
    try:
        prof = msgspec.convert(data, Profile)
    except msgspec.ValidationError as exc:
        raise msgspec_error(source, exc) from exc
    names: set[str] = set()
    for i, r in enumerate(prof.regions):
        where = f"{source}: regions[{i}]"
        if not r.name.strip():
            raise UsageError(f"{where}.name: expected a name, got an empty one")
        if r.name in names:
            raise UsageError(f"{where}.name: duplicate region name {r.name!r}")
        names.add(r.name)
        if len(r.box) != 4:
            raise UsageError(f"{where}.box: expected [x, y, w, h] (4 numbers), got {len(r.box)}")
        x, y, w, h = r.box
        if not (0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 and 0 < h <= 1):
            raise UsageError(f"{where}.box: expected fractions of the frame: 0 <= x, y < 1 and 0 < w, h <= 1")
        if x + w > 1 + 1e-6 or y + h > 1 + 1e-6:
            raise UsageError(f"{where}.box: the region runs past the frame (x + w and y + h must be <= 1)")
    fields: set[str] = set()
    types: dict[str, str] = {}
    for i, f in enumerate(prof.ocr_fields):
        where = f"{source}: ocr_fields[{i}]"
        if not f.name.strip():
            raise UsageError(f"{where}.name: expected a name, got an empty one")
        if f.name in fields:
            raise UsageError(f"{where}.name: duplicate OCR field {f.name!r}")
        fields.add(f.name)
        types[f.name] = f.type
        if f.region not in names:
            known = ", ".join(sorted(names)) or "none"
            raise UsageError(f"{where}.region: no region named {f.region!r} (regions: {known})")
    for i, rule in enumerate(prof.rules):
        where = f"{source}: rules[{i}]"
        if rule.field not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise UsageError(f"{where}.field: no OCR field named {rule.field!r} (fields: {known})")
        if not math.isfinite(rule.value):
            raise UsageError(f"{where}.value: expected a finite number, got {rule.value}")
        if types[rule.field] == "text" and rule.op != "change":
            raise UsageError(f"{where}.op: {rule.field!r} is read as text, so only op change applies, got {rule.op}")
        if rule.op == "drop_pct" and not 0 < rule.value <= 100:
            raise UsageError(f"{where}.value: drop_pct expects a percentage in (0, 100], got {rule.value}")
        if rule.op in ("drop", "rise", "change") and rule.value < 0:
            raise UsageError(f"{where}.value: {rule.op} expects an amount >= 0, got {rule.value}")
    for word in prof.keywords:
        if not word.strip():
            raise UsageError(f"{source}: keywords: expected words or phrases, got an empty one")
    from stages.trigger import SIGNALS  # the detector owns the signal names (pure Python, no heavy import)

    families = {fam for fam, _ in SIGNALS.values()}
    for key, w in prof.weights.items():
        if key not in families and key not in SIGNALS:
            known = ", ".join(sorted(families))
            raise UsageError(f"{source}: weights.{key}: no signal family or signal named {key!r}"
                             f" (families: {known}; or a signal such as audio.onset)")
        if not (math.isfinite(w) and w >= 0):
            raise UsageError(f"{source}: weights.{key}: expected a finite weight >= 0, got {w}")
    check_trigger(prof.trigger, source)
    return prof


# trigger settings that must be over 0 (a history, a block or a budget window of 0 s divides by
# zero; a rarity margin or reference of 0 makes every value count fully); every other number is >= 0
_POSITIVE = frozenset({"history_s", "block_s", "rarity_margin", "rarity_ref", "max_wakes_per_min", "budget_window_s"})
_FRACTIONS = frozenset({"quiet_min_lost", "quiet_icon_lost"})


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
        elif f.name in _FRACTIONS and value > 1:
            what = "a share in [0, 1]"
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


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile YAML file (:class:`UsageError` on any problem)."""
    return parse_profile(load_yaml(path), str(path))


def profile_from_options(options: Mapping[str, Any]) -> Profile:
    """The profile a stage should use: the run option ``profile`` (a path), else the default."""
    value = options.get("profile")
    return load_profile(resolve_profile(str(value) if value else None))
