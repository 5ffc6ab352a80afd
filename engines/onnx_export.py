"""Export a torch module to ONNX and run the result: the generic half of every engine's export.

SigLIP2, VideoMAE and SAM3 each wrap the part of their model worth exporting in a small
``torch.nn.Module`` taking named tensors and call :func:`export_onnx`; the runtime side is
:class:`OnnxRunner`, a thin layer over :func:`engines.onnx_session.create_session` that says
where it really runs.

Which exporter (checked with torch 2.14, onnxscript 0.7, onnx 1.23): ``torch.onnx.export(...,
dynamo=True)`` is first.  It is the exporter torch maintains (the TorchScript one,
``dynamo=False``, is deprecated since 2.9 and warns on every call), it traces through
``torch.export`` so data-dependent Python branches fail loudly instead of being baked in
silently, and it takes ``dynamic_axes`` directly.  It needs onnxscript.  Three things
found on the way (SigLIP2's vision tower hit the first two):

- torch.export specialises axes of size 1, so a batch-1 example bakes batch 1 into some
  reshapes (the export succeeds, then batch 3 fails in ONNX Runtime).  A size-1 batch in the
  example inputs is therefore doubled before exporting.
- transformers' ``torch_compilable_check`` leaves ``aten._is_all_true`` in the graph, which
  the exporter has no translation for; it gets one here (a ReduceMin over the booleans).
- Some models still trip it (an operator without a translation, a guard torch.export cannot
  prove).  When it raises, or its file fails the check below, the TorchScript exporter is
  tried once with the same names and axes and the reason is logged: an export either works or
  says why, whichever exporter the model likes.

Every file is checked before it replaces anything on disk (written in a temporary folder beside
the target, then moved): ``onnx.checker``, the graph's input and output names, and, when onnxruntime is
installed, a run at batch 1 and batch 3 against the torch module (so a batch axis that was
silently fixed is caught at export time, not in the pipeline).

Nothing heavy is imported at module level: torch, onnx and onnxruntime are imported inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from copilot.errors import UsageError, first_line
from engines.onnx_session import CPU, CUDA, TRT, SessionConfig, create_session, select_providers, session_device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENGINES_HINT = "pip install 'gameplay-copilot[engines]'"
DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB for the whole file, graph included
VERIFY_BATCHES = (1, 3)
VERIFY_ATOL = 1e-3
VERIFY_RTOL = 1e-3

_SHORT = {TRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}


def _require_export_libs() -> None:
    """torch, onnx and onnxscript importable, or one line naming the ``engines`` extra."""
    for name in ("torch", "onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise UsageError(f"{name} is not installed; ONNX export needs it: {ENGINES_HINT}") from None


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in names}


def _is_all_true_translation() -> Any:
    """An ONNX translation of ``aten._is_all_true`` (what ``torch._check`` leaves in exported graphs)."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    cast: Any = op.Cast
    reduce_min: Any = op.ReduceMin

    def is_all_true(x: Any) -> Any:
        return cast(reduce_min(cast(x, to=TensorProto.INT32), keepdims=0), to=TensorProto.BOOL)

    return is_all_true


def _example_inputs(inputs: dict[str, torch.Tensor], dynamic_batch: bool) -> dict[str, torch.Tensor]:
    """The inputs to trace with: a size-1 batch doubled (torch.export would fix a size-1 axis)."""
    import torch

    if not dynamic_batch:
        return dict(inputs)
    return {k: torch.cat([v, v]) if v.dim() > 0 and v.shape[0] == 1 else v for k, v in inputs.items()}


