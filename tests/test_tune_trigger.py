"""The trigger tuner's settings: repeatable, checked before anything runs, bad ones one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tune_trigger import CACHE_VERSION, main, parse_settings, with_trigger
from copilot.errors import UsageError
from copilot.profile import Profile


def test_settings_parse_to_typed_values_and_sweeps_to_lists() -> None:
    assert parse_settings(["fire_threshold=0.6", "annotate_hud=false"], sweep=False) == {
        "fire_threshold": [0.6], "annotate_hud": [False]}
    assert parse_settings(["quiet_s=10,20"], sweep=True) == {"quiet_s": [10, 20]}
    prof = with_trigger(Profile(), {"fire_threshold": 0.6, "quiet_s": 10})  # a trigger and a HUD cue setting
    assert prof.trigger == {"fire_threshold": 0.6} and prof.hud == {"quiet_s": 10}
    assert with_trigger(Profile(), {}) == Profile()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nosuch=1"], "no trigger or hud setting nosuch"),
        (["--set", "fire_threshold"], "expected KEY=VALUE"),
        (["--grid", "fire_threshold"], "expected KEY=V1,V2"),
        (["--set", "fire_threshold=high"], r"trigger\.fire_threshold: expected float"),
        (["--grid", "quiet_s=10,often"], r"hud\.quiet_s: expected float"),
        (["--set", "block_s=0"], r"trigger\.block_s: expected a number > 0"),  # divided by zero in the detector
    ],
)
def test_a_bad_setting_is_a_usage_error_before_any_recording_is_made(
    tmp_path: Path, args: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        main(["--games", "Pong", "--data", str(tmp_path), *args])
    assert not list(tmp_path.iterdir()), "nothing was recorded for a run that could not start"


def _figures(out: str) -> list[str]:
    """The tuner's printed figures, without the timing in brackets."""
    return [line.split("[")[0] for line in out.splitlines()]


def test_recordings_prepared_in_worker_processes_give_the_same_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ale_py")
    args = ["--games", "Pong", "Breakout", "--seconds", "3", "--data", str(tmp_path), "--per-game"]
    assert main([*args, "--jobs", "2"]) == 0
    parallel = capsys.readouterr().out
    caches = sorted(p.name for p in tmp_path.glob("*.features.jsonl"))
    assert caches == [f"breakout_s0.default.v{CACHE_VERSION}.features.jsonl",
                      f"pong_s0.default.v{CACHE_VERSION}.features.jsonl"]
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"
    assert main([*args, "--jobs", "1", "--refresh"]) == 0  # computed again, in this process
    assert _figures(capsys.readouterr().out) == _figures(parallel)
    assert "Breakout" in parallel and "Pong" in parallel


def test_the_tuner_replays_what_the_real_pipeline_sent_its_trigger(atari_clip: Path, tmp_path: Path) -> None:
    """No hand-wired copy of the pipeline: the features are what ``annotate`` ran, and replayed with
    the profile's own settings they give the very events the pipeline wrote."""
    import json
    import shutil

    from bench.tune_trigger import cache_paths, cached_features, observations, replay_detector
    from copilot.profile import load_profile, resolve_profile

    video = tmp_path / "clip.mp4"
    shutil.copy(atari_clip, video)
    features = cached_features(video)
    kinds = {json.loads(line)["kind"] for line in features.read_text().splitlines()}
    assert {"features", "cue"} <= kinds  # graded signals and the HUD's cues, as the trigger got them
    pipeline = [json.loads(line) for line in cache_paths(video, None)[1].read_text().splitlines()]
    replayed = replay_detector(observations(features), load_profile(resolve_profile(None)))
    assert len(pipeline) >= 3
    assert sorted(map(json.dumps, replayed)) == sorted(map(json.dumps, pipeline))
    changed = replay_detector(observations(features),
                              with_trigger(load_profile(resolve_profile(None)), {"annotate_hud": False}))
    assert changed != replayed  # and the settings (here a HUD cue setting) do take effect


def test_an_unknown_game_is_refused_before_any_recording_is_made(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    with pytest.raises(UsageError, match="unknown Atari game 'Pongg'"):
        main(["--games", "Pong", "Pongg", "--data", str(tmp_path), "--jobs", "2"])
    assert not list(tmp_path.iterdir())


def test_wakes_are_grouped_by_priority_kind_and_agreeing_families() -> None:
    from bench.tune_trigger import WakeClasses
    from copilot.scoring import evaluate

    def wake(t: float, kind: str, families: dict[str, float], priority: str = "high") -> dict[str, object]:
        return {"t": t, "kind": kind, "priority": priority, "evidence": {"families": families}}

    truth = [{"t": 10.0, "kind": "life_lost"}, {"t": 30.0, "kind": "reward"}]
    pred = [
        wake(9.0, "sound", {"audio": 0.9, "scene": 0.5}),  # before the death: matched
        wake(20.0, "sound", {"audio": 0.8, "scene": 0.4, "motion": 0.1}),  # nothing near: false
        wake(30.5, "hud_change", {"hud": 0.6}, "critical"),  # the reward
        {"t": 40.0, "kind": "hud_change", "priority": "low", "evidence": {}},  # not a wake
    ]
    classes = WakeClasses(agree_min=0.33)
    classes.add(pred, evaluate(pred, truth)["wakes"], "game")
    assert classes.counts == {
        ("high", "sound", "audio+scene"): {"wakes": 2, "matched": 1, "false": 1},  # motion 0.1 did not agree
        ("critical", "hud_change", "hud"): {"wakes": 1, "matched": 1, "false": 0},
    }
    table = classes.table().splitlines()
    assert "families" in table[0] and "audio+scene" in table[1]  # the most frequent class first


def test_ctrl_c_ends_a_bench_tool_with_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.output import run_tool

    def interrupted() -> int:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_tool(interrupted, "python -m bench.tune_trigger")
    assert exc.value.code == 130
    assert capsys.readouterr().err == "python -m bench.tune_trigger: interrupted\n"


def test_a_bench_tool_piped_into_head_stops_without_a_traceback() -> None:
    import subprocess
    import sys

    script = ("from bench.output import run_tool\n"
              "def main():\n"
              "    for _ in range(100000):\n"
              "        print('a line of figures')\n"
              "    return 0\n"
              "run_tool(main, 'tool')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"a line of figures\n"
    proc.stdout.close()  # what `head -1` does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == "", err
