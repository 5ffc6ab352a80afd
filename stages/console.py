"""Console stage: prints events, advice and transcripts as they happen, one line each.

Advice streams: on a terminal its line grows in place as the model writes, then the final line
replaces it; to a file or a pipe only the final advice is written.

This is the terminal overlay of ``replay``/``live``/``demo``.  It writes to stdout (the
live metrics table lives on stderr) and stays silent when the run option ``console`` is
false, which the CLI sets for ``--quiet``, ``--json`` and ``annotate``.

An event line is terse (``00:11.03 !  high     hud_change+sound    1.30  (hud.steps, ...)``), so
before the first one the stage prints :data:`LEGEND` once: what the marks, the score and the kind
mean, for someone who has not read the design.
"""

from __future__ import annotations

import sys
from typing import TextIO

import msgspec

from copilot.messages import PRIORITY_RANK, Advice, Envelope, Event, Transcript
from copilot.registry import register_stage
from copilot.stage import Stage, StageContext
from copilot.timefmt import format_time

_STYLE = {"critical": "!!", "high": "! ", "normal": "  ", "low": ". "}
LEGEND = (
    "legend: media time, mark (!! critical, ! high, . low, none for normal), priority, kind (what changed: "
    "hud_change a HUD area, sound, scene_change the picture, hud_revert a HUD area went back; a+b: both "
    "agreed), score (the fused significance of the signals; by default 0.55 and up is normal, 1.15 high, "
    "2.5 critical; rules and keywords set their own priority), then the signals, rarest first"
)


class ConsoleParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    min_priority: str = "low"  # print events of this priority and above




def format_message(msg: Envelope) -> str | None:
    """One human line for an event, advice or transcript; None for anything else."""
    p = msg.payload
    if isinstance(p, Event):
        signals = p.evidence.get("signals") if isinstance(p.evidence, dict) else None
        why = f"  ({', '.join(map(str, signals))})" if isinstance(signals, (list, tuple)) and signals else ""
        mark = _STYLE.get(p.priority, "  ")
        return f"{format_time(p.t)} {mark} {p.priority:<8} {p.event_kind:<18} {p.score:5.2f}{why}"
    if isinstance(p, Advice):
        about = f"Q: {p.question} " if p.question else f"{p.event_kind} "
        more = "" if p.final else " ..."
        return f"{format_time(p.t_event)} >> {about}[{p.backend}] {p.text}{more}"
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
        self._max_rank = PRIORITY_RANK.get(params.min_priority, 3)
        self._legend_shown = False
        self._partial_open = False  # a partial advice line is on screen, to be overwritten
        try:
            self._tty = self._out.isatty()
        except (AttributeError, ValueError):
            self._tty = False

    async def process(self, msg: Envelope) -> None:
        if not self._enabled:
            return
        p = msg.payload
        if isinstance(p, Event) and PRIORITY_RANK.get(p.priority, 3) > self._max_rank:
            return
        line = format_message(msg)
        if line is None:
            return
        if isinstance(p, Advice) and not p.final:
            # advice as it streams: on a terminal the line grows in place; elsewhere only the final one
            if self._tty:
                self._out.write("\r\x1b[2K" + line[:200])
                self._out.flush()
                self._partial_open = True
            return
        if self._partial_open:
            self._out.write("\r\x1b[2K")
            self._partial_open = False
        if isinstance(p, Event) and not self._legend_shown:
            self._legend_shown = True
            print(LEGEND, file=self._out)
        print(line, file=self._out, flush=True)