def _torch_export(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    output_names: list[str],
    *,
    dynamic_batch: bool,
    opset: int,
    dynamo: bool,
    external_data: bool = False,
) -> None:
    import warnings

    import torch

    axes = _dynamic_axes([*inputs, *output_names]) if dynamic_batch else None
    # The exporters print progress and notes on stdout and stderr (a command's stdout is its result):
    # kept quiet, a failure's reason travels in its exception.  They also warn that the inputs'
    # 'batch' axes share one name, which is the point of naming them so.
    sink = io.StringIO()
    with (torch.no_grad(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink),
          warnings.catch_warnings()):
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended.*")
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        if dynamo:
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=dict(inputs),
                input_names=list(inputs),
                output_names=list(output_names),
                opset_version=opset,
                dynamic_axes=axes,
                dynamo=True,
                external_data=external_data,
                verbose=False,
                custom_translation_table={torch.ops.aten._is_all_true.default: _is_all_true_translation()},
            )
        else:
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=list(output_names),
                opset_version=opset,
                dynamic_axes=axes,
                dynamo=False,
                do_constant_folding=True,
            )


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause (the exporters wrap the real reason in generic errors)."""
    import re

    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    return re.sub(r"\x1b\[[0-9;]*m|\[[0-9;]*m", "", first_line(inner))


def _check_names(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """The exported graph has exactly the asked-for inputs and outputs (an exporter may drop an
    unused input, which would break every caller feeding it by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != inputs or got_out != outputs:
        raise RuntimeError(f"exported graph has inputs {got_in} and outputs {got_out}, expected {inputs} and {outputs}")


def _param_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _tile(v: torch.Tensor, n: int) -> torch.Tensor:
    return v[:1].expand(n, *v.shape[1:]).contiguous() if v.dim() > 0 else v


def _verify_run(module: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path, output_names: list[str],
                dynamic_batch: bool) -> None:
    """Run the exported file with onnxruntime (if installed) and compare it with ``module``:
    at batch 1 and 3 with a dynamic batch, else at the example's own shapes."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.debug("onnxruntime not installed: %s not run-checked", path.name)
        return
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [{k: _tile(v, n) for k, v in inputs.items()} for n in VERIFY_BATCHES] if dynamic_batch else [inputs]
    for feeds in cases:
        with torch.no_grad():
            ref = module(**feeds)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(list(output_names), {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        for name, r, g in zip(output_names, refs, got, strict=False):
            want = r.detach().float().cpu().numpy() if r.is_floating_point() else r.detach().cpu().numpy()
            if want.shape != g.shape:
                raise RuntimeError(f"output {name}: shape {g.shape} from ONNX Runtime, {want.shape} from torch")
            if want.dtype.kind == "f" and not np.allclose(g, want, atol=VERIFY_ATOL, rtol=VERIFY_RTOL):
                raise RuntimeError(f"output {name}: ONNX Runtime differs from torch by up to "
                                   f"{parity_max_abs(g, want):.3g} at batch {want.shape[0] if want.ndim else 1}")


def export_onnx(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    output_names: list[str],
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` (called as ``module(**inputs)``) to ``path`` and return ``path``.

    The graph's inputs are named after the keys of ``inputs`` (in order), its outputs after
    ``output_names``; with ``dynamic_batch`` axis 0 of every input and output is the symbolic
    ``batch``.  The file is written in a temporary folder beside ``path``, checked and moved into
    place, so a failed export never leaves a half file where a good one was.  A module with more
    than ~1.8 GB of weights gets them in ``<name>.data`` beside the graph (ONNX's external data).
    See the module docstring for the exporter choice and the checks.
    """
    _require_export_libs()
    import onnx

    if not inputs:
        raise ValueError("export_onnx: no inputs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = _example_inputs(inputs, dynamic_batch)
    # Weights past protobuf's 2 GB limit go to a '<name>.data' file beside the graph: the export is made
    # in a temporary folder next to ``path`` under the final name, so the graph's reference to its data
    # file stays right once both are moved into place (the data first).
    big = _param_bytes(module) > EXTERNAL_DATA_BYTES
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        errors: list[str] = []
        for dynamo in (True, False):
            for old in tmp_dir.iterdir():
                old.unlink()
            try:
                _torch_export(module, example, tmp, output_names, dynamic_batch=dynamic_batch, opset=opset,
                              dynamo=dynamo, external_data=big)
                onnx.checker.check_model(str(tmp))
                _check_names(tmp, list(inputs), list(output_names))
                _verify_run(module, inputs, tmp, list(output_names), dynamic_batch)
                break
            except Exception as exc:  # an exporter failure of any kind: try the other one, then report both
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {_reason(exc)}")
                if dynamo:
                    log.warning("%s: the dynamo ONNX exporter failed (%s); trying the TorchScript exporter",
                                path.name, _reason(exc))
        else:
            raise RuntimeError(f"ONNX export of {path.name} failed ({'; '.join(errors)})")
        for extra in tmp_dir.iterdir():
            if extra != tmp:
                os.replace(extra, path.parent / extra.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("exported %s", path)
    return path


def parity_max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference between two arrays of the same shape (inf if shapes differ)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)))


