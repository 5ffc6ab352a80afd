"""Motion, scene-change and thumbnail encoders on real Atari frames (and their stages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copilot.messages import Features, VideoFrame
from copilot.testing import make_envelope, run_stage
from stages.motion import MotionAnalyzer, colour_histogram, gray_thumbnail
from stages.thumbnail import ThumbnailAnalyzer, thumbnail_vector


@pytest.fixture(scope="module")
def frames(atari_clip: Path) -> list[tuple[float, np.ndarray]]:
    import av

    out = []
    with av.open(str(atari_clip)) as c:
        for f in c.decode(video=0):
            if f.time > 4.0:
                break
            out.append((float(f.time), f.to_ndarray(format="rgb24")))
    return out


def test_motion_on_real_frames(frames: list[tuple[float, np.ndarray]]) -> None:
    m = MotionAnalyzer()
    vals = [m.update(img, t) for t, img in frames]
    assert vals[0]["diff"] == 0.0
    assert any(v["diff"] > 0 for v in vals[1:]), "the ball and paddle move"
    assert all(0.0 <= v["changed"] <= 1.0 and 0.0 <= v["hist"] <= 1.0 for v in vals)
    assert max(v["hist"] for v in vals) < 0.2, "Breakout keeps its palette from frame to frame"


def test_duplicates_flash_and_reset(frames: list[tuple[float, np.ndarray]]) -> None:
    m = MotionAnalyzer()
    t, img = frames[30]
    m.update(img, t)
    dup = m.update(img.copy(), t + 1 / 30)
    assert dup["still"] == 1.0 and dup["diff"] == 0.0 and dup["flash"] == 0.0
    white = np.full_like(img, 255)
    flash = m.update(white, t + 2 / 30)
    assert flash["flash"] > 0.5 and flash["hist"] > 0.5
    # the whole screen stays changed: ``reset`` compares with the frame about 0.5 s before
    resets = [m.update(white, t + k / 30)["reset"] for k in range(3, 30)]
    assert max(resets) > 0.5 and resets[-1] == 0.0


def test_colour_histogram_is_normalised(frames: list[tuple[float, np.ndarray]]) -> None:
    h = colour_histogram(frames[0][1][::4, ::4])
    assert h.shape == (64,) and abs(float(h.sum()) - 1.0) < 1e-5


def test_thumbnail_vectors(frames: list[tuple[float, np.ndarray]]) -> None:
    v = thumbnail_vector(frames[10][1])
    assert v.shape == (576,) and v.dtype == np.float32
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4
    assert float(v @ thumbnail_vector(frames[10][1])) == pytest.approx(1.0, abs=1e-5)
    other = thumbnail_vector(np.roll(frames[10][1], 200, axis=1))
    assert float(v @ other) < 0.95
    tiny = thumbnail_vector(np.zeros((20, 30, 3), np.uint8))  # smaller than the grid: still a vector
    assert tiny.shape == (576,)


def test_thumbnail_novelty_long_flags_a_screen_not_seen_lately(frames: list[tuple[float, np.ndarray]]) -> None:
    th = ThumbnailAnalyzer()
    last = {}
    for t, img in frames:
        _, last = th.update(img, t)
    assert last["novelty_long"] < 0.05
    rng = np.random.default_rng(0)
    _, new = th.update(rng.integers(0, 255, frames[0][1].shape, dtype=np.uint8), frames[-1][0] + 1 / 30)
    assert new["novelty_long"] > 0.5 and new["novelty"] > 0.5


@pytest.mark.parametrize("kind", ["motion", "frame_diff", "thumbnail"])
def test_stages_on_real_frames(kind: str, frames: list[tuple[float, np.ndarray]]) -> None:
    envs = [make_envelope(VideoFrame(image=img, frame_index=i), t_media=t, seq=i + 1)
            for i, (t, img) in enumerate(frames[:40])]
    res = run_stage(kind, envs)
    feats = res["features"]
    assert len(feats) == 40 and all(isinstance(f, Features) for f in feats)
    if kind == "thumbnail":
        assert feats[0].name == "thumb" and feats[0].vector is not None and feats[0].vector.shape == (576,)
    else:
        assert feats[0].name == "motion" and "diff" in feats[-1].values


def sprites(n: int, shift: int = 0) -> np.ndarray:
    """A dark playfield with ``n`` bright 12x12 sprites (shifted right by ``shift`` px)."""
    img = np.full((240, 320, 3), 20, np.uint8)
    for k in range(n):
        x = 20 + 36 * k + shift
        img[100:112, x:x + 12] = 230
    return img


def test_vanish_is_high_when_sprites_go_away_and_stay_away() -> None:
    m = MotionAnalyzer()
    vals = [m.update(sprites(8, shift=(i % 10)), i / 30) for i in range(60)]  # moving: foreground constant
    assert max(v["vanish"] for v in vals) < 0.05
    gone = [m.update(sprites(2), (60 + i) / 30)["vanish"] for i in range(20)]  # six of eight cleared
    assert max(gone) > 0.6
    flicker = MotionAnalyzer()  # sprites blinking every other frame are not gone
    vals = [flicker.update(sprites(8) if i % 2 else sprites(0), i / 30) for i in range(60)]
    assert max(v["vanish"] for v in vals[20:]) < 0.05


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_gray_thumbnail_is_the_integer_luma_of_every_strided_pixel(stride: int,
                                                                  frames: list[tuple[float, np.ndarray]]) -> None:
    """The fast path (channel views summed straight into int16) equals (R + 2G + B) >> 2 computed
    plainly in int32, for RGB, for BGRA (the same channels reordered) and for gray frames."""
    rng = np.random.default_rng(stride)
    for rgb in (frames[len(frames) // 2][1], rng.integers(0, 256, (97, 131, 3), np.uint8),
                np.full((8, 8, 3), 255, np.uint8)):
        s = rgb[::stride, ::stride].astype(np.int32)
        want = (s[..., 0] + 2 * s[..., 1] + s[..., 2]) >> 2
        got = gray_thumbnail(rgb, stride)
        assert got.dtype == np.int16 and np.array_equal(got, want)
        bgra = np.concatenate([rgb[..., ::-1], np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
        assert np.array_equal(gray_thumbnail(bgra, stride, "bgra"), want)
        gray = rgb[..., 1]
        assert np.array_equal(gray_thumbnail(gray, stride), gray[::stride, ::stride])
