"""The semantic stage: SigLIP2 zero-shot prompts become a graded signal and cues, image embeddings go out.

The rising-edge logic and the profile section are tested alone; the stage with a counting engine
(its probabilities set by the test) and, end to end, with a tiny random SigLIP2 built from a config
whose prompt and image pair is made to pass its threshold: the cue reaches the TriggerDetector and
the event it fires carries the prompt in its evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Cue, Event, Features
from copilot.profile import parse_profile
from copilot.testing import make_envelopes, run_stage, video_frame
from stages import semantic
from stages.semantic import PromptState, SemanticPrompt, SemanticStage, profile_prompts


def test_prompt_fires_on_rising_edge_and_rearms_below_hysteresis() -> None:
    st = PromptState(SemanticPrompt(text="a game over screen", threshold=0.6))
    fired = [st.update(p, 0.1) for p in (0.2, 0.61, 0.9, 0.55, 0.7, 0.45, 0.65)]
    # 0.61 fires; 0.9 and 0.7 stay quiet (0.55 is within the hysteresis); 0.45 re-arms; 0.65 fires again
    assert fired == [False, True, False, False, False, False, True]


def test_profile_prompts_are_validated_with_the_key_named() -> None:
    prof = parse_profile({"semantic": {"prompts": [{"text": "a boss health bar", "kind": "boss", "priority": "high"}]}})
    assert profile_prompts(prof) == [SemanticPrompt(text="a boss health bar", kind="boss", priority="high")]
    with pytest.raises(UsageError, match=r"semantic: unknown key 'promts'"):
        profile_prompts(parse_profile({"semantic": {"promts": []}}), "p.yaml")
    with pytest.raises(UsageError, match=r"semantic.prompts"):
        profile_prompts(parse_profile({"semantic": {"prompts": [{"text": "x", "threshold": 2}]}}), "p.yaml")
    with pytest.raises(UsageError, match=r"semantic.prompts"):
        profile_prompts(parse_profile({"semantic": {"prompts": [{"text": "x", "priority": "urgent"}]}}), "p.yaml")


class ScriptedEngine:
    """Stands in for SigLIP2: each encoded image's probability for prompt i comes from a script
    (the image's mean pixel value picks the row), so the test knows which frames must cue."""

    runtime, device, model_id, fallback, dim = "torch", "cpu", "scripted", "", 4

    def __init__(self, table: dict[int, list[float]]) -> None:
        self.table = table
        self.calls = 0

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.eye(len(texts), self.dim, dtype=np.float32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(images), self.dim), np.float32)
        out[:, 0] = [float(im.mean()) for im in images]
        return out

    def zero_shot(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return np.array([self.table[round(float(v))] for v in image_emb[:, 0]], np.float32)


def test_stage_samples_every_s_and_cues_once_per_crossing(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine({0: [0.1, 0.2], 1: [0.8, 0.2], 2: [0.85, 0.9]})
    monkeypatch.setattr(semantic, "load_engine", lambda p: engine)
    # 40 frames at 10 fps; every_s 0.5 encodes frames 0, 5, 10 ...: values 0 0 1 1 2 2 0 0 (one per sample)
    values = [0, 0, 1, 1, 2, 2, 0, 0]
    frames = [video_frame(8, 8, values[i // 5]) for i in range(40)]
    envs = make_envelopes(frames, step_s=0.1)
    prompts = [{"text": "a game over screen", "kind": "game_over", "priority": "critical", "threshold": 0.6},
               {"text": "a boss health bar", "kind": "boss", "priority": "high", "threshold": 0.5}]
    res = run_stage(SemanticStage, envs, params={"prompts": prompts, "every_s": 0.5}, speed=None)
    assert engine.calls == 8
    cues = res["cues"]
    assert all(isinstance(c, Cue) for c in cues)
    assert [(c.kind, c.priority, round(c.t, 2)) for c in cues] == [("game_over", "critical", 1.0),
                                                                   ("boss", "high", 2.0)]
    assert cues[0].evidence["prompt"] == "a game over screen" and '"a game over screen"' in cues[0].reason
    sig = res["signals"]
    assert len(sig) == 8 and all(isinstance(f, Features) and f.name == "semantic" for f in sig)
    assert sig[0].values["match"] == 0.0 and sig[4].values["match"] == pytest.approx(0.4, abs=1e-3)
    emb = res["embeddings"]
    assert len(emb) == 8 and emb[0].name == "siglip" and emb[0].vector.shape == (4,)
    assert res.metrics.notes["cues"] == 2 and res.metrics.notes["runtime_torch_cpu"] == 1


def test_no_prompts_gives_embeddings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine({0: []})
    monkeypatch.setattr(semantic, "load_engine", lambda p: engine)
    res = run_stage(SemanticStage, make_envelopes([video_frame(8, 8, 0)] * 3, step_s=0.5), speed=None)
    assert res["cues"] == [] and res["signals"] == [] and len(res["embeddings"]) == 3


def test_the_profile_prompts_win_over_the_pipeline_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = ScriptedEngine({0: [0.9]})
    monkeypatch.setattr(semantic, "load_engine", lambda p: engine)
    prof = tmp_path / "game.yaml"
    prof.write_text("name: game\nsemantic:\n  prompts: [{text: a boss health bar, kind: boss}]\n")
    envs = make_envelopes([video_frame(8, 8, 0)] * 2, step_s=0.5)
    params = {"prompts": [{"text": "a game over screen", "kind": "game_over"}]}
    res = run_stage(SemanticStage, envs, params=params, options={"profile": str(prof)}, speed=None)
    assert [c.kind for c in res["cues"]] == ["boss"]
    res = run_stage(SemanticStage, envs, params=params, speed=None)
    assert [c.kind for c in res["cues"]] == ["game_over"]


def _tiny_siglip(tmp_path: Path) -> Path:
    siglip = pytest.importorskip("engines.siglip")
    pytest.importorskip("transformers")
    return Path(siglip.tiny_siglip2(tmp_path / "tiny-siglip2", seed=0))


def test_tiny_siglip2_prompt_above_threshold_fires_an_event_with_the_prompt(tmp_path: Path) -> None:
    """End to end with a real (tiny, random) SigLIP2: the threshold is set between the prompt's
    probability on the frame that should match and on the one that should not, from the model's
    own embeddings, so the test says which frame fires, and the trigger makes it an event."""
    from engines.siglip import load_siglip

    model = _tiny_siglip(tmp_path)
    eng = load_siglip(str(model), runtime="torch")
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2))
    prompt = "a game over screen"
    t_emb = eng.encode_texts([prompt])
    pa, pb = (float(eng.zero_shot(eng.encode_images(im[None]), t_emb)[0, 0]) for im in (a, b))
    assert pa != pb
    hi, lo = (a, b) if pa > pb else (b, a)
    thr = (max(pa, pb) + min(pa, pb)) / 2
    frames = [video_frame(48, 64, 0) for _ in range(30)]
    for i, f in enumerate(frames):
        f.image = (lo if i < 15 else hi).copy()
    params = {"model": str(model), "runtime": "torch", "every_s": 0.5,
              "prompts": [{"text": prompt, "kind": "game_over", "priority": "critical", "threshold": thr}],
              "hysteresis": 0.0}
    res = run_stage(SemanticStage, make_envelopes(frames, step_s=0.1), params=params, speed=None)
    cues = res["cues"]
    assert len(cues) == 1 and cues[0].t == pytest.approx(1.5) and cues[0].evidence["prompt"] == prompt
    # the cue, with the semantic signal beside it, through the TriggerDetector
    trig_in = sorted([*res.envelopes("cues"), *res.envelopes("signals")], key=lambda e: e.t_media)
    bare = tmp_path / "bare.yaml"  # (the default profile weighs families this two-stage pipeline lacks)
    bare.write_text("name: bare\n")
    out = run_stage("trigger", trig_in, input_signals=[("semantic", s) for s in SemanticStage.signals], speed=None,
                    options={"profile": str(bare)})
    events: list[Any] = [e for e in out["events"] if isinstance(e, Event)]
    assert len(events) == 1
    ev = events[0]
    assert ev.event_kind == "game_over" and ev.priority == "critical"
    assert any(prompt in r for r in ev.evidence["reasons"]) and ev.evidence["cues"] == ["game_over"]


def test_an_auto_device_follows_the_placement_and_a_named_one_wins() -> None:
    from stages._placed import placed_device

    assert placed_device("auto", None) == "auto"  # nothing placed: the engine decides
    assert placed_device("auto", "cuda:0") == "cuda" and placed_device("auto", "cuda") == "cuda"
    assert placed_device("auto", "cpu") == "cpu"
    assert placed_device("cpu", "cuda:0") == "cpu" and placed_device("cuda", "cpu") == "cuda"


def test_the_engine_it_loaded_is_reported_where_it_really_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine({0: []})
    seen: list[str] = []
    monkeypatch.setattr(semantic, "load_engine", lambda p: seen.append(p.device) or engine)
    res = run_stage(SemanticStage, make_envelopes([video_frame(8, 8, 0)], step_s=0.5), speed=None)
    assert seen == ["auto"] and res.stage.device_actual == "cpu"
