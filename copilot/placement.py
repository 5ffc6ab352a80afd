"""Placement of the pipeline's groups on devices: which GPUs each group process sees.

A group is one OS process, so a device is a property of the group: the pipeline YAML names it
once under ``groups:`` (``groups: {heavy: {device: "cuda:1"}}``), or on its stages as
``placement.device`` (the older spelling, still read).  Devices are ``cpu``, ``cuda`` (the
first GPU), ``cuda:N`` or ``cuda:N,M`` (a group that sees several GPUs).  GPU indices count
the GPUs the launching process sees: with ``CUDA_VISIBLE_DEVICES=2,3`` around the run,
``cuda:1`` is the GPU numbered 3 on the machine.

The launcher (the supervisor, :mod:`copilot.supervisor`) starts each group with
``CUDA_VISIBLE_DEVICES`` set to its GPUs, so inside the group its first GPU is ``cuda:0``; a
stage learns where it runs from ``StageContext.device`` (``cpu``, ``cuda:0``, ``cuda`` for a
group of several GPUs, or None when nothing is placed and its own params decide).

Hiding GPUs: a group placed on ``cpu`` gets ``CUDA_VISIBLE_DEVICES=""``, so a stage whose
params say ``auto`` cannot take a GPU by accident.  A group with no device at all gets the
same only when the pipeline places some other group on a GPU (its GPUs belong to those
groups then); in a pipeline that places nothing on a GPU, every existing one, the environment
is left as it is and the stages' own ``device: auto`` keeps finding the GPU as before.

``GAMECOPILOT_DEVICE`` goes with ``CUDA_VISIBLE_DEVICES``: it tells the group process that its
GPUs are pinned already (so ``cuda:1`` is its ``cuda:0``); a group run by hand without it sees
the machine's numbering, and its stages get the global device.

Frames cross GPUs as host arrays: a frame is a numpy array on every link, whichever groups
and GPUs its ends are on; a stage on a GPU copies it up itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

from copilot.errors import UsageError

if TYPE_CHECKING:
    from copilot.config import PipelineConfig

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
PINNED = "GAMECOPILOT_DEVICE"  # the group's device, set by the launcher beside CUDA_VISIBLE_DEVICES
DEVICE_FORMS = "cpu, cuda, cuda:N or cuda:N,M"
EMPTY = '""'  # how the report shows an empty CUDA_VISIBLE_DEVICES (every GPU hidden)


class GroupSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of the pipeline's ``groups:`` mapping: where a placement group runs."""

    device: str | None = None  # cpu | cuda | cuda:N | cuda:N,M
    host: str | None = None  # its stages' host (they may leave placement.host out)


@dataclass(frozen=True)
class Device:
    """A parsed device: ``cpu``, or ``cuda`` with the GPU indices it names (none: the first)."""

    kind: Literal["cpu", "cuda"]
    gpus: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        return "cuda:" + ",".join(map(str, self.gpus)) if self.gpus else "cuda"

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def indices(self) -> tuple[int, ...]:
        """The GPUs it means, counted as the launching process sees them (bare ``cuda``: the first)."""
        return self.gpus or ((0,) if self.is_gpu else ())


def parse_device(text: object, where: str) -> Device:
    """``text`` as a :class:`Device`; a :class:`UsageError` naming ``where`` (file and key) if it is none."""
    if not isinstance(text, str):
        raise UsageError(f"{where}: expected a device ({DEVICE_FORMS}), got {text!r}")
    t = text.strip().lower()
    if t == "cpu":
        return Device("cpu")
    if t == "cuda":
        return Device("cuda")
    if t.startswith("cuda:"):
        parts = [p.strip() for p in t[len("cuda:"):].split(",")]
        if parts and all(p.isdigit() and p.isascii() for p in parts):
            gpus = tuple(int(p) for p in parts)
            if len(set(gpus)) < len(gpus):
                raise UsageError(f"{where}: {text!r} names a GPU twice")
            return Device("cuda", gpus)
    raise UsageError(f"{where}: unknown device {text!r} ({DEVICE_FORMS}; N counts from 0)")


@dataclass(frozen=True)
class GroupPlacement:
    """Where one group runs: its host, its device (None: not placed) and each stage's device."""

    name: str
    host: str
    device: Device | None
    stages: tuple[str, ...]
    stage_devices: Mapping[str, Device | None] = field(default_factory=dict)


