"""Native TensorRT engines (engines/tensorrt_engine.py).

On any machine: the engine cache key (pure) changes with each thing a plan depends on, the
optimisation profile comes out right, the ONNX input shapes are read, and a missing tensorrt is
one line naming the ``gpu`` extra.  With tensorrt and a CUDA GPU (``@pytest.mark.gpu``): a real
FP16 build with a dynamic batch, reused from the cache, and its outputs against ONNX Runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.errors import UsageError
from engines import tensorrt_engine as te

PROFILE: te.Profile = {"pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))}
BASE = dict(onnx_sha256="ab" * 32, profile=PROFILE, gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
            trt_version="10.13.0")


def key(**change: object) -> str:
    parts = {**BASE, **change}
    fp16 = bool(parts.pop("fp16", True))
    return te.engine_cache_key(**parts, fp16=fp16)  # type: ignore[arg-type]


def test_cache_key_is_stable_and_short() -> None:
    assert key() == key()
    assert len(key()) == te.KEY_CHARS and int(key(), 16) >= 0


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32},
    {"profile": {"pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}},
    {"profile": {"pixel_values": ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))}},
    {"profile": {"pixel_values": ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))}},
    {"profile": {"input_ids": ((1, 16), (4, 16), (8, 16))}},
    {"gpu_name": "NVIDIA L4"},
    {"compute_capability": (8, 9)},
    {"trt_version": "10.14.1"},
    {"fp16": False},
], ids=["onnx", "max-batch", "opt-batch", "shape", "input-name", "gpu", "capability", "tensorrt", "precision"])
def test_cache_key_changes_with_each_part(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_cache_key_ignores_profile_order() -> None:
    a = {"x": ((1, 2), (2, 2), (4, 2)), "y": ((1, 3), (2, 3), (4, 3))}
    b = dict(reversed(list(a.items())))
    assert key(profile=a) == key(profile=b)


def test_batch_profile() -> None:
    prof = te.batch_profile({"pixel_values": (-1, 3, 32, 32), "input_ids": (-1, 16)}, max_batch=8)
    assert prof == {"pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)),
                    "input_ids": ((1, 16), (4, 16), (8, 16))}
    assert te.batch_profile({"x": (-1, 5)}, max_batch=6, opt_batch=1)["x"] == ((1, 5), (1, 5), (6, 5))
    assert te.batch_profile({"x": (2, 5)}, max_batch=8)["x"] == ((2, 5), (2, 5), (2, 5))  # a fixed batch stays
    with pytest.raises(ValueError, match="only the batch axis"):
        te.batch_profile({"x": (-1, -1)}, max_batch=4)
    with pytest.raises(ValueError, match="opt_batch"):
        te.batch_profile({"x": (-1, 5)}, max_batch=4, opt_batch=5)
    with pytest.raises(ValueError, match="max_batch"):
        te.batch_profile({"x": (-1, 5)}, max_batch=0)


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "m.onnx"
    f.write_bytes(b"x" * 3_000_000)
    assert te.file_sha256(f, chunk=1 << 16) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_onnx_input_shapes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from engines.onnx_export import export_onnx

    class M(torch.nn.Module):  # type: ignore[misc,name-defined]
        def forward(self, pixel_values: Any, input_ids: Any) -> Any:
            return pixel_values.mean((1, 2, 3)) + input_ids.float().mean(1)

    path = export_onnx(M(), {"pixel_values": torch.zeros(1, 3, 8, 8), "input_ids": torch.zeros(1, 4, dtype=torch.long)},
                       tmp_path / "m.onnx", ["y"])
    assert te.onnx_input_shapes(path) == {"pixel_values": (-1, 3, 8, 8), "input_ids": (-1, 4)}


def test_missing_tensorrt_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really")
    for call in (te.import_tensorrt, lambda: te.build_engine(onnx, tmp_path), lambda: te.TensorRTRunner(onnx)):
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == te.TRT_HINT
    assert te.tensorrt_usable() is False


def test_missing_onnx_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ONNX model not found"):
        te.build_engine(tmp_path / "none.onnx", tmp_path)


# -- on a GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_build_and_run_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from engines.onnx_export import OnnxRunner, export_onnx, parity_max_abs
    from engines.onnx_session import SessionConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 16)).eval()
    onnx = export_onnx(net, {"pixel_values": torch.randn(1, 3, 32, 32)}, tmp_path / "net.onnx", ["out"])
    cache = tmp_path / "cache"
    plan = te.build_engine(onnx, cache, fp16=True, max_batch=4)
    assert plan.is_file() and (cache / te.TIMING_CACHE).is_file()
    assert te.build_engine(onnx, cache, fp16=True, max_batch=4) == plan  # from the cache
    assert te.build_engine(onnx, cache, fp16=True, max_batch=8) != plan  # another profile, another plan

    runner = te.TensorRTRunner(plan)
    assert (runner.runtime, runner.device, runner.max_batch) == ("tensorrt", "cuda", 4)
    ort = OnnxRunner(onnx, SessionConfig(device="cpu"))
    rng = np.random.default_rng(0)
    for batch in (1, 3, 6):  # 6: two slices of the profile's maximum
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = runner.run({"pixel_values": x})[0]
        want = ort.run({"pixel_values": x})[0]
        assert got.shape == want.shape == (batch, 16)
        assert parity_max_abs(got, want) < 1e-2
