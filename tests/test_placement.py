"""Placement of groups on devices: parsing, the group environment, the report, the example configs,
and a real two-group run whose groups are placed on cuda:0 and cuda:1 (no GPU needed: the
environment is set all the same, and each group says what it saw)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from copilot.config import load_yaml, parse_pipeline, with_absolute_paths
from copilot.errors import UsageError
from copilot.group import RunOptions
from copilot.messages import Metrics, StageMetrics
from copilot.placement import CUDA_VISIBLE, PINNED, Device, device_mismatch, parse_device
from copilot.stage import Source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "placement"


# -- device strings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "device", "shown"), [
    ("cpu", Device("cpu"), "cpu"),
    ("cuda", Device("cuda"), "cuda"),
    ("cuda:0", Device("cuda", (0,)), "cuda:0"),
    (" CUDA:3 ", Device("cuda", (3,)), "cuda:3"),
    ("cuda:1,2", Device("cuda", (1, 2)), "cuda:1,2"),
    ("cuda:2, 0", Device("cuda", (2, 0)), "cuda:2,0"),
])
def test_devices_parse(text: str, device: Device, shown: str) -> None:
    got = parse_device(text, "t.yaml: k")
    assert got == device
    assert str(got) == shown


@pytest.mark.parametrize(("text", "why"), [
    ("gpu", "unknown device 'gpu'"),
    ("cuda:", "unknown device 'cuda:'"),
    ("cuda:-1", "unknown device 'cuda:-1'"),
    ("cuda:a", "unknown device 'cuda:a'"),
    ("cuda:1,", "unknown device 'cuda:1,'"),
    ("cuda:1,1", "'cuda:1,1' names a GPU twice"),
    ("cuda:١", "unknown device 'cuda:١'"),  # (a digit, but not one CUDA reads)
    (3, "expected a device (cpu, cuda, cuda:N or cuda:N,M), got 3"),
])
def test_bad_devices_are_one_line_naming_the_key(text: Any, why: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_device(text, "t.yaml: groups.g.device")
    msg = str(err.value)
    assert msg.startswith(f"t.yaml: groups.g.device: {why}"), msg
    assert "\n" not in msg


def test_cuda_alone_means_the_first_gpu() -> None:
    assert Device("cuda").indices == (0,)
    assert Device("cpu").indices == ()
    assert Device("cuda", (2, 3)).indices == (2, 3)


# -- the pipeline's groups: -------------------------------------------------------------------------
def pipeline(groups: dict[str, Any] | None = None, devices: dict[str, str] | None = None,
             where: dict[str, str] | None = None) -> dict[str, Any]:
    """A source ``src`` (group a) feeding ``x`` and ``y`` (group b) and ``z`` (group c)."""
    where = {"src": "a", "x": "b", "y": "b", "z": "c", **(where or {})}
    stages: list[dict[str, Any]] = [
        {"name": "src", "kind": "replay", "outputs": {"audio": "audio"}},
        {"name": "x", "kind": "audio_level", "inputs": ["audio"]},
        {"name": "y", "kind": "audio_level", "inputs": ["audio"]},
        {"name": "z", "kind": "audio_level", "inputs": ["audio"]},
    ]
    for st in stages:
        st["placement"] = {"group": where[st["name"]]}
        if devices and st["name"] in devices:
            st["placement"]["device"] = devices[st["name"]]
    data: dict[str, Any] = {"name": "p", "links": {"audio": {}}, "stages": stages}
    if groups is not None:
        data["groups"] = groups
    return data


@pytest.mark.parametrize(("groups", "devices", "message"), [
    ({"b": {"device": "gpu1"}}, None,
     "t.yaml: groups.b.device: unknown device 'gpu1' (cpu, cuda, cuda:N or cuda:N,M; N counts from 0)"),
    (None, {"x": "cuda:one"},
     "t.yaml: stages[1].placement.device: unknown device 'cuda:one' (cpu, cuda, cuda:N or cuda:N,M; N counts from 0)"),
    (None, {"x": "cuda:1", "y": "cuda:2"},
     "t.yaml: placement group 'b' has stages on two devices (cuda:1 for x, cuda:2 for y): a group is one process; "
     "give it one device (groups.b.device) or split it"),
    (None, {"x": "cuda:0", "y": "cpu"},
     "t.yaml: placement group 'b' has stages on two devices (cuda:0 for x, cpu for y): a group is one process; "
     "give it one device (groups.b.device) or split it"),
    ({"b": {"device": "cuda:1,2"}}, {"y": "cuda:3"},
     "t.yaml: stages[2].placement.device: stage 'y' names cuda:3, but its group 'b' is on cuda:1,2 "
     "(groups.b.device): a group is one process; leave the stage's device out or place it in another group"),
    ({"b": {"device": "cuda:1"}}, {"y": "cpu"},
     "t.yaml: stages[2].placement.device: stage 'y' names cpu, but its group 'b' is on cuda:1 "
     "(groups.b.device): a group is one process; leave the stage's device out or place it in another group"),
    ({"d": {"device": "cuda:1"}}, None, "t.yaml: groups.d: no stage is placed in group 'd' (groups: a, b, c)"),
    ({"b": {"devcie": "cuda:1"}}, None, "t.yaml: groups.b: unknown key 'devcie'"),
    ({"b": {"device": 1}}, None, "t.yaml: groups.b.device: expected str | null, got int"),
    (["b"], None, "t.yaml: groups: expected a mapping, got array"),
])
def test_placement_errors_are_one_line_naming_the_file_and_key(groups: Any, devices: dict[str, str] | None,
                                                                message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_pipeline(pipeline(groups, devices), "t.yaml")
    assert str(err.value) == message


def test_a_group_device_comes_from_its_entry_else_from_its_stages() -> None:
    cfg = parse_pipeline(pipeline({"b": {"device": "cuda:1,2"}}, {"y": "cuda:2", "z": "cuda:0", "src": "cpu"}),
                         "t.yaml")
    pl = cfg.placements()
    assert {g: str(p.device) for g, p in pl.groups.items()} == {"a": "cpu", "b": "cuda:1,2", "c": "cuda:0"}
    assert [str(pl.planned(s)) for s in ("src", "x", "y", "z")] == ["cpu", "cuda:1,2", "cuda:2", "cuda:0"]
    # the same GPU said two ways is one device
    same = parse_pipeline(pipeline(devices={"x": "cuda", "y": "cuda:0"}), "t.yaml").placements()
    assert str(same.groups["b"].device) == "cuda:0"


def test_a_group_entry_host_places_its_stages_and_a_stage_naming_another_is_refused() -> None:
    data = pipeline({"c": {"host": "gpu-box"}})
    data["supervisor"] = {"control_endpoint": "tcp://127.0.0.1:5600", "metrics_endpoint": "tcp://127.0.0.1:5601"}
    data["links"]["audio"]["endpoint"] = "tcp://127.0.0.1:5610"
    cfg = parse_pipeline(data, "t.yaml")
    assert [s.placement.host for s in cfg.stages_in("c")] == ["gpu-box"]
    assert cfg.placements().groups["c"].host == "gpu-box"
    data["stages"][3]["placement"]["host"] = "other-box"
    with pytest.raises(UsageError) as err:
        parse_pipeline(data, "t.yaml")
    assert str(err.value) == ("t.yaml: stages[3].placement.host: stage 'z' names other-box, but its group 'c' is on "
                              "gpu-box (groups.c.host)")
    # without tcp:// endpoints a group on another host is refused as before
    with pytest.raises(UsageError, match=re.escape("supervisor.control_endpoint: stages on gpu-box need a tcp://")):
        parse_pipeline(pipeline({"c": {"host": "gpu-box"}}), "t.yaml")


# -- the environment each group's process gets --------------------------------------------------------
def test_a_pipeline_that_places_nothing_leaves_the_environment_alone() -> None:
    """Every existing pipeline: no group is hidden from the GPU a stage's `device: auto` would find."""
    for cfg in (parse_pipeline(pipeline(), "t.yaml"), parse_pipeline(load_yaml(ROOT / "configs" / "default.yaml"),
                                                                     "default.yaml")):
        pl = cfg.placements()
        assert not pl.any_gpu
        assert all(pl.env(g, {}) == {} for g in cfg.groups())
        assert {pl.local_device(s.name, {}) for s in cfg.stages} == {None}


