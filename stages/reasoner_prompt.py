"""What the reasoner asks: the prompt for one wake, and the frames kept to show with it.

The prompt holds the event (kind, priority, evidence), the current game state with what changed,
the last few events, the profile's game notes, and a context slot that HiCo and the timeline fill
later (empty until then).  The frames: the event's keyframe (the frame nearest its moment) and a
few before it, from a small ring of downscaled frames the stage keeps as video passes.  A model
that reads no images gets the text alone, and the prompt says so.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import numpy as np

from copilot.advice import AdviceRequest, format_value
from copilot.messages import GameState
from copilot.timefmt import format_time

# Short on purpose: a small model on a CPU pays for every prompt token before its first answer token
# (the servers that take the schema as response_format enforce it; the repair prompt spells it out).
SYSTEM = (
    "You are a gameplay copilot watching a player's game live, woken only when something significant "
    "happens. Answer with one JSON object with three short string fields: game_state (what the HUD and "
    "screen show now), analysis (what just happened, one sentence) and advice (one concrete thing to do "
    "next, one sentence)."
)


class FrameRing:
    """The last ``keep_s`` of video, one frame every ``step_s`` of media time, at most ``size`` pixels
    on the longer side: what a wake shows the model (bounded: ``keep_s / step_s`` frames)."""

    def __init__(self, keep_s: float = 6.0, step_s: float = 0.5, size: int = 448) -> None:
        self.step_s = step_s
        self.size = size
        self.frames: deque[tuple[float, np.ndarray]] = deque(maxlen=max(2, int(keep_s / step_s) + 2))

    def offer(self, t: float, image: np.ndarray) -> bool:
        """Keep ``image`` if a step has passed since the last one kept; whether it was kept."""
        if self.frames and t - self.frames[-1][0] < self.step_s - 1e-6:
            return False
        self.frames.append((t, downscale(image, self.size)))
        return True

    def around(self, t: float, before: int) -> list[tuple[float, np.ndarray]]:
        """The frame nearest ``t`` (the keyframe) and up to ``before`` frames before it, oldest first."""
        if not self.frames:
            return []
        items = list(self.frames)
        key = min(range(len(items)), key=lambda i: abs(items[i][0] - t))
        return items[max(0, key - before):key + 1]


def downscale(image: np.ndarray, size: int) -> np.ndarray:
    """RGB ``image`` shrunk by an integer stride so its longer side is at most about ``size``."""
    img = image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    stride = max(1, int(np.ceil(max(img.shape[:2]) / max(1, size))))
    return np.ascontiguousarray(img[::stride, ::stride])


def describe_state(state: GameState | None) -> str:
    if state is None or not state.values:
        return "not read (no HUD values for this game)"
    parts = []
    for k, v in state.values.items():
        prev = state.previous.get(k)
        at = state.changed_at.get(k)
        change = f" (was {format_value(prev)}" + (f", changed at {format_time(at)})" if at is not None else ")") \
            if prev is not None and prev != v else ""
        parts.append(f"{k} {format_value(v)}{change}")
    return ", ".join(parts)


def _evidence_text(evidence: dict[str, Any]) -> str:
    """The evidence a reader needs, in a line: why it fired (reasons), which kinds of signal agreed
    (families), what the HUD did (state before and after)."""
    parts = [str(r) for r in evidence.get("reasons", [])][:3]
    fams = evidence.get("families")
    if isinstance(fams, dict) and fams:
        parts.append("signals: " + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else str(k)
                                             for k, v in list(fams.items())[:4]))
    before, after = evidence.get("state_before"), evidence.get("state_after")
    if isinstance(before, dict) and isinstance(after, dict):
        moved = [f"{k} {format_value(before.get(k))} -> {format_value(v)}"
                 for k, v in after.items() if before.get(k) != v]
        if moved:
            parts.append("HUD: " + ", ".join(moved))
    return "; ".join(parts)[:400] or json.dumps(evidence)[:200]


def build_request(*, event: dict[str, Any], question: str, merged: list[dict[str, Any]], state: GameState | None,
                  recent: list[dict[str, Any]], game: str, notes: str, context: str,
                  frames: list[tuple[float, np.ndarray]], takes_images: bool, max_tokens: int) -> AdviceRequest:
    """The request for one wake (see the module docstring)."""
    lines = [f"Game: {game}."]
    if notes:
        lines.append(f"About this game: {notes.strip()}")
    if question:
        lines.append(f"The player asks: {question}")
    if event:
        lines.append(f"Event at {format_time(float(event.get('t', 0.0)))}: {event.get('kind')} "
                     f"(priority {event.get('priority')}, significance {event.get('score', 0.0):.2f}).")
        ev = event.get("evidence")
        if isinstance(ev, dict) and ev:
            lines.append(f"Evidence: {_evidence_text(ev)}")
    if merged:
        lines.append("At the same moment: " + "; ".join(
            f"{m.get('kind')} at {format_time(float(m.get('t', 0.0)))}" for m in merged[:4]) + ".")
    lines.append(f"Game state now: {describe_state(state)}.")
    if recent:
        lines.append("Recent events: " + "; ".join(
            f"{format_time(float(r.get('t', 0.0)))} {r.get('kind')} ({r.get('priority')})" for r in recent) + ".")
    if context:
        lines.append(f"Context: {context}")
    if frames and takes_images:
        lines.append(f"Images: {len(frames)} frames, oldest first; the last is the moment of the event.")
    else:
        lines.append("(No images: judge from this text.)")
    lines.append('Reply with JSON only: {"game_state": "...", "analysis": "...", "advice": "..."}')
    shown = frames if takes_images else []
    return AdviceRequest(
        system=SYSTEM, prompt="\n".join(lines), images=[f for _, f in shown], image_times=[t for t, _ in shown],
        event=event, question=question, recent=recent,
        state={} if state is None else {"values": state.values, "previous": state.previous,
                                        "changed_at": state.changed_at},
        notes=notes, context=context, max_tokens=max_tokens,
    )
