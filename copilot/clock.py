"""One clock interface for the whole pipeline.

Every timestamp in the system is monotonic nanoseconds taken from a :class:`Clock`.  Wall
clock time (``time.time()``) is never mixed in: it jumps with NTP and is meaningless across
stages.  Tests inject :class:`VirtualClock` so pacing and timeouts run instantly and
deterministically.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Source of monotonic time plus a way to wait until a point in it."""

    def now_ns(self) -> int: ...

    async def sleep_until_ns(self, deadline_ns: int) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic_ns`` (CLOCK_MONOTONIC, shared by all processes)."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)


class VirtualClock:
    """A clock that only moves when someone sleeps on it or advances it.

    ``sleep_until_ns`` jumps the clock straight to the deadline (after yielding once to the
    event loop), so a paced replay of ten minutes of media finishes in milliseconds while every
    stage still sees consistent timestamps.
    """

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def advance(self, delta_ns: int) -> None:
        if delta_ns < 0:
            raise ValueError("a clock never goes backwards")
        self._now += delta_ns

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        await asyncio.sleep(0)
        if deadline_ns > self._now:
            self._now = deadline_ns


SYSTEM_CLOCK = MonotonicClock()
