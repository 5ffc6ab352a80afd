"""The VideoMAE engine (engines/videomae.py) on a tiny random checkpoint: numpy preprocessing,
unit clip embeddings with the checkpoint's pooling, the ONNX export within 1e-4 of torch at
batch 1 and 3, the runtime choice, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from copilot.errors import UsageError
from engines.videomae import Preprocess, resize_frames

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from engines.videomae import (  # (after the importorskips)
    INPUT_NAME,
    SIDECAR_NAME,
    TINY_LABEL,
    export_videomae,
    load_videomae,
    tiny_videomae,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_videomae(tmp_path_factory.mktemp("videomae") / "tiny", seed=0)


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_videomae(str(tiny), tmp_path_factory.mktemp("videomae_onnx"))


def clips(n: int, seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, h, w, 3), dtype=np.uint8)


# -- numpy preprocessing ----------------------------------------------------------------------------
def test_resize_keeps_flat_images_flat_and_averages_blocks() -> None:
    flat = np.full((2, 40, 60, 3), 77, np.uint8)
    assert np.allclose(resize_frames(flat, 10, 15), 77.0)
    img = np.zeros((4, 4, 1), np.uint8)
    img[:2, :2] = 200  # one 2x2 block bright
    out = resize_frames(img, 2, 2)
    assert out.shape == (2, 2, 1) and out[0, 0, 0] == 200 and out[1, 1, 0] == 0
    ramp = np.tile(np.arange(8, dtype=np.float32)[None, :, None], (3, 1, 1))  # enlarging a ramp stays a ramp
    up = resize_frames(ramp, 3, 16)[0, 2:-2, 0]
    assert np.allclose(np.diff(up), 0.5)


def test_preprocess_resizes_the_shortest_edge_then_centre_crops() -> None:
    pre = Preprocess.from_config({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                                  "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, 224)
    assert pre.crop == (32, 32) and pre.shortest_edge == 32 and pre.mean == (0.485, 0.456, 0.406)
    frames = np.zeros((16, 48, 96, 3), np.uint8)
    frames[..., :24, :] = 255  # the left quarter is cut by the centre crop of a 2:1 frame
    small = pre.prepare(frames)
    assert small.shape == (16, 32, 32, 3) and small.dtype == np.uint8
    assert small.min() == 0 and small.max() == 0
    px = pre.normalise(small)
    assert px.shape == (16, 3, 32, 32) and px.dtype == np.float32
    assert np.allclose(px[0, :, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-5)
    assert pre.prepare(small) is small  # frames already at the crop size are left alone


# -- the model ------------------------------------------------------------------------------------
def test_the_tiny_checkpoint_loads_like_a_real_one(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["tiny_random"] == TINY_LABEL and cfg["num_frames"] == 16 and cfg["hidden_size"] == 32
    assert (tiny / "preprocessor_config.json").is_file()
    eng = load_videomae(str(tiny), runtime="torch", device="cpu")
    assert (eng.runtime, eng.device, eng.dim, eng.num_frames, eng.pooling) == ("torch", "cpu", 32, 16, "mean")
    assert eng.tiny and eng.label == TINY_LABEL and eng.fallback == ""


def test_encode_clips_gives_unit_vectors_that_tell_clips_apart(tiny: Path) -> None:
    eng = load_videomae(str(tiny), runtime="torch", device="cpu")
    x = clips(3)
    emb = eng.encode_clips(x)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(eng.encode_clips(x[1]), emb[1:2], atol=1e-5)  # one clip alone, same vector
    assert float(emb[0] @ emb[1]) < 0.9999
    # the same clip shrunk first (what the stage holds) gives the same embedding
    assert np.allclose(eng.encode_clips(eng.prepare_frames(x)), emb, atol=1e-5)
    assert eng.calls == 3
    with pytest.raises(ValueError, match=r"takes clips of 16 frames, got 8"):
        eng.encode_clips(x[:, :8])


def test_a_classification_checkpoint_pools_with_its_fc_norm(tmp_path: Path) -> None:
    import torch
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, use_mean_pooling=True)
    torch.manual_seed(1)
    model = VideoMAEForVideoClassification(cfg).eval()
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 2.0)
        model.fc_norm.bias.uniform_(-1.0, 1.0)
    model.save_pretrained(tmp_path)
    eng = load_videomae(str(tmp_path), runtime="torch", device="cpu")
    assert eng.pooling == "fc_norm" and eng.num_frames == 4
    x = np.random.default_rng(5).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    got = eng.encode_clips(x)
    px = torch.from_numpy(eng.preprocess.normalise(x))
    with torch.no_grad():
        pooled = model.fc_norm(model.videomae(pixel_values=px).last_hidden_state.mean(dim=1))
    want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert np.allclose(got, want, atol=1e-5)


def test_onnx_matches_torch_within_1e_4_at_batch_1_and_3(tiny: Path, exported: dict[str, Path]) -> None:
    side = json.loads(exported["sidecar"].read_text())
    assert side["format"] == "gamecopilot.videomae/1" and side["tiny_random"] == TINY_LABEL
    assert (side["num_frames"], side["dim"], side["crop"], side["pooling"]) == (16, 32, [32, 32], "mean")
    assert max(side["parity_max_abs"].values()) < 1e-4
    pt = load_videomae(str(tiny), runtime="torch", device="cpu")
    ort = load_videomae(str(tiny), runtime="onnxruntime", onnx_dir=exported["onnx"].parent, device="cpu")
    assert (ort.runtime, ort.device, ort.fallback, ort.dim, ort.tiny) == ("onnxruntime", "cpu", "", 32, True)
    worst = {}
    for batch in (1, 3):
        x = clips(batch, seed=batch)
        worst[batch] = float(np.abs(pt.encode_clips(x) - ort.encode_clips(x)).max())
        # the graph alone, on the same pixels
        px = pt.preprocess.normalise(pt.preprocess.prepare(x))
        ref = pt.run(px)
        got = ort.extra["runner"].run({INPUT_NAME: px})[0]
        assert got.shape == (batch, 32) and float(np.abs(ref - got).max()) < 1e-4
    print(f"\nVideoMAE ONNX parity (max abs): batch 1 {worst[1]:.2e}, batch 3 {worst[3]:.2e}")
    assert worst[1] < 1e-4 and worst[3] < 1e-4


def test_auto_takes_onnxruntime_only_when_onnx_dir_holds_an_export(tiny: Path, exported: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    assert load_videomae(str(tiny), onnx_dir=exported["onnx"].parent).runtime == "onnxruntime"
    assert load_videomae(str(tiny), onnx_dir=tmp_path).runtime == "torch"
    assert load_videomae(str(tiny)).runtime == "torch"


def test_bad_input_is_one_line(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"^unknown VideoMAE runtime 'jax' \(auto, torch or onnxruntime\)$"):
        load_videomae(str(tiny), runtime="jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no onnx_dir: the (empty) default export folder
    with pytest.raises(UsageError, match=r"holds no VideoMAE export .*gamecopilot export videomae"):
        load_videomae(str(tiny), runtime="onnxruntime")
    with pytest.raises(UsageError, match=r"holds no VideoMAE export .*gamecopilot export videomae"):
        load_videomae(str(tiny), runtime="onnxruntime", onnx_dir=tmp_path)
    (tmp_path / SIDECAR_NAME).write_text("[1, 2]")
    (tmp_path / "videomae.onnx").write_bytes(b"")
    with pytest.raises(UsageError, match=r"expected a JSON object"):
        load_videomae(str(tiny), runtime="onnxruntime", onnx_dir=tmp_path)
    with pytest.raises(UsageError, match=r"is not a VideoMAE checkpoint \(no config.json\)"):
        load_videomae(str(tmp_path), runtime="torch")
    with pytest.raises(UsageError, match=r"^unknown device 'tpu'"):
        load_videomae(str(tiny), device="tpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError, match=r"^model MCG-NJU/videomae-base not found locally or in the Hugging Face"):
        load_videomae("MCG-NJU/videomae-base")


@pytest.mark.gpu
def test_cuda_gives_the_cpu_embeddings(tiny: Path, exported: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from engines.onnx_session import CUDA, available_providers

    x = clips(3, seed=7)
    want = load_videomae(str(tiny), runtime="torch", device="cpu").encode_clips(x)
    gpu = load_videomae(str(tiny), runtime="torch", device="cuda")
    assert gpu.device == "cuda"
    assert float(np.abs(gpu.encode_clips(x) - want).max()) < 1e-3
    if CUDA in available_providers():
        ort = load_videomae(str(tiny), runtime="onnxruntime", onnx_dir=exported["onnx"].parent, device="cuda")
        assert ort.device == "cuda" and ort.fallback == ""
        assert float(np.abs(ort.encode_clips(x) - want).max()) < 1e-3
