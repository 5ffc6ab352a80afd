"""One media-time merge for every stage that fuses several inputs (the trigger, later HiCo and
the reasoner).

Encoders run in different processes and at different speeds, so their outputs reach a fusing
stage out of order (at max speed, by hundreds of milliseconds).  Fusion must compare like with
like, so inputs wait in :class:`MediaTimeOrder` until every active producer has reached their
time (a watermark).

When is a producer gone rather than slow?  At real-time speed a producer that has fallen
``idle_s`` of media behind the newest has stalled, and waiting for it would make every event
late.  In a lossless run (``--speed max``: annotate, the tuner's caches) media time runs as fast
as the slowest encoder, so a producer seconds of media behind is merely slower, and releasing
the others without it would decide differently from one run to the next.  There a producer is
gone only when it has been silent for ``idle_s`` of wall-clock time (pass ``clock``).
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

from copilot.clock import Clock

T = TypeVar("T")


class MediaTimeOrder(Generic[T]):
    """Releases inputs from several producers in media-time order behind a watermark.

    Progress is kept per producer (the stage that sent the input: one stage's outputs come in
    its own order, whatever they carry), and a producer that emits rarely reports it with
    heartbeats (:meth:`advance`); without them it would hold everything back until it fell
    ``idle_s`` behind the newest.  A producer that has fallen ``idle_s`` behind (it stopped)
    stops holding the others back, and a ``late`` input (stamped with a time long past when it
    comes: a transcript, a keyword read by full-frame OCR) never holds them back: it joins when
    it comes.

    Inputs of equal media time leave in ``(stream, rank)`` order, not in the order they happened
    to arrive from other processes, so a run is repeatable.

    With ``clock`` (a lossless run) ``idle_s`` is wall-clock silence instead: a producer holds the
    others back however far behind in media time it is, for as long as it is still heard from.
    """

    def __init__(self, idle_s: float = 1.0, *, clock: Clock | None = None) -> None:
        self.idle_s = idle_s
        self.clock = clock
        self._heap: list[tuple[float, str, int, int, T]] = []
        self._last: dict[str, float] = {}
        self._heard_ns: dict[str, int] = {}  # (with a clock) when each producer was last heard from
        self._n = 0
        self.newest = -math.inf

    def push(self, t: float, stream: str, item: T, *, source: str | None = None, late: bool = False,
             rank: int = 0) -> None:
        """``item`` of ``stream`` at media time ``t`` from producer ``source`` (default: ``stream``)."""
        self._n += 1
        heapq.heappush(self._heap, (t, stream, rank, self._n, item))
        if not late:
            self.advance(source or stream, t)

    def advance(self, source: str, t: float) -> None:
        """``source`` has nothing to send before ``t`` (it sent an input of that time, or a heartbeat)."""
        self._last[source] = max(self._last.get(source, -math.inf), t)
        self.newest = max(self.newest, t)
        if self.clock is not None:
            self._heard_ns[source] = self.clock.now_ns()

    @property
    def watermark(self) -> float:
        if self.clock is None:
            active = [t for t in self._last.values() if t >= self.newest - self.idle_s]
        else:
            since_ns = self.clock.now_ns() - int(self.idle_s * 1e9)
            active = [t for src, t in self._last.items() if self._heard_ns[src] >= since_ns]
        return min(active) if active else self.newest

    def pop_ready(self, *, all_: bool = False) -> list[tuple[float, T]]:
        """``(t, item)`` of every input at or under the watermark (every input with ``all_``), in order."""
        mark = math.inf if all_ else self.watermark
        out: list[tuple[float, T]] = []
        while self._heap and self._heap[0][0] <= mark:
            t, _, _, _, item = heapq.heappop(self._heap)
            out.append((t, item))
        return out

    def __len__(self) -> int:
        return len(self._heap)
