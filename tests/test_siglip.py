"""SigLIP2 embeddings (engines/siglip.py) and ``gamecopilot export`` (engines/export_tool.py).

All on a tiny random Siglip2 built in-process (no download).  What is checked: the numpy
preprocessing and fixed patch grid give what transformers' own Siglip2 processor and model give;
zero-shot is the model's own sigmoid; the ONNX export matches torch within 1e-4 at batch 1 and 3
(images and texts) and runs without torch or transformers; ``auto`` reports its choice; bad input
is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from copilot.errors import UsageError
from engines import siglip as sg
from engines.onnx_export import parity_max_abs

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a photo of a boss", "game over", "the player dies in a bright flash"]


def frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sg.tiny_siglip2(tmp_path_factory.mktemp("tiny") / "siglip2")


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    written = sg.export_siglip(str(tiny), out)
    assert set(written) >= {"vision", "text", "sidecar", "tokenizer.json"}
    return out


@pytest.fixture(scope="module")
def torch_engine(tiny: Path) -> sg.SiglipEngine:
    return sg.load_siglip(str(tiny), runtime="torch", device="cpu")


@pytest.fixture(scope="module")
def onnx_engine(tiny: Path, exported: Path) -> sg.SiglipEngine:
    return sg.load_siglip(str(tiny), runtime="onnxruntime", device="cpu", onnx_dir=exported)


def test_tiny_model_is_labelled(tiny: Path, exported: Path, torch_engine: sg.SiglipEngine) -> None:
    assert json.loads((tiny / "config.json").read_text())["tiny_random"] is True
    side = json.loads((exported / sg.SIDECAR).read_text())
    assert side["tiny_random"] is True and side["arch"] == "siglip2"
    assert (side["image_size"], side["patch_size"], side["dim"], side["text_length"]) == (32, 8, 32, 16)
    assert torch_engine.tiny_random


def test_torch_engine_embeddings(torch_engine: sg.SiglipEngine) -> None:
    e = torch_engine
    assert (e.runtime, e.device, e.dim, e.fallback) == ("torch", "cpu", 32, "")
    img = e.encode_images(frames(3))
    txt = e.encode_texts(TEXTS)
    for emb in (img, txt):
        assert emb.shape == (3, 32) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(img[0], img[1])  # different frames, different embeddings
    assert e.encode_images([frames(1, 20, 30)[0], frames(1, 90, 40)[0]]).shape == (2, 32)  # any sizes
    assert e.encode_images(frames(0)).shape == (0, 32)


def test_preprocessing_matches_transformers(tiny: Path, torch_engine: sg.SiglipEngine) -> None:
    """At the model's own size, the engine is exactly transformers' Siglip2 processor + model."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(str(tiny))
    model = AutoModel.from_pretrained(str(tiny)).eval()
    imgs = frames(2, 32, 32, seed=3)
    inputs = proc(images=list(imgs), return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [4, 4]]
    with torch.no_grad():
        ref = model.get_image_features(**inputs)
    ref = getattr(ref, "pooler_output", ref)
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert parity_max_abs(torch_engine.encode_images(imgs), ref) < 1e-5


def test_zero_shot_is_the_models_own(tiny: Path, torch_engine: sg.SiglipEngine) -> None:
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(str(tiny))
    model = AutoModel.from_pretrained(str(tiny)).eval()
    imgs = frames(2, 32, 32, seed=4)
    inputs = proc(images=list(imgs), return_tensors="pt")
    ids = torch.from_numpy(torch_engine.tokenizer(TEXTS))
    with torch.no_grad():
        want = torch.sigmoid(model(input_ids=ids, **inputs).logits_per_image).numpy()
    got = torch_engine.zero_shot(torch_engine.encode_images(imgs), torch_engine.encode_texts(TEXTS))
    assert got.shape == (2, 3)
    assert parity_max_abs(got, want) < 1e-5
    assert torch_engine.logit_scale == pytest.approx(10.0) and torch_engine.logit_bias == pytest.approx(-5.0)


