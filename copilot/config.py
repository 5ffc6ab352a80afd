"""Pipeline YAML: schema, validation and link resolution.

A pipeline file lists links (name -> policy) and stages (kind, params, inputs, outputs,
placement), and optionally ``groups:`` (a placement group's device and host, see
:mod:`copilot.placement`).  Validation is strict: an unknown key, a wrong type, an unknown stage kind, a
link with no producer or two producers all end in a :class:`UsageError` naming the file and
the key, which the CLI prints as one line (exit code 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from copilot.curve import CurveKeys, is_tcp, load_keys
from copilot.errors import UsageError, first_line
from copilot.links import LinkSpec, check_bind_endpoint, check_ipc_endpoint
from copilot.placement import GroupSettings, Placements, resolve
from copilot.registry import resolve_stage

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class LinkConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    policy: Literal["latest", "ordered"] = "ordered"
    hwm: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_age_ms: Positive | None = None
    block_ms: NonNegative | None = 2000.0
    endpoint: str | None = None


class Placement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    group: str = "main"
    host: str = "localhost"
    # cpu | cuda | cuda:N | cuda:N,M; None: the group's (groups.NAME.device), else not placed.  Every
    # stage of a group is in one process: the devices its stages name must agree (copilot.placement)
    device: str | None = None


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
    heartbeat_s: Positive = 0.25
    heartbeat_timeout_s: Positive = 2.0
    restart_backoff_s: Annotated[list[NonNegative], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [0.1, 0.5, 1.0, 2.0, 5.0]
    )
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 10
    # every group must have started all its stages (models loaded) within this long
    ready_timeout_s: Positive = 120.0
    metrics_interval_s: Positive = 0.5
    shutdown_timeout_s: Positive = 5.0


class PipelineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: Literal[1] = 1
    name: str = "pipeline"
    links: dict[str, LinkConfig] = {}
    stages: list[StageConfig]
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    # the secret key file of ``gamecopilot keys`` (relative to the config file): with it, tcp://
    # sockets use CurveZMQ and may bind addresses other than loopback (copilot.curve)
    curve_keys: str | None = None
    # ``groups:`` in the YAML: a placement group's device and host, said once for all its stages
    group_settings: dict[str, GroupSettings] = msgspec.field(default_factory=dict, name="groups")

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

    def placements(self) -> Placements:
        """Each group's device and the environment its process gets (validated by parse_pipeline)."""
        return resolve(self)


_REWORDS = (
    (re.compile(r"^Object contains unknown field `(.*)`$"), r"unknown key '\1'"),
    (re.compile(r"^Object missing required field `(.*)`$"), r"missing required key '\1'"),
    (re.compile(r"^Expected `object`, got `(.*)`$"), r"expected a mapping, got \1"),
    (re.compile(r"^Expected `array`, got `(.*)`$"), r"expected a list, got \1"),
)


def msgspec_error(path: str, exc: msgspec.ValidationError, prefix: str = "") -> UsageError:
    """One line naming the file, the key (a dotted path) and what was expected."""
    text = first_line(exc, "invalid value")
    where = ""
    if " - at `" in text:
        text, where = text.split(" - at `", 1)
        where = where.rstrip("`").removeprefix("$").removeprefix(".")
    for pattern, repl in _REWORDS:
        text = pattern.sub(repl, text)
    text = text.replace("`", "")
    text = text[:1].lower() + text[1:]
    key = ".".join(k for k in (prefix, where) if k).replace(".[", "[")
    return UsageError(f"{path}: {key + ': ' if key else ''}{text}")


def load_yaml(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = first_line(exc)
        raise UsageError(f"{p}: not valid YAML ({first})") from exc
    if data is None:
        raise UsageError(f"{p}: config file is empty")
    return data


def parse_pipeline(data: Any, source: str = "<config>") -> PipelineConfig:
    """Validate a pipeline mapping; every error names ``source`` and the offending key."""
    # Links first, one by one: msgspec cannot name a mapping key in its error path.
    links = data.get("links") if isinstance(data, dict) else None
    if isinstance(links, dict):
        for name, link in links.items():
            try:
                msgspec.convert(link, LinkConfig)
            except msgspec.ValidationError as exc:
                raise msgspec_error(source, exc, prefix=f"links.{name}") from exc
    groups = data.get("groups") if isinstance(data, dict) else None
    if isinstance(groups, dict):
        for name, entry in groups.items():
            try:
                msgspec.convert(entry, GroupSettings)
            except msgspec.ValidationError as exc:
                raise msgspec_error(source, exc, prefix=f"groups.{name}") from exc
    try:
        cfg = msgspec.convert(data, PipelineConfig)
    except msgspec.ValidationError as exc:
        raise msgspec_error(source, exc) from exc
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
            raise msgspec_error(source, exc, prefix=f"stages[{i}].params") from exc
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
        readers = [s.name for s in cfg.consumers(link)]
        if readers and not producers and not endpoint:  # its end of stream could never come: a hang
            raise UsageError(f"{source}: links.{link}: read by {', '.join(readers)} but no stage produces it "
                             "(give it an endpoint if something outside the pipeline does)")
        if endpoint:
            try:
                check_bind_endpoint(endpoint, curve=cfg.curve_keys is not None)
            except ValueError as exc:
                raise UsageError(f"{source}: links.{link}.endpoint: {exc}") from exc
    for key in ("control_endpoint", "metrics_endpoint"):  # the supervisor binds these
        endpoint = getattr(cfg.supervisor, key)
        if endpoint:
            try:
                check_bind_endpoint(endpoint, curve=cfg.curve_keys is not None)
            except ValueError as exc:
                raise UsageError(f"{source}: supervisor.{key}: {exc}") from exc
    _check_cycles(cfg, source)
    _apply_group_hosts(cfg, data, source)
    resolve(cfg, source)  # (devices: one per group, each a known one)
    _check_hosts(cfg, source)
    curve_keys(cfg, source)  # (a missing or broken key file: said now, not by each group)
    return cfg


def curve_keys(cfg: PipelineConfig, source: str = "<config>") -> CurveKeys | None:
    """The pipeline's CurveZMQ keypair, or None without ``curve_keys``."""
    if cfg.curve_keys is None:
        return None
    try:
        return load_keys(cfg.curve_keys)
    except ValueError as exc:
        raise UsageError(f"{source}: curve_keys: {exc}") from None


def with_absolute_paths(data: Any, path: str | os.PathLike[str]) -> Any:
    """``data`` with a relative ``curve_keys`` made relative to the config file's directory (the
    groups, spawned or started on other hosts, may run elsewhere)."""
    if isinstance(data, dict) and isinstance(data.get("curve_keys"), str):
        keys = Path(data["curve_keys"]).expanduser()
        if not keys.is_absolute():
            return {**data, "curve_keys": str(Path(path).resolve().parent / keys)}
    return data


def _check_cycles(cfg: PipelineConfig, source: str) -> None:
    """Refuse a cycle of stages: each would wait for the other's end of stream, and the run
    would hang, not fail."""
    after = {s.name: [c.name for link in s.outputs.values() for c in cfg.consumers(link)] for s in cfg.stages}
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in after[name]:
            if state.get(nxt) == 1:
                loop = [*path[path.index(nxt):], nxt]
                raise UsageError(f"{source}: stages {' -> '.join(loop)} form a cycle: none of them could "
                                 "ever see the end of its input")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for s in cfg.stages:
        if s.name not in state:
            visit(s.name, [s.name])


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})


