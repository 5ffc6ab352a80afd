"""A restarted group goes on with the run's timeline, and keeps what was written before.

The supervisor restarts a group that died; its sources must not start the media over at 0
(every later event would sit before the ones already seen), and its files must not be
rewritten from scratch.  The stages are run as a restart would run them
(``run_stage(..., restart=...)``); the supervisor's part is in ``test_supervisor.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from copilot.clock import VirtualClock
from copilot.testing import run_stage
from stages.recorder import continuation_path


def test_a_restarted_replay_goes_on_where_the_run_is_now(atari_clip: Path) -> None:
    clock = VirtualClock()
    session_start = clock.now_ns()
    clock.advance(int(8.0e9))  # the group died and came back 8 s into the run (of a 12 s clip)
    res = run_stage("replay", params={"path": str(atari_clip), "until": 11.0}, clock=clock,
                    restart={"incarnation": 1, "session_start_ns": session_start})
    video = res.envelopes("video")
    assert video and 8.0 - 1e-6 <= video[0].t_media < 8.05 and video[-1].t_media < 11.0
    # still paced on the run's clock: frame t goes out at session start + t
    for env in video:
        assert (env.t_capture_ns - session_start) / 1e9 == pytest.approx(env.t_media, abs=0.05)
    assert res.metrics.media_s == pytest.approx(11.0, abs=0.1)  # extent from the run's start


def test_a_restarted_replay_at_max_speed_goes_on_from_where_it_had_got(atari_clip: Path) -> None:
    clock = VirtualClock()
    res = run_stage("replay", params={"path": str(atari_clip), "until": 12.0}, clock=clock, speed=None,
                    restart={"incarnation": 1, "session_start_ns": clock.now_ns(), "resume_media_s": 10.0})
    video = res.envelopes("video")
    assert video and 10.0 - 1e-6 <= video[0].t_media < 10.05 and len(video) == pytest.approx(60, abs=1)


def test_the_first_run_of_a_replay_starts_at_the_start(atari_clip: Path) -> None:
    res = run_stage("replay", params={"path": str(atari_clip), "until": 1.0}, clock=VirtualClock())
    assert res.envelopes("video")[0].t_media == pytest.approx(0.0, abs=1e-6)


def test_a_restarted_atari_game_goes_on_with_the_run_s_media_time(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    truth = tmp_path / "truth.jsonl"
    clock = VirtualClock()
    session_start = clock.now_ns()
    first = run_stage("atari", params={"game": "Breakout", "seconds": 2.0, "truth_out": str(truth)}, clock=clock)
    assert first.envelopes("video")[0].t_media == 0.0
    written = truth.read_text().splitlines()
    clock.advance(int(1.0e9))  # down for a second
    again = run_stage("atari", params={"game": "Breakout", "seconds": 5.0, "truth_out": str(truth)}, clock=clock,
                      restart={"incarnation": 1, "session_start_ns": session_start})
    video = again.envelopes("video")
    assert video[0].t_media == pytest.approx(3.0, abs=0.05) and video[-1].t_media < 5.0
    lines = truth.read_text().splitlines()
    assert lines[1:len(written)] == written[1:]  # what the first game wrote is still there
    assert sum('"kind": "meta"' in ln for ln in lines) == 1


def test_a_restarted_recorder_keeps_the_first_file(tmp_path: Path) -> None:
    first = tmp_path / "session.mp4"
    first.write_bytes(b"recorded before the restart")
    assert continuation_path(first, 1) == tmp_path / "session.restart1.mp4"
    (tmp_path / "session.restart1.mp4").write_bytes(b"")
    assert continuation_path(first, 1) == tmp_path / "session.restart2.mp4"
