"""The console stage: one line per event, after a one-time legend that explains them."""

from __future__ import annotations

import asyncio
import io

from copilot.messages import Event, Priority, Transcript
from copilot.stage import StageContext
from copilot.testing import make_envelope
from stages.console import LEGEND, ConsoleParams, ConsoleStage


def _printed(*payloads: Event | Transcript) -> list[str]:
    out = io.StringIO()
    stage = ConsoleStage(StageContext(name="console"), ConsoleParams(), out=out)

    async def feed() -> None:
        for p in payloads:
            await stage.process(make_envelope(p))

    asyncio.run(feed())
    return out.getvalue().splitlines()


def _event(t: float, priority: Priority = "high") -> Event:
    return Event(t=t, event_kind="hud_change+sound", priority=priority,
                 score=1.3, evidence={"signals": ["hud.steps", "audio.onset"]})


def test_the_legend_comes_once_before_the_first_event() -> None:
    lines = _printed(Transcript(text="hello", t_start=0.5, t_end=1.0), _event(11.03), _event(12.0, "low"))
    assert lines[0].endswith('" hello')  # a transcript line needs no legend
    assert lines[1] == LEGEND
    assert lines[2].startswith("00:11.03 !  high") and lines[3].startswith("00:12.00 .  low")
    assert lines.count(LEGEND) == 1
    for what in ("!! critical", "! high", ". low", "score", "hud_change", "+"):
        assert what in LEGEND


def test_no_legend_without_events() -> None:
    assert _printed(Transcript(text="hello", t_start=0.5, t_end=1.0)) == ['00:00.50 " hello']