def test_gpu_groups_are_pinned_and_the_others_see_no_gpu() -> None:
    cfg = parse_pipeline(pipeline({"b": {"device": "cuda:1"}, "c": {"device": "cpu"}}), "t.yaml")
    pl = cfg.placements()
    assert pl.env("b", {}) == {CUDA_VISIBLE: "1", PINNED: "cuda:1"}
    assert pl.env("c", {}) == {CUDA_VISIBLE: "", PINNED: "cpu"}
    assert pl.env("a", {}) == {CUDA_VISIBLE: "", PINNED: "cpu"}  # not placed, in a pipeline that uses GPUs
    # an explicit cpu group is hidden even when no group is on a GPU
    cpu_only = parse_pipeline(pipeline({"c": {"device": "cpu"}}), "t.yaml").placements()
    assert cpu_only.env("c", {}) == {CUDA_VISIBLE: "", PINNED: "cpu"}
    assert cpu_only.env("a", {}) == {}


def test_gpu_indices_count_the_gpus_the_run_sees() -> None:
    cfg = parse_pipeline(pipeline({"b": {"device": "cuda:1,2"}, "c": {"device": "cuda"}}), "t.yaml")
    pl = cfg.placements()
    assert pl.env("b", {})[CUDA_VISIBLE] == "1,2"
    assert pl.env("c", {})[CUDA_VISIBLE] == "0"
    outer = {CUDA_VISIBLE: "4, 5,GPU-6f1e"}
    assert pl.env("b", outer)[CUDA_VISIBLE] == "5,GPU-6f1e"
    assert pl.env("c", outer)[CUDA_VISIBLE] == "4"
    with pytest.raises(UsageError) as err:
        pl.env("b", {CUDA_VISIBLE: "7"})
    assert str(err.value) == ("group b is placed on cuda:1,2, but CUDA_VISIBLE_DEVICES='7' here leaves 1 GPU "
                              "visible (GPU indices in the pipeline count the GPUs the run sees)")


