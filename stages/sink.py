"""JSONL sink: writes every message it receives as one JSON line (arrays left out).

Lines are flushed as they are written, so an interrupted run keeps everything written so
far.  The output path comes from ``path`` or from a run option named by ``option`` (for
example ``events_out``, which ``--events-out`` sets); with neither, the sink only counts.

Events leave the TriggerDetector in the order they were decided, which is not quite the
order of their ``t``: an event is decided up to 0.5 s after its moment, so a short one can
be decided before a longer one that began earlier.  With ``reorder_s`` set, the sink holds
events (only events) in an :class:`EventReorder` and writes each once no event still to come
can be earlier, so an events file reads as a timeline.  An event is held until a later one
was decided ``reorder_s`` after its ``t``, or for ``reorder_s`` of wall time (media time
moves at least that fast at real-time speed or faster), and at the end of the run; a run
killed outright loses at most that much.  Events decided long after their moment (a keyword
heard in a transcript) can still come out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from typing import IO, Annotated, Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import Advice, Envelope, Event, Features
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext


class JsonlSinkParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str | None = None
    option: str | None = None
    kinds: list[str] = []  # only these message kinds; empty means all
    # > 0: hold events up to this long (s) to write them in order of t (see above)
    reorder_s: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.0


def message_record(msg: Envelope) -> dict[str, Any] | None:
    """A JSON-ready record of a message, or None for one not written (partial advice: the final
    message of a wake has all of it).  Events and advice follow their JSONL formats."""
    p = msg.payload
    if isinstance(p, Event):
        return p.record()
    if isinstance(p, Advice):
        return p.record() if p.final else None
    body = msgspec.to_builtins(p, enc_hook=_drop_arrays)
    if isinstance(p, Features):
        body.pop("vector", None)
    body.pop("type", None)
    head = {"t": msg.t_media, "kind": msg.kind, "source": msg.source}
    if head.keys() & body.keys():  # a payload with its own t or kind (a Cue): nested under its kind
        return {**head, msg.kind: body}
    return {**head, **body}


def _drop_arrays(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return None
    raise NotImplementedError(type(obj).__name__)


class EventReorder:
    """Events in, the same events out in order of ``t``, each as soon as that order is sure.

    The detector decides every event at most ``hold_s`` after its ``t`` (its ``decided_at``,
    in the evidence), and decides them in media-time order.  So once an event decided at
    ``d`` has come, none still to come has a ``t`` before ``d - hold_s``: everything held up
    to there can go.  Bounded by what ``hold_s`` of events can hold.
    """

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._heap: list[tuple[float, int, int, bytes]] = []  # (t, arrival number, arrival ns, line)
        self._n = 0
        self._decided = -math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, event: Event, line: bytes, now_ns: int) -> list[bytes]:
        """Hold ``event`` (written as ``line``); returns the lines now sure of their place."""
        decided = event.evidence.get("decided_at")
        if not isinstance(decided, (int, float)) or isinstance(decided, bool):
            decided = event.t  # from another producer: taken as decided at once
        self._decided = max(self._decided, float(decided))
        self._n += 1
        heapq.heappush(self._heap, (event.t, self._n, now_ns, line))
        return self._release(self._decided - self.hold_s)

    def expire(self, now_ns: int) -> list[bytes]:
        """Lines of events held ``hold_s`` of wall time or longer, and of all earlier ones."""
        waited = [t for t, _, arrived, _ in self._heap if now_ns - arrived >= self.hold_s * 1e9]
        return self._release(max(waited)) if waited else []

    def drain(self) -> list[bytes]:
        return self._release(math.inf)

    def _release(self, upto: float) -> list[bytes]:
        out = []
        while self._heap and self._heap[0][0] <= upto:
            out.append(heapq.heappop(self._heap)[3])
        return out


@register_stage("jsonl_sink")
class JsonlSinkStage(Stage[JsonlSinkParams]):
    Params = JsonlSinkParams

    def __init__(self, ctx: StageContext, params: JsonlSinkParams) -> None:
        super().__init__(ctx, params)
        self._fh: IO[bytes] | None = None
        self._enc = msgspec.json.Encoder()
        self._reorder = EventReorder(params.reorder_s) if params.reorder_s > 0 else None
        self._expiry: asyncio.Task[None] | None = None
        self._expiry_failed: UsageError | None = None  # a write in the expiry task failed

    def output_path(self) -> str | None:
        p = self.params
        if p.path:
            return p.path
        if p.option:
            value = self.ctx.options.get(p.option)
            return str(value) if value else None
        return None

    async def start(self) -> None:
        path = self.output_path()
        if path:
            try:
                self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise UsageError(f"{self.name}: cannot write {path} ({exc.strerror})") from None
            if self._reorder is not None:
                self._expiry = asyncio.create_task(self._expire_held(), name=f"{self.name}-reorder")

    async def process(self, msg: Envelope) -> None:
        kinds = self.params.kinds
        if kinds and msg.kind not in kinds:
            return
        if self._expiry_failed is not None:
            raise self._expiry_failed
        if self._fh is None:
            return
        record = message_record(msg)
        if record is None:
            return
        line = self._enc.encode(record) + b"\n"
        if self._reorder is not None and isinstance(msg.payload, Event):
            self._write(self._reorder.push(msg.payload, line, self.clock.now_ns()))
        else:
            self._write([line])

    async def _expire_held(self) -> None:
        """Writes events held ``reorder_s`` on the stage clock, so a quiet stretch holds none back.

        It looks a few times per ``reorder_s`` of wall time (a plain sleep: on a virtual clock,
        sleeping on the clock would move it), and ages are read on the stage clock.
        """
        assert self._reorder is not None
        while True:
            await asyncio.sleep(self._reorder.hold_s / 4)
            try:
                self._write(self._reorder.expire(self.clock.now_ns()))
            except UsageError as exc:  # reported by the next process(), where the runner sees it
                self._expiry_failed = exc
                return

    def _write(self, lines: list[bytes]) -> None:
        if not lines or self._fh is None:
            return
        try:
            self._fh.write(b"".join(lines))
        except OSError as exc:
            # a full disk is not cured by a restart: the run ends with one line, and the
            # lines written so far stay in the file
            raise UsageError(f"{self.name}: cannot write {self.output_path()} ({exc.strerror or exc})") from None

    async def flush(self) -> None:
        if self._reorder is not None:
            self._write(self._reorder.drain())

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
            self._expiry = None
        if self._fh is not None:
            if self._reorder is not None:
                with contextlib.suppress(UsageError):  # a stop before the end: keep what is held
                    self._write(self._reorder.drain())
            self._fh.close()
            self._fh = None
