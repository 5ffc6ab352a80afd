"""The generic ONNX export and runner (engines/onnx_export.py) and the provider report.

A small two-input module stands in for the encoders: its export must have the asked-for names,
a batch axis that really is dynamic (exported from a batch-1 example, run at 1 and 3), the same
numbers as torch, and a file that is either complete or not there.  The TensorRT -> CUDA -> CPU
report is a pure function, tested with made-up provider lists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.errors import UsageError
from engines import onnx_export as ox
from engines.onnx_session import CPU, CUDA, TRT, SessionConfig

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


class Toy(torch.nn.Module):  # type: ignore[misc,name-defined]
    """Image-like and id-like inputs, two outputs, a reshape over the batch (what a fixed batch breaks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(12 + 4, 5)

    def forward(self, pixels: Any, ids: Any) -> tuple[Any, Any]:
        b = pixels.shape[0]
        x = torch.cat([pixels.reshape(b, -1), self.emb(ids).mean(1)], dim=-1)
        z = self.lin(x)
        return torch.nn.functional.normalize(z, dim=-1), z.sum(-1, keepdim=True)


def example(batch: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(batch)
    return {"pixels": torch.randn(batch, 3, 2, 2, generator=g), "ids": torch.randint(0, 10, (batch, 6), generator=g)}


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Toy, Path]:
    module = Toy().eval()
    path = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    assert ox.export_onnx(module, example(1), path, ["emb", "total"]) == path
    return module, path


def test_export_names_and_dynamic_batch(toy_onnx: tuple[Toy, Path]) -> None:
    import onnx

    path = toy_onnx[1]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["pixels", "ids"]
    assert [o.name for o in model.graph.output] == ["emb", "total"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name}: batch axis is not symbolic"
    assert model.opset_import[0].version == ox.DEFAULT_OPSET
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.onnx"]  # no temp files or data left


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_runner_matches_torch(toy_onnx: tuple[Toy, Path], batch: int) -> None:
    module, path = toy_onnx
    runner = ox.OnnxRunner(path, SessionConfig(device="cpu"))
    feeds = example(batch)
    got = runner.run({"pixels": feeds["pixels"].double().numpy(), "ids": feeds["ids"].numpy()})  # float64 in
    with torch.no_grad():
        want = module(**feeds)
    assert [g.dtype for g in got] == [np.float32, np.float32]
    assert [g.shape for g in got] == [(batch, 5), (batch, 1)]
    assert ox.parity_max_abs(got[0], want[0].numpy()) < 1e-5
    assert ox.parity_max_abs(got[1], want[1].numpy()) < 1e-4


def test_runner_reports_what_runs(toy_onnx: tuple[Toy, Path]) -> None:
    runner = ox.OnnxRunner(toy_onnx[1], SessionConfig(device="cpu"))
    assert runner.runtime == "onnxruntime"
    assert runner.device == "cpu"
    assert runner.providers == [CPU]
    assert runner.fallback == ""
    assert (runner.input_names, runner.output_names) == (["pixels", "ids"], ["emb", "total"])
    with pytest.raises(ValueError, match="missing inputs"):
        runner.run({"pixels": np.zeros((1, 3, 2, 2), np.float32)})


def test_runner_fallback_is_reported(toy_onnx: tuple[Toy, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that offers CUDA but runs on the CPU: the fallback is a line, not silence."""
    import engines.onnx_session as sess

    monkeypatch.setattr(sess, "available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(sess, "cuda_available", lambda: True)

    class FakeSession:
        def __init__(self, real: object) -> None:
            self.real = real

        def get_providers(self) -> list[str]:
            return [CPU]

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    real_create = ox.create_session
    cpu = SessionConfig(device="cpu")
    monkeypatch.setattr(ox, "create_session", lambda path, cfg: FakeSession(real_create(path, cpu)))
    runner = ox.OnnxRunner(toy_onnx[1], SessionConfig(device="auto"))
    assert runner.fallback == f"asked for {CUDA}, running on {CPU}"
    assert runner.device == "cpu"


def test_failed_export_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no translation for aten.frobnicate")

    monkeypatch.setattr(ox, "_torch_export", broken)
    with pytest.raises(RuntimeError) as err:
        ox.export_onnx(Toy(), example(1), path, ["emb", "total"])
    assert "dynamo: no translation" in str(err.value) and "torchscript: no translation" in str(err.value)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_torchscript_exporter_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    real = ox._torch_export
    calls: list[bool] = []

    def dynamo_fails(*args: object, dynamo: bool, **kwargs: object) -> None:
        calls.append(dynamo)
        if dynamo:
            raise RuntimeError("guard failed")
        real(*args, dynamo=dynamo, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ox, "_torch_export", dynamo_fails)
    path = ox.export_onnx(Toy(), example(1), tmp_path / "m.onnx", ["emb", "total"])
    assert calls == [True, False]
    assert "dynamo ONNX exporter failed (guard failed)" in caplog.text
    runner = ox.OnnxRunner(path, SessionConfig(device="cpu"))
    assert runner.run({k: v.numpy() for k, v in example(3).items()})[0].shape == (3, 5)


def test_a_fixed_batch_is_caught_at_export(tmp_path: Path) -> None:
    """A graph whose batch is baked in fails the batch-3 run check, with both exporters' reasons."""

    class Fixed(torch.nn.Module):  # type: ignore[misc,name-defined]
        def forward(self, x: Any) -> Any:
            return x.reshape(2, -1).sum(-1)  # the batch is 2, whatever comes in

    with pytest.raises(RuntimeError, match=r"export of f\.onnx failed"):
        ox.export_onnx(Fixed(), {"x": torch.zeros(2, 3)}, tmp_path / "f.onnx", ["y"])
    assert not (tmp_path / "f.onnx").exists()


def test_external_data_lands_beside_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the size limit the weights go to a data file that still loads after the move into place."""
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)
    path = ox.export_onnx(Toy(), example(1), tmp_path / "big.onnx", ["emb", "total"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "big.onnx" and len(files) == 2 and files[1].startswith("big.onnx")
    runner = ox.OnnxRunner(path, SessionConfig(device="cpu"))
    with torch.no_grad():
        want = Toy()(**example(3))[0].numpy()
    assert ox.parity_max_abs(runner.run({k: v.numpy() for k, v in example(3).items()})[0], want) < 1e-5


def test_missing_onnxscript_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UsageError, match=r"onnxscript is not installed.*gameplay-copilot\[engines\]"):
        ox.export_onnx(Toy(), example(1), tmp_path / "m.onnx", ["emb", "total"])


def test_parity_max_abs() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert ox.parity_max_abs(a, a) == 0.0
    assert ox.parity_max_abs(a, a + np.array([[0, 0.5], [0, -0.25]], np.float32)) == pytest.approx(0.5)
    assert ox.parity_max_abs(a, a[:1]) == float("inf")
    assert ox.parity_max_abs(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


# -- provider selection report (pure) ---------------------------------------------------------------------------


def test_describe_providers_tensorrt_first_with_a_gpu() -> None:
    cfg = SessionConfig(trt_cache_dir="/tmp/trt")
    names, line = ox.describe_providers(cfg, [TRT, CUDA, CPU], gpu_present=True)
    assert names == [TRT, CUDA, CPU]
    assert line == "running on TensorRT"


def test_describe_providers_falls_back_to_cuda_then_cpu() -> None:
    cfg = SessionConfig(trt_cache_dir="/tmp/trt")
    names, line = ox.describe_providers(cfg, [CUDA, CPU], gpu_present=True)
    assert names == [CUDA, CPU]
    assert line == "TensorRT: not in this onnxruntime build; running on CUDA"
    names, line = ox.describe_providers(cfg, [CPU], gpu_present=False)
    assert names == [CPU]
    assert line == "TensorRT: not in this onnxruntime build; CUDA: not in this onnxruntime build; running on CPU"
    names, line = ox.describe_providers(cfg, [TRT, CUDA, CPU], gpu_present=False)
    assert names == [CPU]
    assert line == "TensorRT: no GPU visible; CUDA: no GPU visible; running on CPU"


def test_describe_providers_says_why_tensorrt_was_skipped() -> None:
    names, line = ox.describe_providers(SessionConfig(), [TRT, CUDA, CPU], gpu_present=True)
    assert names == [CUDA, CPU]
    assert line.startswith("TensorRT: no engine cache dir set")
    assert line.endswith("running on CUDA")


def test_describe_providers_explicit_choices() -> None:
    assert ox.describe_providers(SessionConfig(device="cpu"), [TRT, CUDA, CPU], True) == (
        [CPU], "device 'cpu' asked for; running on CPU")
    assert ox.describe_providers(SessionConfig(device="cuda"), [TRT, CUDA, CPU], True) == (
        [CUDA, CPU], "running on CUDA")
    with pytest.raises(UsageError, match="device 'tensorrt'"):
        ox.describe_providers(SessionConfig(device="tensorrt"), [CUDA, CPU], True)
    with pytest.raises(UsageError, match="device 'cuda'"):
        ox.describe_providers(SessionConfig(device="cuda"), [CUDA, CPU], False)
