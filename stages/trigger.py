"""The TriggerDetector: decides, causally, which moments are significant.

It reads the graded signals that the encoders feeding it declare (``Features``: motion,
thumbnail, HUD, audio, VAD; see :mod:`copilot.signals`), the discrete news they send as cues
and the parsed game state, and turns them into a few ``Event`` messages with evidence.

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
  (picture, HUD, audio loudness, timbre, speech: whatever the encoders declare).  A family's score is its best signal,
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
* **Cues open episodes with their own priority.**  Discrete news comes as typed
  :class:`copilot.messages.Cue` messages from the stages that understand it: a HUD area going
  back to an earlier content or a lives icon going away (:mod:`stages.hud_cues`), an OCR rule
  firing or a keyword read on screen (:mod:`stages.hud_ocr`), a keyword heard in speech
  (:mod:`stages.asr`).  The trigger knows no cue kind: a cue opens or joins an episode at its
  ``t`` with its suggested priority and its reason.  A late cue (a keyword heard in an ASR
  transcript, placed at the start of its speech segment) is an event of its own, decided when it
  arrives, with the evidence still kept from around its time.
* **Annotations need news.**  Below wake priority, an event needs evidence from an annotating
  family (one whose :class:`copilot.signals.Family` says ``annotates``: the HUD) or a cue that is
  not weak to be emitted at all (``annotate_need_hud``): on the training pool, three in four
  sound-only and two in three picture-only normal events were near no reward or death.  Nor is
  one whose only evidence is weak (a HUD step too small to count as ``hud.steps`` and the weak
  cue of that step: ``annotate_need_steps``); on the training pool four in five of those were
  near no reward or death.  A wake demoted by the budget is still emitted, with its note.
* **Game state in the evidence.**  The latest :class:`copilot.messages.GameState` (parsed HUD
  values) goes into every event as ``state_after`` / ``state_before``.
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

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from copilot.messages import PRIORITY_RANK, Cue, Envelope, Event, Features, GameState, Priority
from copilot.order import MediaTimeOrder
from copilot.profile import Profile, profile_from_options
from copilot.registry import register_stage
from copilot.signals import SignalTable, pipeline_signals
from copilot.stage import Stage, StageContext
from stages.trigger_settings import TriggerParams, trigger_settings

WAKES = ("critical", "high")
# kinds named after two families that agree (a HUD step with a sound is the typical reward or death);
# otherwise an event is named after its strongest family (Family.event_kind)
PAIR_KINDS = {frozenset({"hud", "audio"}): "hud_change+sound"}


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
    kind: str = "moment"
    signals: dict[str, dict[str, float]] = field(default_factory=dict)  # signal -> {rarity, value, t}
    families: dict[str, float] = field(default_factory=dict)
    # the cues that joined it, with their moments: told in the order of their moments (then text),
    # never in the order they happened to arrive over two links
    reasons: list[tuple[float, str]] = field(default_factory=list)
    forced: Priority | None = None  # a priority set by a cue
    strong_cues: int = 0  # cues that were not weak
    cues: set[str] = field(default_factory=set)  # the kinds of the cues that joined it (for the event scorer)


class DetectorEvent(msgspec.Struct, kw_only=True):
    """An event with the media time at which it was decided."""

    event: Event
    decided_at: float

    def record(self) -> dict[str, Any]:
        return self.event.record()

    @property
    def delay_s(self) -> float:
        return self.decided_at - self.event.t


class TriggerDetector:
    """Causal fusion of declared signals and cues into events (see the module docstring).

    ``signals`` is the table of the graded signals the detector scores (what the stages feeding
    it declare); a ``Features`` value that no stage declared is ignored.  Feed it with
    :meth:`observe` (graded signals), :meth:`observe_cue` and :meth:`observe_state` in (roughly)
    media-time order; each call returns the events decided by then.  :meth:`finish` flushes an
    open episode at end of stream.
    """

    def __init__(self, profile: Profile | None = None, signals: SignalTable | None = None,
                 settings: TriggerParams | None = None) -> None:
        self.profile = profile or Profile()
        self.p = settings or trigger_settings(self.profile.trigger, self.profile.name)
        self.table = signals if signals is not None else SignalTable()
        self._annotating = frozenset(f.name for f in self.table.families.values() if f.annotates)
        self._baselines: dict[str, RarityBaseline] = {}
        self._recent: deque[tuple[float, str, float, float]] = deque()  # (t, signal, rarity, value)
        self._episode: _Episode | None = None
        self._late: deque[_Episode] = deque()  # cues that came too late to join an episode
        self._latched = False
        self._last_event: tuple[float, str] | None = None  # (t, priority)
        self._wakes: deque[float] = deque()
        self._high_wakes: deque[float] = deque()  # media times of high wakes, for max_high_per_min
        self._now = -math.inf
        self._unstepped = False  # inputs came at media time _now that the fusion has not looked at yet
        self._t0: float | None = None
        self._state: GameState | None = None
        self._weights: dict[str, float] = {}
        self.decided: list[DetectorEvent] = []

    @property
    def started_at(self) -> float | None:
        """The media time of the first input (None before any): where the baselines start."""
        return self._t0

    # -- inputs ------------------------------------------------------------------------------
    def _arrive(self, t: float, out: list[DetectorEvent]) -> None:
        """An input of media time ``t``: decide everything before it first.

        The detector decides once it has seen every input of a media time: when the first input
        of a later time comes (or at :meth:`finish`).  So inputs of equal time (one frame's
        motion, HUD and thumbnail features) count the same whatever order they come in.
        """
        if self._t0 is None:
            self._t0 = t
        if t > self._now and self._unstepped:
            self._step(out)  # everything up to the previous media time is in
            self._unstepped = False
        self._now = max(self._now, t)
        self._unstepped = True

    def observe(self, t: float, name: str, values: dict[str, float]) -> list[DetectorEvent]:
        """One encoder's ``Features(name, values)`` at media time ``t``; returns events decided by now.

        A value ``age`` (seconds the measured moment lies before ``t``) or ``offset`` (after it)
        places the signal at its moment.
        """
        out: list[DetectorEvent] = []
        self._arrive(t, out)
        t_sig = t - float(values.get("age", 0.0)) + float(values.get("offset", 0.0))
        for key, value in values.items():
            sig = f"{name}.{key}"
            spec = self.table.get(sig)
            if spec is None:
                continue
            base = self._baselines.get(sig)
            if base is None:
                base = self._baselines[sig] = RarityBaseline(self.p.history_s, self.p.block_s, spec.floor,
                                                             self.p.rarity_margin)
            v = float(value)
            if spec.binary:
                v = 1.0 if v > spec.floor else 0.0
            r = base.update(t_sig, v)
            if r > 0:
                self._recent.append((t_sig, sig, r, float(value)))
        return out

    def observe_cue(self, t: float, cue: Cue) -> list[DetectorEvent]:
        """A cue that arrived with media time ``t`` (its moment is ``cue.t``)."""
        out: list[DetectorEvent] = []
        self._arrive(t, out)
        self._force(cue.t, cue.priority, cue.kind, cue.reason or cue.kind, weak=cue.weak)
        return out

    def observe_state(self, t: float, state: GameState) -> list[DetectorEvent]:
        """The parsed game state as of ``t``: every event decided from now on carries it."""
        out: list[DetectorEvent] = []
        self._arrive(t, out)
        self._state = state
        return out

    def _force(self, t: float, priority: Priority, kind: str, reason: str, *, weak: bool = False) -> None:
        if t < self._now - self.p.max_delay_s:
            # late (a keyword read by full-frame OCR or heard in a transcript, seconds after its
            # moment): an event of its own, decided at the next step with the evidence still kept
            # from around its time, never merged into the episode open now
            late = _Episode(onset=t, opened_at=t, forced=priority, kind=kind, reasons=[(t, reason)],
                            strong_cues=0 if weak else 1, cues={kind})
            fam, best = self._family_scores(t - self.p.window_s, until=t + self.p.coalesce_s)
            late.score, late.families = self.fused(fam), fam
            late.signals = _signal_evidence(best)
            self._late.append(late)
            return
        ep = self._episode
        if ep is None:
            ep = self._episode = _Episode(onset=t, opened_at=t)
        ep.reasons.append((t, reason))
        ep.cues.add(kind)
        ep.strong_cues += 0 if weak else 1
        if ep.forced is None or PRIORITY_RANK[priority] < PRIORITY_RANK[ep.forced]:
            ep.forced = priority
            ep.kind = kind

    # -- fusion --------------------------------------------------------------------------------
    def _family_scores(self, since: float, until: float = math.inf
                       ) -> tuple[dict[str, float], dict[str, tuple[float, str, float, float]]]:
        fam: dict[str, float] = {}
        best: dict[str, tuple[float, str, float, float]] = {}
        signals = self.table.signals
        for item in self._recent:
            ts, sig, r, _v = item
            if ts < since or ts > until:
                continue
            family = signals[sig].family.name
            s = min(1.0, r / self.p.rarity_ref) * self._weight(sig)
            if s > fam.get(family, 0.0):
                fam[family] = s
            if sig not in best or r > best[sig][2]:
                best[sig] = item
        return fam, best

    def _weight(self, sig: str) -> float:
        w = self._weights.get(sig)
        if w is None:
            family = self.table.signals[sig].family
            weights = self.profile.weights
            w = weights.get(sig, weights.get(family.name, family.default_weight))
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

    def _priority_of(self, score: float) -> Priority:
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
        prio: Priority = self._priority_of(ep.score)
        kind = self._kind_of(ep.families)
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
            evidence["reasons"] = [reason for _, reason in sorted(ep.reasons)]
        if ep.cues:
            evidence["cues"] = sorted(ep.cues)
        if notes:
            evidence["notes"] = notes
        state = self._state
        if state is not None and state.values:
            evidence["state_after"] = dict(state.values)
            evidence["state_before"] = {k: state.previous.get(k, v) for k, v in state.values.items()}
        event = Event(t=round(ep.onset, 4), event_kind=kind, priority=prio, score=round(ep.score, 3),
                      evidence=evidence)
        if self._last_event is None or ep.onset >= self._last_event[0]:
            self._last_event = (ep.onset, prio)
        de = DetectorEvent(event=event, decided_at=now)
        self.decided.append(de)
        return de

    def _too_little_evidence(self, ep: _Episode) -> bool:
        """Whether an annotation (below wake priority) lacks the evidence to be emitted: no evidence
        from an annotating family and no cue (``annotate_need_hud``), or only weak signals and weak
        cues (``annotate_need_steps``)."""
        p = self.p
        if p.annotate_need_hud and ep.forced is None and not any(ep.families.get(f, 0.0) > 0
                                                                  for f in self._annotating):
            return True
        signals = self.table.signals
        return p.annotate_need_steps and ep.strong_cues == 0 and all(signals[s].weak for s in ep.signals)

    def _kind_of(self, families: dict[str, float]) -> str:
        """A readable event kind from the families that agreed (strongest first)."""
        names = [f for f, s in sorted(families.items(), key=lambda kv: -kv[1]) if s > 0]
        if not names:
            return "moment"
        present = set(names)
        for pair, kind in PAIR_KINDS.items():
            if pair <= present:
                return kind
        fam = self.table.families.get(names[0])
        return (fam.event_kind if fam is not None else "") or names[0]

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


class TriggerStageParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Stage params: settings in ``overrides`` override the profile's ``trigger`` section."""

    overrides: dict[str, Any] = {}
    idle_s: float = 1.0  # an input this far behind the newest one no longer holds the others back
    # in a lossless run (--speed max) a producer holds the others back until silent this long (wall clock)
    lossless_idle_s: float = 10.0


