"""Native TensorRT engines built from an exported ONNX file, cached on disk, run on torch CUDA buffers.

Why native TensorRT beside ONNX Runtime's TensorRT provider: the provider builds its engine
inside the session on first use, with its own cache naming, and falls back to CUDA or the CPU
for anything it does not take; here the build is a step of its own (``gamecopilot export ...
--to tensorrt``), its cost is paid once per (model, shapes, GPU, TensorRT version), and a model
that TensorRT cannot build fails the export with TensorRT's own message instead of running
somewhere slower without saying so.

The engine is FP16 (by default) with a dynamic batch: one optimisation profile whose batch
axis runs from 1 to ``max_batch`` (tuned for ``opt_batch``); every other axis is fixed by the
ONNX file.  Two caches live in ``cache_dir``:

- the engine cache: ``<stem>-<key>.plan``, where the key (:func:`engine_cache_key`) hashes
  the ONNX file's sha256, the profile, the GPU's name and compute capability, the TensorRT
  version and the precision; a plan is only valid for exactly those, so any change builds anew;
- the timing cache (``timing.cache``): the kernel timings TensorRT measured, reused across
  builds on the same GPU and TensorRT, which cuts rebuilds of similar models from minutes to
  seconds.

:class:`TensorRTRunner` executes a plan with the TensorRT 10 API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) on torch CUDA tensors as buffers (torch already
manages the device memory and the stream, so no cuda-python is needed).  ``tensorrt`` and
``torch`` are imported lazily; without tensorrt every entry point is one :class:`UsageError`
line naming the ``gpu`` extra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError

log = logging.getLogger(__name__)

TRT_HINT = "tensorrt is not installed: pip install 'gameplay-copilot[gpu]' on a machine with CUDA"
TIMING_CACHE = "timing.cache"
KEY_CHARS = 20

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or one UsageError line saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise UsageError(TRT_HINT) from None
    return tensorrt


def tensorrt_usable() -> bool:
    """True when tensorrt imports and torch sees a CUDA device (what ``runtime: auto`` asks)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install: not usable
        return False


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks (an ONNX file can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_cache_key(onnx_sha256: str, profile: Profile, gpu_name: str, compute_capability: tuple[int, int],
                     trt_version: str, *, fp16: bool = True) -> str:
    """The engine cache key: a short hex digest of everything a serialised plan depends on.

    Pure, so it is tested without a GPU: it changes with the ONNX file's hash, any shape of
    the profile, the GPU's name, its compute capability, the TensorRT version and the precision.
    """
    parts = {
        "onnx": onnx_sha256,
        "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
        "gpu": gpu_name,
        "cc": f"{compute_capability[0]}.{compute_capability[1]}",
        "trt": trt_version,
        "fp16": bool(fp16),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def batch_profile(input_shapes: dict[str, Shape], max_batch: int, opt_batch: int | None = None) -> Profile:
    """Min/opt/max shapes for inputs whose axis 0 is the dynamic batch (``-1`` or 0 there).

    Every other axis must be fixed (a positive size): the exported encoders take fixed-size
    images, clips and token lengths.  A fixed batch axis keeps its size for all three.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = max(1, max_batch // 2) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must be in 1..{max_batch}, got {opt_batch}")
    out: Profile = {}
    for name, shape in input_shapes.items():
        if not shape:
            raise ValueError(f"input {name}: a scalar has no batch axis")
        rest = tuple(int(d) for d in shape[1:])
        if any(d <= 0 for d in rest):
            raise ValueError(f"input {name}: only the batch axis may be dynamic, got shape {tuple(shape)}")
        if int(shape[0]) > 0:
            fixed = (int(shape[0]), *rest)
            out[name] = (fixed, fixed, fixed)
        else:
            out[name] = ((1, *rest), (opt, *rest), (max_batch, *rest))
    return out


def onnx_input_shapes(onnx_path: str | os.PathLike[str]) -> dict[str, Shape]:
    """The graph inputs of an ONNX file with their shapes (-1 for a symbolic axis), weights not loaded."""
    try:
        import onnx
    except ImportError:
        raise UsageError("onnx is not installed: pip install 'gameplay-copilot[engines]'") from None
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, Shape] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        out[inp.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return out


def gpu_identity(device_id: int = 0) -> tuple[str, tuple[int, int]]:
    """The GPU's name and compute capability (through torch); UsageError without CUDA."""
    try:
        import torch
    except ImportError:
        raise UsageError("torch is not installed: pip install 'gameplay-copilot[engines]'") from None
    if not torch.cuda.is_available():
        raise UsageError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    name = torch.cuda.get_device_name(device_id)
    major, minor = torch.cuda.get_device_capability(device_id)
    return name, (int(major), int(minor))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _logger(trt: Any) -> Any:
    """TensorRT's own logger at WARNING (a pybind ILogger subclass would be called from TensorRT's
    threads; the built-in one writes warnings and errors to stderr, which is what a build step wants)."""
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *, fp16: bool = True,
                 max_batch: int = 8, opt_batch: int | None = None, workspace_gb: float = 4.0,
                 device_id: int = 0) -> Path:
    """A serialised TensorRT plan for ``onnx_path`` in ``cache_dir`` (built, or reused from the cache).

    The batch axis of every input gets the profile 1 / ``opt_batch`` / ``max_batch``; ``fp16``
    lets TensorRT pick half-precision kernels where the GPU has fast ones.  The timing cache in
    ``cache_dir`` is read before and written after each build.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX model not found: {onnx_path}")
    trt = import_tensorrt()
    gpu_name, cc = gpu_identity(device_id)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    profile = batch_profile(onnx_input_shapes(onnx_path), max_batch, opt_batch)
    key = engine_cache_key(file_sha256(onnx_path), profile, gpu_name, cc, str(trt.__version__), fp16=fp16)
    plan_path = cache / f"{onnx_path.stem}-{key}.plan"
    if plan_path.is_file():
        log.info("%s: TensorRT engine from the cache (%s)", onnx_path.name, plan_path.name)
        return plan_path

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    timing_path = cache / TIMING_CACHE
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise RuntimeError(f"{onnx_path.name}: TensorRT sees an input {name!r} the ONNX graph does not list")
        lo, mid, hi = profile[name]
        opt_profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt_profile)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_path.name} (see the log above)")
    _write_atomic(plan_path, bytes(plan))
    _write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
    meta = {"onnx": str(onnx_path), "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "gpu": gpu_name, "compute_capability": list(cc), "tensorrt": str(trt.__version__), "fp16": fp16}
    _write_atomic(plan_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    log.info("%s: TensorRT engine built in %.1f s (%s)", onnx_path.name, time.perf_counter() - t0, plan_path.name)
    return plan_path


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise RuntimeError(f"TensorRT tensor type {dtype} is not supported here")
    return table[dtype]


class TensorRTRunner:
    """A TensorRT plan run on one GPU: the same ``run(feeds)`` as :class:`engines.onnx_export.OnnxRunner`.

    A batch larger than the profile's maximum is run in slices of the maximum and joined.
    """

    runtime = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], *, device_id: int = 0) -> None:
        trt = import_tensorrt()
        import torch

        self.path = Path(plan_path)
        if not self.path.is_file():
            raise UsageError(f"TensorRT engine not found: {self.path}")
        if not torch.cuda.is_available():
            raise UsageError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
        self._torch = torch
        self._device = torch.device("cuda", device_id)
        self.device = "cuda" if device_id == 0 else f"cuda:{device_id}"
        self.providers = ["TensorRT"]
        self.fallback = ""
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not load {self.path.name} (built for another GPU or version?)")
            self.context = self.engine.create_execution_context()
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._dtypes: dict[str, Any] = {}
        self.max_batch = 0
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self._dtypes[name] = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
                hi = self.engine.get_tensor_profile_shape(name, 0)[2]
                self.max_batch = int(hi[0]) if not self.max_batch else min(self.max_batch, int(hi[0]))
            else:
                self.output_names.append(name)
        self._stream = torch.cuda.Stream(device=self._device)

    @classmethod
    def from_onnx(cls, onnx_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
                  device_id: int = 0, **build: Any) -> TensorRTRunner:
        """Build (or take from the cache) the plan for ``onnx_path`` and load it."""
        return cls(build_engine(onnx_path, cache_dir, device_id=device_id, **build), device_id=device_id)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        keep: list[Any] = []
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self._device, self._dtypes[name])
                t = t.contiguous()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                o = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
                outs.append(o)
                self.context.set_tensor_address(name, o.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
            self._stream.synchronize()
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on ``feeds`` (by input name); float outputs come back as float32 numpy arrays."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}")
        n = int(np.asarray(feeds[self.input_names[0]]).shape[0])
        if n <= self.max_batch:
            return self._run_once(feeds)
        parts = [self._run_once({k: np.asarray(v)[i:i + self.max_batch] for k, v in feeds.items()})
                 for i in range(0, n, self.max_batch)]
        return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(self.output_names))]

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.path.name}, max_batch={self.max_batch})"
