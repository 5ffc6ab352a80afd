"""When the reasoner answers: its own bounded, coalescing queue of wakes, on a clock.

The trigger emits events at the pace of the game; a model answers in seconds.  The reasoner
stage takes every event into this schedule as it arrives (``offer`` returns at once, so the
trigger's emit never waits on a model) and asks it what to start (``take``) and what to cancel
(``to_preempt``).  The rules, each counted under its name in the stage's metrics notes:

* ``below_priority``: events under ``min_priority`` (default high) wake nothing;
* ``merged``: an event within ``coalesce_s`` of media time of a pending or running wake joins it
  (the wake keeps the higher priority and names the merged events) instead of making its own;
* ``wake_capped``: more than ``max_wakes_per_min`` starts in the last minute; the event is dropped;
* ``queue_full``: more than ``max_pending`` waiting: the lowest-priority, oldest one goes;
* ``preempted``: all ``max_in_flight`` slots busy and a wake of higher priority waiting: the
  lowest running one is cancelled (its partial advice is abandoned) and the new one starts;
* ``stale``: a wake still waiting ``stale_s`` after its event was emitted is dropped, and so is
  advice that would arrive later than that (:meth:`WakeSchedule.is_stale`).

Questions (``Wake.question``) are never below priority, capped or merged: a player asked.
Pure logic over :class:`~copilot.clock.Clock` time, so the tests drive it on a virtual clock.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from copilot.messages import PRIORITIES, Envelope, Priority

RANK = {p: i for i, p in enumerate(PRIORITIES)}  # 0 is the most urgent


@dataclass
class Wake:
    """One reason to ask the model: an event (or a question), and the events merged into it."""

    id: int
    t: float  # media time of the event
    priority: Priority
    kind: str
    emitted_ns: int  # when the trigger emitted the event (monotonic ns): latencies count from here
    event: dict[str, Any] = field(default_factory=dict)  # the event's record
    envelope: Envelope | None = None
    question: str = ""
    merged: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return RANK[self.priority]

    def absorb(self, other: Wake) -> None:
        """``other`` joins this wake: the more urgent of the two events leads it."""
        if other.rank < self.rank:
            self.merged.append(self.event)
            self.t, self.priority, self.kind, self.event = other.t, other.priority, other.kind, other.event
            self.envelope = other.envelope
            self.emitted_ns = min(self.emitted_ns, other.emitted_ns)
        else:
            self.merged.append(other.event)
        self.merged.extend(other.merged)


@dataclass(frozen=True)
class ScheduleSettings:
    min_priority: Priority = "high"
    coalesce_s: float = 2.0
    stale_s: float = 10.0
    max_in_flight: int = 1
    max_pending: int = 8
    max_wakes_per_min: float = 12.0


class WakeSchedule:
    """Which wakes run, and when (see the module docstring)."""

    def __init__(self, settings: ScheduleSettings) -> None:
        self.settings = settings
        self.pending: list[Wake] = []
        self.running: list[Wake] = []
        self.counts: Counter[str] = Counter()
        self._starts: deque[int] = deque()  # start times (ns) of event wakes in the last minute

    # -- arrivals -----------------------------------------------------------------------------
    def offer(self, wake: Wake, now_ns: int) -> str:
        """Take a wake in; what became of it (``queued``, ``merged``, ``below_priority``, ...)."""
        s = self.settings
        if not wake.question:
            self.counts["events"] += 1
            if wake.rank > RANK[s.min_priority]:
                self.counts["below_priority"] += 1
                return "below_priority"
            self.counts["wakes"] += 1
            for other in [*self.pending, *self.running]:
                if other.question or abs(other.t - wake.t) > s.coalesce_s:
                    continue
                if other in self.running and wake.rank < other.rank:
                    continue  # more urgent than what is running: it may preempt it instead
                other.absorb(wake)
                self.counts["merged"] += 1
                return "merged"
        else:
            self.counts["questions"] += 1
        self.pending.append(wake)
        if len(self.pending) > s.max_pending:
            victim = max(self.pending, key=lambda w: (not w.question, w.rank, -w.emitted_ns))
            self.pending.remove(victim)
            self.counts["queue_full"] += 1
            if victim is wake:
                return "queue_full"
        return "queued"

    # -- departures ---------------------------------------------------------------------------
    def take(self, now_ns: int) -> Wake | None:
        """The next wake to start, if a slot is free: the most urgent, then the newest (advice about the
        latest moment is worth most to a player, and an older wake waiting behind a busy model goes
        stale first: it is dropped, counted, rather than answered too late)."""
        self._drop_stale(now_ns)
        if len(self.running) >= self.settings.max_in_flight:
            return None
        while self.pending:
            wake = min(self.pending, key=lambda w: (not w.question, w.rank, -w.emitted_ns))
            self.pending.remove(wake)
            if not wake.question and not self._budget_allows(now_ns):
                self.counts["wake_capped"] += 1
                continue
            self.running.append(wake)
            self.counts["started"] += 1
            return wake
        return None

    def to_preempt(self) -> Wake | None:
        """A running wake to cancel for a more urgent waiting one (all slots busy), or None."""
        if not self.pending or len(self.running) < self.settings.max_in_flight:
            return None
        best = min(self.pending, key=lambda w: (not w.question, w.rank))
        worst = max(self.running, key=lambda w: (w.rank, -w.emitted_ns))
        if best.rank < worst.rank and not worst.question:
            return worst
        return None

    def finished(self, wake: Wake, outcome: str) -> None:
        """A running wake ended: ``advised``, ``preempted``, ``failed``, ``invalid``, ``stale`` ..."""
        if wake in self.running:
            self.running.remove(wake)
        self.counts[outcome] += 1

    def is_stale(self, wake: Wake, now_ns: int) -> bool:
        return not wake.question and now_ns - wake.emitted_ns > self.settings.stale_s * 1e9

    def _drop_stale(self, now_ns: int) -> None:
        for wake in [w for w in self.pending if self.is_stale(w, now_ns)]:
            self.pending.remove(wake)
            self.counts["stale"] += 1

    def _budget_allows(self, now_ns: int) -> bool:
        while self._starts and now_ns - self._starts[0] >= 60e9:
            self._starts.popleft()
        if len(self._starts) >= self.settings.max_wakes_per_min:
            return False
        self._starts.append(now_ns)
        return True
