"""``gamecopilot export siglip|videomae|sam3 --to onnx|tensorrt``: make an engine's runtime files once.

An engine's ONNX files (and TensorRT plans built from them) take seconds to minutes to make, so
they are a step of their own rather than a surprise at the start of a session.  ``--to onnx``
calls the engine's export function (``engines.siglip.export_siglip``,
``engines.videomae.export_videomae``, ``engines.sam3.export_sam3_backbone``); ``--to tensorrt``
exports to ONNX and builds a TensorRT plan for each file (``engines.tensorrt_engine``), checking
first that TensorRT and a GPU are there so a machine without them says so in one line before any
work.  ``--tiny`` builds the engine's tiny random model first (into the output folder), so the
whole command can be tried without weights.

Progress goes to stderr one line per step; stdout gets one line per written file, nothing else.
Without ``--out`` the files go where the engine looks by default (the user's cache, one folder
per engine and model: ``engines.model_registry.export_dir``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from copilot.args import OneLineParser, positive_int
from copilot.errors import UsageError, first_line

PROG = "gamecopilot export"

#: engine -> (module, export function, DEFAULT_MODELS key)
ENGINES: dict[str, tuple[str, str, str]] = {
    "siglip": ("engines.siglip", "export_siglip", "siglip2"),
    "videomae": ("engines.videomae", "export_videomae", "videomae"),
    "sam3": ("engines.sam3", "export_sam3_backbone", "sam3"),
}
#: engine -> the tiny random model builder's name in its module (out_dir, seed=0) -> Path
TINY_BUILDERS = {"siglip": "tiny_siglip2", "videomae": "tiny_videomae", "sam3": "tiny_sam3"}
TINY_DIR = "tiny-model"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export an engine's model to ONNX (and build TensorRT engines from it).")
    p.add_argument("engine", choices=sorted(ENGINES), help="which engine's model")
    p.add_argument("--model", help="model id (Hugging Face cache) or local checkpoint (default: the engine's default)")
    p.add_argument("--tiny", action="store_true", help="build the engine's tiny random model first and export that")
    p.add_argument("--to", required=True, choices=("onnx", "tensorrt"), help="onnx, or tensorrt (ONNX, then plans)")
    p.add_argument("--out", help="output folder (default: the engine's export folder in the user's cache)")
    p.add_argument("--allow-download", action="store_true", help="download the model if it is not in the cache")
    p.add_argument("--max-batch", type=positive_int, default=8, help="TensorRT: largest batch of the profile")
    return p


def _step(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _engine_function(engine: str, name: str) -> Callable[..., Any]:
    module_name = ENGINES[engine][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{engine}: cannot import {module_name} ({first_line(exc)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{engine}: {module_name} has no {name}() (not available in this version)")
    return fn  # type: ignore[no-any-return]


def _check_tensorrt() -> None:
    """TensorRT and a GPU, or one line (before any export work is done)."""
    from engines.tensorrt_engine import gpu_identity, import_tensorrt

    import_tensorrt()
    gpu_identity()


def run(args: argparse.Namespace) -> list[Path]:
    """Do the export ``args`` asks for; the written files, in order."""
    from engines.model_registry import DEFAULT_MODELS, export_dir

    engine = args.engine
    if args.tiny and args.model:
        raise UsageError("--tiny builds its own model: leave out --model")
    if args.to == "tensorrt":
        _check_tensorrt()
    export_fn = _engine_function(engine, ENGINES[engine][1])
    if args.tiny:
        out = Path(args.out) if args.out else Path(f"{engine}-tiny-export")
        builder = _engine_function(engine, TINY_BUILDERS[engine])
        _step(f"building the tiny random {engine} model in {out / TINY_DIR}")
        model = str(builder(out / TINY_DIR))
    else:
        model = args.model or DEFAULT_MODELS[ENGINES[engine][2]]
        out = Path(args.out) if args.out else export_dir(engine, model)
    _step(f"exporting {model} to ONNX in {out}")
    written = [Path(p) for p in export_fn(model, out, allow_download=args.allow_download).values()]
    if args.to == "tensorrt":
        from engines.tensorrt_engine import build_engine

        for onnx in [p for p in written if p.suffix == ".onnx"]:
            _step(f"building a TensorRT engine for {onnx.name} (FP16, batch 1..{args.max_batch})")
            written.append(build_engine(onnx, out / "tensorrt", fp16=True, max_batch=args.max_batch))
    return written


def main(argv: list[str] | None = None) -> int:
    """``gamecopilot export ENGINE --to onnx|tensorrt [...]``: 0 done, 2 bad input, 1 the export failed."""
    args = build_parser().parse_args(argv)
    # the exporter's optimiser notes ("Skipping constant folding ...") are not the user's business
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    try:
        written = run(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"{PROG}: {args.engine}: export failed: {first_line(exc)}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    _step(f"done: {len(written)} files")
    return 0
