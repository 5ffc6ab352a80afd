"""JSONL sink: writes every message it receives as one JSON line (arrays left out).

Lines are flushed as they are written, so an interrupted run keeps everything written so
far.  The output path comes from ``path`` or from a run option named by ``option`` (for
example ``events_out``, which ``--events-out`` sets); with neither, the sink only counts.
"""

from __future__ import annotations

from typing import IO, Any

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import Envelope, Event, Features
from copilot.registry import register_stage
from copilot.stage import Stage


class JsonlSinkParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str | None = None
    option: str | None = None
    kinds: list[str] = []  # only these message kinds; empty means all


def message_record(msg: Envelope) -> dict[str, Any]:
    """A JSON-ready record of a message.  Events follow DESIGN.md's events JSONL format."""
    p = msg.payload
    if isinstance(p, Event):
        return {"t": p.t, "kind": p.event_kind, "priority": p.priority, "score": p.score, "evidence": p.evidence}
    body = msgspec.to_builtins(p, enc_hook=_drop_arrays)
    if isinstance(p, Features):
        body.pop("vector", None)
    body.pop("type", None)
    return {"t": round(msg.t_media, 4), "kind": msg.kind, "source": msg.source, **body}


def _drop_arrays(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return None
    raise NotImplementedError(type(obj).__name__)


@register_stage("jsonl_sink")
class JsonlSinkStage(Stage):
    Params = JsonlSinkParams

    def __init__(self, ctx, params):  # type: ignore[no-untyped-def]
        super().__init__(ctx, params)
        self._fh: IO[bytes] | None = None
        self._enc = msgspec.json.Encoder()

    def output_path(self) -> str | None:
        p: JsonlSinkParams = self.params  # type: ignore[assignment]
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

    async def process(self, msg: Envelope) -> None:
        kinds = self.params.kinds  # type: ignore[attr-defined]
        if kinds and msg.kind not in kinds:
            return
        if self._fh is not None:
            try:
                self._fh.write(self._enc.encode(message_record(msg)) + b"\n")
            except OSError as exc:
                # a full disk is not cured by a restart: the run ends with one line, and the
                # lines written so far stay in the file
                raise UsageError(f"{self.name}: cannot write {self.output_path()} ({exc.strerror or exc})") from None

    async def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
