"""The learned tier of the cascade: what a candidate event's window of cheap signals looks like,
how a candidate is labelled from the truth, and how the scorer's probabilities set its priority.

The TriggerDetector decides in under half a second whether *something* happened; it cannot tell
a death from a reward from an explosion that cost nothing.  The event scorer looks at each of its
candidates (every priority) once more, through the window of signals the pipeline's encoders sent
around the candidate's moment, and a small gradient-boosted model
(:mod:`engines.event_scorer_model`) turns that window into calibrated probabilities of
``death``, ``reward`` and ``none``.

One function computes the window's numbers (:func:`window_features`) for the running stage
(``stages/event_scorer.py``, from its buffers) and for training and benchmarks (from a features
JSONL the real pipeline recorded, :func:`candidates_from_features`), so what was trained on is
what runs.  Bump :data:`SIGNAL_VERSION` when an input or a statistic changes: a model trained on
another version is refused in one line.

The window ends ``LOOKAHEAD_S`` after the candidate's moment (the stage waits that long, so a wake
is decided at most about 1 s after its moment) and spans ``WINDOW_S``; its last ``NEAR_S`` is the
moment itself, the rest the "before" it is compared with.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.event_session import SessionContext, session_feature_names

SIGNAL_VERSION = 2  # 2: the session features of engines.event_session
LOOKAHEAD_S = 0.5
WINDOW_S = 4.0
NEAR_S = 1.0

# (features name, keys): the scalar signals whose window statistics the model reads
SCALARS: dict[str, tuple[str, ...]] = {
    "audio": ("onset", "rise", "novelty", "flux", "rms_db"),
    "motion": ("diff", "flash", "reset", "vanish", "hist"),
    "thumb": ("novelty", "novelty_long"),
    "hud": ("steps", "small", "areas"),
}
MEL = "mel"  # log-mel bands (stages/audio_mel.py): b00..b15 and db
MEL_BANDS = 16
# the cheap tier's own view of the candidate
FAMILIES = ("motion", "scene", "audio", "timbre", "hud", "speech")
CUES = ("hud_revert", "hud_quiet_change", "hud_change")
PRIORITY_CODE = {"critical": 3.0, "high": 2.0, "normal": 1.0, "low": 0.0}
# the streams a pipeline must feed the scorer (the model file names the features it needs)
STREAMS = (*SCALARS, MEL)

Sample = tuple[float, Mapping[str, float]]
# per scalar: its near and before statistics, and how the moment stands out from before it
STATS = ("near_max", "near_mean", "before_mean", "before_max", "rise_max", "rise_mean")


def feature_names() -> list[str]:
    """The names of a candidate's numbers, in a fixed order: its window's (:func:`window_features`),
    then how it stands against the session's earlier candidates (:mod:`engines.event_session`)."""
    names: list[str] = []
    for stream, keys in SCALARS.items():
        for key in keys:
            names += [f"{stream}.{key}.{s}" for s in STATS]
    bands = [f"b{i:02d}" for i in range(MEL_BANDS)]
    names += [f"mel.{b}.near" for b in bands]
    names += [f"mel.{b}.delta" for b in bands]
    names += ["mel.db.near_max", "mel.db.before_mean", "mel.db.delta", "mel.low_high.near"]
    names += [f"family.{f}" for f in FAMILIES]
    names += [f"cue.{c}" for c in CUES]
    names += ["cue.other", "cheap.priority", "cheap.score"]
    return names + session_feature_names()


# what a trained model reads (:func:`model_inputs`): how the moment differs from what came before it
RELATIVE_PREFIXES = ("session.", "cheap.", "family.", "cue.")
RELATIVE_SUFFIXES = (".rise_max", ".rise_mean", ".delta")


def model_inputs() -> list[str]:
    """The features ``gamecopilot train scorer`` fits on: the session's ranks and rates, the cheap
    tier's view, and each window statistic as a change (near the moment against before it), not
    its level.  Levels (how loud, how much motion) say which game this is more than what happened:
    cross-validated by game on the train pool, p_death from every feature ranked deaths at ROC AUC
    0.55, from these at 0.62.  The other features stay computed, so a model may still read them."""
    return [n for n in feature_names() if n.startswith(RELATIVE_PREFIXES) or n.endswith(RELATIVE_SUFFIXES)]


