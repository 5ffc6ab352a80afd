"""What the torch engines (VideoMAE, SAM3) share: reading a checkpoint's JSON, the torch device and
thread count, quiet loading, and finding an export's sidecar.

Small on purpose: each engine keeps its own preprocessing and model code; this module holds only
what would otherwise be written twice.  torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from copilot.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is one :class:`UsageError` line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def quiet_hf(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` without transformers' progress bars (loading, writing shards): a stage's
    log is not a terminal."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def set_torch_threads(threads: int) -> None:
    """Give torch ``threads`` intra-op threads (0: leave its default, one per core).  Process-wide:
    torch has one pool.  On a small busy machine this matters more than anything else: on the
    2-core CI box the tiny VideoMAE took 1.6 ms with 1 thread and 114 ms with 2 while another
    process used the second core (OpenMP workers waiting on each other)."""
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def torch_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r} (auto, cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def read_sidecar(onnx_dir: Path, onnx_name: str, sidecar_name: str, fmt: str, what: str, engine: str) -> dict[str, Any]:
    """The sidecar of the export in ``onnx_dir`` (format ``fmt``); a missing export or another
    format is one line saying how to make it (``gamecopilot export ENGINE``)."""
    side = onnx_dir / sidecar_name
    if not side.is_file() or not (onnx_dir / onnx_name).is_file():
        raise UsageError(f"{onnx_dir} holds no {what} export ({onnx_name} and {sidecar_name}); "
                         f"make one with `gamecopilot export {engine}`")
    data = read_json(side)
    if data.get("format") != fmt:
        raise UsageError(f"{side}: format {data.get('format')!r}, expected {fmt!r} (export it again)")
    return data
