"""The expensive engines in ``gamecopilot bench encoders``: latency by runtime and batch size, and parity.

SigLIP2 (image embeddings), VideoMAE (16-frame clip embeddings) and SAM3 (its vision backbone, the
part exported to ONNX and the bulk of a frame's cost) are each loaded on every runtime this machine
has: ``torch``, ``onnxruntime`` (from the engine's own ONNX export, made into a temporary directory)
and ``tensorrt`` where CUDA and tensorrt exist.  Each runtime encodes the same real inputs (Atari
frames) at batch 1 and 3; the figure is the wall time of one call, p50/p99 over ``repeats`` calls
after ``warmup``, and ``parity_max_abs`` the largest absolute difference of its output from torch's on
the same batch (torch itself: 0).

With ``--tiny`` the models are tiny random ones built from configs on the fly (no weights exist on
this machine), labelled ``"tiny_random": true``: they measure the engine paths (preprocessing,
export, session set-up, batching), not a real model's speed.  ``--engine-model NAME=PATH`` benches a
real checkpoint instead (a local directory or the Hugging Face cache, offline).

Two more figures the engines' placement needs: ``sam3_cascade`` runs the segment stage's cascade
over the bundled Breakout clip's events (from the cheap pipeline) and reports the fraction of frames
SAM3 was run on; ``frame_copy`` times the host copy of one 720p RGB frame, the price of a frame
crossing from one GPU's group to another's as a host array (plus the link hop ``bench bus`` measures).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError
from copilot.messages import VideoFrame

ENGINES = ("siglip2", "videomae", "sam3")
BATCHES = (1, 3)
Encode = Callable[[np.ndarray], np.ndarray]


@dataclass
class EngineCase:
    """One engine on its runtimes: the runtimes' encode functions and a batch maker."""

    name: str
    runtimes: dict[str, Encode]
    make_batch: Callable[[int], np.ndarray]
    model: str
    tiny: bool
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why it was not measured


def _summary_ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64) * 1e3
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3)}