def test_a_stage_learns_its_device_as_its_own_process_numbers_it() -> None:
    cfg = parse_pipeline(pipeline({"b": {"device": "cuda:1,2"}, "c": {"device": "cuda:3"}}, {"y": "cuda:2"}),
                         "t.yaml")
    pl = cfg.placements()
    pinned_b = pl.env("b", {})
    pinned_c = pl.env("c", {})
    assert pl.local_device("y", pinned_b) == "cuda:1"  # the group's second GPU
    assert pl.local_device("x", pinned_b) == "cuda"  # the group's GPUs, all of them
    assert pl.local_device("z", pinned_c) == "cuda:0"
    assert pl.local_device("src", pl.env("a", {})) == "cpu"  # not placed: hidden, so the CPU
    # a group run by hand without the launcher's pinning: the machine's numbering
    assert pl.local_device("y", {}) == "cuda:2"
    assert pl.local_device("z", {}) == "cuda:3"
    assert pl.local_device("src", {}) is None
    # pinned for another group (a stale variable) is not pinned for this one
    assert pl.local_device("z", pinned_b) == "cuda:3"


def test_a_group_run_by_hand_can_pin_itself_once() -> None:
    pl = parse_pipeline(pipeline({"b": {"device": "cuda:1"}}), "t.yaml").placements()
    environ = {CUDA_VISIBLE: "2,3", "HOME": "/h"}
    assert pl.pin_process("b", environ) == {CUDA_VISIBLE: "3", PINNED: "cuda:1"}
    assert environ == {CUDA_VISIBLE: "3", PINNED: "cuda:1", "HOME": "/h"}
    assert pl.local_device("x", environ) == "cuda:0"
    assert pl.pin_process("b", environ) == {}  # pinned already (by a launcher, or before): not mapped twice
    assert environ[CUDA_VISIBLE] == "3"


