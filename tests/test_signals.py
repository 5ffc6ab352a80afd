"""Declared signals: a new encoder with a new signal family reaches the trigger's fused score and
an event's evidence without any change to the trigger's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from copilot.config import default_config_path, load_yaml, parse_pipeline
from copilot.errors import UsageError
from copilot.messages import Envelope, Features, VideoFrame
from copilot.signals import HUD, Family, Signal, SignalTable, pipeline_signals
from copilot.stage import Stage
from copilot.testing import make_envelope, run_stage

# a family the built-in encoders do not have, declared where it is produced (the README's example)
LIGHT = Family("light", default_weight=2.0, event_kind="light_change")


class FlashAt6sStage(Stage):
    """A test encoder: the jump of mean brightness between frames, plus a flash it 'sees' at 6 s of
    media so the test knows when the new signal must open an event."""

    output_ports: ClassVar[tuple[str, ...]] = ("features",)
    signals: ClassVar[tuple[Signal, ...]] = (Signal("bright.jump", LIGHT, floor=0.05),)

    async def process(self, msg: Envelope) -> None:
        frame = msg.payload
        if not isinstance(frame, VideoFrame):
            return
        jump = 1.0 if 6.0 <= msg.t_media < 6.04 else 0.0
        await self.emit("features", Features(name="bright", values={"jump": jump}), parent=msg)


def _pipeline_with_the_new_encoder(tmp_path: Path) -> Path:
    data = load_yaml(default_config_path())
    data["links"]["bright"] = {"policy": "ordered", "hwm": 512}
    data["stages"].insert(1, {"name": "brightness", "kind": f"{__name__}:FlashAt6sStage", "inputs": ["frames"],
                              "outputs": {"features": "bright"}, "placement": {"group": "decode"}})
    for stage in data["stages"]:
        if stage["kind"] == "trigger":
            stage["inputs"].append("bright")
    path = tmp_path / "with_brightness.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_trigger_table_is_what_the_stages_feeding_it_declare(tmp_path: Path) -> None:
    cfg = parse_pipeline(load_yaml(_pipeline_with_the_new_encoder(tmp_path)), "p.yaml")
    table = SignalTable(pipeline_signals(cfg, "trigger"))
    assert table.get("bright.jump") == Signal("bright.jump", LIGHT, floor=0.05)
    assert {"motion", "scene", "hud", "audio", "timbre", "speech", "light"} <= set(table.families)
    small = table.get("hud.small")
    assert small is not None and small.binary and small.weak
    table.check_weights({"light": 1.5, "audio.onset": 1.0}, "p.yaml")  # a declared family, a declared signal
    with pytest.raises(UsageError, match=r"p\.yaml: weights\.dark: no stage of this pipeline declares"):
        table.check_weights({"dark": 1.0}, "p.yaml")
    default = parse_pipeline(load_yaml(default_config_path()), "default.yaml")
    with pytest.raises(UsageError, match=r"weights\.light"):  # the default pipeline has no such encoder
        SignalTable(pipeline_signals(default, "trigger")).check_weights({"light": 1.0}, "p.yaml")


def test_two_stages_declaring_one_signal_differently_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"'hud\.steps' is declared differently by stages 'a' and 'b'"):
        SignalTable([("a", Signal("hud.steps", HUD, floor=0.1)), ("b", Signal("hud.steps", HUD, floor=0.2))])
    with pytest.raises(UsageError, match="family 'hud' is declared differently"):
        SignalTable([("a", Signal("x.y", HUD)), ("b", Signal("x.z", Family("hud", default_weight=9.0)))])
    with pytest.raises(ValueError, match=r"FEATURES_NAME\.VALUE_KEY"):
        Signal("nodot", HUD)


def test_a_new_signal_family_shows_in_an_event_without_touching_the_trigger(tmp_path: Path) -> None:
    # a profile without weights: the default profile weights the built-in families, which a pipeline
    # of this one encoder does not declare (an error, see above); the family's own default applies
    prof = tmp_path / "light.yaml"
    prof.write_text("name: light\n")
    envs = [make_envelope(Features(name="bright", values={"jump": 1.0 if i == 180 else 0.0}), t_media=i / 30,
                          source="brightness") for i in range(300)]
    declared = [("brightness", s) for s in FlashAt6sStage.signals]
    res = run_stage("trigger", envs, input_signals=declared, options={"profile": str(prof)})
    events = res["events"]
    assert [(e.event_kind, e.priority, round(e.t, 2)) for e in events] == [("light_change", "high", 6.0)]
    assert events[0].evidence["signals"] == ["bright.jump"] and "light" in events[0].evidence["families"]
    without = run_stage("trigger", envs, options={"profile": str(prof)})  # not declared: not scored
    assert without["events"] == []


@pytest.mark.slow
def test_a_pipeline_with_a_new_encoder_wakes_on_its_signal_end_to_end(tmp_path: Path, atari_clip: Path) -> None:
    """The real CLI over a real recording: the trigger of a pipeline that adds the encoder scores its
    signal (the group reads the declarations of the stages feeding the trigger)."""
    cfg = _pipeline_with_the_new_encoder(tmp_path)
    out = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "replay", str(atari_clip), "--config", str(cfg), "--speed", "max",
         "--events-out", str(out), "-q"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    near6 = [e for e in events if abs(e["t"] - 6.0) < 0.1]
    assert near6, events
    assert "bright.jump" in near6[0]["evidence"]["signals"] and "light" in near6[0]["evidence"]["families"]


def test_a_profile_weight_for_an_undeclared_family_is_one_line_before_anything_runs(tmp_path: Path,
                                                                                     atari_clip: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\nweights: {light: 1.0}\n")
    events = tmp_path / "e.jsonl"
    events.write_text("kept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "replay", str(atari_clip), "--profile", str(prof), "--speed", "max",
         "--events-out", str(events), "-q"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "weights.light: no stage of this pipeline declares" in lines[0], proc.stderr
    assert events.read_text() == "kept\n"  # nothing already written is lost
