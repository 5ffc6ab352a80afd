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
from copilot.messages import Priority

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

    def fires(self, prev: float, value: float) -> bool:
        """Whether the field moving from ``prev`` to ``value`` fires this rule."""
        op, v = self.op, self.value
        if op == "drop_pct":
            return prev > 0 and (prev - value) / prev * 100.0 > v
        if op == "drop":
            return prev - value >= max(v, 1e-12)
        if op == "rise":
            return value - prev >= max(v, 1e-12)
        if op == "below":
            return prev >= v > value
        if op == "above":
            return prev <= v < value
        return abs(value - prev) >= max(v, 1e-12)  # change

    def reason(self, prev: float, value: float) -> str:
        """The sentence an event fired by this rule carries in its evidence."""
        return f"rule {self.field} {self.op} {self.value:g}: {prev:g} -> {value:g}"


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A game profile.  Every field is optional; the default profile sets almost none."""

    name: str = DEFAULT_PROFILE
    description: str = ""
    regions: list[Region] = []
    ocr_fields: list[OcrField] = []
    rules: list[Rule] = []
    keywords: dict[str, Priority] = {}  # text on screen (full-frame OCR) or in speech (ASR) -> priority
    weights: dict[str, float] = {}  # by signal family (or single signal): the stages of the pipeline declare them
    auto_hud: bool = True  # find static HUD areas from pixels (besides the profile regions)
    # sections owned by a stage kind, validated by that stage (see check_sections): the core does not
    # know their keys.  ``trigger``: the TriggerDetector's settings; ``hud``: the HUD cue policy's;
    # ``advice``: the rules backend's advice rules (validated by the reasoner stage); ``semantic``: the
    # SigLIP2 zero-shot prompts that become cues (the semantic stage); ``segment``: the concept prompts
    # SAM3 looks for on keyframes (the segment stage).
    trigger: dict[str, Any] = {}
    hud: dict[str, Any] = {}
    advice: list[dict[str, Any]] = []
    semantic: dict[str, Any] = {}
    segment: dict[str, Any] = {}
    notes: str = ""  # what a player should know about the game: goes into the reasoner's prompt

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
    for key, w in prof.weights.items():  # the names are checked against the pipeline's declared signals
        if not (math.isfinite(w) and w >= 0):
            raise UsageError(f"{source}: weights.{key}: expected a finite weight >= 0, got {w}")
    return prof


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile YAML file (:class:`UsageError` on any problem)."""
    return parse_profile(load_yaml(path), str(path))


def check_sections(prof: Profile, stage_classes: Mapping[str, Any], source: str, context: Any = None) -> None:
    """Let each stage of a pipeline validate the profile sections it owns, before anything runs.

    ``stage_classes`` maps stage names to their classes; each class's ``Stage.check_profile``
    validates the sections it owns (the trigger its ``trigger`` section and
    the profile's weights against the signals declared upstream of it, the HUD stage its ``hud``
    section) and raises :class:`UsageError` naming ``source`` and the key.  ``context`` is what the
    caller knows of the pipeline (the parsed config).
    """
    for name, cls in stage_classes.items():
        cls.check_profile(prof, source, context, name)


def profile_from_options(options: Mapping[str, Any]) -> Profile:
    """The profile a stage should use: the run option ``profile`` (a path), else the default."""
    value = options.get("profile")
    return load_profile(resolve_profile(str(value) if value else None))
