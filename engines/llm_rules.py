"""The ``rules`` backend: advice with no model, from the profile's advice rules.

What it knows is what the request carries: the event's kind, priority and evidence, and the game
state before and after.  ``game_state`` lists the HUD values (with what changed), ``analysis``
says what happened from the evidence, ``advice`` comes from the first profile rule that matches
(``advice:`` in a game profile, see configs/profiles/breakout.yaml), else from a built-in line for
the event's kind.  Every piece of advice it writes begins ``(rules)``, and its backend and model
are ``rules``: nobody should mistake it for a model's judgement.  It answers in microseconds, so
it is the default when no model is configured and the baseline ``bench reasoner`` compares with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import msgspec

from copilot.advice import AdviceRequest, BackendOptions, format_value
from copilot.errors import UsageError
from copilot.timefmt import format_time

PREFIX = "(rules) "

# built-in advice by event kind (a kind made of parts, ``hud_change+sound``, matches each part)
DEFAULT_ADVICE: dict[str, str] = {
    "life_lost": "You lost a life: look at what hit you in the last seconds and keep clear of it.",
    "death": "You died: look at what hit you in the last seconds and keep clear of it.",
    "game_over": "Game over: start again and play the opening more carefully.",
    "score_reset": "The score went back to zero: a new game began.",
    "hud_revert": "A HUD counter went back (a life or a resource lost?): slow down and play safe.",
    "hud_change": "The HUD changed: check your lives and score.",
    "scene_change": "The scene changed: take a moment to read the new situation.",
    "sound": "Something loud happened: check the screen for danger.",
    "speech": "Something was said: listen for instructions.",
    "score": "You scored: keep doing what worked.",
}
GENERIC = "Something significant happened: keep an eye on the screen."


class AdviceRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One profile advice rule: ``kind`` (an event kind, or ``*``) and optionally a ``field`` of the
    game state that must have moved (``dropped``/``rose``), then what to say."""

    kind: str = "*"
    field: str | None = None
    moved: str | None = None  # dropped | rose (with field)
    advice: str
    analysis: str | None = None

    def matches(self, kind: str, before: dict[str, Any], after: dict[str, Any]) -> bool:
        if self.kind != "*" and self.kind not in kind.split("+") and self.kind != kind:
            return False
        if self.field is None:
            return True
        a, b = before.get(self.field), after.get(self.field)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        if self.moved == "dropped":
            return b < a
        if self.moved == "rose":
            return b > a
        return b != a


def parse_rules(data: Any, source: str = "the profile's advice section") -> list[AdviceRule]:
    """The profile's ``advice`` rules, or one clear line naming what is wrong."""
    if not isinstance(data, list):
        raise UsageError(f"{source}: expected a list of rules, got {type(data).__name__}")
    rules = []
    for i, item in enumerate(data):
        try:
            rule = msgspec.convert(item, AdviceRule)
        except msgspec.ValidationError as exc:
            raise UsageError(f"{source}: rule {i + 1}: {exc}") from None
        if rule.moved not in (None, "dropped", "rose"):
            raise UsageError(f"{source}: rule {i + 1}: moved must be dropped or rose, got {rule.moved!r}")
        rules.append(rule)
    return rules


class RulesBackend:
    """Advice from rules over the evidence and the game state (see the module docstring)."""

    name: ClassVar[str] = "rules"

    def __init__(self, options: BackendOptions) -> None:
        self.model = "rules"
        self.takes_images = False
        self.rules = parse_rules(options.rules)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def answer(self, request: AdviceRequest) -> dict[str, str]:
        """The advice JSON for ``request``."""
        ev = request.event
        raw = ev.get("evidence")
        evidence: dict[str, Any] = raw if isinstance(raw, dict) else {}
        before = evidence.get("state_before") or request.state.get("previous") or {}
        after = evidence.get("state_after") or request.state.get("values") or {}
        kind = str(ev.get("kind", "question" if request.question else ""))
        state = _state_line(after, before)
        if request.question:
            return {"game_state": state,
                    "analysis": f"{PREFIX}No model is configured, so the question cannot be answered from the "
                                f"footage; the last event was {_last_event(request.recent)}.",
                    "advice": f"{PREFIX}Configure a model (--reasoner openai --llm-url URL, or --llm-model PATH) "
                              "to ask questions."}
        rule = next((r for r in self.rules if r.matches(kind, before, after)), None)
        what = _what_happened(ev, evidence, before, after)
        analysis = rule.analysis if rule and rule.analysis else what
        if rule is not None:
            advice = rule.advice
        else:
            advice = next((DEFAULT_ADVICE[k] for k in [kind, *kind.split("+")] if k in DEFAULT_ADVICE), GENERIC)
        return {"game_state": state, "analysis": PREFIX + analysis, "advice": PREFIX + advice}

    async def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        text = json.dumps(self.answer(request))
        # in a few pieces, like a model would, so every reader of the stream is exercised
        step = max(16, len(text) // 4)
        for i in range(0, len(text), step):
            yield text[i:i + step]


def _state_line(after: dict[str, Any], before: dict[str, Any]) -> str:
    if not after:
        return "No HUD values are read for this game (add OCR fields to its profile)."
    parts = []
    for k, v in after.items():
        b = before.get(k, v)
        parts.append(f"{k} {format_value(b)} -> {format_value(v)}" if b != v else f"{k} {format_value(v)}")
    return ", ".join(parts)


def _what_happened(ev: dict[str, Any], evidence: dict[str, Any], before: dict[str, Any],
                   after: dict[str, Any]) -> str:
    kind = str(ev.get("kind", "event"))
    t = ev.get("t")
    when = f" at {format_time(float(t))}" if isinstance(t, (int, float)) else ""
    moved = [f"{k} went from {format_value(before[k])} to {format_value(v)}" for k, v in after.items()
             if k in before and before[k] != v]
    raw = evidence.get("reasons")
    reasons: list[Any] = raw if isinstance(raw, list) else []
    why = "; ".join(str(r) for r in [*moved, *reasons][:3])
    return f"{kind.replace('_', ' ')} ({ev.get('priority', 'normal')}){when}" + (f": {why}." if why else ".")


def _last_event(recent: list[dict[str, Any]]) -> str:
    if not recent:
        return "none yet"
    ev = recent[-1]
    t = ev.get("t")
    return f"{ev.get('kind', 'event')} at {format_time(float(t))}" if isinstance(t, (int, float)) else "unknown"