def _same(a: Device, b: Device) -> bool:
    return a.kind == b.kind and a.indices == b.indices


def _group_device(cfg: PipelineConfig, group: str, settings: GroupSettings | None, source: str) -> Device | None:
    """The group's device from its ``groups:`` entry, else from what its stages name (which must agree)."""
    named: list[tuple[str, Device, str]] = []  # (stage, device, key)
    for i, st in enumerate(cfg.stages):
        if st.placement.group == group and st.placement.device is not None:
            key = f"stages[{i}].placement.device"
            named.append((st.name, parse_device(st.placement.device, f"{source}: {key}"), key))
    if settings is not None and settings.device is not None:
        dev = parse_device(settings.device, f"{source}: groups.{group}.device")
        for stage, sdev, key in named:
            inside = (sdev.is_gpu and dev.is_gpu and set(sdev.indices if sdev.gpus else dev.indices)
                      <= set(dev.indices)) or (sdev.kind == dev.kind == "cpu")
            if not inside:
                raise UsageError(f"{source}: {key}: stage {stage!r} names {sdev}, but its group {group!r} is on "
                                 f"{dev} (groups.{group}.device): a group is one process; leave the stage's "
                                 "device out or place it in another group")
        return dev
    if not named:
        return None
    first_stage, first, _ = named[0]
    for stage, dev, _ in named[1:]:
        if not _same(dev, first):
            raise UsageError(f"{source}: placement group {group!r} has stages on two devices ({first} for "
                             f"{first_stage}, {dev} for {stage}): a group is one process; give it one device "
                             f"(groups.{group}.device) or split it")
    return max((d for _, d, _ in named), key=lambda d: len(d.gpus))  # the most explicit spelling