def test_tokenizer_pads_and_cuts(torch_engine: sg.SiglipEngine) -> None:
    ids = torch_engine.tokenizer(["game over", " ".join(["boss"] * 40)])
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    pad = torch_engine.spec.pad_id
    assert (ids[0, 3:] == pad).all() and (ids[1] != pad).all()
    with pytest.raises(TypeError):
        torch_engine.tokenizer("one string")  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch(torch_engine: sg.SiglipEngine, onnx_engine: sg.SiglipEngine, batch: int) -> None:
    assert (onnx_engine.runtime, onnx_engine.device, onnx_engine.fallback) == ("onnxruntime", "cpu", "")
    imgs = frames(batch, seed=batch)
    assert parity_max_abs(onnx_engine.encode_images(imgs), torch_engine.encode_images(imgs)) < 1e-4
    texts = TEXTS[:batch]
    assert parity_max_abs(onnx_engine.encode_texts(texts), torch_engine.encode_texts(texts)) < 1e-4


def test_batches_bigger_than_max_are_sliced(tiny: Path, exported: Path, onnx_engine: sg.SiglipEngine) -> None:
    small = sg.load_siglip(str(tiny), runtime="onnxruntime", onnx_dir=exported, batch_sizes=(1, 2))
    assert small.max_batch == 2
    imgs = frames(5, seed=9)
    assert parity_max_abs(small.encode_images(imgs), onnx_engine.encode_images(imgs)) < 1e-6


def test_regions_are_one_batch_of_crops(torch_engine: sg.SiglipEngine) -> None:
    img = frames(1, 60, 80, seed=5)[0]
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.25, 0.5, 1.0, 1.0), (0.9, 0.9, 0.9, 0.9)]  # the last: one pixel
    got = torch_engine.encode_regions(img, boxes)
    want = torch_engine.encode_images([img[0:30, 0:40], img[30:60, 20:80], img[54:55, 72:73]])
    assert got.shape == (3, 32)
    assert parity_max_abs(got, want) < 1e-6
    assert torch_engine.encode_regions(img, []).shape == (0, 32)
    with pytest.raises(ValueError, match="x1 < x0"):
        torch_engine.encode_regions(img, [(0.5, 0.0, 0.2, 1.0)])


def test_resize() -> None:
    flat = np.full((1080, 1920, 3), 77, np.uint8)
    out = sg.resize_rgb(flat, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 77.0, atol=1e-3)
    checker = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    np.testing.assert_allclose(sg.resize_rgb(checker, 32), 127.5, atol=1.0)  # averaged, not sampled
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    np.testing.assert_allclose(sg.resize_rgb(ramp, 32), ramp.astype(np.float32), atol=1e-4)  # same size: unchanged
    with pytest.raises(ValueError, match="RGB"):
        sg.resize_rgb(np.zeros((4, 4, 4), np.uint8), 8)


def test_auto_reports_its_choice(tiny: Path, exported: Path, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="engines.siglip")
    with_export = sg.load_siglip(str(tiny), onnx_dir=exported)
    assert with_export.runtime == "onnxruntime"
    assert "tensorrt: not usable here" in with_export.choice and f"export found in {exported}" in with_export.choice
    without = sg.load_siglip(str(tiny), onnx_dir=tmp_path / "empty")
    assert without.runtime == "torch"
    assert "no export in" in without.choice
    assert "runtime onnxruntime on cpu" in caplog.text and "runtime torch on cpu" in caplog.text


