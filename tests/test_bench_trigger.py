"""``gamecopilot bench trigger``: the cheap trigger and the cascade on the same recordings, in the JSON
contract later checks read, with the curve and its plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("ale_py")


@pytest.mark.slow
def test_bench_trigger_reports_both_variants_per_game_with_curves(tmp_path: Path) -> None:
    out, png = tmp_path / "bt.json", tmp_path / "curve.png"
    proc = subprocess.run([sys.executable, "-m", "copilot", "bench", "trigger", "--games", "Breakout", "SpaceInvaders",
                           "--seconds", "20", "--data", str(tmp_path / "data"), "--plot", str(png), "-o", str(out),
                           "--json", "-q"], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["games"] == ["Breakout_s0", "SpaceInvaders_s0"]
    for name in ("cheap", "cascade"):
        v = result["variants"][name]
        assert set(v) >= {"critical_recall", "wake_precision_pooled", "wakes_per_min", "false_wakes_per_min",
                          "per_game", "curve"}
        assert set(v["per_game"]) == {"Breakout_s0", "SpaceInvaders_s0"}
        assert len(v["curve"]) >= 5 and all(set(p) == {"threshold", "wakes_per_min", "critical_recall"}
                                            for p in v["curve"])
        assert 0.0 <= v["wake_precision_pooled"] <= 1.0
    # the cheap variant is the pipeline's own output: its figures equal `eval` on those events
    cheap = result["variants"]["cheap"]["per_game"]["Breakout_s0"]
    data = tmp_path / "data"
    events = next(data.glob("breakout_s0.*.events.jsonl"))
    ev = subprocess.run([sys.executable, "-m", "copilot", "eval", str(events), str(data / "breakout_s0.truth.jsonl"),
                         "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    scored = json.loads(ev.stdout)
    assert cheap["critical_recall"] == scored["critical"]["recall"]
    assert cheap["wakes_per_min"] == pytest.approx(scored["wakes_per_min"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the cascade with the session's signature, beside it
    assert set(result["cascade_adapted"]) >= {"critical_recall", "wake_precision_pooled", "false_wakes_per_min"}
    # how the model ranks these candidates, with the counts it was judged on
    sep = result["separation"]
    from copilot.scoring import load_events

    n_events = sum(1 for f in data.glob("*_s0.*.events.jsonl") for e in load_events(f) if e.get("kind") != "meta")
    assert sum(sep["candidates"].values()) == n_events
    assert sum(sep["cheap_wakes"].values()) <= sum(sep["candidates"].values())


def test_separation_ranks_the_candidates_by_their_truth_labels() -> None:
    """p_death that orders deaths first gives 1.0; p_none that puts the noise wakes last gives 0.0;
    annotations (not wakes) do not count among the wakes."""
    import numpy as np

    from bench.train_scorer import Recording
    from bench.trigger import separation

    events = [{"t": float(i), "priority": p} for i, p in enumerate(["critical", "high", "high", "normal", "high"])]
    y = np.array([0, 1, 2, 2, 0])
    rec = Recording("Pong", 0, "random", Path("pong_s0.truth.jsonl"), events, np.zeros((5, 1)), y)
    probs = np.array([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.2, 0.1, 0.7], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    probs[2, 2] = 0.01  # the one noise wake ranked least noisy of all wakes
    sep = separation([rec], [probs])
    assert sep["auc_death"] == 1.0
    assert sep["auc_death_vs_reward"] == 1.0
    assert sep["auc_noise_among_cheap_wakes"] == 0.0
    assert sep["candidates"] == {"death": 2, "reward": 1, "none": 2}
    assert sep["cheap_wakes"] == {"death": 2, "reward": 1, "none": 1}