# what the media-time merge holds: a graded-signal input, a cue or a game state
_Input = Features | Cue | GameState


@register_stage("trigger")
class TriggerStage(Stage[TriggerStageParams]):
    """Fuses ``Features``, ``Cue`` and ``GameState`` inputs into ``Event`` messages on ``events``.

    Its signal table is what the stages feeding it declare (``ctx.input_signals``, filled from the
    pipeline).  Inputs are put in media-time order first (:class:`copilot.order.MediaTimeOrder`);
    a late cue never holds the others back.  Two timings are recorded per event:
    ``decision_delay_ms``, media time the detector had seen (on every input) when it decided
    minus the event's ``t`` (the causal rule: at most ``max_delay_s`` plus a frame), and
    ``emit_lag_ms``, the newest input's media time then minus ``t`` (adds how far the slowest
    encoder lagged; the same at real-time speed, larger at max speed when queues build up).
    """

    Params = TriggerStageParams
    accepts = (Features, Cue, GameState)
    output_ports = ("events",)
    reads_signals: ClassVar[bool] = True  # the group fills ctx.input_signals from the pipeline

    def __init__(self, ctx: StageContext, params: TriggerStageParams) -> None:
        super().__init__(ctx, params)
        self.detector: TriggerDetector | None = None
        # a lossless run waits for a slow encoder however far behind it is, so it decides the same every time
        self.order: MediaTimeOrder[_Input] = (
            MediaTimeOrder(params.lossless_idle_s, clock=ctx.clock) if ctx.speed is None
            else MediaTimeOrder(params.idle_s))
        self._restarted = ctx.incarnation > 0  # its events are marked until its baselines have refilled

    @classmethod
    def check_profile(cls, prof: Profile, source: str, cfg: Any, name: str) -> None:
        """Validate the profile's ``trigger`` section and its weights against the signals declared
        upstream of this stage in ``cfg`` (before anything runs: one line, exit code 2)."""
        trigger_settings(prof.trigger, source)
        if cfg is not None:
            SignalTable(pipeline_signals(cfg, name)).check_weights(prof.weights, source)

    async def start(self) -> None:
        prof = profile_from_options(self.ctx.options)
        source = str(self.ctx.options.get("profile") or prof.name)
        settings = trigger_settings(prof.trigger, source, self.params.overrides)
        table = SignalTable(self.ctx.input_signals)
        table.check_weights(prof.weights, source)
        if not len(table):
            self.log.warning("no stage feeding %s declares a signal: only cues can make events", self.name)
        self.detector = TriggerDetector(prof, table, settings)
        if self._restarted:
            # a restarted detector has lost its baselines: rarity is judged against what it has seen since,
            # so real deaths can come out low or normal until history_s of media has refilled them
            self.log.warning("%s restarted: its baselines refill over %.0f s of media; events decided until then"
                             " carry a warming_up note", self.name, settings.history_s)

    def _warming_up(self, de: DetectorEvent) -> None:
        """After a restart, mark events decided before the baselines held ``history_s`` of media."""
        det = self.detector
        if not self._restarted or det is None or det.started_at is None:
            return
        seen = de.decided_at - det.started_at
        if seen < det.p.history_s:
            de.event.evidence.setdefault("notes", []).append(
                f"warming_up: the detector restarted; its baselines hold {seen:.1f} s of the {det.p.history_s:g} s"
                " they judge by, so this priority may be too low")
            self.recorder.note("warming_up")

    async def _emit_all(self, events: list[DetectorEvent], parent: Envelope | None) -> None:
        for de in events:
            self._warming_up(de)
            self.recorder.observe_extra("decision_delay_ms", max(0.0, de.delay_s) * 1000.0)
            self.recorder.observe_extra("emit_lag_ms", max(0.0, self.order.newest - de.event.t) * 1000.0)
            await self.emit("events", de.event, parent=parent, t_media=de.event.t)

    async def _feed(self, parent: Envelope | None, *, all_: bool = False) -> None:
        det = self.detector
        assert det is not None
        for t, item in self.order.pop_ready(all_=all_):
            if isinstance(item, Features):
                decided = det.observe(t, item.name, item.values)
            elif isinstance(item, Cue):
                decided = det.observe_cue(t, item)
            else:
                decided = det.observe_state(t, item)
            await self._emit_all(decided, parent)

    async def process(self, msg: Envelope) -> None:
        if self.detector is None:
            return
        p = msg.payload
        if isinstance(p, Features):
            self.order.push(msg.t_media, p.name, p, source=msg.source, rank=1)
        elif isinstance(p, Cue):
            # a producer's cues of one media time go before its graded signals of that time
            self.order.push(msg.t_media, msg.source, p, source=msg.source, late=p.late, rank=0)
        elif isinstance(p, GameState):
            self.order.push(msg.t_media, msg.source, p, source=msg.source, rank=1)
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