def _stats(values: np.ndarray, near: np.ndarray) -> tuple[float, ...]:
    nan = math.nan
    a, b = values[near], values[~near]
    near_max, near_mean = (float(a.max()), float(a.mean())) if a.size else (nan, nan)
    before_mean, before_max = (float(b.mean()), float(b.max())) if b.size else (nan, nan)
    return near_max, near_mean, before_mean, before_max, near_max - before_max, near_mean - before_mean


def window_features(event: Mapping[str, Any], streams: Mapping[str, Sequence[Sample]]) -> dict[str, float]:
    """The named numbers of one candidate: ``event`` is its events-JSONL record, ``streams`` the
    samples ``(t, values)`` of each features name inside the window (NaN where a stream is empty)."""
    t_end = float(event["t"]) + LOOKAHEAD_S
    out: dict[str, float] = {}
    for stream, keys in SCALARS.items():
        samples = streams.get(stream, ())
        times = np.fromiter((s[0] for s in samples), np.float64, len(samples))
        near = times > t_end - NEAR_S
        for key in keys:
            vals = np.fromiter((float(s[1].get(key, math.nan)) for s in samples), np.float64, len(samples))
            ok = ~np.isnan(vals)
            stats = _stats(vals[ok], near[ok])
            for name, v in zip(STATS, stats, strict=True):
                out[f"{stream}.{key}.{name}"] = v
    mel = streams.get(MEL, ())
    bands = [f"b{i:02d}" for i in range(MEL_BANDS)]
    if mel:
        times = np.fromiter((s[0] for s in mel), np.float64, len(mel))
        near = times > t_end - NEAR_S
        grid = np.array([[float(s[1].get(b, math.nan)) for b in [*bands, "db"]] for s in mel], np.float64)
        near_mean = grid[near].mean(axis=0) if near.any() else np.full(grid.shape[1], math.nan)
        before_mean = grid[~near].mean(axis=0) if (~near).any() else np.full(grid.shape[1], math.nan)
        near_db_max = float(grid[near, -1].max()) if near.any() else math.nan
    else:
        near_mean = before_mean = np.full(MEL_BANDS + 1, math.nan)
        near_db_max = math.nan
    for i, b in enumerate(bands):
        out[f"mel.{b}.near"] = float(near_mean[i])
        out[f"mel.{b}.delta"] = float(near_mean[i] - before_mean[i])
    out["mel.db.near_max"] = near_db_max
    out["mel.db.before_mean"] = float(before_mean[-1])
    out["mel.db.delta"] = float(near_mean[-1] - before_mean[-1])
    half = MEL_BANDS // 2
    out["mel.low_high.near"] = float(np.mean(near_mean[:half]) - np.mean(near_mean[half:MEL_BANDS]))
    evidence = event.get("evidence") or {}
    families = evidence.get("families") or {}
    for f in FAMILIES:
        out[f"family.{f}"] = float(families.get(f, 0.0))
    cues = set(evidence.get("cues") or ())
    for c in CUES:
        out[f"cue.{c}"] = float(c in cues)
    out["cue.other"] = float(bool(cues - set(CUES)))
    out["cheap.priority"] = PRIORITY_CODE.get(str(event.get("priority")), 0.0)
    out["cheap.score"] = float(event.get("score") or 0.0)
    return out


def candidate_features(event: Mapping[str, Any], streams: Mapping[str, Sequence[Sample]],
                       session: SessionContext) -> dict[str, float]:
    """Every named number of one candidate: its window's, then the session's (which remembers it).
    The one function the stage and the offline tools call, once per candidate, in order."""
    window = window_features(event, streams)
    return window | session.features(event, window)


