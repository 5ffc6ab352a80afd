"""The ONNX Runtime session factory: explicit options, provider order, clear errors.

Provider selection is a pure function, so the GPU ordering is checked here on any machine;
the tests that need a real CUDA device carry ``@pytest.mark.gpu`` and skip without one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copilot.errors import UsageError
from engines.onnx_session import (
    CPU,
    CUDA,
    TRT,
    SessionConfig,
    create_session,
    cuda_available,
    select_providers,
    session_device,
    session_options,
)

ort = pytest.importorskip("onnxruntime")


def silero_model() -> Path:
    from engines.silero_vad import bundled_model_path

    pytest.importorskip("faster_whisper")
    return bundled_model_path()


def names(specs: list[tuple[str, dict]]) -> list[str]:  # type: ignore[type-arg]
    return [n for n, _ in specs]


def test_cpu_only_build_gets_the_cpu() -> None:
    assert names(select_providers(SessionConfig(), [CPU])) == [CPU]
    assert names(select_providers(SessionConfig(device="cpu"), [TRT, CUDA, CPU])) == [CPU]


def test_auto_puts_gpu_providers_first_when_present() -> None:
    avail = [TRT, CUDA, CPU]
    assert names(select_providers(SessionConfig(), avail)) == [CUDA, CPU]  # no TRT without an engine cache
    specs = select_providers(SessionConfig(trt_cache_dir="/tmp/trt", device_id=1), avail)
    assert names(specs) == [TRT, CUDA, CPU]
    trt_opts = dict(specs[0][1])
    assert trt_opts["trt_engine_cache_enable"] is True and trt_opts["device_id"] == 1
    assert dict(specs[1][1])["device_id"] == 1
    # a build with CUDA on a machine without a GPU stays on the CPU
    assert names(select_providers(SessionConfig(), avail, gpu_present=False)) == [CPU]


def test_explicit_gpu_that_cannot_be_had_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="CUDA"):
        select_providers(SessionConfig(device="cuda"), [CPU])
    with pytest.raises(UsageError, match="TensorRT"):
        select_providers(SessionConfig(device="tensorrt"), [CUDA, CPU])
    assert names(select_providers(SessionConfig(device="tensorrt"), [TRT, CUDA, CPU])) == [TRT, CUDA, CPU]


def test_session_options_are_explicit() -> None:
    opts = session_options(SessionConfig(intra_op_threads=2, inter_op_threads=1, optimization="basic"))
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.enable_cpu_mem_arena is False
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    opts = session_options(SessionConfig(cpu_mem_arena=True, parallel_execution=True, optimization="disable"))
    assert opts.enable_cpu_mem_arena is True
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_create_session_runs_a_real_model_on_the_cpu() -> None:
    sess = create_session(silero_model(), SessionConfig(device="cpu"))
    assert sess.get_providers() == [CPU]
    assert session_device(sess) == "cpu"
    x = np.zeros((2, 576), np.float32)
    h = np.zeros((1, 1, 128), np.float32)
    probs, *_ = sess.run(None, {"input": x, "h": h, "c": h})
    assert probs.shape[0] == 2


def test_missing_model_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ONNX model not found"):
        create_session(tmp_path / "missing.onnx")


def test_explicit_cuda_on_a_cpu_machine_is_a_usage_error() -> None:
    if cuda_available():
        pytest.skip("this machine has CUDA")
    if CUDA not in ort.get_available_providers():
        with pytest.raises(UsageError, match="CUDA"):
            create_session(silero_model(), SessionConfig(device="cuda"))


@pytest.mark.gpu
def test_cuda_session_matches_the_cpu() -> None:
    if not cuda_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    model = silero_model()
    gpu = create_session(model, SessionConfig(device="cuda"))
    assert session_device(gpu) == "cuda"
    cpu = create_session(model, SessionConfig(device="cpu"))
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((8, 576))).astype(np.float32)
    h = np.zeros((1, 1, 128), np.float32)
    a = gpu.run(None, {"input": x, "h": h, "c": h})[0]
    b = cpu.run(None, {"input": x, "h": h, "c": h})[0]
    np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.gpu
def test_ocr_recognizer_on_cuda_matches_the_cpu() -> None:
    if not cuda_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    pytest.importorskip("rapidocr")
    from engines.ocr import TextRecognizer

    rng = np.random.default_rng(1)
    crop = rng.integers(0, 255, (32, 120, 3), dtype=np.uint8)
    a = TextRecognizer(session=SessionConfig(device="cuda"))([crop])[0]
    b = TextRecognizer(session=SessionConfig(device="cpu"))([crop])[0]
    assert a.text == b.text
