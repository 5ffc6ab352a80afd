"""configs/engines.yaml end to end: SigLIP2, VideoMAE and SAM3 (tiny random models) in the default
pipeline over the bundled clip, lossless: the semantic signal and embeddings reach the trigger and
HiCo, VideoMAE emits clips, SAM3 runs only on the chosen keyframes and its entities reach the timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from copilot.config import config_dir, load_yaml
from copilot.testing import run_pipeline
from stages.timeline_db import TimelineReader

pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leak_check")]
CLIP = Path(__file__).resolve().parent.parent / "bench" / "data" / "breakout_s0.mp4"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from engines.sam3 import tiny_sam3
    from engines.siglip import tiny_siglip2
    from engines.videomae import tiny_videomae

    root = tmp_path_factory.mktemp("tiny")
    return {"semantic": str(tiny_siglip2(root / "siglip2")), "clip_embed": str(tiny_videomae(root / "videomae")),
            "segment": str(tiny_sam3(root / "sam3"))}


def test_the_engines_pipeline_runs_every_engine_where_its_config_says(tiny_models: dict[str, str],
                                                                      tmp_path: Path) -> None:
    data: dict[str, Any] = load_yaml(config_dir() / "engines.yaml")
    data["stages"] = [s for s in data["stages"] if s["kind"] not in ("overlay", "console")]
    session = tmp_path / "session"
    session.mkdir()
    overrides = {name: {"model": path} for name, path in tiny_models.items()}
    overrides["segment"]["threshold"] = 0.0  # a random model's scores are low: keep its best guesses
    overrides["replay"] = {"until": 20.0}
    res = run_pipeline(data, input_file=CLIP, speed=None, overrides=overrides, timeout_s=600.0,
                       options={"session": str(session)})
    sem, clips, seg = (res.stages[n] for n in ("semantic", "clip_embed", "segment"))
    assert sem.notes["encoded"] == pytest.approx(20 / 0.5, abs=1)  # one frame every 0.5 s of media
    assert clips.count > 0 and seg.notes["frames_seen"] >= 20 * 29
    assert res.stages["hico"].count > 0  # HiCo compressed the SigLIP2 embeddings (source: siglip)
    chosen, done = seg.notes.get("events_chosen", 0), seg.notes.get("frames_segmented", 0)
    assert 1 <= done <= chosen  # only keyframes of high-priority events (the rate cap may skip some)
    assert done / seg.notes["frames_seen"] <= 0.05
    with TimelineReader(session) as r:
        entities = [f for f in r.all_facts() if f.kind == "entities"]
    assert len(entities) == done and all(f.data["reason"].startswith("event:") for f in entities)
