"""Pipeline YAML validation: every mistake is one UsageError line naming file, key and type."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from copilot.config import default_config_path, link_specs, load_pipeline, load_yaml, parse_pipeline
from copilot.errors import UsageError

BASE: dict[str, Any] = {
    "name": "t",
    "links": {"a": {"policy": "ordered"}, "v": {"policy": "latest", "hwm": 2, "max_age_ms": 250}},
    "stages": [
        {"name": "r", "kind": "replay", "outputs": {"audio": "a", "video": "v"}},
        {"name": "l", "kind": "audio_level", "inputs": ["a"]},
        {"name": "s", "kind": "jsonl_sink", "inputs": ["v"], "placement": {"group": "other"}},
    ],
}


def edit(fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    fn(d)
    return d


def test_the_base_and_the_default_config_parse() -> None:
    cfg = parse_pipeline(copy.deepcopy(BASE), "t.yaml")
    assert cfg.groups() == ["main", "other"]
    assert [s.name for s in cfg.stages_in("main")] == ["r", "l"]
    assert cfg.producer("a").name == "r"
    assert [s.name for s in cfg.consumers("v")] == ["s"]
    default = load_pipeline(default_config_path())
    assert default.stages


CASES = [
    ("unknown-top-key", lambda d: d.update(bogus=1), "t.yaml: unknown key 'bogus'"),
    ("unknown-stage-key", lambda d: d["stages"][1].update(colour="red"), "t.yaml: stages[1]: unknown key 'colour'"),
    ("unknown-placement-key", lambda d: d["stages"][1].update(placement={"gruop": "x"}),
     "t.yaml: stages[1].placement: unknown key 'gruop'"),
    ("unknown-link-key", lambda d: d["links"]["a"].update(hwmm=3), "t.yaml: links.a: unknown key 'hwmm'"),
    ("unknown-supervisor-key", lambda d: d.update(supervisor={"heartbeat": 1}),
     "t.yaml: supervisor: unknown key 'heartbeat'"),
    ("unknown-param", lambda d: d["stages"][0].update(params={"pth": "x"}),
     "t.yaml: stages[0].params: unknown key 'pth'"),
    ("wrong-type-inputs", lambda d: d["stages"][1].update(inputs="a"),
     "t.yaml: stages[1].inputs: expected a list, got str"),
    ("wrong-type-hwm", lambda d: d["links"]["a"].update(hwm="two"), "t.yaml: links.a.hwm: expected int, got str"),
    ("wrong-type-param", lambda d: d["stages"][0].update(params={"start": "soon"}),
     "t.yaml: stages[0].params.start: expected float, got str"),
    ("wrong-type-stages", lambda d: d.update(stages={"a": 1}), "t.yaml: stages: expected a list, got object"),
    ("wrong-type-link", lambda d: d["links"].update(a=3), "t.yaml: links.a: expected a mapping, got int"),
    ("bad-policy", lambda d: d["links"]["a"].update(policy="fastest"), "t.yaml: links.a.policy"),
    ("negative-hwm", lambda d: d["links"]["a"].update(hwm=-5), "t.yaml: links.a.hwm: expected int >= 1"),
    ("zero-heartbeat", lambda d: d.update(supervisor={"heartbeat_s": 0}), "t.yaml: supervisor.heartbeat_s"),
    ("empty-backoff", lambda d: d.update(supervisor={"restart_backoff_s": []}), "t.yaml: supervisor.restart_backoff_s"),
    ("future-version", lambda d: d.update(version=2), "t.yaml: version"),
    ("missing-stages", lambda d: d.pop("stages"), "t.yaml: missing required key 'stages'"),
    ("missing-name", lambda d: d["stages"][1].pop("name"), "t.yaml: stages[1]: missing required key 'name'"),
    ("unknown-kind", lambda d: d["stages"][1].update(kind="nope"), "t.yaml: stages[1].kind: unknown stage kind 'nope'"),
    ("duplicate-name", lambda d: d["stages"][1].update(name="r"), "t.yaml: stages[1].name: duplicate stage name 'r'"),
    ("undeclared-link", lambda d: d["stages"][1].update(inputs=["zz"]), "t.yaml: stages[1]: link 'zz' is not declared"),
    ("unknown-port", lambda d: d["stages"][0].update(outputs={"vid": "a"}),
     "t.yaml: stages[0].outputs: stage kind 'replay' has no output port 'vid'"),
    ("no-input", lambda d: d["stages"][1].update(inputs=[]),
     "t.yaml: stages[1].inputs: stage kind 'audio_level' needs"),
    ("two-producers", lambda d: d["stages"].append({"name": "r2", "kind": "replay", "outputs": {"audio": "a"}}),
     "t.yaml: links.a: produced by several stages"),
    ("public-link-endpoint", lambda d: d["links"]["a"].update(endpoint="tcp://0.0.0.0:5000"),
     "t.yaml: links.a.endpoint: refusing to bind"),
    ("public-control-endpoint", lambda d: d.update(supervisor={"control_endpoint": "tcp://0.0.0.0:5000"}),
     "t.yaml: supervisor.control_endpoint: refusing to bind"),
    ("public-metrics-endpoint", lambda d: d.update(supervisor={"metrics_endpoint": "tcp://*:5001"}),
     "t.yaml: supervisor.metrics_endpoint: refusing to bind"),
    ("negative-start", lambda d: d["stages"][0].update(params={"start": -3}),
     "t.yaml: stages[0].params.start: expected float >= 0.0"),
    ("kind-module-missing", lambda d: d["stages"][1].update(kind="nosuch_mod:Level"),
     "t.yaml: stages[1].kind: stage kind 'nosuch_mod:Level': cannot import nosuch_mod"),
    ("kind-not-a-stage", lambda d: d["stages"][1].update(kind="copilot.config:Placement"),
     "t.yaml: stages[1].kind: stage kind 'copilot.config:Placement': Placement is not a Stage class"),
    ("kind-the-base-class", lambda d: d["stages"][1].update(kind="copilot.stage:Stage"),
     "t.yaml: stages[1].kind: stage kind 'copilot.stage:Stage': Stage is not a Stage class (a subclass"),
    # wiring that would hang the run (an end of stream that can never come) is refused up front
    ("unproduced-link", lambda d: (d["links"].update(x={}), d["stages"][1].update(inputs=["a", "x"])),
     "t.yaml: links.x: read by l but no stage produces it"),
    ("cycle", lambda d: (d["links"].update(b={}, c={}),
                         d["stages"][1].update(inputs=["a", "c"], outputs={"features": "b"}),
                         d["stages"].append({"name": "l2", "kind": "audio_level", "inputs": ["b"],
                                             "outputs": {"features": "c"}})),
     "t.yaml: stages l -> l2 -> l form a cycle"),
    ("self-loop", lambda d: (d["links"].update(b={}),
                             d["stages"][1].update(inputs=["a", "b"], outputs={"features": "b"})),
     "t.yaml: stages l -> l form a cycle"),
    # another host cannot reach this host's run directory
    ("group-on-two-hosts", lambda d: d["stages"][0].update(placement={"host": "gpu1"}),
     "t.yaml: placement group 'main' has stages on several hosts (gpu1, localhost)"),
    ("remote-without-control-endpoint", lambda d: d["stages"][2].update(placement={"group": "other", "host": "gpu1"}),
     "t.yaml: supervisor.control_endpoint: stages on gpu1 need a tcp:// endpoint"),
    ("remote-link-without-endpoint", lambda d: (
        d["stages"][2].update(placement={"group": "other", "host": "gpu1"}),
        d.update(supervisor={"control_endpoint": "tcp://127.0.0.1:5000", "metrics_endpoint": "tcp://127.0.0.1:5001"})),
     "t.yaml: links.v: it crosses hosts (gpu1, localhost) and needs a tcp:// endpoint"),
]


def test_a_link_fed_from_outside_and_groups_on_other_hosts_parse_when_their_addresses_are_given() -> None:
    def fix(d: dict[str, Any]) -> None:
        d["links"].update(x={"endpoint": "tcp://127.0.0.1:5002"})  # something outside publishes here
        d["stages"][1].update(inputs=["a", "x"])
        d["stages"][2].update(placement={"group": "other", "host": "gpu1"})
        d["links"]["v"].update(endpoint="tcp://127.0.0.1:5003")
        d.update(supervisor={"control_endpoint": "tcp://127.0.0.1:5000", "metrics_endpoint": "tcp://127.0.0.1:5001"})

    cfg = parse_pipeline(edit(fix), "t.yaml")
    assert [s.placement.host for s in cfg.stages_in("other")] == ["gpu1"]


@pytest.mark.parametrize(("fn", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_file_and_key(fn: Callable[[dict[str, Any]], Any], expected: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_pipeline(edit(fn), "t.yaml")
    text = str(info.value)
    assert text.startswith(expected), text
    assert "\n" not in text and "`" not in text


def test_not_a_mapping() -> None:
    with pytest.raises(UsageError, match=r"^t.yaml: expected a mapping, got array$"):
        parse_pipeline([1, 2], "t.yaml")


@pytest.mark.parametrize(
    ("content", "match"),
    [("", "config file is empty"), ("# only a comment\n", "config file is empty"),
     ("stages: [\n", "not valid YAML"), (b"\xff\xfe\x00bad", "not valid YAML")],
    ids=["empty", "comment-only", "broken-yaml", "not-utf8"],
)
def test_bad_yaml_files(tmp_path: Path, content: str | bytes, match: str) -> None:
    p = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        load_yaml(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_pipeline(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="config file not found"):
        load_pipeline(tmp_path)  # a directory


def test_load_pipeline_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("stages: []\nbogus: 1\n")
    with pytest.raises(UsageError, match=rf"^{p}: unknown key 'bogus'$"):
        load_pipeline(p)


def test_params_are_normalised_by_the_stage_params() -> None:
    cfg = parse_pipeline(edit(lambda d: d["stages"][0].update(params={"until": 5})), "t.yaml")
    assert cfg.stages[0].params["until"] == 5.0
    assert cfg.stages[0].params["start"] == 0.0  # defaults filled in


def test_link_endpoints_resolve_per_run() -> None:
    cfg = parse_pipeline(edit(lambda d: d["links"]["a"].update(endpoint="tcp://127.0.0.1:7777")), "t.yaml")
    inproc = link_specs(cfg, run_dir=None)
    assert inproc["v"].endpoint == "inproc://t/v" and inproc["v"].policy == "latest" and inproc["v"].hwm == 2
    assert inproc["v"].max_age_ms == 250
    assert inproc["a"].endpoint == "tcp://127.0.0.1:7777"
    ipc = link_specs(cfg, run_dir="/tmp/run")
    assert ipc["v"].endpoint == "ipc:///tmp/run/v"
    assert ipc["a"].endpoint == "tcp://127.0.0.1:7777"


def test_a_stage_kind_may_be_a_module_path() -> None:
    """How a plugin reaches spawned groups, where classes registered by the user's script do not exist."""
    from copilot.registry import resolve_stage
    from stages.audio_level import AudioLevelStage

    cfg = parse_pipeline(edit(lambda d: d["stages"][1].update(kind="stages.audio_level:AudioLevelStage")), "t.yaml")
    assert resolve_stage(cfg.stages[1].kind) is AudioLevelStage


def test_this_host_may_be_spelled_in_capitals() -> None:
    cfg = parse_pipeline(edit(lambda d: d["stages"][2].update(placement={"group": "other", "host": "LOCALHOST"})),
                         "t.yaml")  # not another host: no tcp endpoints needed
    assert cfg.stages[2].placement.host == "LOCALHOST"
