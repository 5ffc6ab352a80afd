"""Where the expensive encoders' models come from: local paths or the Hugging Face cache, offline.

A model is named by a local path (a checkpoint directory, or a file such as the event scorer's
``.npz``) or by a Hugging Face id.  :func:`resolve_model` looks for it without the network
unless asked (``allow_download``; ``--allow-download`` on the command line): a copilot that
starts a game session must not stall on a multi-gigabyte download nobody asked for, and a
machine without a network must say which model is missing rather than hang.
``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are honoured the way huggingface_hub
honours them, but read at each call (see :func:`hf_cache_dir`).

:func:`configured_models` lists the models a pipeline config names (what ``gamecopilot
models`` shows).  The default model of each engine lives here, in :data:`DEFAULT_MODELS`, so
the stages, the engines and this listing agree without importing each other.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from copilot.errors import UsageError

DEFAULT_MODELS: dict[str, str] = {
    "siglip2": "google/siglip2-so400m-patch14-384",
    "videomae": "MCG-NJU/videomae-base",
    "sam3": "facebook/sam3",
}

#: Stage kind -> (role shown by ``gamecopilot models``, its engine's key in DEFAULT_MODELS).
STAGE_MODELS: dict[str, tuple[str, str]] = {
    "semantic": ("semantic (SigLIP2)", "siglip2"),
    "clip_embed": ("clip_embed (VideoMAE)", "videomae"),
    "segment": ("segment (SAM3)", "sam3"),
}


@dataclass
class ModelEntry:
    """One model a pipeline uses: its id, what it is for, where it was found (``path`` is None
    and ``found`` False when it was not), and the runtime and dtype the config asks for."""

    id: str
    role: str
    path: str | None
    found: bool
    runtime: str
    dtype: str

    def as_json(self) -> dict[str, Any]:
        """The ``gamecopilot models --json`` record: id, path, found, runtime, dtype first."""
        d = asdict(self)
        return {k: d[k] for k in ("id", "path", "found", "runtime", "dtype", "role")}


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, as huggingface_hub defines it (``HF_HUB_CACHE``, else
    ``HF_HOME``/hub, else ``$XDG_CACHE_HOME``/huggingface/hub, else ~/.cache/huggingface/hub).

    Read at each call and passed to huggingface_hub explicitly: huggingface_hub reads the
    variables once, when it is first imported, so a later change would otherwise be ignored."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def export_dir(engine: str, model: str) -> Path:
    """The default folder for an engine's export of ``model`` (``gamecopilot export`` without
    ``--out``, and exports an engine makes on demand): one folder per engine and model in the
    user's cache (``$XDG_CACHE_HOME`` or ~/.cache, then gameplay-copilot/ENGINE/), so the export
    command and a later run find the same files."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gameplay-copilot" / engine
    text = str(model)
    if Path(text).expanduser().exists():
        text = str(Path(text).expanduser().resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[-60:]
    return base / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids the network (huggingface_hub's own truthy values)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(text: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/abs``, ``a/b/c``, ``x.npz``)
    is meant as a path, and a missing path should not be asked of the hub."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def stage_hint(stage: str) -> str:
    """How a pipeline's user fetches a stage's missing model (the run commands have no flag for it)."""
    return (f"fetch it with `gamecopilot models -c PIPELINE.yaml --allow-download`, or set allow_download: true "
            f"in the {stage} stage's params")


def resolve_model(model: str, *, allow_download: bool = False,
                  hint: str = "pass --allow-download to fetch it") -> Path:
    """The local path of ``model``: an existing file or directory as given, else the snapshot of
    a hub id in the Hugging Face cache; with ``allow_download`` (and ``HF_HUB_OFFLINE`` unset) a
    missing id is downloaded.  A miss is one :class:`UsageError` line naming the cache and ``hint``
    (how to fetch it from where the user is: a flag of a command, a stage's param).
    """
    text = str(model or "").strip()
    if not text:
        raise UsageError("no model given (a local path or a Hugging Face model id)")
    path = Path(text).expanduser()
    if path.exists():
        return path
    cache = hf_cache_dir()
    if _looks_like_path(text):
        raise UsageError(f"model {text} not found: no such file or directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"model {text} is not a local path, and huggingface_hub is not installed to look it up "
                         "(pip install 'gameplay-copilot[engines]')") from None
    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache))
    except Exception as exc:  # LocalEntryNotFoundError, an invalid repo id, a broken cache: all a miss here
        local_error = exc
    if not allow_download:
        raise UsageError(f"model {text} not found locally or in the Hugging Face cache (HF_HUB_CACHE={cache}); "
                         f"{hint}")
    if offline():
        raise UsageError(f"model {text} not found in the Hugging Face cache (HF_HUB_CACHE={cache}) and "
                         "HF_HUB_OFFLINE is set, so it cannot be downloaded")
    try:
        return Path(snapshot_download(text, cache_dir=cache))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model {text}: download failed ({first}; "
                         f"cache lookup: {type(local_error).__name__})") from None


