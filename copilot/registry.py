"""Registry of stage and engine kinds.

The core never imports a stage by module name.  Kinds come from two places:

* ``@register_stage("kind")`` on a class (tests, plugins imported by the user);
* the ``gamecopilot.stages`` / ``gamecopilot.engines`` entry points in ``pyproject.toml``,
  loaded lazily the first time a kind is asked for, so ``gamecopilot --help`` imports nothing
  heavy and a stage's own dependencies load only when that stage is used.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from copilot.errors import UsageError

T = TypeVar("T")

_REGISTRIES: dict[str, dict[str, Any]] = {"stages": {}, "engines": {}}
_ENTRY_GROUPS = {"stages": "gamecopilot.stages", "engines": "gamecopilot.engines"}


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
