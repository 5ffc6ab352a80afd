"""How a candidate stands against the session's earlier candidates: the scorer's game-free features.

Window statistics alone do not carry from one game to another: a death in Breakout is quiet, one
in Robotank is the loudest thing on screen, and a game that explodes every few seconds makes the
cheap tier fire all the time.  Within one game the same statistics still rank deaths above the
rest (that is what the session signature builds on).  So besides its absolute window, each
candidate is described relative to the candidates this session has already seen:

* ``session.pct.NAME``: for each window statistic of :data:`RANKED`, the fraction of the session's
  last :data:`HISTORY` candidates this one exceeds (ties count half); NaN before
  :data:`MIN_HISTORY` of them.  "Louder than 95% of what this game usually does" means the same in
  every game.
* ``session.rate_60s`` and ``session.wake_rate_60s``: candidates and cheap wakes a minute over the
  last 60 s of media (a game that fires all the time makes each candidate less likely news).
* ``session.since_prev`` and ``session.since_wake``: seconds since the previous candidate and the
  previous cheap wake (capped at 60).

Everything here is causal (only earlier candidates count) and depends only on the order the
candidates are decided in, which is the same in the running stage and offline
(:func:`engines.event_scorer.candidates_from_features`), so what the model was trained on is what
it sees.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

HISTORY = 120  # candidates remembered (at a busy game's ~10 a minute: the last 12 minutes)
MIN_HISTORY = 5
RATE_S = 60.0
CAP_S = 60.0
WAKE_PRIORITIES = ("critical", "high")

# the window statistics ranked against the session (names from engines.event_scorer.feature_names)
RANKED: tuple[str, ...] = (
    "audio.onset.near_max", "audio.rise.near_max", "audio.novelty.near_max", "audio.flux.near_max",
    "audio.rms_db.near_max", "audio.rms_db.rise_max", "audio.flux.rise_max",
    "motion.diff.near_max", "motion.diff.rise_max", "motion.flash.near_max", "motion.reset.near_max",
    "motion.vanish.near_max", "motion.hist.near_max", "motion.diff.near_mean",
    "thumb.novelty.near_max", "thumb.novelty_long.near_max",
    "hud.steps.near_max", "hud.small.near_max", "hud.areas.near_max",
    "mel.db.near_max", "mel.db.delta", "mel.low_high.near",
    "mel.b00.delta", "mel.b03.delta", "mel.b07.delta", "mel.b11.delta", "mel.b15.delta",
    "cheap.score",
)
RATES = ("session.rate_60s", "session.wake_rate_60s", "session.since_prev", "session.since_wake")


def session_feature_names() -> list[str]:
    """The names :meth:`SessionContext.features` adds, in a fixed order."""
    return [f"session.pct.{n}" for n in RANKED] + list(RATES)


class SessionContext:
    """The session's earlier candidates (bounded: the newest :data:`HISTORY`), and how the next one
    compares with them.  One per session: the stage keeps one, offline tools make one a recording."""

    def __init__(self) -> None:
        self.history: deque[np.ndarray] = deque(maxlen=HISTORY)
        self.times: deque[float] = deque(maxlen=HISTORY)
        self.wake_times: deque[float] = deque(maxlen=HISTORY)

    def features(self, event: Mapping[str, Any], window: Mapping[str, float]) -> dict[str, float]:
        """The session features of one candidate (its events-JSONL record and its window
        statistics), then remember it; call once per candidate, in the order they are decided."""
        t = float(event["t"])
        x = np.array([float(window.get(n, math.nan)) for n in RANKED], np.float64)
        past = np.stack(self.history) if self.history else np.empty((0, len(RANKED)))  # (n, len(RANKED))
        seen = (~np.isnan(past)).sum(axis=0)  # NaN compares false: it counts neither below nor equal
        with np.errstate(invalid="ignore", divide="ignore"):
            pct = ((past < x).sum(axis=0) + 0.5 * (past == x).sum(axis=0)) / seen
        pct[(seen < MIN_HISTORY) | np.isnan(x)] = math.nan
        out = {f"session.pct.{name}": float(v) for name, v in zip(RANKED, pct, strict=True)}
        out["session.rate_60s"] = sum(1 for s in self.times if t - s <= RATE_S) * 60.0 / RATE_S
        out["session.wake_rate_60s"] = sum(1 for s in self.wake_times if t - s <= RATE_S) * 60.0 / RATE_S
        out["session.since_prev"] = min(CAP_S, t - self.times[-1]) if self.times else CAP_S
        out["session.since_wake"] = min(CAP_S, t - self.wake_times[-1]) if self.wake_times else CAP_S
        self.history.append(x)
        self.times.append(t)
        if str(event.get("priority")) in WAKE_PRIORITIES:
            self.wake_times.append(t)
        return out
