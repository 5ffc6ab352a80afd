"""The SAM3 engine (engines/sam3.py) on a tiny random checkpoint: it loads like a real one, its
post-processing equals the processor's, the vision backbone exported to ONNX matches torch
within 1e-4 at batch 1 and 3, and ``segment`` gives the same entities through both runtimes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Entity

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from engines.sam3 import (  # (after the importorskips)
    FPN_OUTPUTS,
    INPUT_NAME,
    SIDECAR_NAME,
    TINY_LABEL,
    entities_from_outputs,
    export_sam3_backbone,
    load_sam3,
    tiny_sam3,
)

PROMPTS = ["enemy", "player", "health bar"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sam3(tmp_path_factory.mktemp("sam3") / "tiny", seed=0)


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_sam3_backbone(str(tiny), tmp_path_factory.mktemp("sam3_onnx"))


def image(seed: int = 0, h: int = 120, w: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_the_tiny_checkpoint_loads_like_a_real_one_and_says_what_it_is(tiny: Path) -> None:
    from transformers import Sam3Model, Sam3Processor

    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["tiny_random"] == TINY_LABEL and cfg["vision_config"]["scale_factors"] == [4.0, 2.0, 1.0, 0.5]
    assert isinstance(Sam3Model.from_pretrained(tiny), Sam3Model)
    proc = Sam3Processor.from_pretrained(tiny)
    enc = proc(text=["health bar", "Zébra 42!"], return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape == (2, 32)
    tok = proc.tokenizer
    assert ids[0, 0] == tok.bos_token_id and tok.unk_token_id not in ids[1, 1:int(enc["attention_mask"][1].sum()) - 1]
    eng = load_sam3(str(tiny), runtime="torch", device="cpu")
    assert (eng.runtime, eng.device, eng.tiny, eng.label) == ("torch", "cpu", True, TINY_LABEL)
    assert eng.prep.size == (112, 112)


def test_segment_returns_entities_per_prompt_best_first(tiny: Path) -> None:
    eng = load_sam3(str(tiny), runtime="torch", device="cpu", threshold=0.0, max_entities=3)
    ents = eng.segment(image(), PROMPTS)
    assert eng.calls == 1
    assert all(isinstance(e, Entity) for e in ents)
    assert [e.label for e in ents] == [p for p in PROMPTS for _ in range(3)]  # 16 queries, 3 kept per prompt
    for p in PROMPTS:
        scores = [e.score for e in ents if e.label == p]
        assert scores == sorted(scores, reverse=True)
    for e in ents:
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
        assert 0 <= e.mask_area <= 1 and 0 < e.score < 1
    # the random model scores about 0.25 (two sigmoids of ~0): the default threshold keeps nothing
    strict = load_sam3(str(tiny), runtime="torch", device="cpu")
    assert strict.segment(image(), PROMPTS) == [] and strict.calls == 1
    assert eng.segment(image(), []) == [] and eng.calls == 1  # no prompts: no call
    assert set(eng.timings_ms) == {"backbone_ms", "heads_ms"}


def test_post_processing_equals_the_processors(tiny: Path) -> None:
    """The numpy post-processing keeps what Sam3Processor.post_process_instance_segmentation keeps
    (same scores and boxes; mask areas equal when its masks stay on the model's grid)."""
    import torch
    from transformers import Sam3Processor
    from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

    eng = load_sam3(str(tiny), runtime="torch", device="cpu")
    raw = eng.heads(eng.vision_features(eng.prep(image(3))), PROMPTS)
    grid = raw["masks"].shape[-2:]
    out = Sam3ImageSegmentationOutput(
        pred_logits=torch.from_numpy(raw["logits"]), presence_logits=torch.from_numpy(raw["presence"]),
        pred_boxes=torch.from_numpy(raw["boxes"]), pred_masks=torch.from_numpy(raw["masks"]))
    proc = Sam3Processor.from_pretrained(tiny)
    threshold = 0.25
    ref = proc.post_process_instance_segmentation(out, threshold=threshold, target_sizes=[tuple(grid)] * len(PROMPTS))
    ents = entities_from_outputs(PROMPTS, raw["logits"], raw["presence"], raw["boxes"], raw["masks"],
                                 threshold=threshold, max_entities=100)
    assert 0 < len(ents) < 16 * len(PROMPTS)  # the threshold keeps some and drops some
    for p, r in zip(PROMPTS, ref, strict=True):
        mine = [e for e in ents if e.label == p]
        order = np.argsort(-r["scores"].numpy(), kind="stable")
        assert [e.score for e in mine] == pytest.approx(r["scores"].numpy()[order].tolist(), abs=1e-5)
        boxes = r["boxes"].numpy()[order] / np.array([grid[1], grid[0], grid[1], grid[0]])
        assert np.allclose([e.box for e in mine], np.clip(boxes, 0, 1), atol=1e-5)
        areas = r["masks"].numpy()[order].reshape(len(order), -1).mean(axis=1)
        assert np.allclose([e.mask_area for e in mine], areas, atol=1e-5)


def test_the_backbone_onnx_matches_torch_within_1e_4_at_batch_1_and_3(tiny: Path, exported: dict[str, Path]) -> None:
    import torch

    from engines.onnx_export import OnnxRunner, parity_max_abs
    from engines.sam3 import _backbone_module, _load_torch_model

    side = json.loads(exported["sidecar"].read_text())
    assert side["outputs"] == list(FPN_OUTPUTS) and side["tiny_random"] == TINY_LABEL
    assert side["output_shapes"] == [[128, 32, 32], [128, 16, 16], [128, 8, 8]]
    model, _ = _load_torch_model(tiny)
    module = _backbone_module(model)
    runner = OnnxRunner(exported["onnx"])
    worst: dict[int, float] = {}
    for batch in (1, 3):
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(10 + batch))
        with torch.inference_mode():
            ref = [t.numpy() for t in module(x)]
        got = runner.run({INPUT_NAME: x.numpy()})
        assert [g.shape for g in got] == [r.shape for r in ref]
        worst[batch] = max(parity_max_abs(r, g) for r, g in zip(ref, got, strict=True))
    print(f"\nSAM3 backbone parity (max abs): batch 1 {worst[1]:.2e}, batch 3 {worst[3]:.2e}")
    assert worst[1] < 1e-4 and worst[3] < 1e-4
    # the engines' batch entry point (what benchmarks time): same rows through both runtimes
    pt = load_sam3(str(tiny), runtime="torch", device="cpu")
    ort = load_sam3(str(tiny), runtime="onnxruntime", device="cpu", onnx_dir=exported["onnx"].parent)
    frames = np.stack([image(s) for s in range(3)])
    a, b = pt.encode_backbone(frames), ort.encode_backbone(frames)
    assert a.shape == (3, 128 * (32 * 32 + 16 * 16 + 8 * 8)) and a.dtype == np.float32
    assert parity_max_abs(a, b) < 1e-4
    assert np.allclose(pt.encode_backbone(frames[1]), a[1:2], atol=1e-5)