def locate(model: str) -> str | None:
    """Where ``model`` is on this machine without downloading (None when it is not)."""
    try:
        return str(resolve_model(model, allow_download=False))
    except UsageError:
        return None


def _entry(model: str, role: str, runtime: str, dtype: str, *, allow_download: bool = False) -> ModelEntry:
    if allow_download:
        path: str | None = str(resolve_model(model, allow_download=True))
    else:
        path = locate(model)
    return ModelEntry(id=model, role=role, path=path, found=path is not None, runtime=runtime, dtype=dtype)


def default_entries(*, allow_download: bool = False) -> list[ModelEntry]:
    """Each engine's default model (what ``gamecopilot models`` lists without a config naming any)."""
    return [_entry(DEFAULT_MODELS[key], role, "auto", "auto", allow_download=allow_download)
            for role, key in STAGE_MODELS.values()]


def _stage_list(cfg_data: dict[str, Any], source: str) -> list[dict[str, Any]]:
    stages = cfg_data.get("stages")
    if not isinstance(stages, list):
        raise UsageError(f"{source}: stages: expected a list of stages")
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            raise UsageError(f"{source}: stages[{i}]: expected a mapping")
    return stages


def _scorer_path(choice: str) -> str | None:
    """The event scorer's model file for a ``model`` param (None for ``none``)."""
    if choice == "none":
        return None
    if choice == "default":
        from importlib import resources

        return str(resources.files("engines") / "models" / "event_scorer.npz")
    return choice


def configured_models(cfg_data: dict[str, Any] | None, *, allow_download: bool = False,
                      source: str = "config") -> list[ModelEntry]:
    """The models a pipeline config (its parsed YAML mapping) names, in stage order.

    ``semantic``, ``clip_embed`` and ``segment`` stages (their ``model`` param, else the engine's
    default) with their ``runtime`` and ``dtype`` params; a ``reasoner`` whose ``llm.model`` is
    set; an ``event_scorer`` whose model is not ``none``.  With no config, or a config naming no
    model at all, the engines' defaults.  ``allow_download`` fetches missing hub ids.  A malformed
    config is one :class:`UsageError` line starting with ``source``.
    """
    if cfg_data is None:
        return default_entries(allow_download=allow_download)
    if not isinstance(cfg_data, dict):
        raise UsageError(f"{source}: expected a mapping at the top level")
    out: list[ModelEntry] = []
    for i, stage in enumerate(_stage_list(cfg_data, source)):
        kind = str(stage.get("kind", ""))
        if ":" in kind:  # module.path:ClassName, e.g. stages.semantic:SemanticStage
            kind = kind.partition(":")[0].rsplit(".", 1)[-1]
        params = stage.get("params") or {}
        if not isinstance(params, dict):
            raise UsageError(f"{source}: stages[{i}].params: expected a mapping")
        runtime = str(params.get("runtime", "auto"))
        dtype = str(params.get("dtype", "auto"))
        if kind in STAGE_MODELS:
            role, key = STAGE_MODELS[kind]
            model = str(params.get("model") or DEFAULT_MODELS[key])
            out.append(_entry(model, role, runtime, dtype, allow_download=allow_download))
        elif kind == "reasoner":
            llm = params.get("llm") or {}
            if isinstance(llm, dict) and llm.get("model"):
                if llm.get("url"):  # served by an OpenAI-compatible server: nothing to find here
                    out.append(ModelEntry(id=str(llm["model"]), role="reasoner", path=str(llm["url"]), found=True,
                                          runtime="openai", dtype=dtype))
                else:
                    out.append(_entry(str(llm["model"]), "reasoner", "transformers", dtype,
                                      allow_download=allow_download))
        elif kind == "event_scorer":
            path = _scorer_path(str(params.get("model", "default")))
            if path is not None:
                found = Path(path).expanduser().is_file()
                out.append(ModelEntry(id=path, role="event_scorer", path=path if found else None, found=found,
                                      runtime="numpy", dtype="n/a"))
    if not out:
        return default_entries(allow_download=allow_download)
    return out