def test_the_report_line_says_pid_device_variable_and_stages() -> None:
    cfg = parse_pipeline(pipeline({"b": {"device": "cuda:1"}}), "t.yaml")
    pl = cfg.placements()
    assert pl.describe("b", env=pl.env("b", {}), pid=42) == \
        "group b (pid 42): device cuda:1 (CUDA_VISIBLE_DEVICES=1): stages x, y"
    assert pl.describe("a", env=pl.env("a", {}), pid=7) == \
        'group a (pid 7): device cpu (CUDA_VISIBLE_DEVICES=""): stages src'
    plain = parse_pipeline(pipeline(), "t.yaml").placements()
    assert plain.describe("c", env={}, pid=9) == "group c (pid 9): device not placed (CUDA_VISIBLE_DEVICES as " \
        "inherited): stages z"
    assert pl.table({CUDA_VISIBLE: "3,4"}) == [
        'group a: device cpu (CUDA_VISIBLE_DEVICES=""): stages src',
        "group b: device cuda:1 (CUDA_VISIBLE_DEVICES=4): stages x, y",
        'group c: device cpu (CUDA_VISIBLE_DEVICES=""): stages z',
    ]


def test_a_stage_that_fell_back_to_the_cpu_is_a_mismatch() -> None:
    gpu, cpu = Device("cuda", (1,)), Device("cpu")
    assert device_mismatch(gpu, "cpu")
    assert device_mismatch(cpu, "cuda:0")
    assert not device_mismatch(gpu, "cuda:0")
    assert not device_mismatch(gpu, "tensorrt")
    assert not device_mismatch(cpu, "cpu")
    assert not device_mismatch(None, "cpu")  # placed nowhere: nothing to compare with
    assert not device_mismatch(gpu, "")  # the stage said nothing


def test_the_supervisor_refuses_a_gpu_the_run_cannot_see_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from copilot.supervisor import Supervisor

    data = pipeline({"b": {"device": "cuda:1"}})
    cfg = parse_pipeline(data, "t.yaml")
    monkeypatch.setenv(CUDA_VISIBLE, "0")
    with pytest.raises(UsageError, match=re.escape("group b is placed on cuda:1, but CUDA_VISIBLE_DEVICES='0'")):
        Supervisor(cfg, data, "t.yaml", RunOptions())
    monkeypatch.delenv(CUDA_VISIBLE)
    sup = Supervisor(cfg, data, "t.yaml", RunOptions())
    assert sup._group_env("b") == {CUDA_VISIBLE: "1", PINNED: "cuda:1"}
    # a stage that says where it really runs: a warning once when it is not its placement's kind
    said = Metrics(group="b", stages=[StageMetrics(stage="x", count=0, fps=0.0, dropped=0, device="cpu"),
                                      StageMetrics(stage="y", count=0, fps=0.0, dropped=0, device="cuda:0")])
    with caplog.at_level("INFO", logger="copilot.supervisor"):
        sup._check_devices(said)
        sup._check_devices(said)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["stage x (group b) was placed on cuda:1 but runs on cpu"]
    assert "stage y (group b) runs on cuda:0" in [r.getMessage() for r in caplog.records]


# -- the example configs ------------------------------------------------------------------------------------
NEW_KINDS = {"semantic": "stages.semantic:SemanticStage", "clip_embed": "stages.clip_embed:ClipEmbedStage",
             "segment": "stages.segment:SegmentStage"}


class _StandIn(Source):  # (a Source: it needs no input to validate)
    """Stands for an expensive encoder whose module is not written yet: same kind of ports."""


