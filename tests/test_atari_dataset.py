"""Atari footage with ground truth: determinism, media lengths, and truth against picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ale_py")
av = pytest.importorskip("av")

from copilot.errors import UsageError  # noqa: E402
from engines.atari_dataset import AtariRecording, make_atari_recording  # noqa: E402
from engines.atari_game import AtariGame, resolve_game  # noqa: E402

SECONDS = 20
FPS = 30


@pytest.fixture(scope="module")
def breakout(tmp_path_factory: pytest.TempPathFactory) -> AtariRecording:
    out = tmp_path_factory.mktemp("atari")
    return make_atari_recording("Breakout", SECONDS, out, fps=FPS, seed=3, progress=False)


def _read_truth(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], lines[1:]


def _decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].sample_rate
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    return frames, audio, rate


def test_files_meta_and_events(breakout: AtariRecording) -> None:
    assert breakout.video.name == "breakout_s3.mp4"
    assert breakout.truth.name == "breakout_s3.truth.jsonl"
    meta, events = _read_truth(breakout.truth)
    assert meta["kind"] == "meta"
    assert meta["game"] == "Breakout" and meta["seed"] == 3 and meta["fps"] == FPS
    assert meta["frames"] == SECONDS * FPS and meta["seconds"] == SECONDS
    assert (meta["width"], meta["height"], meta["audio_rate"]) == (640, 480, 48000)
    assert events, "a random agent loses lives in Breakout within 20 s"
    assert {e["kind"] for e in events} <= {"reward", "life_lost", "game_over"}
    for e in events:
        assert e["t"] == round(e["frame"] / FPS, 6)
        assert e["frame"] == e["emu_frame"] // (60 // FPS)
    times = [e["t"] for e in events]
    assert times == sorted(times)
    rewards = [e for e in events if e["kind"] == "reward"]
    assert all(r["value"] > 0 for r in rewards)


def test_same_seed_gives_identical_truth(breakout: AtariRecording, tmp_path: Path) -> None:
    again = make_atari_recording("breakout", SECONDS, tmp_path, fps=FPS, seed=3, progress=False)
    assert again.truth.read_bytes() == breakout.truth.read_bytes()
    other = make_atari_recording("Breakout", SECONDS, tmp_path, fps=FPS, seed=4, progress=False)
    assert other.truth.read_bytes() != breakout.truth.read_bytes()


def test_mp4_frames_and_audio_length(breakout: AtariRecording) -> None:
    frames, audio, rate = _decode(breakout.video)
    assert len(frames) == SECONDS * FPS
    assert frames[0].shape == (480, 640, 3)
    video_s = len(frames) / FPS
    assert abs(len(audio) / rate - video_s) <= 0.050
    assert np.abs(audio).max() > 0.05, "the console's sound is in the track"


def test_audio_is_the_emulators_and_in_sync(breakout: AtariRecording) -> None:
    """The AAC track is the emulator's own sound, not shifted.

    The emulator is replayed with the same seed, its u8 samples resampled to 48 kHz by
    linear interpolation, and cross-correlated with the decoded track: the correlation
    peaks at lag 0 (within 2 ms) and is high.
    """
    _, audio, rate = _decode(breakout.video)
    game = AtariGame("Breakout", seed=3)
    src = np.concatenate([game.step().audio for _ in range(60 * SECONDS)]).astype(np.float64)
    n = int(len(src) * rate / 30720)
    ref = np.interp(np.arange(n) * 30720 / rate, np.arange(len(src)), src - 128.0)
    dec = audio[:n].astype(np.float64)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(dec, size) * np.conj(np.fft.rfft(ref, size)), size)
    span = rate // 10
    lag = int(np.argmax(np.concatenate([xc[-span:], xc[: span + 1]]))) - span
    assert abs(lag) <= rate * 0.002
    assert np.corrcoef(dec, ref)[0, 1] > 0.9


def test_truth_lines_up_with_the_hud(breakout: AtariRecording) -> None:
    """Every truth event shows on the picture at its time, and nothing else does.

    Breakout draws its score and lives counter in a HUD band at the top of the screen
    (console rows 5-14, rows 11-32 of the 640x480 video) that the ball never enters.  The
    band therefore changes exactly when the score or the lives change, or a new game
    resets them.  Decoding the MP4, the set of frames on which the band changes must equal
    the set of event frames, where an event on frame k may show on frame k or k+1 (the
    game redraws its HUD one emulator frame after ALE reports the event; at 30 fps that
    lands on the same or the next output frame).  This checks both directions: no event
    is placed where the picture shows nothing, and no visible score/lives change is
    missing from the truth.
    """
    frames, _, _ = _decode(breakout.video)
    _, events = _read_truth(breakout.truth)
    band = np.array([f[8:36].astype(np.int16) for f in frames])
    diff = np.abs(np.diff(band, axis=0)).mean(axis=(1, 2, 3))  # diff[k-1]: frame k vs k-1
    assert diff.max() > 2.0
    changed = {int(k) + 1 for k in np.nonzero(diff > 1.0)[0]}
    event_frames = {int(e["frame"]) for e in events}
    missing = [e for e in events if not {e["frame"], e["frame"] + 1} & changed]
    unexplained = sorted(k for k in changed if not {k, k - 1} & event_frames)
    assert not missing, f"events with no HUD change: {missing}"
    assert not unexplained, f"HUD changes at frames {unexplained} with no truth event"
    # and the time really is the frame's PTS
    with av.open(str(breakout.video)) as c:
        pts = [float(f.time) for f in c.decode(video=0)]
    for e in events:
        assert abs(pts[e["frame"]] - e["t"]) < 1e-3


def test_game_over_resets_and_continues() -> None:
    game = AtariGame("Breakout", seed=0)
    over = None
    for _ in range(60 * 30):
        s = game.step()
        assert s.rgb.shape == (210, 160, 3) and s.rgb.dtype == np.uint8
        assert s.audio.shape == (512,) and s.audio.dtype == np.uint8
        if s.game_over:
            over = s
            break
    assert over is not None, "a random agent loses Breakout within 30 s"
    nxt = game.step()
    assert nxt.index == over.index + 1
    assert nxt.episode == over.episode + 1 and nxt.lives > over.lives and game.score == 0


def test_emulator_is_deterministic_per_seed() -> None:
    def run(seed: int, policy: str) -> list[tuple[int, int, bytes]]:
        g = AtariGame("Pong", seed=seed, policy=policy)
        out = []
        for _ in range(300):
            s = g.step()
            out.append((int(s.reward), s.lives, s.rgb.tobytes() + s.audio.tobytes()))
        return out

    assert run(1, "sticky") == run(1, "sticky")
    assert run(1, "sticky") != run(2, "sticky")
    assert run(1, "random") != run(1, "sticky")


@pytest.mark.parametrize(
    ("name", "rom"),
    [
        ("Breakout", "breakout"),
        ("SpaceInvaders", "space_invaders"),
        ("space_invaders", "space_invaders"),
        ("DemonAttack", "demon_attack"),
        ("Pong", "pong"),
        ("MsPacman", "ms_pacman"),
        ("ALE/Pong-v5", "pong"),
        ("BreakoutNoFrameskip-v4", "breakout"),
    ],
)
def test_game_names(name: str, rom: str) -> None:
    assert resolve_game(name) == rom


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        AtariGame("Brekout")
    message = str(err.value)
    assert "\n" not in message and "Breakout" in message and "Pong" in message
    with pytest.raises(UsageError):
        AtariGame("Breakout", policy="smart")
    with pytest.raises(UsageError):
        make_atari_recording("Breakout", 1, tmp_path, fps=25, progress=False)
    with pytest.raises(UsageError):
        make_atari_recording("Breakout", 0, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_that_cannot_be_used_is_refused_before_recording(tmp_path: Path) -> None:
    """These were tracebacks; the last one came after the whole recording had been made."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match=r"cannot create output directory .*afile/sub \(Not a directory\)"):
        make_atari_recording("Breakout", 1, tmp_path / "afile" / "sub", progress=False)
    (tmp_path / "taken" / "breakout_s0.mp4").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"cannot write .*breakout_s0\.mp4: it is a directory"):
        make_atari_recording("Breakout", 1, tmp_path / "taken", progress=False)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["breakout_s0.mp4"]  # nothing begun


def test_sixty_fps(tmp_path: Path) -> None:
    rec = make_atari_recording("SpaceInvaders", 2, tmp_path, fps=60, seed=1, progress=False)
    frames, audio, rate = _decode(rec.video)
    assert len(frames) == 120 and rec.frames == 120
    assert abs(len(audio) / rate - 2.0) <= 0.050
    meta, events = _read_truth(rec.truth)
    assert meta["frame_step"] == 1
    assert all(e["frame"] == e["emu_frame"] for e in events)