def trusted_cue(event: Mapping[str, Any]) -> bool:
    """Whether the cheap tier's priority came from news the scorer does not second-guess: a profile
    rule over the HUD's values (a lives counter going down), a keyword read or heard."""
    cues = set((event.get("evidence") or {}).get("cues") or ())
    return bool(cues - set(CUES))


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Thresholds:
    """When the scorer's probabilities make a wake (see :func:`decide`)."""

    death: float = 0.5  # p_death at or above: critical, whatever the cheap tier said
    drop: float = 0.8  # p_none at or above: a cheap wake is noise, kept as a normal annotation
    event: float = 0.9  # p_death + p_reward at or above: a cheap annotation is promoted to a high wake
    gap_s: float = 0.0  # a wake this soon after the scorer's previous wake is a repeat: normal

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Thresholds:
        return cls(**{k: float(v) for k, v in d.items() if k in ("death", "drop", "event", "gap_s")})


def decide(event: Mapping[str, Any], probs: Sequence[float], th: Thresholds) -> str:
    """The final priority of a candidate.  The scorer rescores the cheap tier's candidates, it does
    not replace the detector: a trusted cue keeps its priority; a likely death is critical; a cheap
    wake stays a wake unless the scorer is sure it is noise (``p_none >= drop``: ``normal``, still
    annotated); an annotation the scorer finds likely to be something becomes a ``high`` wake.  With
    every threshold above 1 the cascade gives the cheap tier's priorities."""
    cheap = str(event.get("priority", "low"))
    if trusted_cue(event):
        return cheap
    p_death, p_reward, p_none = float(probs[0]), float(probs[1]), float(probs[2])
    if p_death >= th.death:
        return "critical"
    if cheap in ("critical", "high"):
        return "normal" if p_none >= th.drop else cheap
    if p_death + p_reward >= th.event:
        return "high"
    return cheap


class Cascade:
    """The scorer's verdicts over one session's candidates, in the order they are decided:
    :func:`decide`, then a wake within ``gap_s`` of the previous one the scorer made is a repeat of
    the same moment (kept as ``normal``; a trusted cue's priority is never touched).  The one place
    the stage and the offline tools build a rescored event."""

    def __init__(self, th: Thresholds, model: str) -> None:
        self.th = th
        self.model = model
        self.last_wake = -math.inf

    def rescore(self, event: Mapping[str, Any], probs: Sequence[float]) -> dict[str, Any]:
        """``event`` (an events-JSONL record) with its final priority and ``evidence["scorer"]``
        (``p_death``, ``p_reward``, ``p_none``, ``model``; ``cheap_priority`` when it changed,
        ``repeat`` when a wake was kept back as a repeat)."""
        priority = decide(event, probs, self.th)
        verdict: dict[str, Any] = {"p_death": round(float(probs[0]), 4), "p_reward": round(float(probs[1]), 4),
                                   "p_none": round(float(probs[2]), 4), "model": self.model}
        t = float(event["t"])
        if priority in ("critical", "high") and not trusted_cue(event):
            if t - self.last_wake < self.th.gap_s:
                priority = "normal"
                verdict["repeat"] = True
            else:
                self.last_wake = t
        if priority != event.get("priority"):
            verdict["cheap_priority"] = event.get("priority")
        return {**event, "priority": priority, "evidence": {**(event.get("evidence") or {}), "scorer": verdict}}


# --------------------------------------------------------------------------- adaptation within a session


@dataclass
class SessionSignature:
    """What this session's deaths looked like, so similar candidates later score higher.

    A death is *confirmed* when the game says so (a trusted cue, a profile rule on the lives
    counter, decided critical) or when the model is sure of it (``p_death`` at least ``confirm``).
    The window of a confirmed death (centred, unit length) joins the signature (the newest
    ``keep``); a later candidate whose window is closer than ``similar`` (cosine) to one of them
    gets ``p_death`` raised by up to ``boost`` of what it lacks, the other two shrunk to match.
    Games repeat their death animation and tune, which a model trained on other games has not seen.
    """

    confirm: float = 0.85
    similar: float = 0.9
    boost: float = 0.5
    keep: int = 8
    signatures: list[np.ndarray] | None = None

    def adjust(self, event: Mapping[str, Any], x: np.ndarray, probs: Sequence[float]) -> np.ndarray:
        """``probs`` of one candidate (window ``x``) after the session's signature; learns from it."""
        p = np.asarray(probs, np.float64).copy()
        v = np.nan_to_num(np.asarray(x, np.float64))
        v = v - v.mean()
        norm = float(np.linalg.norm(v))
        if norm > 0:
            v = v / norm
        if self.signatures is None:
            self.signatures = []
        if self.signatures and norm > 0:
            sim = max(float(s @ v) for s in self.signatures)
            if sim >= self.similar:
                lift = self.boost * (sim - self.similar) / max(1e-9, 1.0 - self.similar) * (1.0 - p[0])
                rest = p[1:].sum()
                p[0] += lift
                if rest > 0:
                    p[1:] *= (rest - lift) / rest
        confirmed = p[0] >= self.confirm or (trusted_cue(event) and event.get("priority") == "critical")
        if confirmed and norm > 0:
            self.signatures.append(v)
            del self.signatures[:-self.keep]
        return p


