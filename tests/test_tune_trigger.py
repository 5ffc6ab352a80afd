"""The trigger tuner's settings: repeatable, checked before anything runs, bad ones one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tune_trigger import main, parse_settings, with_trigger
from copilot.errors import UsageError
from copilot.profile import Profile


def test_settings_parse_to_typed_values_and_sweeps_to_lists() -> None:
    assert parse_settings(["fire_threshold=0.6", "annotate_hud=false"], sweep=False) == {
        "fire_threshold": [0.6], "annotate_hud": [False]}
    assert parse_settings(["quiet_s=10,20"], sweep=True) == {"quiet_s": [10, 20]}
    prof = with_trigger(Profile(), {"fire_threshold": 0.6, "quiet_s": 10})
    assert prof.trigger.fire_threshold == 0.6 and prof.trigger.quiet_s == 10.0
    assert with_trigger(Profile(), {}) == Profile()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nosuch=1"], "no trigger setting nosuch"),
        (["--set", "fire_threshold"], "expected KEY=VALUE"),
        (["--grid", "fire_threshold"], "expected KEY=V1,V2"),
        (["--set", "fire_threshold=high"], "Expected `float`"),
        (["--grid", "quiet_s=10,often"], "Expected `float`"),
        (["--set", "block_s=0"], r"trigger\.block_s: expected a number > 0"),  # divided by zero in the detector
    ],
)
def test_a_bad_setting_is_a_usage_error_before_any_recording_is_made(
    tmp_path: Path, args: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        main(["--games", "Pong", "--data", str(tmp_path), *args])
    assert not list(tmp_path.iterdir()), "nothing was recorded for a run that could not start"
