"""Declared signals: the contract between the encoders and the TriggerDetector.

An encoder stage says, as class metadata, which graded signals it emits::

    class BrightnessStage(Stage):
        signals = (Signal("bright.jump", family=Family("light", default_weight=1.0), floor=0.02),)

A signal is named ``<Features.name>.<values key>`` (``motion.flash`` is the ``flash`` value of
the ``Features(name="motion")`` messages).  Its ``family`` groups it with the signals that
see the same kind of thing (picture, HUD, loudness, timbre, speech): the detector scores a
family by its best signal and rewards agreement between families.  Values at or under
``floor`` are noise; a ``binary`` signal counts as present or absent, whatever its size; a
``weak`` one does not justify an annotation on its own.

The trigger builds its table (:class:`SignalTable`) from the stages that feed it in the
pipeline it runs in (:func:`pipeline_signals`), so a new encoder with a new signal or a new
family reaches the fused score without editing the trigger, and a profile weight for a family
no stage declares is an error that names it.  These are plain frozen dataclasses: they never
travel on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from copilot.errors import UsageError


@dataclass(frozen=True)
class Family:
    """A group of signals that see one kind of thing.

    ``default_weight`` applies when the profile gives the family no weight; ``event_kind`` names
    an event this family leads (``hud`` -> ``hud_change``); ``annotates``: evidence from this
    family lets an event under wake priority be emitted (see the trigger's ``annotate_need_hud``).
    """

    name: str
    default_weight: float = 1.0
    event_kind: str = ""
    annotates: bool = False


@dataclass(frozen=True)
class Signal:
    """One graded signal an encoder emits (see the module docstring)."""

    name: str
    family: Family
    floor: float = 0.0
    binary: bool = False
    weak: bool = False

    def __post_init__(self) -> None:
        features, _, key = self.name.partition(".")
        if not features or not key:
            raise ValueError(f"signal {self.name!r}: write FEATURES_NAME.VALUE_KEY, e.g. motion.flash")


# The families of the built-in encoders.  Weights were tuned on the train pool
# (bench/TRIGGER_TUNING.md): routine motion alone says little, a big picture change (a flash, a
# cut, a redraw) a lot, HUD and audio in between; speech has no tuning data, so it stays evidence.
MOTION = Family("motion", default_weight=0.02, event_kind="motion")
SCENE = Family("scene", default_weight=1.6, event_kind="scene_change")
HUD = Family("hud", default_weight=0.85, event_kind="hud_change", annotates=True)
AUDIO = Family("audio", default_weight=1.2, event_kind="sound")
TIMBRE = Family("timbre", default_weight=0.4)
SPEECH = Family("speech", default_weight=0.3, event_kind="speech")


class SignalTable:
    """The signals one consumer reads, by name, with their families.

    Two producers may declare the same signal only identically; anything else is a
    :class:`UsageError` naming both, so a pipeline never silently scores a signal two ways.
    """

    def __init__(self, declared: Iterable[tuple[str, Signal]] = ()) -> None:
        self.signals: dict[str, Signal] = {}
        self.families: dict[str, Family] = {}
        self._by: dict[str, str] = {}  # signal or family name -> the stage that declared it first
        for stage, sig in declared:
            self.add(sig, stage)

    def add(self, sig: Signal, stage: str = "?") -> None:
        old = self.signals.get(sig.name)
        if old is not None and old != sig:
            raise UsageError(f"signal {sig.name!r} is declared differently by stages {self._by[sig.name]!r}"
                             f" and {stage!r}")
        fam = self.families.get(sig.family.name)
        if fam is not None and fam != sig.family:
            raise UsageError(f"signal family {fam.name!r} is declared differently by stages"
                             f" {self._by['family:' + fam.name]!r} and {stage!r}")
        self.signals[sig.name] = sig
        self.families[sig.family.name] = sig.family
        self._by.setdefault(sig.name, stage)
        self._by.setdefault("family:" + sig.family.name, stage)

    def get(self, name: str) -> Signal | None:
        return self.signals.get(name)

    def check_weights(self, weights: dict[str, float], source: str) -> None:
        """Every profile weight names a declared family or signal, else one clear line."""
        for key in weights:
            if key not in self.families and key not in self.signals:
                known = ", ".join(sorted(self.families)) or "none"
                raise UsageError(f"{source}: weights.{key}: no stage of this pipeline declares a signal family or"
                                 f" signal named {key!r} (families: {known}; or a signal such as audio.onset)")

    def __len__(self) -> int:
        return len(self.signals)


def declared_by(cls: Any) -> tuple[Signal, ...]:
    """The signals a stage class declares (none for a class that declares nothing)."""
    return tuple(getattr(cls, "signals", ()) or ())


def pipeline_signals(cfg: Any, stage_name: str) -> list[tuple[str, Signal]]:
    """``(producer, signal)`` for every signal the producers of ``stage_name``'s inputs declare.

    ``cfg`` is a parsed pipeline (:class:`copilot.config.PipelineConfig`); producer classes are
    resolved through the registry, never imported by name.
    """
    from copilot.registry import resolve_stage

    by_name = {s.name: s for s in cfg.stages}
    consumer = by_name[stage_name]
    out: list[tuple[str, Signal]] = []
    for link in consumer.inputs:
        for producer in cfg.stages:
            if link in producer.outputs.values():
                out.extend((producer.name, sig) for sig in declared_by(resolve_stage(producer.kind)))
    return out