class SemanticStandIn(_StandIn):
    output_ports = ("signals", "cues", "embeddings")


class ClipEmbedStandIn(_StandIn):
    output_ports = ("features",)


class SegmentStandIn(_StandIn):
    output_ports = ("entities",)


STAND_INS = {"semantic": "SemanticStandIn", "clip_embed": "ClipEmbedStandIn", "segment": "SegmentStandIn"}


def example(name: str, tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """An example config's data as ``gamecopilot run`` reads it, each expensive encoder's kind by module
    path (its entry point needs the package reinstalled) or a stand-in while its module is not there."""
    path = EXAMPLES / name
    data = with_absolute_paths(load_yaml(path), path)
    standing_in = []
    for st in data["stages"]:
        if st["kind"] in NEW_KINDS:
            module = NEW_KINDS[st["kind"]].partition(":")[0]
            try:
                importlib.import_module(module)
                st["kind"] = NEW_KINDS[st["kind"]]
            except ImportError:
                standing_in.append(st["kind"])
                st["kind"] = f"{__name__}:{STAND_INS[st['kind']]}"
    if data.get("curve_keys"):  # the keypair `gamecopilot keys` makes (never shipped: configs/placement/.gitignore)
        from copilot.curve import generate_keys

        assert data["curve_keys"] == str(EXAMPLES / "keys" / "copilot.key_secret")
        data["curve_keys"] = str(generate_keys(tmp_path / "keys")[1])
    return data, standing_in


EXPECTED = {  # stage -> device, as each file's header says
    "gpu1.yaml": {"replay": "cpu", "hud_ocr": "cuda:0", "semantic": "cuda:0", "segment": "cuda:0",
                  "clip_embed": "cuda:0", "reasoner": "cuda:0", "overlay": "cpu"},
    "gpu2.yaml": {"replay": "cpu", "hud_ocr": "cuda:0", "semantic": "cuda:0", "segment": "cuda:1",
                  "clip_embed": "cuda:1", "reasoner": "cuda:1", "overlay": "cpu"},
    "gpu4.yaml": {"replay": "cpu", "hud_ocr": "cuda:0", "semantic": "cuda:0", "segment": "cuda:1",
                  "clip_embed": "cuda:2", "hico": "cuda:2", "reasoner": "cuda:3", "overlay": "cpu"},
    "two_host.yaml": {"replay": "cpu", "hud_ocr": "cuda:0", "semantic": "cuda:0", "segment": "cuda:0",
                      "clip_embed": "cuda:0", "reasoner": "cuda:1", "overlay": "cpu"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_example_configs_validate_and_place_what_they_say(name: str, tmp_path: Path) -> None:
    from copilot.commands import without_stages

    data, standing_in = example(name, tmp_path)
    cfg = parse_pipeline(data, name)
    pl = cfg.placements()
    assert {s: str(pl.planned(s)) for s in EXPECTED[name]} == EXPECTED[name]
    assert pl.any_gpu
    default_stages = {s["name"] for s in yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["stages"]}
    assert default_stages <= {s.name for s in cfg.stages}  # the default pipeline, and more
    header = (EXAMPLES / name).read_text().split("\nversion:")[0]
    assert "copy" in header.lower() and "host array" in header  # each says what frames crossing GPUs cost
    for g in cfg.groups():  # every group in the header's table
        assert f"  {g} " in header, (name, g)
    local = [g for g, p in pl.groups.items() if p.host == "localhost"]
    envs = {g: pl.env(g, {}) for g in local}
    assert all(e[CUDA_VISIBLE] == "" for g, e in envs.items() if str(pl.groups[g].device) in ("cpu", "None"))
    # what a default run leaves out (no --overlay, no --session) still validates
    parse_pipeline(without_stages(data, ["overlay", "timeline"]), name)
    if standing_in:
        print(f"{name}: stand-ins for {', '.join(standing_in)} (their modules are not written yet)")


def test_the_two_host_example_splits_its_groups_over_two_hosts(tmp_path: Path) -> None:
    data, _ = example("two_host.yaml", tmp_path)
    cfg = parse_pipeline(data, "two_host.yaml")
    pl = cfg.placements()
    assert {g: p.host for g, p in pl.groups.items()} == {
        "decode": "localhost", "detect": "localhost", "vision": "localhost", "overlay": "localhost",
        "heavy": "gpu-box", "reason": "gpu-box"}
    endpoints = {name: link.endpoint for name, link in cfg.links.items() if link.endpoint}
    assert endpoints and all(e.startswith("tcp://") for e in endpoints.values())
    assert cfg.curve_keys is not None and cfg.supervisor.control_endpoint == "tcp://10.0.0.5:5600"
    for link, endpoint in endpoints.items():  # a link binds on its producer's host
        producer = pl.group_of(cfg.producer(link).name)
        assert endpoint.startswith("tcp://10.0.0.6:" if producer.host == "gpu-box" else "tcp://10.0.0.5:"), link
    lines = pl.table({})
    assert "group heavy (on gpu-box): device cuda:0 (CUDA_VISIBLE_DEVICES as set on its host): stages clip_embed, " \
        "segment" in lines
    assert "group vision: device cuda:0 (CUDA_VISIBLE_DEVICES=0): stages semantic" in lines


# -- a real run: two groups, two GPUs named, none present -----------------------------------------------
class ProbeParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    out: str
    actual: str | None = None  # what the stage says it really runs on


class EnvProbeStage(Source[ProbeParams]):
    """Writes what its group process sees: the GPUs it was given and its own device."""

    Params = ProbeParams

    async def start(self) -> None:
        self.device_actual = self.params.actual

    async def produce(self) -> None:
        seen = {"cvd": os.environ.get(CUDA_VISIBLE), "pinned": os.environ.get(PINNED), "device": self.ctx.device,
                "pid": os.getpid()}
        Path(self.params.out).write_text(json.dumps(seen))


def test_gamecopilot_run_starts_each_group_pinned_to_its_gpu(tmp_path: Path) -> None:
    config = {
        "name": "two-gpus",
        "groups": {"first": {"device": "cuda:0"}, "second": {"device": "cuda:1"}},
        "stages": [
            {"name": "probe_a", "kind": f"{__name__}:EnvProbeStage", "params": {"out": str(tmp_path / "a.json")},
             "placement": {"group": "first"}},
            {"name": "probe_b", "kind": f"{__name__}:EnvProbeStage",
             "params": {"out": str(tmp_path / "b.json"), "actual": "cpu"}, "placement": {"group": "second"}},
        ],
        "supervisor": {"heartbeat_s": 0.1},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in (CUDA_VISIBLE, PINNED)}
    res = subprocess.run([sys.executable, "-m", "copilot", "run", "-c", str(path), "-q", "-v"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert (a["cvd"], a["pinned"], a["device"]) == ("0", "cuda:0", "cuda:0")
    assert (b["cvd"], b["pinned"], b["device"]) == ("1", "cuda:1", "cuda:0")  # its GPU is its cuda:0
    assert a["pid"] != b["pid"] != os.getpid()
    lines = res.stderr.splitlines()
    assert f"INFO copilot.supervisor: group first (pid {a['pid']}): device cuda:0 (CUDA_VISIBLE_DEVICES=0): " \
           "stages probe_a" in lines, res.stderr
    assert f"INFO copilot.supervisor: group second (pid {b['pid']}): device cuda:1 (CUDA_VISIBLE_DEVICES=1): " \
           "stages probe_b" in lines, res.stderr
    # probe_b said it really runs on the CPU: warned once, naming both
    warned = [line for line in lines if "was placed on" in line]
    assert warned == ["WARNING copilot.supervisor: stage probe_b (group second) was placed on cuda:1 but runs on cpu"]
    assert CUDA_VISIBLE not in env  # (the run's own environment was not touched)
