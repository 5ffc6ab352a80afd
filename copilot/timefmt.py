"""Time arguments: seconds (``12.5``) or ``MM:SS`` / ``HH:MM:SS`` (``03:12``)."""

from __future__ import annotations

import math


def parse_time(text: str) -> float:
    """Seconds from ``text``; ``ValueError`` with a readable message if it is not a time."""
    raw = text.strip()
    try:
        if ":" in raw:
            parts = [float(p) for p in raw.split(":")]
            # minutes and seconds after the first field are under 60 (1:70 is a typo, not 2:10)
            if len(parts) > 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or any(p >= 60 for p in parts[1:]):
                raise ValueError
            seconds = 0.0
            for p in parts:
                seconds = seconds * 60 + p
            return seconds
        value = float(raw)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use seconds or MM:SS)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"not a time: {text!r} (must be zero or more)")
    return value


def format_time(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m):02d}:{s:05.2f}"