def is_local_host(host: str) -> bool:
    return host.strip().lower() in LOCAL_HOSTS


def _host(stage: StageConfig) -> str:
    """The stage's host, every spelling of this one as ``localhost``."""
    return "localhost" if is_local_host(stage.placement.host) else stage.placement.host


def _apply_group_hosts(cfg: PipelineConfig, data: Any, source: str) -> None:
    """A ``groups:`` entry's ``host`` becomes the host of each of its stages; a stage that names
    another one itself is refused (a group is one process, on one host)."""
    raw = data.get("stages") if isinstance(data, dict) else None
    for name, settings in cfg.group_settings.items():
        if settings.host is None:
            continue
        for i, st in enumerate(cfg.stages):
            if st.placement.group != name:
                continue
            entry = raw[i] if isinstance(raw, list) and i < len(raw) else None
            said = entry.get("placement", {}).get("host") if isinstance(entry, dict) else None
            if isinstance(said, str) and (is_local_host(said) != is_local_host(settings.host) or (
                    not is_local_host(said) and said.strip().lower() != settings.host.strip().lower())):
                raise UsageError(f"{source}: stages[{i}].placement.host: stage {st.name!r} names {said}, but its "
                                 f"group {name!r} is on {settings.host} (groups.{name}.host)")
            st.placement.host = settings.host


def _check_hosts(cfg: PipelineConfig, source: str) -> None:
    """Stages on another host need addresses both hosts can reach: the defaults are files in
    this host's run directory, where a group started elsewhere would wait in vain."""
    for group in cfg.groups():
        hosts = {_host(s) for s in cfg.stages_in(group)}
        if len(hosts) > 1:
            raise UsageError(f"{source}: placement group {group!r} has stages on several hosts "
                             f"({', '.join(sorted(hosts))}): a group is one process")
    remote = sorted({_host(s) for s in cfg.stages} - {"localhost"})
    if not remote:
        return
    for key in ("control_endpoint", "metrics_endpoint"):
        if not (getattr(cfg.supervisor, key) or "").startswith("tcp://"):
            raise UsageError(f"{source}: supervisor.{key}: stages on {', '.join(remote)} need a tcp:// "
                             "endpoint here to reach the supervisor")
    for link, lc in cfg.links.items():
        hosts = {_host(s) for s in cfg.stages if link in s.inputs or link in s.outputs.values()}
        if len(hosts) > 1 and not (lc.endpoint or "").startswith("tcp://"):
            raise UsageError(f"{source}: links.{link}: it crosses hosts ({', '.join(sorted(hosts))}) and needs a "
                             "tcp:// endpoint")


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    return parse_pipeline(with_absolute_paths(load_yaml(path), path), str(path))


def link_specs(cfg: PipelineConfig, *, run_dir: str | None, keys: CurveKeys | None = None) -> dict[str, LinkSpec]:
    """Resolve endpoints: explicit ones stay; others are ``ipc://`` in ``run_dir`` or inproc.
    ``keys``: the pipeline's, when the caller has read them already (else read here)."""
    out = {}
    keys = keys or curve_keys(cfg)
    for name, lc in cfg.links.items():
        if lc.endpoint:
            endpoint = lc.endpoint
        elif run_dir is not None:
            endpoint = f"ipc://{run_dir}/{name}"
        else:
            endpoint = f"inproc://{cfg.name}/{name}"
        try:
            check_ipc_endpoint(endpoint)
        except ValueError as exc:
            raise UsageError(f"links.{name}: {exc}") from None
        out[name] = LinkSpec(
            name=name,
            endpoint=endpoint,
            policy=lc.policy,
            hwm=lc.hwm,
            max_age_ms=lc.max_age_ms,
            block_ms=lc.block_ms,
            curve=keys if is_tcp(endpoint) else None,
        )
    return out


def config_dir() -> Path:
    """Where the bundled pipeline configs and profiles live."""
    return Path(__file__).resolve().parent.parent / "configs"


def default_config_path() -> Path:
    return config_dir() / "default.yaml"
