"""ProjectorBank: embedding tokens from the copilot's encoders into an LLM's input space.

An encoder's tokens (HiCo context tokens, thumbnail embeddings, ...) live in that encoder's
space; the LLM reads vectors of its hidden size.  The bank holds one small MLP per *source*
(``Linear(dim, hidden) -> GELU -> Linear(hidden, hidden)``, ``hidden`` the LLM's hidden size)
and turns ``{source: (n, dim) float32}`` into one ``(total_tokens, hidden)`` tensor that the
transformers backend writes over placeholder rows of the prompt's ``inputs_embeds``.

Sources are projected in a fixed order, sorted by name (:attr:`ProjectorBank.sources`), whatever
order the request's dict has, so a trained bank always sees its tokens in the same layout.

The weights are a safetensors file (a ``torch.save``'d state dict when safetensors is not
installed); :meth:`ProjectorBank.load` finds the sources and their dimensions in the weights.
An untrained bank only adds noise to the prompt: the backend uses a bank only when given weights.

Every mistake is one line (:class:`~copilot.errors.UsageError`) naming the source and the sizes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from copilot.errors import UsageError, first_line

FLAG = "llm.projectors"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_KEY = re.compile(r"^proj\.(?P<source>[A-Za-z0-9_\-]+)\.(?P<layer>[02])\.(?P<part>weight|bias)$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format


class ProjectorBank(nn.Module):
    """One MLP projector per embedding source, each from that source's dimension to ``hidden_size``."""

    def __init__(self, dims: Mapping[str, int], hidden_size: int) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"projector hidden size must be positive, got {hidden_size}")
        if not dims:
            raise ValueError("a ProjectorBank needs at least one source")
        for source, dim in dims.items():
            if not isinstance(source, str) or not _NAME.match(source):
                raise ValueError(f"projector source {source!r}: use letters, digits, '_' or '-'")
            if int(dim) <= 0:
                raise ValueError(f"projector {source!r}: dimension must be positive, got {dim}")
        self.hidden_size = int(hidden_size)
        self.dims: dict[str, int] = {s: int(dims[s]) for s in sorted(dims)}
        self.proj = nn.ModuleDict({
            s: nn.Sequential(nn.Linear(d, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, self.hidden_size))
            for s, d in self.dims.items()
        })

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources in the order their tokens are projected (sorted by name)."""
        return tuple(self.dims)

    def check(self, embeddings: Mapping[str, Any]) -> int:
        """The number of tokens ``embeddings`` holds; UsageError for an unknown source or a wrong size."""
        total = 0
        for source, arr in embeddings.items():
            if source not in self.dims:
                known = ", ".join(self.sources)
                raise UsageError(f"{FLAG}: no projector for source {source!r} (the bank has: {known})")
            shape = np.shape(arr)
            if len(shape) not in (1, 2):
                raise UsageError(f"projector {source!r} takes (n, {self.dims[source]}) tokens, got shape {shape}")
            dim = shape[-1]
            if dim != self.dims[source]:
                raise UsageError(f"projector {source!r} takes {self.dims[source]}-d tokens, got {dim}-d")
            total += 1 if len(shape) == 1 else int(shape[0])
        return total

    def project(self, embeddings: Mapping[str, np.ndarray]) -> torch.Tensor:
        """``{source: (n, dim)}`` (a 1-D array is one token) -> ``(total_tokens, hidden_size)``, the
        sources in :attr:`sources` order, on the bank's device and dtype."""
        self.check(embeddings)
        first = next(iter(self.parameters()))
        parts: list[torch.Tensor] = []
        for source in self.sources:
            if source not in embeddings:
                continue
            arr = np.asarray(embeddings[source], dtype=np.float32)
            x = torch.from_numpy(arr.reshape(-1, arr.shape[-1]).copy()).to(device=first.device, dtype=first.dtype)
            if x.shape[0]:
                parts.append(self.proj[source](x))
        if not parts:
            return torch.zeros(0, self.hidden_size, device=first.device, dtype=first.dtype)
        return torch.cat(parts, dim=0)

    def forward(self, embeddings: Mapping[str, np.ndarray]) -> torch.Tensor:
        return self.project(embeddings)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the weights (safetensors, else ``torch.save`` of the state dict); return the path."""
        p = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        try:
            from safetensors.torch import save_file
        except ImportError:
            torch.save(state, p)
        else:
            save_file(state, str(p), metadata={"format": "pt", "hidden_size": str(self.hidden_size)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str], hidden_size: int) -> ProjectorBank:
        """A bank from weights written by :meth:`save`; the sources and their dimensions come from
        the weights, and every projector must give ``hidden_size``-d tokens (the LLM's hidden size)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"{FLAG}: no projector weights at {p} (a file written by ProjectorBank.save)")
        state = _read_state(p)
        dims = _dims_from_state(state, p, hidden_size)
        bank = cls(dims, hidden_size)
        try:
            bank.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # pragma: no cover - shapes were checked above
            raise UsageError(f"{FLAG}: {p}: {first_line(exc)}") from None
        return bank.eval()


def _read_state(p: Path) -> dict[str, torch.Tensor]:
    with p.open("rb") as f:
        magic = f.read(4)
    try:
        if magic == _ZIP_MAGIC:
            state = torch.load(p, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
    except Exception as exc:
        raise UsageError(f"{FLAG}: {p} is not a projector weights file ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{FLAG}: {p} is not a projector weights file (expected a state dict of tensors)")
    return state


def _dims_from_state(state: Mapping[str, torch.Tensor], p: Path, hidden_size: int) -> dict[str, int]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise UsageError(f"{FLAG}: {p} is not a projector weights file (unexpected tensor {key!r})")
        parts.setdefault(m["source"], {})[f"{m['layer']}.{m['part']}"] = tensor
    if not parts:
        raise UsageError(f"{FLAG}: {p} holds no projectors")
    dims: dict[str, int] = {}
    for source, t in sorted(parts.items()):
        missing = {"0.weight", "0.bias", "2.weight", "2.bias"} - set(t)
        if missing:
            raise UsageError(f"{FLAG}: {p}: projector {source!r} is missing {', '.join(sorted(missing))}")
        w1, b1, w2, b2 = t["0.weight"], t["0.bias"], t["2.weight"], t["2.bias"]
        if w1.ndim != 2 or w2.ndim != 2 or b1.ndim != 1 or b2.ndim != 1:
            raise UsageError(f"{FLAG}: {p}: projector {source!r} has malformed weights")
        out = int(w2.shape[0])
        if out != hidden_size:
            raise UsageError(f"{FLAG}: projector {source!r} gives {out}-d tokens but the LLM's hidden size is "
                             f"{hidden_size} (weights for another model?)")
        if (w1.shape[0], b1.shape[0], w2.shape[1], b2.shape[0]) != (hidden_size,) * 4:
            raise UsageError(f"{FLAG}: {p}: projector {source!r} has inconsistent layer sizes "
                             f"({tuple(w1.shape)}, {tuple(w2.shape)})")
        dims[source] = int(w1.shape[1])
    return dims
