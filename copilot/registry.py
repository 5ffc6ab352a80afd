"""Registry of stage and engine kinds, and of the tools the command line hands work to.

The core never imports a stage, an engine or a ``bench`` module by name.  Kinds come from
these places:

* ``@register_stage("kind")`` on a class (tests, plugins imported by the user);
* the entry points in ``pyproject.toml`` (``gamecopilot.stages``, ``gamecopilot.engines``,
  ``gamecopilot.datasets``: dataset makers behind ``gamecopilot dataset SOURCE``,
  ``gamecopilot.benchmarks``: tools behind ``gamecopilot bench NAME``), loaded lazily the
  first time a kind is asked for, so ``gamecopilot --help`` imports nothing heavy and a
  stage's own dependencies load only when that stage is used;
* ``module.path:ClassName``, imported when first asked for.  This is how a plugin reaches
  the placement groups: each runs in a process of its own (spawned), where a class the
  user's script registered by importing it does not exist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from copilot.errors import UsageError

T = TypeVar("T")

_ENTRY_GROUPS = {
    "stages": "gamecopilot.stages",
    "engines": "gamecopilot.engines",
    "datasets": "gamecopilot.datasets",  # SOURCE -> make(game, seconds, out_dir, **options)
    "benchmarks": "gamecopilot.benchmarks",  # NAME -> main(argv) -> exit code
    "reasoners": "gamecopilot.reasoners",  # the reasoner's backends (copilot/advice.py AdviceBackend)
    "tools": "gamecopilot.tools",  # further commands: NAME -> main(argv) -> exit code (llm-server)
}
_REGISTRIES: dict[str, dict[str, Any]] = {family: {} for family in _ENTRY_GROUPS}


def _register(family: str, kind: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
        _REGISTRIES[family][kind] = obj
        obj.kind = kind  # type: ignore[attr-defined]
        return obj

    return deco


def register_stage(kind: str) -> Callable[[T], T]:
    return _register("stages", kind)


def register_engine(kind: str) -> Callable[[T], T]:
    return _register("engines", kind)


def _entry_points(family: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=_ENTRY_GROUPS[family])}


def available(family: str = "stages") -> list[str]:
    return sorted(set(_REGISTRIES[family]) | set(_entry_points(family)))


def resolve(kind: str, family: str = "stages") -> Any:
    """The class registered for ``kind``; a clear :class:`UsageError` if there is none."""
    reg = _REGISTRIES[family]
    if kind not in reg and ":" in kind:
        obj = _import_kind(kind, family)
        reg[kind] = obj
        return obj
    if kind not in reg:
        eps = _entry_points(family)
        if kind not in eps:
            names = ", ".join(available(family)) or "none"
            raise UsageError(f"unknown {family[:-1]} kind {kind!r} (known: {names})")
        obj = eps[kind].load()
        reg[kind] = obj
        obj.kind = kind
    return reg[kind]


def resolve_stage(kind: str) -> Any:
    return resolve(kind, "stages")


def _import_kind(kind: str, family: str) -> Any:
    """``module.path:ClassName``: the class, imported; a UsageError naming what is missing."""
    module_name, _, attr = kind.partition(":")
    what = family[:-1]
    if not module_name or not attr.isidentifier():
        raise UsageError(f"{what} kind {kind!r}: write a registered name or module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} kind {kind!r}: cannot import {module_name} ({exc})") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise UsageError(f"{what} kind {kind!r}: {module_name} has no {attr}")
    if family == "stages":
        from copilot.stage import Source, Stage

        if not (isinstance(obj, type) and issubclass(obj, Stage)) or obj in (Stage, Source):
            raise UsageError(f"{what} kind {kind!r}: {attr} is not a Stage class (a subclass of Stage)")
    return obj
