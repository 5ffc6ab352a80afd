"""How often the SAM3 cascade really runs: the segment stage inside the default pipeline, over the
bundled clip, with the events the cheap tier finds on it.

The default pipeline (its cheap encoders, the trigger, the scorer as configured) runs in this process
at full speed, lossless, over ``bench/data/breakout_s0.mp4`` with a ``segment`` stage added at its
default settings (keyframes of high-priority events, at most 12 a minute, no periodic frames) on a
tiny random SAM3.  The stage counts the frames it saw and the frames it sent to SAM3; their ratio is
the fraction the issue bounds (at most 5%).  The reasoner, overlay and timeline are left out: they
do not change which frames are chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLIP = Path(__file__).resolve().parent / "data" / "breakout_s0.mp4"
PROMPTS = ["player", "ball", "brick"]


def cascade_config(sam3_model: str) -> dict[str, Any]:
    """The default pipeline, without its slow consumers, plus a segment stage on ``events``."""
    from copilot.commands import without_stages
    from copilot.config import default_config_path, load_yaml

    data = without_stages(load_yaml(default_config_path()), ["reasoner", "overlay", "timeline", "hico", "console"])
    data["links"]["entities"] = {"policy": "ordered", "hwm": 32}
    data["stages"].append({"name": "segment", "kind": "segment", "params": {"model": sam3_model, "prompts": PROMPTS},
                           "inputs": ["frames", "events"], "outputs": {"entities": "entities"},
                           "placement": {"group": "vision"}})
    return data


def cascade_fraction(work: Path, clip: Path = CLIP) -> dict[str, Any]:
    """``{"clip", "frames", "segmented", "fraction", "events_seen", "events_chosen", "rate_cap", ...}``."""
    from copilot.testing import run_pipeline
    from engines.sam3 import tiny_sam3

    model = tiny_sam3(work / "sam3-cascade", seed=0)
    res = run_pipeline(cascade_config(str(model)), input_file=clip, speed=None, timeout_s=600.0)
    notes = res.stages["segment"].notes
    frames, done = int(notes.get("frames_seen", 0)), int(notes.get("frames_segmented", 0))
    return {
        "clip": clip.name,
        "frames": frames,
        "segmented": done,
        "fraction": round(done / frames, 5) if frames else 0.0,
        "events_seen": int(notes.get("events_seen", 0)),
        "events_chosen": int(notes.get("events_chosen", 0)),
        "rate_cap": int(notes.get("rate_cap", 0)),
        "settings": "default (min_priority high, max_per_min 12, every_s 0)",
        "tiny_random": True,
    }
