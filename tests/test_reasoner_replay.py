"""The reasoner as a user runs it: ``gamecopilot replay`` on real Atari footage with rules advice,
and the command line's reasoner options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from copilot.commands import sample_clip, without_stages
from copilot.config import default_config_path, load_yaml, parse_pipeline

ROOT = Path(__file__).resolve().parent.parent


def gamecopilot(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "copilot", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)


@pytest.mark.slow
def test_rules_advice_follows_most_wakes_of_a_real_replay_within_150_ms(tmp_path: Path) -> None:
    advice, events, metrics = tmp_path / "a.jsonl", tmp_path / "e.jsonl", tmp_path / "m.json"
    proc = gamecopilot("replay", str(sample_clip()), "--speed", "1", "--reasoner", "rules", "--advice-out",
                       str(advice), "--events-out", str(events), "--metrics-out", str(metrics), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "reasoner: rules" in proc.stderr  # the choice, in one line
    lines = [json.loads(x) for x in advice.read_text().splitlines()]
    wakes = [e for e in map(json.loads, events.read_text().splitlines()) if e["priority"] in ("critical", "high")]
    report = json.loads(metrics.read_text())
    notes = report["stages"]["reasoner"]["notes"]
    assert notes["wakes"] == len(wakes) > 0  # the reasoner saw every wake the trigger wrote
    assert len(lines) >= 0.8 * len(wakes), (len(lines), len(wakes), notes)
    assert {a["t_event"] for a in lines} <= {e["t"] for e in wakes}
    for a in lines:
        assert a["backend"] == "rules" and a["text"].startswith("(rules)")
        assert set(a["structured"]) == {"game_state", "analysis", "advice"}
    final = [a["latency_ms"]["event_to_final"] for a in lines]
    assert float(np.percentile(final, 95)) <= 150.0, final
    assert report["realtime_factor"] >= 0.97


def test_reasoner_options_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    clip = str(sample_clip())
    out = tmp_path / "a.jsonl"
    out.write_text("kept\n")
    for args, needle in [
        (["--reasoner", "openai"], "--llm-url"),
        (["--reasoner", "transformers"], "--llm-model"),
        (["--reasoner", "none", "--advice-out", str(out)], "--reasoner none"),
    ]:
        proc = gamecopilot("replay", clip, "--until", "1", *args, "-q", timeout=60)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in proc.stderr
    assert out.read_text() == "kept\n"  # nothing written was lost


def test_leaving_the_reasoner_out_takes_what_only_it_fed() -> None:
    """(``--reasoner none`` leaves out HiCo too, whose context only the reasoner reads, and the
    timeline goes without ``--session``.)"""
    data = load_yaml(default_config_path())
    cfg = parse_pipeline(without_stages(data, ["reasoner", "hico", "timeline"]), "default")
    names = {s.name for s in cfg.stages}
    assert "reasoner" not in names and "advice" not in names  # the advice sink had no other input
    console = next(s for s in cfg.stages if s.name == "console")
    assert "advice" not in console.inputs and "events" in console.inputs
    assert "reason" not in cfg.groups()
