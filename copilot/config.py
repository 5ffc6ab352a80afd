"""Pipeline YAML: schema, validation and link resolution.

A pipeline file lists links (name -> policy) and stages (kind, params, inputs, outputs,
placement).  Validation is strict: an unknown key, a wrong type, an unknown stage kind, a
link with no producer or two producers all end in a :class:`UsageError` naming the file and
the key, which the CLI prints as one line (exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from copilot.errors import UsageError
from copilot.links import LinkSpec, check_bind_endpoint
from copilot.registry import resolve_stage


class LinkConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    policy: Literal["latest", "ordered"] = "ordered"
    hwm: int = 64
    max_age_ms: float | None = None
    block_ms: float | None = 2000.0
    endpoint: str | None = None


class Placement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    group: str = "main"
    host: str = "localhost"
    device: str = "cpu"


class StageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    kind: str
    params: dict[str, Any] = {}
    inputs: list[str] = []
    outputs: dict[str, str] = {}
    placement: Placement = msgspec.field(default_factory=Placement)


class SupervisorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    control_endpoint: str | None = None
    metrics_endpoint: str | None = None
    heartbeat_s: float = 0.25
    heartbeat_timeout_s: float = 2.0
    restart_backoff_s: list[float] = msgspec.field(default_factory=lambda: [0.1, 0.5, 1.0, 2.0, 5.0])
    max_restarts: int = 10
    metrics_interval_s: float = 0.5
    shutdown_timeout_s: float = 5.0


class PipelineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    name: str = "pipeline"
    links: dict[str, LinkConfig] = {}
    stages: list[StageConfig]
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)

    # -- derived views ----------------------------------------------------------------------
    def groups(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.stages:
            seen.setdefault(s.placement.group, None)
        return list(seen)

    def stages_in(self, group: str) -> list[StageConfig]:
        return [s for s in self.stages if s.placement.group == group]

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def consumers(self, link: str) -> list[StageConfig]:
        return [s for s in self.stages if link in s.inputs]

    def producer(self, link: str) -> StageConfig:
        for s in self.stages:
            if link in s.outputs.values():
                return s
        raise KeyError(link)


def _msgspec_error(path: str, exc: msgspec.ValidationError) -> UsageError:
    text = str(exc)
    where = ""
    if " - at `" in text:
        text, where = text.split(" - at `", 1)
        where = where.rstrip("`").replace("$.", "").replace("$", "")
    text = text.replace("`", "")
    return UsageError(f"{path}: {where + ': ' if where else ''}{text[0].lower() + text[1:]}")


def load_yaml(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{p}: not valid YAML ({first})") from exc
    if data is None:
        raise UsageError(f"{p}: config file is empty")
    return data


def parse_pipeline(data: Any, source: str = "<config>") -> PipelineConfig:
    """Validate a pipeline mapping; every error names ``source`` and the offending key."""
    try:
        cfg = msgspec.convert(data, PipelineConfig)
    except msgspec.ValidationError as exc:
        raise _msgspec_error(source, exc) from exc
    names = set()
    for i, st in enumerate(cfg.stages):
        where = f"{source}: stages[{i}]"
        if st.name in names:
            raise UsageError(f"{where}.name: duplicate stage name {st.name!r}")
        names.add(st.name)
        try:
            cls = resolve_stage(st.kind)
        except UsageError as exc:
            raise UsageError(f"{where}.kind: {exc}") from exc
        try:
            st.params = msgspec.to_builtins(msgspec.convert(st.params, cls.Params))
        except msgspec.ValidationError as exc:
            err = _msgspec_error(source, exc)
            msg = str(err).split(": ", 1)[1]
            raise UsageError(f"{where}.params{'.' if not msg.startswith('expected') else ': '}{msg}") from exc
        for port in st.outputs:
            if port not in cls.output_ports:
                raise UsageError(
                    f"{where}.outputs: stage kind {st.kind!r} has no output port {port!r} "
                    f"(ports: {', '.join(cls.output_ports) or 'none'})"
                )
        if cls.min_inputs and len(st.inputs) < cls.min_inputs:
            raise UsageError(f"{where}.inputs: stage kind {st.kind!r} needs an input link")
        for link in [*st.inputs, *st.outputs.values()]:
            if link not in cfg.links:
                raise UsageError(f"{where}: link {link!r} is not declared under links")
    for link in cfg.links:
        producers = [s.name for s in cfg.stages if link in s.outputs.values()]
        if len(producers) > 1:
            raise UsageError(f"{source}: links.{link}: produced by several stages ({producers})")
        endpoint = cfg.links[link].endpoint
        if endpoint:
            try:
                check_bind_endpoint(endpoint)
            except ValueError as exc:
                raise UsageError(f"{source}: links.{link}.endpoint: {exc}") from exc
    return cfg


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    return parse_pipeline(load_yaml(path), str(path))


def link_specs(cfg: PipelineConfig, *, run_dir: str | None) -> dict[str, LinkSpec]:
    """Resolve endpoints: explicit ones stay; others are ``ipc://`` in ``run_dir`` or inproc."""
    out = {}
    for name, lc in cfg.links.items():
        if lc.endpoint:
            endpoint = lc.endpoint
        elif run_dir is not None:
            endpoint = f"ipc://{run_dir}/{name}"
        else:
            endpoint = f"inproc://{cfg.name}/{name}"
        out[name] = LinkSpec(
            name=name,
            endpoint=endpoint,
            policy=lc.policy,
            hwm=lc.hwm,
            max_age_ms=lc.max_age_ms,
            block_ms=lc.block_ms,
        )
    return out


def config_dir() -> Path:
    """Where the bundled pipeline configs and profiles live."""
    return Path(__file__).resolve().parent.parent / "configs"


def default_config_path() -> Path:
    return config_dir() / "default.yaml"
