"""The one place that creates ONNX Runtime sessions, every setting explicit.

Why one place: ONNX Runtime's defaults are wrong for a streaming pipeline on a small
machine.  Left alone, every session spawns a thread per core for intra-op work and another
pool for inter-op work, so three models in one process fight over two cores; the CPU
memory arena grows to the largest input ever seen and never shrinks; the provider list
silently falls back to the CPU when a GPU provider fails to load.  Here each model states
its threads, arena and optimisation level, and the provider list is chosen from what the
installed build offers: TensorRT, then CUDA, then the CPU, each with its options.

``onnxruntime`` is imported lazily (inside the functions), so importing this module is
free.  :func:`select_providers` is pure (it takes the list of available providers), which
is how the GPU ordering is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from copilot.errors import UsageError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
Optimization = Literal["disable", "basic", "extended", "all"]

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

ProviderSpec = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class SessionConfig:
    """How to run one model.  The defaults suit a small per-frame model on a busy CPU."""

    intra_op_threads: int = 1  # threads inside one operator; 0 lets ONNX Runtime pick (one per core)
    inter_op_threads: int = 1  # threads across independent branches (only with parallel execution)
    parallel_execution: bool = False
    device: Device = "auto"  # auto: TensorRT/CUDA when the build and the machine have them, else CPU
    device_id: int = 0
    cpu_mem_arena: bool = False  # off: varying input shapes (OCR crops) would grow the arena for good
    mem_pattern: bool = True
    optimization: Optimization = "all"
    log_severity: int = 3  # 0 verbose .. 4 fatal; 3 keeps ONNX Runtime's warnings out of the logs
    trt_fp16: bool = True
    trt_cache_dir: str | None = None  # TensorRT engine cache (building an engine takes minutes)
    cuda_mem_limit_bytes: int | None = None
    extra_session_config: dict[str, str] = field(default_factory=dict)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (empty if it is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def cuda_available() -> bool:
    """True when onnxruntime has the CUDA provider and a CUDA device is visible."""
    if CUDA not in available_providers():
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or os.name == "nt"


def select_providers(cfg: SessionConfig, available: list[str], *, gpu_present: bool = True) -> list[ProviderSpec]:
    """Ordered ``(provider, options)`` for ``cfg`` given the ``available`` providers.

    ``auto`` puts TensorRT and CUDA first when the build has them and ``gpu_present``; an
    explicit ``cuda``/``tensorrt`` that cannot be honoured is a :class:`UsageError` rather
    than a silent CPU fallback (a config that names a GPU expects one).  The CPU provider
    always comes last, so operators a GPU provider lacks still run.
    """
    cuda_opts: dict[str, Any] = {
        "device_id": cfg.device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": True,
    }
    if cfg.cuda_mem_limit_bytes:
        cuda_opts["gpu_mem_limit"] = int(cfg.cuda_mem_limit_bytes)
    trt_opts: dict[str, Any] = {
        "device_id": cfg.device_id,
        "trt_fp16_enable": cfg.trt_fp16,
        "trt_engine_cache_enable": cfg.trt_cache_dir is not None,
    }
    if cfg.trt_cache_dir is not None:
        trt_opts["trt_engine_cache_path"] = cfg.trt_cache_dir
    cpu: ProviderSpec = (CPU, {"arena_extend_strategy": "kSameAsRequested"})

    if cfg.device == "cpu":
        return [cpu]
    if cfg.device == "tensorrt":
        if TRT not in available or not gpu_present:
            raise UsageError("device 'tensorrt' asked for, but this onnxruntime build or machine has no TensorRT "
                             f"(available providers: {', '.join(available) or 'none'})")
        out = [(TRT, trt_opts)]
        if CUDA in available:
            out.append((CUDA, cuda_opts))
        return [*out, cpu]
    if cfg.device == "cuda":
        if CUDA not in available or not gpu_present:
            raise UsageError("device 'cuda' asked for, but this onnxruntime build or machine has no CUDA "
                             f"(available providers: {', '.join(available) or 'none'}; install onnxruntime-gpu)")
        return [(CUDA, cuda_opts), cpu]
    # auto
    out = []
    if gpu_present:
        if TRT in available and cfg.trt_cache_dir is not None:  # without a cache every start rebuilds engines
            out.append((TRT, trt_opts))
        if CUDA in available:
            out.append((CUDA, cuda_opts))
    return [*out, cpu]


def session_options(cfg: SessionConfig) -> Any:
    """An ``onnxruntime.SessionOptions`` with every setting from ``cfg``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(cfg.intra_op_threads))
    opts.inter_op_num_threads = max(0, int(cfg.inter_op_threads))
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if cfg.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = cfg.cpu_mem_arena
    opts.enable_mem_pattern = cfg.mem_pattern
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[cfg.optimization]
    opts.log_severity_level = cfg.log_severity
    # Spinning worker threads burn a core between calls; a per-frame model is idle most of the time.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, value in cfg.extra_session_config.items():
        opts.add_session_config_entry(key, value)
    return opts


def create_session(model_path: str | os.PathLike[str], cfg: SessionConfig | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model_path`` configured by ``cfg``.

    A missing model file is a :class:`UsageError` (one line, exit code 2).  The providers the
    session really got are logged, so a GPU that silently fell back shows up in the logs.
    """
    cfg = cfg or SessionConfig()
    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"ONNX model not found: {path}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UsageError("onnxruntime is not installed (pip install 'gameplay-copilot[perception]')") from exc

    gpu = cfg.device != "cpu" and (cuda_available() or cfg.device in ("cuda", "tensorrt"))
    providers = select_providers(cfg, list(ort.get_available_providers()), gpu_present=gpu)
    sess = ort.InferenceSession(
        str(path),
        sess_options=session_options(cfg),
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )
    got = sess.get_providers()
    wanted = providers[0][0]
    if wanted not in got:
        log.warning("%s: asked for %s, running on %s", path.name, wanted, ", ".join(got))
    else:
        log.debug("%s: running on %s", path.name, ", ".join(got))
    return sess


def session_device(sess: Any) -> str:
    """``cuda``, ``tensorrt`` or ``cpu``: where ``sess`` really runs its first provider."""
    first = sess.get_providers()[0]
    return {TRT: "tensorrt", CUDA: "cuda"}.get(first, "cpu")
