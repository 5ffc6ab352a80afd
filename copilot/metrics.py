"""Per-stage metrics: typed records, computed off the hot path.

On the hot path a stage only appends a few integers to preallocated numpy rings
(:meth:`StageRecorder.observe`).  Percentiles are computed when a snapshot is taken, once a
second by the group runner and once at the end of a run.  Totals use reservoir sampling so
p50/p95/p99 cover the whole run in bounded memory.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import msgspec
import numpy as np

from copilot.messages import LatencySummary, StageMetrics

RESERVOIR = 8192


class _Reservoir:
    """Uniform sample of up to ``size`` values seen so far (Algorithm R), in ms."""

    def __init__(self, size: int = RESERVOIR, seed: int = 0) -> None:
        self.values = np.empty(size, dtype=np.float64)
        self.seen = 0
        self._rng = random.Random(seed)

    def add(self, value_ms: float) -> None:
        size = len(self.values)
        if self.seen < size:
            self.values[self.seen] = value_ms
        else:
            j = self._rng.randrange(self.seen + 1)
            if j < size:
                self.values[j] = value_ms
        self.seen += 1

    def summary(self) -> LatencySummary | None:
        n = min(self.seen, len(self.values))
        if n == 0:
            return None
        p50, p95, p99 = np.percentile(self.values[:n], (50, 95, 99))
        return LatencySummary(p50=round(float(p50), 3), p95=round(float(p95), 3), p99=round(float(p99), 3))


class StageRecorder:
    """Counts and latencies for one stage.

    ``latency`` is capture-to-output: from the message's ``t_capture_ns`` (taken at the source)
    to the moment this stage finished with it.  ``queue_age`` is how long the message waited
    between the previous stage's output and this stage picking it up.  ``busy`` is this
    stage's own processing time.
    """

    def __init__(self, stage: str, start_ns: int) -> None:
        self.stage = stage
        self.start_ns = start_ns
        self.count = 0
        # video frames emitted (sources): a source's fps is its video frame rate, which the count of
        # all its messages (audio chunks, truth events too) would overstate
        self.video_frames = 0
        self.dropped: Counter[str] = Counter()  # counted by the stage itself (late, overflow, ...)
        self.link_dropped: Counter[str] = Counter()  # lost on its links, refreshed by the runner
        self.latency = _Reservoir()
        self.queue_age = _Reservoir(seed=1)
        self.busy = _Reservoir(seed=2)
        self.busy_ns_total = 0
        self.media_first: float | None = None
        self.media_last: float | None = None
        self.slow = False
        self.media_extent_s: float | None = None  # a source sets the media span it covered
        self.extra: dict[str, _Reservoir] = {}
        self.notes: Counter[str] = Counter()  # stage-specific counts (events decided while warming up ...)
        self.first_out_ns: int | None = None  # the wall span of its outputs: how fast a source went
        self.last_out_ns: int | None = None

    def observe_extra(self, name: str, value_ms: float) -> None:
        """Record a stage-specific timing (reported as ``extra_ms.NAME`` with p50/p95/p99)."""
        res = self.extra.get(name)
        if res is None:
            res = self.extra[name] = _Reservoir(seed=3 + len(self.extra))
        res.add(value_ms)

    def observe(
        self, *, t_capture_ns: int, t_in_ns: int, t_out_ns: int, t_prev_out_ns: int | None,
        t_media: float | None = None,
    ) -> None:
        self.count += 1
        self.latency.add((t_out_ns - t_capture_ns) / 1e6)
        self.busy.add((t_out_ns - t_in_ns) / 1e6)
        self.busy_ns_total += t_out_ns - t_in_ns
        if self.first_out_ns is None:
            self.first_out_ns = t_out_ns
        self.last_out_ns = t_out_ns
        if t_prev_out_ns is not None:
            self.queue_age.add(max(0, t_in_ns - t_prev_out_ns) / 1e6)
        if t_media is not None:
            if self.media_first is None:
                self.media_first = t_media
            self.media_last = t_media

    def media_span(self) -> float:
        if self.media_extent_s is not None:
            return self.media_extent_s
        if self.media_first is None or self.media_last is None:
            return 0.0
        return self.media_last - self.media_first

    def note(self, name: str, n: int = 1) -> None:
        """Count a stage-specific occurrence (reported as ``notes.NAME``)."""
        self.notes[name] += n

    def drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[reason] += n

    def snapshot(self, now_ns: int) -> StageMetrics:
        elapsed = max(1e-9, (now_ns - self.start_ns) / 1e9)
        dropped = self.dropped + self.link_dropped
        return StageMetrics(
            stage=self.stage,
            count=self.count,
            fps=round((self.video_frames or self.count) / elapsed, 2),
            dropped=sum(dropped.values()),
            dropped_by_reason=dict(dropped),
            latency_ms=self.latency.summary(),
            queue_age_ms=self.queue_age.summary(),
            busy_ms=self.busy.summary(),
            media_s=round(self.media_span(), 4),
            slow=self.slow,
            extra_ms={k: v for k, v in ((k, r.summary()) for k, r in self.extra.items()) if v is not None},
            notes=dict(self.notes),
            video_frames=self.video_frames,
            active_s=round((self.last_out_ns - self.first_out_ns) / 1e9, 4)
            if self.first_out_ns is not None and self.last_out_ns is not None else 0.0,
        )


def metrics_json(
    stages: Iterable[StageMetrics], *, wall_s: float, media_s: float, extra: dict | None = None  # type: ignore[type-arg]
) -> dict:  # type: ignore[type-arg]
    """The metrics JSON of DESIGN.md (extra keys allowed, the contract keys always present)."""
    out: dict = {  # type: ignore[type-arg]
        "wall_s": round(wall_s, 4),
        "media_s": round(media_s, 4),
        "realtime_factor": round(media_s / wall_s, 3) if wall_s > 0 else 0.0,
        "stages": {},
    }
    for m in stages:
        lat = m.latency_ms or LatencySummary(p50=0.0, p95=0.0, p99=0.0)
        entry = {
            "count": m.count,
            "fps": m.fps,
            "dropped": m.dropped,
            "latency_ms": msgspec.to_builtins(lat),
            "dropped_by_reason": m.dropped_by_reason,
        }
        if m.video_frames:  # a source: its fps is video frames a second, counted here
            entry["video_frames"] = m.video_frames
            if m.active_s > 0:  # media it released over the wall time it took, whatever ran after it
                entry["realtime_factor"] = round(m.media_s / m.active_s, 3)
        if m.device:  # where the stage really runs (set by a stage whose engine chose or fell back)
            entry["device"] = m.device
        if m.queue_age_ms is not None:
            entry["queue_age_ms"] = msgspec.to_builtins(m.queue_age_ms)
        if m.busy_ms is not None:
            entry["busy_ms"] = msgspec.to_builtins(m.busy_ms)
        for name, summary in m.extra_ms.items():
            entry[name] = msgspec.to_builtins(summary)
        if m.notes:  # stage-specific counts (the reasoner's wakes, merges, drops, failures)
            entry["notes"] = dict(m.notes)
        out["stages"][m.stage] = entry
    if extra:
        out.update(extra)
    return out