def session_probabilities(events: Sequence[Mapping[str, Any]], X: np.ndarray, probs: np.ndarray,
                          th: Thresholds) -> np.ndarray:
    """Every candidate's probabilities after :class:`SessionSignature`, in the order of the session."""
    sig = SessionSignature()
    out = np.asarray(probs, np.float64).copy()
    for i in sorted(range(len(events)), key=lambda k: float(events[k]["t"])):
        out[i] = sig.adjust(events[i], X[i], probs[i])
    return out


# --------------------------------------------------------------------------- labels


def critical_moments(truth: Iterable[Mapping[str, Any]], merge_s: float = 0.5) -> list[tuple[float, float]]:
    """``(first, last)`` of each critical moment (life_lost / game_over closer than ``merge_s`` to the
    previous one make one), as :mod:`copilot.scoring` forms them."""
    crit = sorted(float(e["t"]) for e in truth if e.get("kind") in ("life_lost", "game_over"))
    moments: list[list[float]] = []
    for t in crit:
        if moments and t - moments[-1][-1] <= merge_s + 1e-6:
            moments[-1].append(t)
        else:
            moments.append([t])
    return [(m[0], m[-1]) for m in moments]


def label(t: float, moments: Sequence[tuple[float, float]], rewards: Sequence[float],
          critical_window: tuple[float, float] = (4.0, 1.5), reward_window_s: float = 1.5) -> int:
    """0 death, 1 reward, 2 none: a candidate at ``t`` is a death when a wake there would match a
    critical moment (from ``critical_window[0]`` s before its first event to ``[1]`` s after its
    last, both ends included), a reward when one is within ``reward_window_s``; deaths win."""
    before, after = critical_window
    eps = 1e-6
    if any(first - before - eps <= t <= last + after + eps for first, last in moments):
        return 0
    i = bisect.bisect_left(rewards, t - reward_window_s - eps)
    if i < len(rewards) and rewards[i] <= t + reward_window_s + eps:
        return 1
    return 2


# --------------------------------------------------------------------------- offline (training, benchmarks)


def read_streams(features_jsonl: str | Path) -> dict[str, list[Sample]]:
    """The samples of every stream the scorer reads from a features JSONL (``annotate --features-out``)."""
    streams: dict[str, list[Sample]] = {s: [] for s in STREAMS}
    with open(features_jsonl, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("kind") != "features" or rec.get("name") not in streams:
                continue
            streams[rec["name"]].append((float(rec["t"]), rec.get("values") or {}))
    for samples in streams.values():
        samples.sort(key=lambda s: s[0])
    return streams


def candidates_from_features(events: Sequence[Mapping[str, Any]],
                             features_jsonl: str | Path) -> tuple[np.ndarray, list[str]]:
    """``(X, names)``: one row of :func:`window_features` per candidate event."""
    streams = read_streams(features_jsonl)
    times = {name: [s[0] for s in samples] for name, samples in streams.items()}
    names = feature_names()
    session = SessionContext()
    rows = []
    for ev in events:
        t = float(ev["t"])
        lo, hi = t + LOOKAHEAD_S - WINDOW_S, t + LOOKAHEAD_S
        win = {n: s[bisect.bisect_right(times[n], lo): bisect.bisect_right(times[n], hi + 1e-9)]
               for n, s in streams.items()}
        f = candidate_features(ev, win, session)
        rows.append([f[n] for n in names])
    return np.asarray(rows, np.float64).reshape(len(rows), len(names)), names
