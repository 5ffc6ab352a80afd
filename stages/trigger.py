"""The TriggerDetector: decides, causally, which moments are significant.

It reads every cheap signal (``Features`` from the motion, thumbnail, HUD, audio, OCR,
keyword and VAD encoders) and turns them into a few ``Event`` messages with evidence.

Why it is built this way:

* **Rarity, not z-scores.**  Many frames are exact duplicates and much game audio is
  silence, so a median/MAD z-score of a signal saturates (the MAD is 0).  Each signal is
  instead judged by how rarely the recent past (``history_s``) reached its current value:
  the past is cut into blocks of ``block_s``, each block keeps its peak, and the rarity of
  a value ``x`` is ``log10((n + 1) / (k + 1))`` where ``k`` of the ``n`` past block peaks
  were at least ``x``.  A change that happens every second is in half the blocks, so its
  rarity is about 0.3 and it stops firing; a change never seen in 20 s scores ~1.6.
  Values under a per-signal floor (codec noise, near silence) score 0.
* **Agreement counts more than loudness.**  Signals are grouped in independent families
  (picture, HUD, audio loudness, timbre, OCR, keywords, speech).  A family's score is its best signal,
  capped at 1, times the profile weight; the fused score adds the best family and
  ``agreement_bonus`` times each further family that is itself notable, so a HUD step
  that comes with a sound beats any single signal however loud.
* **Hysteresis, coalescing, refractory time, budget.**  An episode opens when the fused
  score crosses ``fire_threshold``, gathers every signal for ``coalesce_s`` (one event,
  not a burst), and another cannot open until the score fell under
  ``release_threshold``.  After an event, none of the same or lower priority follows within
  ``refractory_s``.  Wakes (critical and high events) are limited to
  ``max_wakes_per_min`` over a sliding ``budget_window_s``; past it, wakes are demoted to
  normal and say so in their evidence.  ``max_high_per_min`` (off by default) is a budget for
  high wakes alone, for a game that scores all the time: critical ones still get through.
* **Rules and keywords from the profile** (OCR values such as a health drop of more than
  30%, or a keyword on screen or in speech) open an episode with their own priority.  A
  keyword heard in an ASR transcript is placed at the start of its speech segment and is
  decided when the transcript arrives, so its decision delay includes the segment and Whisper.
* **HUD semantics without OCR.**  A small HUD area that goes back to a content it showed
  before (``hud.revert``: a lives counter after a game over, a score reset) is a
  ``revert_priority`` (critical) event, but only when the area has shown few contents
  (``revert_max_states``): a gauge, a timer or a score shows dozens and goes back
  routinely (an oxygen bar refilled, a countdown restarted), so its reverts are only
  annotations; an area that steps like a clock never reverts (see :mod:`stages.hud`).  A
  step in a HUD cell that had been still for ``quiet_s`` (``hud.quiet``: a lives icon that
  goes away, found without knowing where the lives are) is a ``quiet_priority`` (high)
  event when it is small (``quiet_max_cells``), mostly pixels going to the background
  (``quiet_min_lost``: an icon lost, not a digit gained) and not one of a run of such steps
  (``quiet_gap_s``: a sprite creeping over still cells).  Early in a session, or soon after
  a game over redrew the icons, no cell has been still that long, so a cell still for only
  ``quiet_icon_s`` also counts when nearly all its stepped pixels went to the background
  (``quiet_icon_lost``: an icon gone, where a changed digit redraws).
* **Annotations are HUD news.**  A step in a small HUD area to a content it never showed
  (``annotate_fresh``: a score gone up, not a blink or a gauge going back and forth) is at
  least a ``low`` annotation (``annotate_hud``), so score changes are annotated even once
  routine.  Below wake priority, an event needs HUD evidence or a reason (a rule, a keyword,
  a revert) to be emitted at all (``annotate_need_hud``): on the training pool, three in four
  sound-only and two in three picture-only normal events were near no reward or death.  Nor
  is one whose only evidence is a HUD step too small to count as ``hud.steps`` (a few
  pixels, with no other signal and no other reason: ``annotate_need_steps``); on the
  training pool four in five of those were near no reward or death.  A wake demoted by the
  budget is still emitted, with its note.
* **One wake per death.**  A critical event within ``critical_gap_s`` of the previous wake
  (a lives icon and a score reset of the same game over) is demoted to normal.
* **Causal.**  An event is decided ``coalesce_s`` after its onset, from signals up to that
  media time only, and always within ``max_delay_s`` (<= 0.5 s).  The stage records the
  delay (media time of the newest input when the event is emitted minus the event's ``t``)
  as ``decision_delay_ms`` in its metrics.

:class:`TriggerDetector` is pure (no I/O, no clock) so tests drive it directly;
:class:`TriggerStage` is the thin stage around it.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from copilot.keywords import match_keywords
from copilot.messages import PRIORITIES, Envelope, Event, Features, Transcript
from copilot.profile import Profile, Rule, profile_from_options
from copilot.registry import register_stage
from copilot.stage import Stage

# signal -> (family, floor).  A value at or under the floor is noise and scores 0.
SIGNALS: dict[str, tuple[str, float]] = {
    # routine movement: weighted low by default (profile weights "motion")
    "motion.diff": ("motion", 0.01),
    "thumb.novelty": ("motion", 0.05),
    # big picture changes: a cut, a flash, the whole screen redrawn, a screen not seen lately
    "motion.hist": ("scene", 0.2),
    "motion.flash": ("scene", 0.03),
    "motion.reset": ("scene", 0.5),
    "motion.vanish": ("scene", 0.08),  # a lasting share of the foreground went away (enemies cleared)
    "thumb.novelty_long": ("scene", 0.2),
    # step changes in still areas; "small" is the part inside small HUD areas (scores, lives)
    "hud.small": ("hud", 0.00003),  # binary, see BINARY
    "hud.steps": ("hud", 0.0004),
    "hud.areas": ("hud", 1.5),
    "audio.onset": ("audio", 0.5),
    "audio.rise": ("audio", 6.0),
    # a timbre not heard lately (a jingle, a death tune, not the usual shot): its own family, so a
    # new sound agreeing with a picture or HUD change adds to it rather than competing with the onset
    "audio.novelty": ("timbre", 0.005),
    "vad.speech_prob": ("speech", 0.5),
}
# signals judged by how often they happen, not how big they are (a digit flip is a few pixels
# or many depending on the digits): their value is 1 when over the floor, else 0
BINARY = frozenset({"hud.small"})
# tuned on the development games (bench/tune_trigger.py): routine motion alone says little,
# a big picture change (flash, cut, redraw) says a lot, HUD and audio in between
# speech (VAD) is kept under agree_min: no tuning data has speech, so it is evidence only
DEFAULT_WEIGHTS = {"motion": 0.02, "scene": 1.6, "audio": 1.2, "timbre": 0.4, "hud": 0.85, "speech": 0.3}
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # critical 0 ... low 3
WAKES = ("critical", "high")
HUD_NEWS = "a HUD area changed"  # the reason of an annotate_hud annotation
# the evidence of a HUD step too small to count as hud.steps (annotate_need_steps)
TINY_HUD = frozenset({"hud.small", "hud.areas"})


class RarityBaseline:
    """Rarity of a signal's value against the block peaks of its recent past."""

    def __init__(self, history_s: float = 20.0, block_s: float = 0.5, floor: float = 0.0, margin: float = 1.0) -> None:
        self.history_s = history_s
        self.margin = margin
        self.block_s = block_s
        self.floor = floor
        self._blocks: deque[tuple[float, float]] = deque()  # (block start, peak), closed blocks
        self._sorted: list[float] = []
        self._cur_start: float | None = None
        self._cur_peak = 0.0

    def _roll(self, t: float) -> None:
        if self._cur_start is None:
            self._cur_start = t
        while t >= self._cur_start + self.block_s:
            self._blocks.append((self._cur_start, self._cur_peak))
            insort(self._sorted, self._cur_peak)
            self._cur_start += self.block_s
            self._cur_peak = 0.0
            if t >= self._cur_start + self.block_s:  # a gap: jump over empty blocks
                skipped = int((t - self._cur_start) // self.block_s)
                self._cur_start += skipped * self.block_s
        horizon = t - self.history_s
        while self._blocks and self._blocks[0][0] < horizon:
            _, peak = self._blocks.popleft()
            del self._sorted[bisect_left(self._sorted, peak)]

    def rarity(self, value: float) -> float:
        """``log10((n + 1) / (k + 1))``; 0 for values under the floor.

        ``k`` counts past block peaks of at least ``value / margin``: with a margin over 1 a
        value must clearly exceed what the recent past reached to count as rare.
        """
        if value <= self.floor:
            return 0.0
        n = len(self._sorted)
        k = n - bisect_left(self._sorted, value / self.margin)
        return math.log10((n + 1) / (k + 1))

    def update(self, t: float, value: float) -> float:
        """Score ``value`` at ``t`` against the past, then add it to the current block."""
        self._roll(t)
        r = self.rarity(value)
        self._cur_peak = max(self._cur_peak, value)
        return r

    @property
    def max_rarity(self) -> float:
        return math.log10(len(self._sorted) + 1)


@dataclass
class _Episode:
    onset: float
    opened_at: float
    score: float = 0.0
    priority: str = "low"
    kind: str = "moment"
    signals: dict[str, dict[str, float]] = field(default_factory=dict)  # signal -> {rarity, value, t}
    families: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # rules and keywords that fired
    forced: str | None = None  # a priority set by a rule or keyword


class DetectorEvent(msgspec.Struct, kw_only=True):
    """An event with the media time at which it was decided."""

    event: Event
    decided_at: float

    def record(self) -> dict[str, Any]:
        e = self.event
        return {"t": e.t, "kind": e.event_kind, "priority": e.priority, "score": e.score, "evidence": e.evidence}

    @property
    def delay_s(self) -> float:
        return self.decided_at - self.event.t


class TriggerDetector:
    """Causal fusion of cheap signals into events (see the module docstring).

    Feed it with :meth:`observe` in (roughly) media-time order; each call returns the
    events decided by then.  :meth:`finish` flushes an open episode at end of stream.
    """

    def __init__(self, profile: Profile | None = None) -> None:
        self.profile = profile or Profile()
        self.p = self.profile.trigger
        self._baselines: dict[str, RarityBaseline] = {}
        self._recent: deque[tuple[float, str, float, float]] = deque()  # (t, signal, rarity, value)
        self._episode: _Episode | None = None
        self._late: deque[_Episode] = deque()  # forced events that came too late to join an episode
        self._latched = False
        self._last_event: tuple[float, str] | None = None  # (t, priority)
        self._wakes: deque[float] = deque()
        self._high_wakes: deque[float] = deque()  # media times of high wakes, for max_high_per_min
        self._now = -math.inf
        self._unstepped = False  # inputs came at media time _now that the fusion has not looked at yet
        self._t0: float | None = None
        self._last_quiet = -math.inf  # media time of the last step in a long-still HUD cell
        self._state: dict[str, float] = {}  # latest OCR values
        self._state_before: dict[str, float] = {}  # OCR values before the latest change
        self._rules: list[Rule] = list(self.profile.rules)
        self._weights: dict[str, float] = {}
        self.decided: list[DetectorEvent] = []

    # -- inputs ------------------------------------------------------------------------------
    def observe(
        self,
        t: float,
        name: str,
        values: dict[str, float],
        text: dict[str, str] | None = None,
    ) -> list[DetectorEvent]:
        """One encoder output at media time ``t``; returns events decided by now.

        The detector decides once it has seen every input of a media time: when the first input
        of a later time comes (or at :meth:`finish`).  So inputs of equal time (one frame's
        motion, HUD and thumbnail features) count the same whatever order they come in.
        """
        if self._t0 is None:
            self._t0 = t
        out: list[DetectorEvent] = []
        if t > self._now and self._unstepped:
            self._step(out)  # everything up to the previous media time is in
            self._unstepped = False
        self._now = max(self._now, t)
        if name == "hud_ocr":
            self._observe_ocr(t, values, text or {})
        elif name == "keywords":
            self._observe_keywords(t, values, text or {})
        elif name == "transcript":
            self._observe_transcript(t, text or {})
        else:
            t_sig = t - float(values.get("age", 0.0)) + float(values.get("offset", 0.0))
            warm = t_sig - self._t0 >= self.p.warmup_s
            if (name == "hud" and warm and self.p.annotate_hud and values.get("small", 0.0) > 0
                    and values.get("novel", math.inf) >= self.p.annotate_min_novel_s
                    and (not self.p.annotate_fresh or values.get("fresh", 0.0) > 0)):
                self._force(t_sig, "low", "hud_change", HUD_NEWS)
            if name == "hud" and warm:
                self._observe_hud(t_sig, values)
            for key, value in values.items():
                sig = f"{name}.{key}"
                spec = SIGNALS.get(sig)
                if spec is None:
                    continue
                base = self._baselines.get(sig)
                if base is None:
                    base = self._baselines[sig] = RarityBaseline(self.p.history_s, self.p.block_s, spec[1],
                                                                     self.p.rarity_margin)
                v = float(value)
                if sig in BINARY:
                    v = 1.0 if v > spec[1] else 0.0
                r = base.update(t_sig, v)
                if r > 0:
                    self._recent.append((t_sig, sig, r, float(value)))
        self._unstepped = True
        return out

    def _observe_hud(self, t: float, values: dict[str, float]) -> None:
        """HUD semantics: a counter going back (revert) and a long-still HUD cell stepping (quiet)."""
        p = self.p
        if values.get("revert", 0.0) > 0:
            n = int(values.get("revert_states", 0.0))
            if p.revert_max_states <= 0 or n <= p.revert_max_states:  # 0: not reported
                self._force(t, p.revert_priority, "hud_revert",
                            f"a HUD area went back to what it showed {values.get('revert_age', 0.0):.1f} s ago")
            elif p.annotate_hud:  # a gauge or a timer cycling: routine, an annotation only
                self._force(t, "low", "hud_change", f"a HUD area with {n} states went back to an earlier one")
        quiet = values.get("quiet_area" if p.quiet_by_area else "quiet", 0.0)
        lost = values.get("quiet_lost", 1.0)
        # two ways to look like a lost icon: a cell still for long that changes in any way that
        # mostly clears it, or a cell still for a while whose pixels nearly all went to the background
        long_still = p.quiet_s > 0 and quiet >= p.quiet_s and lost >= p.quiet_min_lost
        icon_gone = p.quiet_icon_s > 0 and quiet >= p.quiet_icon_s and lost >= p.quiet_icon_lost
        if p.quiet_s > 0 and quiet >= min(x for x in (p.quiet_s, p.quiet_icon_s) if x > 0):  # quiet_s 0: both off
            lone = t - self._last_quiet >= p.quiet_gap_s
            self._last_quiet = t
            if lone and values.get("quiet_cells", 0.0) <= p.quiet_max_cells and (long_still or icon_gone):
                self._force(t, p.quiet_priority, "hud_quiet_change", f"a HUD area still for {quiet:.0f} s changed")

    def _observe_ocr(self, t: float, values: dict[str, float], text: dict[str, str]) -> None:
        for fld, value in values.items():
            prev = self._state.get(fld)
            if prev is not None and value != prev:
                self._state_before[fld] = prev
            self._state[fld] = value
            if prev is None:
                continue
            for rule in self._rules:
                if rule.field == fld and _rule_fires(rule, prev, value):
                    self._force(t, rule.priority, rule.event_kind(),
                                f"rule {rule.field} {rule.op} {rule.value:g}: {prev:g} -> {value:g}")

    def _observe_keywords(self, t: float, values: dict[str, float], text: dict[str, str]) -> None:
        best = None
        for prio in PRIORITIES:
            if values.get(prio, 0.0) > 0:
                best = prio
                break
        if best is not None:
            self._force(t, best, "keyword", f"keyword {text.get('matched', '')!r}")

    def _observe_transcript(self, t: float, text: dict[str, str]) -> None:
        """Speech (an ASR transcript starting at ``t``) that says a profile keyword."""
        said = text.get("text", "")
        found = match_keywords([said], self.profile.keywords) if self.profile.keywords and said else []
        if found:
            best = min(found, key=lambda kw: PRIORITY_RANK[self.profile.keywords[kw]])
            self._force(t, self.profile.keywords[best], "spoken_keyword", f"heard {best!r}: {said.strip()!r}")

    def _force(self, t: float, priority: str, kind: str, reason: str) -> None:
        if t < self._now - self.p.max_delay_s:
            # late (a keyword read by full-frame OCR or heard in a transcript, seconds after its
            # moment): an event of its own, decided at the next step with the evidence still kept
            # from around its time, never merged into the episode open now
            late = _Episode(onset=t, opened_at=t, forced=priority, kind=kind, reasons=[reason])
            fam, best = self._family_scores(t - self.p.window_s, until=t + self.p.coalesce_s)
            late.score, late.families = self.fused(fam), fam
            late.signals = _signal_evidence(best)
            self._late.append(late)
            return
        ep = self._episode
        if ep is None:
            ep = self._episode = _Episode(onset=t, opened_at=t)
        ep.reasons.append(reason)
        if ep.forced is None or PRIORITY_RANK[priority] < PRIORITY_RANK[ep.forced]:
            ep.forced = priority
            ep.kind = kind

    # -- fusion --------------------------------------------------------------------------------
    def _family_scores(self, since: float, until: float = math.inf
                       ) -> tuple[dict[str, float], dict[str, tuple[float, str, float, float]]]:
        fam: dict[str, float] = {}
        best: dict[str, tuple[float, str, float, float]] = {}
        for item in self._recent:
            ts, sig, r, _v = item
            if ts < since or ts > until:
                continue
            family = SIGNALS[sig][0]
            s = min(1.0, r / self.p.rarity_ref) * self._weight(sig)
            if s > fam.get(family, 0.0):
                fam[family] = s
            if sig not in best or r > best[sig][2]:
                best[sig] = item
        return fam, best

    def _weight(self, sig: str) -> float:
        w = self._weights.get(sig)
        if w is None:
            family = SIGNALS[sig][0]
            weights = self.profile.weights
            w = weights.get(sig, weights.get(family, DEFAULT_WEIGHTS.get(family, 1.0)))
            self._weights[sig] = w
        return w

    def fused(self, fam: dict[str, float]) -> float:
        scores = sorted(fam.values(), reverse=True)
        if not scores:
            return 0.0
        extra = [s for s in scores[1:] if s >= self.p.agree_min]
        if not extra:  # one family alone: agreement counts for more than loudness
            return scores[0] * self.p.solo_factor
        return scores[0] + self.p.agreement_bonus * sum(extra)

    def _step(self, out: list[DetectorEvent]) -> None:
        p = self.p
        now = self._now
        while self._late:
            ev = self._decide(self._late.popleft(), now)
            if ev is not None:
                out.append(ev)
        horizon = now - max(p.coalesce_s, p.window_s) - 1.0
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        fam, best = self._family_scores(now - p.window_s)
        score = self.fused(fam)
        warm = self._t0 is not None and now - self._t0 >= p.warmup_s
        ep = self._episode
        if ep is None and warm and not self._latched and score >= p.fire_threshold:
            onset = min((best[s][0] for s in best), default=now)
            ep = self._episode = _Episode(onset=onset, opened_at=now)
            self._latched = True
        if self._latched and score < p.release_threshold:
            self._latched = False
        if ep is None:
            return
        # gather: everything since the onset joins the episode
        fam_ep, best_ep = self._family_scores(ep.onset - 1e-9)
        ep_score = self.fused(fam_ep)
        if ep_score >= ep.score:
            ep.score = ep_score
            ep.families = dict(fam_ep)
            ep.signals = _signal_evidence(best_ep)
        deadline = min(ep.onset + p.coalesce_s, ep.onset + p.max_delay_s)
        if now >= deadline:
            ev = self._decide(ep, now)
            self._episode = None
            if ev is not None:
                out.append(ev)

    def _priority_of(self, score: float) -> str:
        p = self.p
        if score >= p.critical_score:
            return "critical"
        if score >= p.high_score:
            return "high"
        if score >= p.normal_score:
            return "normal"
        return "low"

    def _decide(self, ep: _Episode, now: float) -> DetectorEvent | None:
        p = self.p
        if ep.forced is None and ep.score < p.min_score:
            return None
        prio = self._priority_of(ep.score)
        kind = _kind_of(ep.families)
        if ep.forced is not None and PRIORITY_RANK[ep.forced] <= PRIORITY_RANK[prio]:
            prio, kind = ep.forced, ep.kind
        notes: list[str] = []
        over_budget = False
        if self._last_event is not None:
            t_last, prio_last = self._last_event
            if abs(ep.onset - t_last) < p.refractory_s and PRIORITY_RANK[prio] >= PRIORITY_RANK[prio_last]:
                return None
            # opened by the score with the onset of the event decided last, or earlier: the signals of that
            # moment still in the window opened it again, so it is that moment again (one moment, one event)
            if ep.forced is None and ep.onset <= t_last:
                return None
        # the nearest wake, before or after: a late event (a keyword) may come after later wakes
        gap = min((abs(ep.onset - w) for w in self._wakes), default=math.inf)
        if prio == "critical" and gap < p.critical_gap_s:
            notes.append(f"demoted from critical: {gap:.2f} s from another wake")
            prio = "normal"
        if prio == "high" and gap < p.wake_gap_s:
            notes.append(f"demoted from high: {gap:.2f} s from another wake")
            prio = "normal"
        if prio == "high" and p.max_high_per_min > 0:
            while self._high_wakes and self._high_wakes[0] <= ep.onset - p.budget_window_s:
                self._high_wakes.popleft()
            if len(self._high_wakes) >= p.max_high_per_min * p.budget_window_s / 60.0:
                notes.append(f"demoted from high: high-wake budget of {p.max_high_per_min:g}/min spent")
                prio = "normal"
        if prio in WAKES:
            while self._wakes and self._wakes[0] <= ep.onset - p.budget_window_s:
                self._wakes.popleft()
            allowed = p.max_wakes_per_min * p.budget_window_s / 60.0
            if len(self._wakes) >= allowed:
                notes.append(f"demoted from {prio}: wake budget of {p.max_wakes_per_min:g}/min spent")
                prio = "normal"
                over_budget = True
            else:
                self._wakes.insert(bisect_right(self._wakes, ep.onset), ep.onset)  # in media-time order
                if prio == "high" and p.max_high_per_min > 0:  # kept (and pruned) only while that budget is on
                    self._high_wakes.insert(bisect_right(self._high_wakes, ep.onset), ep.onset)
        if prio not in WAKES and not over_budget and self._too_little_evidence(ep):
            # not emitted (nor a wake demoted as a repeat of the previous one; one demoted by the budget
            # is, with its note).  Nothing was emitted, so there is no event to keep a second one from
            # duplicating: the hysteresis latch is let go and what comes next may open an episode of its own
            self._latched = False
            return None
        ranked = sorted(ep.signals, key=lambda k: (-ep.signals[k]["rarity"], k))
        evidence: dict[str, Any] = {
            "signals": ranked,
            "scores": {k: ep.signals[k] for k in ranked},
            "families": {k: round(v, 3) for k, v in sorted(ep.families.items(), key=lambda kv: -kv[1])},
            "decided_at": round(now, 3),
        }
        if ep.reasons:
            evidence["reasons"] = ep.reasons
        if notes:
            evidence["notes"] = notes
        if self._state:
            evidence["state_after"] = dict(self._state)
            evidence["state_before"] = {k: self._state_before.get(k, v) for k, v in self._state.items()}
        event = Event(t=round(ep.onset, 4), event_kind=kind, priority=prio,  # type: ignore[arg-type]
                      score=round(ep.score, 3), evidence=evidence)
        if self._last_event is None or ep.onset >= self._last_event[0]:
            self._last_event = (ep.onset, prio)
        de = DetectorEvent(event=event, decided_at=now)
        self.decided.append(de)
        return de

    def _too_little_evidence(self, ep: _Episode) -> bool:
        """Whether an annotation (below wake priority) lacks the evidence to be emitted: no HUD
        evidence and no reason (``annotate_need_hud``), or only a HUD step of a few pixels whose
        one reason is that step itself (``annotate_need_steps``)."""
        p = self.p
        if p.annotate_need_hud and ep.forced is None and ep.families.get("hud", 0.0) <= 0:
            return True
        return p.annotate_need_steps and set(ep.signals) <= TINY_HUD and all(r == HUD_NEWS for r in ep.reasons)

    def finish(self) -> list[DetectorEvent]:
        """End of stream: decide what the last inputs show, then an open episode now."""
        out: list[DetectorEvent] = []
        if self._unstepped or self._late:
            self._step(out)
            self._unstepped = False
        ep = self._episode
        self._episode = None
        if ep is not None:
            ev = self._decide(ep, self._now)
            if ev is not None:
                out.append(ev)
        return out


def _signal_evidence(best: dict[str, tuple[float, str, float, float]]) -> dict[str, dict[str, float]]:
    """Each signal's strongest ``(t, signal, rarity, value)`` as an event's evidence."""
    return {s: {"t": round(b[0], 3), "rarity": round(b[2], 3), "value": round(b[3], 5)} for s, b in best.items()}


def _rule_fires(rule: Rule, prev: float, value: float) -> bool:
    op, v = rule.op, rule.value
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


def _kind_of(families: dict[str, float]) -> str:
    """A readable event kind from the families that agreed (strongest first)."""
    names = [f for f, s in sorted(families.items(), key=lambda kv: -kv[1]) if s > 0]
    if not names:
        return "moment"
    if "hud" in names and "audio" in names:
        return "hud_change+sound"
    return {"hud": "hud_change", "audio": "sound", "scene": "scene_change", "motion": "motion",
            "speech": "speech"}.get(names[0], names[0])


class TriggerParamsOverride(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Stage params: settings here override the profile's ``trigger`` section."""

    overrides: dict[str, Any] = {}
    idle_s: float = 1.0  # an input this far behind the newest one no longer holds the others back


# inputs stamped with a time long past when they come (a transcript with the start of its speech
# segment, after the segment ended and Whisper ran; keywords read off a frame by full-frame OCR,
# up to a second later): waiting for them would hold every event back by seconds, so they never
# set the watermark and join when they come
LATE_STREAMS = frozenset({"transcript", "keywords"})


class MediaTimeOrder:
    """Releases inputs from several streams in media-time order (a watermark).

    Encoders run in different processes and at different speeds, so their outputs reach
    the detector out of order (at max speed, by hundreds of milliseconds).  Fusion must
    compare like with like, so inputs wait here until every active stream has reached
    their time.  Progress is kept per producer (the stage that sent the input: one stage's
    outputs come in its own order, whatever names they carry), and a producer that emits
    rarely reports it with heartbeats (:meth:`advance`); without them it would hold every
    event back until it fell ``idle_s`` behind the newest.  A producer that has fallen
    ``idle_s`` behind (it stopped) stops holding the others back, and a late input
    (:data:`LATE_STREAMS`) never does.
    """

    def __init__(self, idle_s: float = 1.0) -> None:
        self.idle_s = idle_s
        # (t, stream, arrival, ...): inputs of equal media time leave in stream-name order, not in the
        # order they happened to arrive from other processes, so a run is repeatable
        self._heap: list[tuple[float, str, int, dict[str, float], dict[str, str]]] = []
        self._last: dict[str, float] = {}
        self._n = 0
        self.newest = -math.inf

    def push(self, t: float, name: str, values: dict[str, float], text: dict[str, str],
             source: str | None = None) -> None:
        """An input ``name`` at media time ``t`` from producer ``source`` (default: ``name``)."""
        self._n += 1
        heapq.heappush(self._heap, (t, name, self._n, values, text))
        if name not in LATE_STREAMS:
            self.advance(source or name, t)

    def advance(self, source: str, t: float) -> None:
        """``source`` has nothing to send before ``t`` (it sent an input of that time, or a heartbeat)."""
        self._last[source] = max(self._last.get(source, -math.inf), t)
        self.newest = max(self.newest, t)

    @property
    def watermark(self) -> float:
        active = [t for t in self._last.values() if t >= self.newest - self.idle_s]
        return min(active) if active else self.newest

    def pop_ready(self, *, all_: bool = False) -> list[tuple[float, str, dict[str, float], dict[str, str]]]:
        mark = math.inf if all_ else self.watermark
        out = []
        while self._heap and self._heap[0][0] <= mark:
            t, name, _, values, text = heapq.heappop(self._heap)
            out.append((t, name, values, text))
        return out


@register_stage("trigger")
class TriggerStage(Stage):
    """Fuses ``Features`` (and ``Transcript``) inputs into ``Event`` messages on ``events``.

    Inputs are put in media-time order first (:class:`MediaTimeOrder`).  Two timings are
    recorded per event: ``decision_delay_ms``, media time the detector had seen (on every
    input) when it decided minus the event's ``t`` (the causal rule: at most
    ``max_delay_s`` plus a frame), and ``emit_lag_ms``, the newest input's media time
    then minus ``t`` (adds how far the slowest encoder lagged; the same at real-time speed,
    larger at max speed when queues build up).
    """

    Params = TriggerParamsOverride
    output_ports = ("events",)

    def __init__(self, ctx, params):  # type: ignore[no-untyped-def]
        super().__init__(ctx, params)
        self.detector: TriggerDetector | None = None
        self.order = MediaTimeOrder(params.idle_s)

    async def start(self) -> None:
        prof = profile_from_options(self.ctx.options)
        over = self.params.overrides  # type: ignore[attr-defined]
        if over:
            trig = msgspec.convert({**msgspec.to_builtins(prof.trigger), **over}, type(prof.trigger))
            prof = msgspec.structs.replace(prof, trigger=trig)
        self.detector = TriggerDetector(prof)

    async def _emit_all(self, events: list[DetectorEvent], parent: Envelope | None) -> None:
        for de in events:
            self.recorder.observe_extra("decision_delay_ms", max(0.0, de.delay_s) * 1000.0)
            self.recorder.observe_extra("emit_lag_ms", max(0.0, self.order.newest - de.event.t) * 1000.0)
            await self.emit("events", de.event, parent=parent, t_media=de.event.t)

    async def _feed(self, parent: Envelope | None, *, all_: bool = False) -> None:
        det = self.detector
        assert det is not None
        for t, name, values, text in self.order.pop_ready(all_=all_):
            await self._emit_all(det.observe(t, name, values, text), parent)

    async def process(self, msg: Envelope) -> None:
        if self.detector is None:
            return
        p = msg.payload
        if isinstance(p, Features):
            self.order.push(msg.t_media, p.name, p.values, p.text, source=msg.source)
        elif isinstance(p, Transcript):
            self.order.push(msg.t_media, "transcript", {}, {"text": p.text}, source=msg.source)
        else:
            return
        await self._feed(msg)

    async def on_progress(self, msg: Envelope) -> None:
        if self.detector is not None:
            self.order.advance(msg.source, msg.t_media)
            await self._feed(msg)

    async def flush(self) -> None:
        if self.detector is not None:
            await self._feed(None, all_=True)
            await self._emit_all(self.detector.finish(), None)
