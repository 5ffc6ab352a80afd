"""Game profiles: resolution by name or path, strict validation with one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from copilot.commands import resolve_profile_option
from copilot.config import default_config_path, load_yaml, parse_pipeline
from copilot.errors import UsageError
from copilot.profile import load_profile, profile_from_options, profiles_dir, resolve_profile


def check_for_default_pipeline(path: Path) -> None:
    """What the CLI does with ``--profile``: load it, then let the default pipeline's stages
    validate the sections they own (the trigger's settings and weights, the HUD's cues)."""
    cfg = parse_pipeline(load_yaml(default_config_path()), "default.yaml")
    resolve_profile_option(str(path), cfg)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "game.yaml"
    p.write_text(text)
    return p


def test_default_and_bundled_profiles_load() -> None:
    assert resolve_profile(None) == profiles_dir() / "default.yaml"
    assert load_profile(resolve_profile(None)).name == "default"
    names = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
    assert "default" in names and len(names) >= 2
    for name in names:
        prof = load_profile(resolve_profile(name))
        for f in prof.ocr_fields:
            assert prof.region(f.region).name == f.region


def test_options_without_a_profile_give_the_default() -> None:
    assert profile_from_options({}).name == "default"


def test_a_path_is_taken_as_is(tmp_path: Path) -> None:
    p = write(tmp_path, "name: mine\n")
    assert resolve_profile(str(p)) == p
    assert load_profile(p).name == "mine"


def test_unknown_bare_name_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown profile 'nosuchgame' \(known: .*default"):
        resolve_profile("nosuchgame")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("name: x\ncolour: red\n", r"game\.yaml: .*colour"),
        ("regions: [{name: hp, box: [0, 0, 0.2]}]\n", r"regions\[0\]\.box: expected \[x, y, w, h\]"),
        ("regions: [{name: hp, box: [0.9, 0, 0.2, 0.1]}]\n", r"regions\[0\]\.box: the region runs past the frame"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: health, region: ammo}]\n",
         r"ocr_fields\[0\]\.region: no region named 'ammo'"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: health, region: hp, type: roman}]\n",
         r"ocr_fields\[0\]\.type"),
        ("rules: [{field: health, op: drop_pct, value: 30}]\n", r"rules\[0\]\.field: no OCR field named 'health'"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: health, region: hp}]\n"
         "rules: [{field: health, op: drop_pct, value: 30, priority: urgent}]\n", r"rules\[0\]\.priority"),
        ("keywords: {GAME OVER: loud}\n", r"keywords"),
        ("trigger: {refractory_s: soon}\n", r"trigger\.refractory_s: expected `?float"),
        ("trigger: {max_delay_s: 2.0}\n", r"trigger\.max_delay_s: expected seconds in \[0, 0\.5\]"),
        ("weights: {hud: -1}\n", r"weights\.hud: expected a finite weight >= 0"),
        ("weights: {audio: .inf}\n", r"weights\.audio: expected a finite weight >= 0, got inf"),
        ("weights: {audio: .nan}\n", r"weights\.audio: expected a finite weight"),
        # a 0 s block divided by zero in the detector (the run hung); any negative setting is a typo
        ("trigger: {block_s: 0}\n", r"trigger\.block_s: expected a number > 0, got 0"),
        ("trigger: {window_s: -1}\n", r"trigger\.window_s: expected a number >= 0, got -1"),
        ("hud: {quiet_max_cells: -3}\n", r"hud\.quiet_max_cells: expected a finite number >= 0"),
        ("hud: {revert_max_states: many}\n", r"hud\.revert_max_states: expected `?int"),
        ("trigger: {quiet_s: 20}\n", r"trigger\.quiet_s: a HUD cue setting: put it in the profile's hud section"),
        ("trigger: {fire_threshold: .nan}\n", r"trigger\.fire_threshold: expected a finite number"),
        ("hud: {quiet_icon_lost: 2}\n", r"hud\.quiet_icon_lost: expected a share in \[0, 1\]"),
        ("regions: [{name: '', box: [0, 0, 0.2, 0.1]}]\n", r"regions\[0\]\.name: expected a name"),
        ("keywords: {'': critical}\n", r"keywords: expected words or phrases, got an empty one"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: who, region: hp, type: text}]\n"
         "rules: [{field: who, op: drop, value: 1}]\n", r"rules\[0\]\.op: 'who' is read as text"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: health, region: hp}]\n"
         "rules: [{field: health, op: drop, value: -5}]\n", r"rules\[0\]\.value: drop expects an amount >= 0"),
        ("regions: [{name: hp, box: [0, 0, 0.2, 0.1]}]\nocr_fields: [{name: health, region: hp}]\n"
         "rules: [{field: health, op: below, value: .nan}]\n", r"rules\[0\]\.value: expected a finite number"),
        ("weights: {sound: 2}\n", r"weights\.sound: no stage of this pipeline declares a signal family or signal"
                                  r" named 'sound' \(families: audio,"),
        ("- just\n- a list\n", r"expected a mapping"),
    ],
)
def test_validation_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, pattern: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        check_for_default_pipeline(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(p) in msg
    import re

    assert re.search(pattern, msg), msg


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="empty"):
        load_profile(write(tmp_path, ""))


def test_cli_bad_profile_exits_2_with_one_line(tmp_path: Path, atari_clip: Path) -> None:
    bad = write(tmp_path, "trigger: {refractory_s: soon}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "copilot", "annotate", str(atari_clip), "-o", str(tmp_path / "e.jsonl"),
         "--profile", str(bad), "-q"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "refractory_s" in lines[0] and "Traceback" not in proc.stderr
