"""Rendering per-stage metrics: a rich table for people, the metrics JSON for tools."""

from __future__ import annotations

from typing import Any

from copilot.messages import StageMetrics


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def stage_timings(stages: list[StageMetrics]) -> list[str]:
    """One line per stage-specific timing (a detector's decision delay, Whisper per segment...)."""
    return [
        f"{m.stage} {name.removesuffix('_ms').replace('_', ' ')}: p50 {_fmt(x.p50)}, p95 {_fmt(x.p95)}, "
        f"p99 {_fmt(x.p99)} ms"
        for m in stages
        for name, x in sorted(m.extra_ms.items())
    ]


def metrics_table(stages: list[StageMetrics], title: str = "per-stage metrics") -> Any:
    """The per-stage table; its caption says what the columns mean and lists the stages' own timings."""
    from rich.table import Table

    caption = "\n".join(["fps: messages a second (a source: video frames a second, its audio not counted); "
                         "latency: capture to stage output, ms; queue: wait before the stage, ms; "
                         "busy: the stage's own work, ms", *stage_timings(stages)])
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    # a "note" column only when a stage ran slower than real time (otherwise it would be empty)
    any_slow = any(m.slow for m in stages)
    cols: tuple[str, ...] = ("stage", "msgs", "fps", "drops", "p50", "p95", "p99", "queue p50", "busy p50")
    cols += ("note",) if any_slow else ()
    for col in cols:
        table.add_column(col, justify="left" if col in ("stage", "note") else "right", no_wrap=col == "stage")
    for m in stages:
        lat = m.latency_ms
        drops = str(m.dropped)
        if m.dropped_by_reason:
            drops += " (" + ", ".join(f"{k} {v}" for k, v in sorted(m.dropped_by_reason.items()) if v) + ")"
        row = [
            m.stage,
            str(m.count),
            f"{m.fps:.1f}",
            drops,
            _fmt(lat.p50 if lat else None),
            _fmt(lat.p95 if lat else None),
            _fmt(lat.p99 if lat else None),
            _fmt(m.queue_age_ms.p50 if m.queue_age_ms else None),
            _fmt(m.busy_ms.p50 if m.busy_ms else None),
        ]
        if any_slow:
            row.append("[yellow]slow[/]" if m.slow else "")
        table.add_row(*row)
    return table
