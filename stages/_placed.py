"""Where an engine stage runs: its ``device`` param, else the device its placement group was given.

A pipeline places groups on devices (``groups: {vision: {device: cuda:1}}``); the launcher pins the
group's process to that GPU, and the stage sees it as ``StageContext.device`` (``cuda:0``, ``cpu``, or
None when nothing is placed).  An engine stage whose own ``device`` param is ``auto`` follows it, so
a placement moves the model without editing every stage's params; a param that names a device wins.
After loading, the stage reports where the engine really runs (``Stage.device_actual``), which the
supervisor compares with the placement: a GPU stage that fell back to the CPU is a warning, not a
silence.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from copilot.errors import UsageError
from copilot.stage import Stage

P = TypeVar("P", bound=msgspec.Struct)


def placed_device(param: str, ctx_device: str | None) -> str:
    """``auto`` follows the placement (``cuda:N`` -> ``cuda``: the pinned process sees only its GPUs)."""
    if param != "auto" or ctx_device is None:
        return param
    return "cuda" if ctx_device.startswith("cuda") else "cpu"


def placed_params(stage: Stage[Any], params: P) -> P:
    """``params`` with ``device`` resolved against the stage's placement."""
    device = placed_device(getattr(params, "device", "auto"), stage.ctx.device)
    return msgspec.structs.replace(params, device=device)  # type: ignore[type-var]


def check_export(params: Any, stage: str, engine: str) -> bool:
    """Whether the engine's ONNX export is there (``onnx_dir``, else the folder ``gamecopilot export``
    writes by default); ``runtime: onnxruntime`` without one is one line saying how to make it."""
    import importlib
    from pathlib import Path

    from engines.model_registry import export_dir

    odir = Path(params.onnx_dir) if params.onnx_dir is not None else export_dir(engine, str(params.model))
    found = bool(importlib.import_module(f"engines.{engine}").has_export(odir))
    if params.runtime == "onnxruntime" and not found:
        raise UsageError(f"{stage}: runtime onnxruntime, but {odir} holds no {engine} export (make it with "
                         f"`gamecopilot export {engine} --to onnx`, or give onnx_dir)")
    return found


def report_device(stage: Stage[Any], engine: Any) -> None:
    """Tell the metrics (and through them the supervisor) where ``engine`` really runs."""
    actual = str(getattr(engine, "device", "") or "")
    if actual:
        stage.device_actual = actual