def time_calls(fn: Encode, batch: np.ndarray, repeats: int, warmup: int) -> tuple[dict[str, float], np.ndarray]:
    """p50/p99 wall ms of ``fn(batch)`` over ``repeats`` calls after ``warmup``, and the last output."""
    out = fn(batch)
    for _ in range(warmup):
        out = fn(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(batch)
        times.append(time.perf_counter() - t0)
    return _summary_ms(times), np.asarray(out)


def bench_case(case: EngineCase, *, batches: tuple[int, ...] = BATCHES, repeats: int = 10,
               warmup: int = 2) -> dict[str, Any]:
    """``{RUNTIME: {"batch": {"1": {"p50_ms", "p99_ms"}, ...}, "parity_max_abs"}}`` for one engine."""
    from engines.onnx_export import parity_max_abs

    out: dict[str, Any] = {}
    reference: dict[int, np.ndarray] = {}
    inputs = {b: case.make_batch(b) for b in batches}
    for runtime, fn in case.runtimes.items():
        row: dict[str, Any] = {"batch": {}}
        parity = 0.0
        for b in batches:
            stats, got = time_calls(fn, inputs[b], repeats, warmup)
            row["batch"][str(b)] = stats
            if runtime == "torch":
                reference[b] = got
            elif b in reference:
                parity = max(parity, parity_max_abs(reference[b], got))
        row["parity_max_abs"] = float(f"{parity:.3g}")
        out[runtime] = row
    for runtime, why in case.skipped.items():
        out.setdefault(runtime, {"skipped": why})
    return out


@lru_cache(maxsize=8)
def _frames(n: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> np.ndarray:
    """``n`` real Atari frames (Breakout, random play; synthetic without ale-py, as
    :func:`bench.encoders.make_inputs` makes them), made once per shape: every runtime times the same ones."""
    from bench.encoders import make_inputs

    inputs = make_inputs("Breakout", max(n, 1) * 4, 0.1, seed=seed)
    frames = [np.asarray(f.image) for f in inputs.video(size[::-1]) if isinstance(f, VideoFrame)]
    return np.stack(frames[::4][:n])


def _tensorrt_ready() -> str:
    """Empty when TensorRT can run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (the gpu extra, on a machine with CUDA)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return "" if torch.cuda.is_available() else "no CUDA device"


@dataclass(frozen=True)
class EngineSpec:
    """How to build, export and load one engine on each runtime (names in its module)."""

    module: str
    tiny: str  # tiny random model builder: (out_dir, seed) -> Path
    export: str  # (model, out_dir) -> files
    load: str  # (model, runtime=, device=, onnx_dir=) -> engine
    method: str  # the engine's encode method the bench times
    tensorrt: bool  # whether the engine has a TensorRT runtime


SPECS = {
    "siglip2": EngineSpec("engines.siglip", "tiny_siglip2", "export_siglip", "load_siglip", "encode_images", True),
    "videomae": EngineSpec("engines.videomae", "tiny_videomae", "export_videomae", "load_videomae", "encode_clips",
                           False),
    "sam3": EngineSpec("engines.sam3", "tiny_sam3", "export_sam3_backbone", "load_sam3", "encode_backbone", False),
}


def make_case(name: str, model: str | None, work: Path, *, tiny: bool) -> EngineCase:
    """``name`` on torch, on ONNX Runtime from its export (made in ``work``), and on TensorRT where it can."""
    import importlib

    spec = SPECS[name]
    mod = importlib.import_module(spec.module)
    tiny = tiny or model is None
    path = str(getattr(mod, spec.tiny)(work / name, seed=0)) if tiny else str(model)
    onnx_dir = work / f"{name}-onnx"
    getattr(mod, spec.export)(path, onnx_dir)
    load = getattr(mod, spec.load)
    torch_engine = load(path, runtime="torch", device="cpu")
    runtimes: dict[str, Encode] = {
        "torch": getattr(torch_engine, spec.method),
        "onnxruntime": getattr(load(path, runtime="onnxruntime", device="cpu", onnx_dir=onnx_dir), spec.method),
    }
    skipped = {}
    why = _tensorrt_ready() if spec.tensorrt else f"no TensorRT runtime for {name} yet (its ONNX export can be built)"
    if why:
        skipped["tensorrt"] = why
    else:
        runtimes["tensorrt"] = getattr(load(path, runtime="tensorrt", onnx_dir=onnx_dir), spec.method)
    if name == "videomae":
        frames_per_clip = int(torch_engine.num_frames)

        def make_batch(n: int) -> np.ndarray:
            f = _frames(frames_per_clip * n, size=(240, 320))
            return f.reshape(n, frames_per_clip, *f.shape[1:])
    else:
        def make_batch(n: int) -> np.ndarray:
            return _frames(n)
    return EngineCase(name, runtimes, make_batch, path, tiny, skipped)


def frame_copy_ms(repeats: int = 50) -> dict[str, Any]:
    """Host copy of one 720p RGB frame (what a frame crossing GPU groups costs besides the link hop)."""
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame.copy()
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"host_copy_720p": _summary_ms(times), "device_to_host_720p": "no CUDA device here"}
    import torch

    if torch.cuda.is_available():
        dev = torch.from_numpy(frame).cuda()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dev.cpu()
            times.append(time.perf_counter() - t0)
        out["device_to_host_720p"] = _summary_ms(times)
    out["link_hop"] = "see `gamecopilot bench bus` (one 720p frame over ipc/tcp)"
    return out


def run_engines(*, tiny: bool, only: set[str] | None = None, models: dict[str, str] | None = None,
                repeats: int = 10, warmup: int = 2, cascade: bool = True,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``{"engines": ...}`` report (see the module docstring)."""
    models = models or {}
    unknown = sorted(set(models) - set(ENGINES))
    if unknown:
        raise UsageError(f"--engine-model: no engine {unknown[0]!r} (engines: {', '.join(ENGINES)})")
    if not tiny and not models:
        raise UsageError("bench encoders engines: give --tiny (tiny random models) or --engine-model NAME=PATH")
    report: dict[str, Any] = {"engines": {}, "tiny_random": {}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="gamecopilot-bench-engines-") as tmp:
        for name in ENGINES:
            if (only and name not in only) or (not tiny and name not in models):
                continue
            if progress:
                progress(f"{name}: building and exporting")
            case = make_case(name, models.get(name), Path(tmp), tiny=tiny and name not in models)
            if progress:
                progress(f"{name}: timing {', '.join(case.runtimes)}")
            report["engines"][name] = bench_case(case, repeats=repeats, warmup=warmup)
            report["tiny_random"][name] = case.tiny
            report["models"][name] = case.model
        if cascade and (not only or "sam3" in only) and tiny:
            if progress:
                progress("sam3 cascade over the bundled clip")
            from bench.engines_cascade import cascade_fraction

            report["sam3_cascade"] = cascade_fraction(Path(tmp))
    report["frame_copy"] = frame_copy_ms()
    return report


def format_engines(report: dict[str, Any]) -> str:
    """The engines' table: one row per engine, runtime and batch."""
    lines = [f"{'engine':<10} {'runtime':<12} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'parity':>9}"]
    for name, runtimes in report["engines"].items():
        tag = " (tiny random)" if report["tiny_random"].get(name) else ""
        for runtime, row in runtimes.items():
            if "skipped" in row:
                lines.append(f"{name:<10} {runtime:<12} {'-':>5}  skipped: {row['skipped']}")
                continue
            for b, st in row["batch"].items():
                lines.append(f"{name:<10} {runtime:<12} {b:>5} {st['p50_ms']:>9.2f} {st['p99_ms']:>9.2f} "
                             f"{row['parity_max_abs']:>9.2g}{tag}")
    cas = report.get("sam3_cascade")
    if cas:
        lines.append(f"SAM3 cascade: {cas['segmented']} of {cas['frames']} frames "
                     f"({cas['fraction'] * 100:.2f}%) over {cas['clip']}")
    copy = report["frame_copy"]["host_copy_720p"]
    lines.append(f"720p RGB host copy p50 {copy['p50_ms']:.3f} ms (a frame crossing GPU groups, plus bench bus's hop)")
    return "\n".join(lines)

