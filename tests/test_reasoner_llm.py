"""A real model end to end on the CPU: llama.cpp's OpenAI-compatible server with SmolLM2-135M (the
``llm-cpu`` extra), driven through the openai backend by ``gamecopilot replay`` on real Atari footage
at real time.  Perception must keep real time while the model answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("llama_cpp", reason="the llm-cpu extra (llama-cpp-python[server]) is not installed")
pytest.importorskip("aiohttp")


@pytest.mark.slow
def test_a_real_small_model_advises_most_wakes_while_perception_keeps_real_time(tmp_path: Path) -> None:
    from engines.llm_server import LlamaServer, smollm2_gguf

    # a real recording with a player's pace of wakes (about 6 a minute).  The bundled Breakout clip wakes
    # the model 23 times a minute, more than this 135M model on one niced CPU thread answers (about one
    # answer per 3-5 s here): there most wakes are merged or dropped as stale, counted (see README.md)
    made = subprocess.run([sys.executable, "-m", "copilot", "dataset", "atari", "--game", "SpaceInvaders", "--seconds",
                           "60", "-o", str(tmp_path), "-q"], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          check=False)
    assert made.returncode == 0, made.stderr
    clip = made.stdout.splitlines()[0]
    advice, events, metrics = tmp_path / "a.jsonl", tmp_path / "e.jsonl", tmp_path / "m.json"
    with LlamaServer(smollm2_gguf(), port=0, threads=1, log_path=tmp_path / "server.log") as server:
        proc = subprocess.run(
            [sys.executable, "-m", "copilot", "replay", clip, "--speed", "1", "--reasoner", "openai",
             "--llm-url", server.url, "--advice-out", str(advice), "--events-out", str(events), "--metrics-out",
             str(metrics), "-q"],
            capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "reasoner: openai" in proc.stderr
    report = json.loads(metrics.read_text())
    notes = report["stages"]["reasoner"]["notes"]
    lines = [json.loads(x) for x in advice.read_text().splitlines()]
    wakes = notes["wakes"]
    n_events = sum(json.loads(x)["priority"] in ("critical", "high") for x in events.read_text().splitlines())
    first = [a["latency_ms"]["event_to_first"] for a in lines]
    final = [a["latency_ms"]["event_to_final"] for a in lines]
    print(f"\nSmolLM2-135M via llama.cpp: {len(lines)} advice for {wakes} wakes; notes {notes}; "
          f"event_to_first p50 {np.percentile(first, 50):.0f} p95 {np.percentile(first, 95):.0f} ms, "
          f"event_to_final p50 {np.percentile(final, 50):.0f} p95 {np.percentile(final, 95):.0f} ms; "
          f"replay realtime {report['stages']['replay']['realtime_factor']}, "
          f"emit lag p99 {report['stages']['trigger']['emit_lag_ms']['p99']} ms")
    assert wakes == n_events > 0
    for a in lines:  # every line written is schema-valid advice from the model
        assert a["backend"] == "openai" and set(a["structured"]) == {"game_state", "analysis", "advice"}
        assert all(isinstance(v, str) and v.strip() for v in a["structured"].values())
        assert a["saw_images"] is False  # a text-only model: told so, not shown frames
    # at least 70% of the wakes.  Each answer takes this CPU model seconds, so a wake that comes while one is
    # being answered waits for it; the reasoner keeps its prompts short enough (PromptBudget) that it is
    # still fresh after.  Measured here: 4 of 4 (and 2 of 4 in CI before the budget, with HiCo's context
    # on every prompt: first token p50 5.2 s instead of 2.5 s)
    assert len(lines) >= 0.7 * wakes
    # the rest are accounted for: merged into another wake, dropped as stale or by the caps, or failed
    unadvised = wakes - len(lines)
    counted = sum(notes.get(k, 0) for k in ("merged", "stale", "stale_advice", "wake_capped", "queue_full", "failed",
                                             "invalid", "preempted", "unfinished_at_end"))
    assert counted >= unadvised
    # perception kept real time: the replay released its media at its pace (the run's own wall_s also
    # holds the reasoner finishing its last answer after the end of the input)
    assert report["stages"]["replay"]["realtime_factor"] >= 0.97
    assert report["stages"]["trigger"]["emit_lag_ms"]["p99"] <= 1000.0
