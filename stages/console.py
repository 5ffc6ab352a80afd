"""Console stage: prints events, advice and transcripts as they happen, one line each.

This is the terminal overlay of ``replay``/``live``/``demo``.  It writes to stdout (the
live metrics table lives on stderr) and stays silent when the run option ``console`` is
false, which the CLI sets for ``--quiet``, ``--json`` and ``annotate``.
"""

from __future__ import annotations

import sys
from typing import TextIO

import msgspec

from copilot.messages import Advice, Envelope, Event, Transcript
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from copilot.timefmt import format_time

_STYLE = {"critical": "!!", "high": "! ", "normal": "  ", "low": ". "}


class ConsoleParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    min_priority: str = "low"  # print events of this priority and above


_RANK = {"critical": 0, "high": 1, "normal": 2, "low": 3}


def format_message(msg: Envelope) -> str | None:
    """One human line for an event, advice or transcript; None for anything else."""
    p = msg.payload
    if isinstance(p, Event):
        signals = p.evidence.get("signals") if isinstance(p.evidence, dict) else None
        why = f"  ({', '.join(map(str, signals))})" if isinstance(signals, (list, tuple)) and signals else ""
        mark = _STYLE.get(p.priority, "  ")
        return f"{format_time(p.t)} {mark} {p.priority:<8} {p.event_kind:<18} {p.score:5.2f}{why}"
    if isinstance(p, Advice):
        return f"{format_time(p.t_event)} >> [{p.backend}] {p.text}"
    if isinstance(p, Transcript):
        return f"{format_time(p.t_start)} \" {p.text}"
    return None


@register_stage("console")
class ConsoleStage(Stage[ConsoleParams]):
    Params = ConsoleParams

    def __init__(self, ctx: StageContext, params: ConsoleParams, out: TextIO | None = None) -> None:
        super().__init__(ctx, params)
        self._out = out or sys.stdout
        self._enabled = bool(ctx.options.get("console", True))
        self._max_rank = _RANK.get(params.min_priority, 3)

    async def process(self, msg: Envelope) -> None:
        if not self._enabled:
            return
        p = msg.payload
        if isinstance(p, Event) and _RANK.get(p.priority, 3) > self._max_rank:
            return
        line = format_message(msg)
        if line is not None:
            print(line, file=self._out, flush=True)