def test_onnxruntime_exports_on_demand(tiny: Path, exported: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_export(model: str, out_dir: Path, *, allow_download: bool = False) -> dict[str, Path]:
        calls.append(out_dir)
        shutil.copytree(exported, out_dir)
        return {}

    monkeypatch.setattr(sg, "export_siglip", fake_export)
    eng = sg.load_siglip(str(tiny), runtime="onnxruntime", onnx_dir=tmp_path / "new")
    assert calls == [tmp_path / "new"] and eng.runtime == "onnxruntime"


def test_bad_choices_are_one_line(tiny: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown runtime 'openvino'"):
        sg.load_siglip(str(tiny), runtime="openvino")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        sg.load_siglip(str(tiny), device="tpu")
    with pytest.raises(UsageError, match="not found"):
        sg.load_siglip(str(tmp_path / "missing"), runtime="torch")
    with pytest.raises(UsageError, match="pass --allow-download"):
        sg.load_siglip("nobody/no-such-siglip", runtime="torch", onnx_dir=tmp_path / "x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="not SigLIP"):
        sg.load_siglip(str(other), runtime="torch", onnx_dir=tmp_path / "y")
    with pytest.raises(UsageError, match=f"holds an export of {tiny}"):
        sg.load_siglip(str(other), onnx_dir=exported)


def test_tensorrt_without_it_is_one_line(tiny: Path, exported: Path) -> None:
    from engines.tensorrt_engine import tensorrt_usable

    if tensorrt_usable():
        pytest.skip("tensorrt and a GPU are here")
    with pytest.raises(UsageError) as err:
        sg.load_siglip(str(tiny), runtime="tensorrt", onnx_dir=exported)
    assert "\n" not in str(err.value)


def test_onnx_path_needs_neither_torch_nor_transformers(tiny: Path, exported: Path,
                                                        onnx_engine: sg.SiglipEngine) -> None:
    code = (
        "import sys, json, numpy as np\n"
        "for m in ('torch', 'transformers'): sys.modules[m] = None\n"
        "from pathlib import Path\n"
        "from engines.siglip import load_siglip\n"
        f"e = load_siglip({str(tiny)!r}, runtime='onnxruntime', onnx_dir=Path({str(exported)!r}))\n"
        f"img = np.random.default_rng(7).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)\n"
        f"print(json.dumps([e.encode_images(img).tolist(), e.encode_texts({TEXTS!r}).tolist()]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    img_emb, txt_emb = (np.asarray(a, np.float32) for a in json.loads(res.stdout.strip().splitlines()[-1]))
    imgs = np.random.default_rng(7).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    assert parity_max_abs(img_emb, onnx_engine.encode_images(imgs)) < 1e-6
    assert parity_max_abs(txt_emb, onnx_engine.encode_texts(TEXTS)) < 1e-6


# -- gamecopilot export -----------------------------------------------------------------------------------------


def test_export_tool_tiny_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engines.export_tool import main

    out = tmp_path / "out"
    assert main(["siglip", "--tiny", "--to", "onnx", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    written = [Path(line) for line in cap.out.splitlines()]
    assert written[:3] == [out / sg.VISION_FILE, out / sg.TEXT_FILE, out / sg.SIDECAR]
    assert all(p.is_file() for p in written)
    assert "building the tiny random siglip model" in cap.err and "exporting" in cap.err
    model = out / "tiny-model"
    onnx = sg.load_siglip(str(model), onnx_dir=out)
    ref = sg.load_siglip(str(model), runtime="torch")
    assert onnx.runtime == "onnxruntime" and onnx.tiny_random
    for batch in (1, 3):
        imgs = frames(batch, seed=10 + batch)
        assert parity_max_abs(onnx.encode_images(imgs), ref.encode_images(imgs)) < 1e-4
        assert parity_max_abs(onnx.encode_texts(TEXTS[:batch]), ref.encode_texts(TEXTS[:batch])) < 1e-4


def test_export_tool_tensorrt_here_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engines.export_tool import main
    from engines.tensorrt_engine import tensorrt_usable

    if tensorrt_usable():
        pytest.skip("tensorrt and a GPU are here")
    assert main(["siglip", "--tiny", "--to", "tensorrt", "--out", str(tmp_path / "o")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # checked before any work


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "nobody/no-such-model"])
def test_export_tool_unknown_model_is_exit_2(tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.export_tool import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["siglip", "--model", model, "--to", "onnx", "--out", str(tmp_path / "o")]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    errors = [line for line in cap.err.splitlines() if "exporting" not in line]
    assert len(errors) == 1 and model in errors[0]


def test_export_tool_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from engines.export_tool import main

    with pytest.raises(SystemExit) as exc:
        main(["siglip", "--to", "openvino"])
    assert exc.value.code == 2
    assert main(["siglip", "--tiny", "--model", "x", "--to", "onnx"]) == 2
    assert "leave out --model" in capsys.readouterr().err


@pytest.mark.parametrize("engine, export_name, tiny_name", [
    ("videomae", "export_videomae", "tiny_videomae"), ("sam3", "export_sam3_backbone", "tiny_sam3")])
def test_export_tool_dispatch_and_tensorrt_step(engine: str, export_name: str, tiny_name: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The tool calls each engine's export by name, and --to tensorrt builds one plan per ONNX file
    (TensorRT itself faked here: its real build is the gpu test in test_tensorrt_engine.py)."""
    import types

    from engines import export_tool
    from engines import tensorrt_engine as te

    calls: list[tuple[str, object]] = []

    def fake_tiny(out_dir: Path, seed: int = 0) -> Path:
        calls.append(("tiny", out_dir))
        return Path(out_dir)

    def fake_export(model: str, out_dir: Path, *, allow_download: bool = False) -> dict[str, Path]:
        calls.append(("export", (model, out_dir, allow_download)))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        onnx, side = Path(out_dir) / f"{engine}.onnx", Path(out_dir) / f"{engine}.json"
        onnx.write_bytes(b"onnx")
        side.write_text("{}")
        return {"onnx": onnx, "sidecar": side}

    def fake_build(onnx: Path, cache_dir: Path, **kw: object) -> Path:
        calls.append(("build", (onnx.name, kw["max_batch"])))
        return Path(cache_dir) / f"{onnx.stem}-key.plan"

    fake = types.ModuleType(f"engines.{engine}")
    setattr(fake, export_name, fake_export)
    setattr(fake, tiny_name, fake_tiny)
    monkeypatch.setitem(sys.modules, f"engines.{engine}", fake)
    monkeypatch.setattr(export_tool, "_check_tensorrt", lambda: None)
    monkeypatch.setattr(te, "build_engine", fake_build)

    out = tmp_path / "o"
    assert export_tool.main([engine, "--model", "org/m", "--to", "tensorrt", "--out", str(out), "--max-batch", "4",
                             "--allow-download"]) == 0
    assert calls == [("export", ("org/m", out, True)), ("build", (f"{engine}.onnx", 4))]
    assert capsys.readouterr().out.splitlines() == [
        str(out / f"{engine}.onnx"), str(out / f"{engine}.json"), str(out / "tensorrt" / f"{engine}-key.plan")]
    calls.clear()
    assert export_tool.main([engine, "--tiny", "--to", "onnx", "--out", str(out)]) == 0
    assert calls == [("tiny", out / "tiny-model"), ("export", (str(out / "tiny-model"), out, False))]


# -- on a GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_runtime_matches_torch(tiny: Path, exported: Path, torch_engine: sg.SiglipEngine,
                                        tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    onnx_dir = tmp_path / "exp"
    shutil.copytree(exported, onnx_dir)
    eng = sg.load_siglip(str(tiny), runtime="tensorrt", onnx_dir=onnx_dir, batch_sizes=(1, 4))
    assert (eng.runtime, eng.device) == ("tensorrt", "cuda")
    for batch in (1, 3):
        imgs = frames(batch, seed=20 + batch)
        assert parity_max_abs(eng.encode_images(imgs), torch_engine.encode_images(imgs)) < 1e-2
        assert parity_max_abs(eng.encode_texts(TEXTS[:batch]), torch_engine.encode_texts(TEXTS[:batch])) < 1e-2


def test_plain_siglip_checkpoints_work_too(tiny: Path, tmp_path: Path) -> None:
    """A SiglipModel checkpoint (how the fixed-resolution SigLIP2 releases are stored): the same engine,
    exact against transformers' own processor and model, and its export within 1e-4 of torch."""
    from transformers import AutoImageProcessor, AutoModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    ckpt = tmp_path / "siglip"
    ckpt.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, ckpt / name)
    text = json.loads((tiny / "config.json").read_text())["text_config"]
    torch.manual_seed(1)
    cfg = SiglipConfig(
        text_config={k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "max_position_embeddings", "pad_token_id",
                                          "bos_token_id", "eos_token_id")},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 24, "patch_size": 8})
    SiglipModel(cfg).save_pretrained(str(ckpt))
    SiglipImageProcessor(size={"height": 24, "width": 24}).save_pretrained(str(ckpt))

    eng = sg.load_siglip(str(ckpt), runtime="torch")
    assert (eng.spec.arch, eng.spec.image_size, eng.dim) == ("siglip", 24, 32)
    imgs = frames(2, 24, 24, seed=6)
    inputs = AutoImageProcessor.from_pretrained(str(ckpt))(images=list(imgs), return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(str(ckpt)).eval().get_image_features(**inputs)
    ref = torch.nn.functional.normalize(getattr(ref, "pooler_output", ref), dim=-1).numpy()
    assert parity_max_abs(eng.encode_images(imgs), ref) < 1e-5

    out = tmp_path / "export"
    sg.export_siglip(str(ckpt), out)
    onnx = sg.load_siglip(str(ckpt), runtime="onnxruntime", onnx_dir=out)
    for batch in (1, 3):
        imgs = frames(batch, seed=30 + batch)
        assert parity_max_abs(onnx.encode_images(imgs), eng.encode_images(imgs)) < 1e-4
        assert parity_max_abs(onnx.encode_texts(TEXTS[:batch]), eng.encode_texts(TEXTS[:batch])) < 1e-4