@dataclass(frozen=True)
class Placements:
    """Every group's placement in a validated pipeline (see :func:`resolve`)."""

    groups: Mapping[str, GroupPlacement]

    @property
    def any_gpu(self) -> bool:
        """Some group is placed on a GPU (so groups without a device have theirs hidden)."""
        return any(g.device is not None and g.device.is_gpu for g in self.groups.values())

    def group_of(self, stage: str) -> GroupPlacement:
        for g in self.groups.values():
            if stage in g.stages:
                return g
        raise KeyError(stage)

    def planned(self, stage: str) -> Device | None:
        """The device a stage is placed on (the machine's numbering); None when nothing is placed."""
        gp = self.group_of(stage)
        dev = gp.stage_devices.get(stage)
        if dev is None and gp.device is None and self.any_gpu:
            return Device("cpu")
        return dev

    def pin_value(self, group: str) -> str | None:
        """What ``GAMECOPILOT_DEVICE`` says in the group's process; None: the environment is left alone."""
        gp = self.groups[group]
        if gp.device is not None:
            return str(gp.device)
        return "cpu" if self.any_gpu else None

    def env(self, group: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        """The environment the launcher gives ``group``'s process (nothing when it is not placed).

        GPU indices are mapped through the launcher's own ``CUDA_VISIBLE_DEVICES`` (``environ``),
        as CUDA itself would; an index beyond it is a :class:`UsageError`."""
        pin = self.pin_value(group)
        if pin is None:
            return {}
        dev = self.groups[group].device
        if dev is None or not dev.is_gpu:
            return {CUDA_VISIBLE: "", PINNED: pin}
        outer = environ.get(CUDA_VISIBLE)
        if outer is None:
            visible = [str(i) for i in dev.indices]
        else:
            seen = [t.strip() for t in outer.split(",") if t.strip()]
            beyond = [i for i in dev.indices if i >= len(seen)]
            if beyond:
                raise UsageError(f"group {group} is placed on {dev}, but {CUDA_VISIBLE}={outer!r} here leaves "
                                 f"{len(seen)} GPU{'s' if len(seen) != 1 else ''} visible (GPU indices in the "
                                 "pipeline count the GPUs the run sees)")
            visible = [seen[i] for i in dev.indices]
        return {CUDA_VISIBLE: ",".join(visible), PINNED: pin}

    def pin_process(self, group: str, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
        """Give this process the environment the launcher gives ``group`` (for a group run here by
        hand, ``gamecopilot stage``), unless a launcher pinned it already; what was set is returned.
        Call it before anything starts CUDA: a CUDA library reads the variable once, when it starts."""
        if PINNED in environ:
            return {}
        env = self.env(group, environ)
        environ.update(env)
        return env

    def local_device(self, stage: str, environ: Mapping[str, str] = os.environ) -> str | None:
        """The device ``stage`` runs on as its own process names it: ``cpu``, ``cuda:K``, ``cuda``
        (several GPUs), or None when nothing is placed (the stage's own params decide).

        In a process the launcher pinned (``GAMECOPILOT_DEVICE`` says this group's device) the
        group's first GPU is ``cuda:0``; elsewhere (a group run by hand) the machine's numbering holds."""
        gp = self.group_of(stage)
        pin = self.pin_value(gp.name)
        pinned = pin is not None and environ.get(PINNED) == pin
        dev = gp.stage_devices.get(stage)
        if dev is None:
            return "cpu" if pinned else None  # (pinned without a device: its GPUs are hidden)
        if not dev.is_gpu:
            return "cpu"
        group_gpus = gp.device.indices if gp.device is not None else dev.indices
        mine = dev.indices if dev.gpus else group_gpus
        if len(mine) > 1:
            return "cuda"
        return f"cuda:{group_gpus.index(mine[0]) if pinned else mine[0]}"

    def describe(self, group: str, *, env: Mapping[str, str] | None, pid: int | None = None,
                 local: bool = True) -> str:
        """One line: ``group NAME (pid P): device cuda:1 (CUDA_VISIBLE_DEVICES=1): stages a, b``.

        ``env``: what the launcher set for it (None: not known here, a group started on its host)."""
        gp = self.groups[group]
        where = ", ".join(x for x in (f"pid {pid}" if pid else "", "" if local else f"on {gp.host}") if x)
        pin = self.pin_value(group)
        device = str(gp.device) if gp.device is not None else ("cpu" if pin == "cpu" else "not placed")
        if env is None:
            cvd = f"{CUDA_VISIBLE} as set on its host" if not local else f"{CUDA_VISIBLE} unknown"
        elif CUDA_VISIBLE in env:
            cvd = f"{CUDA_VISIBLE}={env[CUDA_VISIBLE] or EMPTY}"
        else:
            cvd = f"{CUDA_VISIBLE} as inherited"
        return f"group {group}{f' ({where})' if where else ''}: device {device} ({cvd}): stages {', '.join(gp.stages)}"

    def table(self, environ: Mapping[str, str] = os.environ, *, local_hosts: frozenset[str] = frozenset()) -> list[str]:
        """A line per group, without pids: what a run would do (for a check before any process starts)."""
        out = []
        for name, gp in self.groups.items():
            local = gp.host == "localhost" or gp.host in local_hosts
            out.append(self.describe(name, env=self.env(name, environ) if local else None, local=local))
        return out


def resolve(cfg: PipelineConfig, source: str = "<config>") -> Placements:
    """Every group's device, checked: an unknown device, a group whose stages name two devices,
    a stage outside its group's GPUs or a ``groups:`` entry no stage uses is a :class:`UsageError`
    naming ``source`` and the key."""
    settings = cfg.group_settings
    names = cfg.groups()
    for name in settings:
        if name not in names:
            raise UsageError(f"{source}: groups.{name}: no stage is placed in group {name!r} "
                             f"(groups: {', '.join(names)})")
    out: dict[str, GroupPlacement] = {}
    for name in names:
        dev = _group_device(cfg, name, settings.get(name), source)
        stages = cfg.stages_in(name)
        per_stage: dict[str, Device | None] = {}
        for st in stages:
            own = st.placement.device
            per_stage[st.name] = parse_device(own, "") if own is not None else dev
        host = stages[0].placement.host if stages else "localhost"
        out[name] = GroupPlacement(name=name, host="localhost" if _is_local(host) else host, device=dev,
                                   stages=tuple(s.name for s in stages), stage_devices=per_stage)
    return Placements(out)


def _is_local(host: str) -> bool:
    from copilot.config import is_local_host  # (config imports this module: only at call time)

    return is_local_host(host)


def device_mismatch(planned: Device | None, actual: str) -> bool:
    """A stage said it runs on ``actual`` (``cpu``, ``cuda:0``, ``tensorrt`` ...): is that another
    kind of device than it was placed on (a GPU stage that fell back to the CPU)?"""
    if planned is None or not actual:
        return False
    on_gpu = actual.strip().lower().startswith(("cuda", "tensorrt", "gpu"))
    return on_gpu != planned.is_gpu