def test_segment_gives_the_same_entities_through_both_runtimes(tiny: Path, exported: dict[str, Path]) -> None:
    kw: dict[str, Any] = {"device": "cpu", "threshold": 0.0, "max_entities": 4}
    pt = load_sam3(str(tiny), runtime="torch", **kw)
    ort = load_sam3(str(tiny), runtime="onnxruntime", onnx_dir=exported["onnx"].parent, **kw)
    assert ort.runtime == "onnxruntime" and ort.backbone_device == "cpu" and ort.fallback == ""
    assert not any(True for _ in ort.model.vision_encoder.parameters())  # the torch ViT is gone
    auto = load_sam3(str(tiny), onnx_dir=exported["onnx"].parent, **kw)
    assert auto.runtime == "onnxruntime"
    for seed in (1, 2):
        a, b = pt.segment(image(seed, 90, 200), PROMPTS), ort.segment(image(seed, 90, 200), PROMPTS)
        assert [e.label for e in a] == [e.label for e in b]
        assert np.allclose([e.score for e in a], [e.score for e in b], atol=1e-4)
        assert np.allclose([e.box for e in a], [e.box for e in b], atol=1e-4)
        assert np.allclose([e.mask_area for e in a], [e.mask_area for e in b], atol=1e-3)
    assert pt.calls == ort.calls == 2


def test_bad_input_is_one_line(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"^unknown SAM3 runtime 'tensorrt' \(auto, torch or onnxruntime\)$"):
        load_sam3(str(tiny), runtime="tensorrt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no onnx_dir: the (empty) default export folder
    with pytest.raises(UsageError, match=r"holds no SAM3 backbone export .*gamecopilot export sam3"):
        load_sam3(str(tiny), runtime="onnxruntime")
    with pytest.raises(UsageError, match=r"holds no SAM3 backbone export .*gamecopilot export sam3"):
        load_sam3(str(tiny), runtime="onnxruntime", onnx_dir=tmp_path)
    (tmp_path / SIDECAR_NAME).write_text('{"format": "other"}')
    (tmp_path / "sam3_backbone.onnx").write_bytes(b"")
    with pytest.raises(UsageError, match=r"format 'other', expected"):
        load_sam3(str(tiny), runtime="onnxruntime", onnx_dir=tmp_path)
    with pytest.raises(UsageError, match=r"is not a SAM3 checkpoint \(no config.json\)"):
        load_sam3(str(tmp_path), runtime="torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError, match=r"^model facebook/sam3 not found locally or in the Hugging Face cache"):
        load_sam3("facebook/sam3")
    with pytest.raises(UsageError, match=r"^unknown device 'tpu'"):
        load_sam3(str(tiny), device="tpu")


@pytest.mark.gpu
def test_cuda_gives_the_cpu_entities(tiny: Path, exported: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from engines.onnx_session import CUDA, available_providers

    kw: dict[str, Any] = {"threshold": 0.0, "max_entities": 16}
    img = image(4)

    def scores(ents: list[Entity]) -> dict[str, list[float]]:
        return {p: sorted(e.score for e in ents if e.label == p) for p in PROMPTS}

    want = scores(load_sam3(str(tiny), runtime="torch", device="cpu", **kw).segment(img, PROMPTS))
    gpu = load_sam3(str(tiny), runtime="torch", device="cuda", **kw)
    assert gpu.device == gpu.backbone_device == "cuda"
    got = scores(gpu.segment(img, PROMPTS))
    assert all(np.allclose(got[p], want[p], atol=1e-3) for p in PROMPTS)
    if CUDA in available_providers():
        ort = load_sam3(str(tiny), runtime="onnxruntime", onnx_dir=exported["onnx"].parent, device="cuda", **kw)
        assert ort.backbone_device == "cuda" and ort.device == "cuda" and ort.fallback == ""
        got = scores(ort.segment(img, PROMPTS))
        assert all(np.allclose(got[p], want[p], atol=1e-3) for p in PROMPTS)
