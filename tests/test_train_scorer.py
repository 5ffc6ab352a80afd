"""``gamecopilot train scorer`` end to end on a few short Atari recordings: recordings made, the real
pipeline run over each, candidates labelled, cross-validated by game, a model and its card written,
and the model then used by ``annotate --scorer PATH``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("sklearn")
pytest.importorskip("ale_py")


@pytest.mark.slow
def test_train_scorer_writes_a_model_and_card_that_annotate_uses(tmp_path: Path) -> None:
    games = ["Breakout", "SpaceInvaders", "DemonAttack", "Boxing", "Asterix"]  # Atari-57 training games
    model = tmp_path / "m.npz"
    proc = subprocess.run([sys.executable, "-m", "copilot", "train", "scorer", "--games", *games, "--seconds", "20",
                           "--sticky", "none", "--folds", "5", "--data", str(tmp_path / "data"), "-o", str(model),
                           "-q"], capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "cross-validated by game" in proc.stdout
    from engines.event_scorer import SIGNAL_VERSION, feature_names
    from engines.event_scorer_model import EventScorerModel

    m = EventScorerModel.load(model, signal_version=SIGNAL_VERSION, available=set(feature_names()))
    card = m.card
    assert card["games"] == sorted(games) and len(card["recordings"]) == 5
    assert set(m.thresholds) == {"death", "drop", "event", "gap_s"} and 0 < m.thresholds["death"] < 1
    cv = card["cross_validated"]
    assert set(cv) >= {"cheap", "cascade", "calibration", "auc_death"}
    assert sum(b["n"] for b in cv["calibration"]) == card["candidates"]
    text = model.with_suffix(".card.md").read_text()
    assert "cross-validated by game" in text and "Breakout" in text
    # annotate with it: every event carries the scorer's verdict
    clip = tmp_path / "data" / "breakout_s0.mp4"
    events = tmp_path / "e.jsonl"
    ann = subprocess.run([sys.executable, "-m", "copilot", "annotate", str(clip), "-o", str(events), "--scorer",
                          str(model), "-q"], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert ann.returncode == 0, ann.stderr
    lines = [json.loads(x) for x in events.read_text().splitlines() if '"meta"' not in x]
    assert lines and all(e["evidence"]["scorer"]["model"] == "m" for e in lines)