def describe_providers(cfg: SessionConfig, available: list[str], gpu_present: bool) -> tuple[list[str], str]:
    """The providers :func:`select_providers` picks for ``cfg`` and one line saying what was left
    out and why, e.g. ``TensorRT: not in this onnxruntime build; CUDA: no GPU visible; running on CPU``.

    Pure (the available list and the GPU flag are arguments), so the TensorRT -> CUDA -> CPU
    fallback is tested without a GPU.  An explicit ``cuda``/``tensorrt`` that cannot be honoured
    raises :class:`UsageError` exactly as :func:`select_providers` does.
    """
    chosen = [name for name, _ in select_providers(cfg, list(available), gpu_present=gpu_present)]
    notes: list[str] = []
    if cfg.device == "cpu":
        notes.append("device 'cpu' asked for")
    else:
        for name in (TRT, CUDA):
            if name in chosen:
                continue
            if cfg.device == "cuda" and name == TRT:
                continue  # not asked for
            if name not in available:
                why = "not in this onnxruntime build"
            elif not gpu_present:
                why = "no GPU visible"
            elif name == TRT and cfg.trt_cache_dir is None:
                why = "no engine cache dir set (each start would rebuild the engine)"
            else:
                why = "not selected"
            notes.append(f"{_SHORT[name]}: {why}")
    notes.append(f"running on {_SHORT.get(chosen[0], chosen[0])}")
    return chosen, "; ".join(notes)


class OnnxRunner:
    """One exported model run by ONNX Runtime: float32 arrays in, float32 arrays out.

    ``providers`` are the ones the session really got; ``fallback`` is one line when the first
    provider asked for is not the one running (empty otherwise), so a GPU that fell back to the
    CPU is reported, never silent.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], cfg: SessionConfig | None = None) -> None:
        from engines.onnx_session import available_providers, cuda_available

        self.path = Path(path)
        self.cfg = cfg or SessionConfig()
        gpu = self.cfg.device != "cpu" and (cuda_available() or self.cfg.device in ("cuda", "tensorrt"))
        wanted, self.selection = describe_providers(self.cfg, available_providers(), gpu)
        self.session: Any = create_session(self.path, self.cfg)
        self.providers: list[str] = list(self.session.get_providers())
        self.device: str = session_device(self.session)
        self.fallback = ""
        if wanted and self.providers and self.providers[0] != wanted[0]:
            self.fallback = f"asked for {wanted[0]}, running on {self.providers[0]}"
        self.input_names: list[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on ``feeds`` (by input name); float inputs go in as float32, outputs come back float32."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}")
        ready = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            if arr.dtype.kind == "f" and arr.dtype != np.float32:
                arr = arr.astype(np.float32)
            ready[name] = np.ascontiguousarray(arr)
        outs = self.session.run(self.output_names, ready)
        return [np.asarray(o, dtype=np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o) for o in outs]

    def __repr__(self) -> str:
        return f"OnnxRunner({self.path.name}, providers={self.providers})"
