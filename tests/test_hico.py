"""HiCo's rolling compressor (stages/hico_tokens.py): bounded, spans that tile the stream, a
reconstruction better than uniform pooling, snapshots that leave the state alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.hico_tokens import HiCo, mean_cosine, uniform_pooling


def check_tiling(h: HiCo, times: list[float]) -> None:
    """Spans are ordered, disjoint and cover the stream from its first frame to its end."""
    spans = h.spans
    assert len(spans) == len(h) <= h.budget
    assert sum(s[2] for s in spans) == len(times) == h.frames
    assert spans[0][0] == times[0]
    for (a0, a1, an), (b0, _b1, _bn) in pairwise(spans):
        assert a0 <= a1 == b0  # a token ends where the next begins: no gap, no overlap
        assert an >= 1
    last_dt = times[-1] - times[-2] if len(times) > 1 else 0.0
    assert spans[-1][1] == pytest.approx(times[-1] + last_dt)
    # each frame's time lies in the span of the token that counts it
    pos = h.locate(times)
    assert np.all(np.diff(pos) >= 0)
    assert np.bincount(pos, minlength=len(spans)).tolist() == [s[2] for s in spans] or len(set(times)) < len(times)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recent=st.integers(0, 6),
    extra=st.integers(2, 10),
    gaps=st.lists(st.sampled_from([0.0, 1 / 60, 1 / 30, 0.5, 3.0]), min_size=1, max_size=120),
    seed=st.integers(0, 2**16),
    scenes=st.integers(1, 4),
)
def test_never_over_budget_and_spans_tile_the_stream(recent: int, extra: int, gaps: list[float], seed: int,
                                                     scenes: int) -> None:
    rng = np.random.default_rng(seed)
    budget = recent + extra
    centres = rng.normal(size=(scenes, 4))
    h = HiCo(4, budget=budget, recent=recent)
    times: list[float] = []
    t = float(rng.uniform(0, 100))
    for k, gap in enumerate(gaps):
        t += gap
        v = centres[rng.integers(scenes)] + 0.1 * rng.normal(size=4)
        if k % 17 == 5:
            v = np.zeros(4)  # a flat frame: a zero vector
        h.push(t, v)
        times.append(t)
        assert len(h) <= budget
        assert h.max_len <= budget
    check_tiling(h, times)
    # the newest `recent` frames are level-0 tokens as they came
    tail = h.spans[-min(recent, len(h)):] if recent else []
    assert all(s[2] == 1 for s in tail)
    levels = h.levels
    assert all(lv == 0 for lv in levels[len(levels) - len(tail):])
    assert all(lv <= s[2] - 1 for lv, s in zip(levels, h.spans, strict=True))  # a merge adds at most one level


def _reference(frames: np.ndarray, budget: int, recent: int) -> list[tuple[int, int]]:
    """The same greedy rule written the slow, obvious way: ``[(first frame, frames), ...]``."""
    toks: list[tuple[np.ndarray, int, int]] = []  # (sum of unit vectors, first frame, count)
    for k, v in enumerate(frames):
        if len(toks) == budget:
            hist = min(len(toks), len(toks) - recent + 1)  # the oldest recent frame joins the history first

            def loss(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.linalg.norm(a) + np.linalg.norm(b) - np.linalg.norm(a + b))

            i = min(range(hist - 1), key=lambda i: loss(toks[i][0], toks[i + 1][0]))
            (sa, fa, na), (sb, _fb, nb) = toks[i], toks[i + 1]
            toks[i : i + 2] = [(sa + sb, fa, na + nb)]
        toks.append((v / np.linalg.norm(v), k, 1))
    return [(f, n) for _s, f, n in toks]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), recent=st.integers(0, 5), extra=st.integers(2, 8), n=st.integers(1, 90))
def test_matches_the_obvious_greedy_merge(seed: int, recent: int, extra: int, n: int) -> None:
    """The preallocated, linked, cached implementation merges exactly what the slow rule does."""
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(n, 6)) + rng.normal(size=(3, 6))[rng.integers(3, size=n)] * 2
    h = HiCo(6, budget=recent + extra, recent=recent)
    for k, v in enumerate(frames):
        h.push(k * 0.1, v)
    got = [(round(s[0] / 0.1), s[2]) for s in h.spans]
    assert got == _reference(frames, recent + extra, recent)


def test_half_an_hour_at_30_fps_stays_within_budget() -> None:
    """54,000 frames (30 min at 30 fps) in a 1024-token budget: bounded, tiled, every frame counted."""
    rng = np.random.default_rng(7)
    dim, n = 16, 54_000
    centres = rng.normal(size=(40, dim))
    scene = np.repeat(rng.integers(40, size=n // 300 + 1), 300)[:n]  # a new scene every 10 s
    frames = centres[scene] + 0.2 * rng.normal(size=(n, dim))
    h = HiCo(dim)
    times = [k / 30 for k in range(n)]
    for t, v in zip(times, frames, strict=True):
        h.push(t, v)
    assert h.max_len == len(h) == 1024
    check_tiling(h, times)
    assert h.spans[-1][1] == pytest.approx(1800.0)
    assert h.merges == n - 1024
    assert max(h.levels) >= 2  # the old parts were merged again


def scenes_of_very_different_lengths(seed: int = 3, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Long still scenes (a menu, a corridor: 2,000 frames) between bursts of a few frames each."""
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(12):
        lengths.append(2000)
        lengths.extend(int(x) for x in rng.integers(2, 12, size=8))
    frames = []
    for length in lengths:
        centre = rng.normal(size=dim)
        centre /= np.linalg.norm(centre)
        frames.append(centre + 0.05 * rng.normal(size=(length, dim)) / math.sqrt(dim))
    x = np.concatenate(frames)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(len(x)) / 30.0, x


def test_reconstruction_beats_uniform_pooling_on_scenes_of_very_different_lengths() -> None:
    """Why similarity merging wins here: uniform pooling spends its tokens evenly over time, so a
    long still scene gets a hundred tokens that all say the same thing while each short burst
    shares a token with its neighbours and is blurred into them.  Merging the most similar
    neighbours first folds each still scene into a few tokens at almost no loss and keeps the
    bursts apart, so each frame's token stays much closer to it."""
    times, x = scenes_of_very_different_lengths()
    budget = 256
    h = HiCo(x.shape[1], budget=budget, recent=16)
    for t, v in zip(times, x, strict=True):
        h.push(t, v)
    hico = mean_cosine(x, h.tokens, h.locate(times))
    pooled, which = uniform_pooling(x, budget)
    uniform = mean_cosine(x, pooled, which)
    assert hico > uniform + 0.02, (hico, uniform)
    # the mean cosine equals sum |S_k| / N: what the merge rule keeps as large as it can
    snap = h.context()
    assert hico == pytest.approx(float(np.sum(snap.coherence * snap.counts)) / len(x), abs=1e-6)


def test_context_merges_down_to_k_in_a_copy() -> None:
    times, x = scenes_of_very_different_lengths(seed=5, dim=8)
    times, x = times[:3000], x[:3000]
    h = HiCo(8, budget=200, recent=20)
    for t, v in zip(times, x, strict=True):
        h.push(t, v)
    spans, tokens, levels = h.spans, h.tokens.copy(), h.levels
    for k in (1, 8, 64, 200, 500):
        snap = h.context(budget=k)
        assert len(snap) == min(k, len(h)) == snap.vectors.shape[0] == snap.counts.size
        assert snap.vectors.dtype == np.float32 and snap.vectors.shape[1] == 8
        assert int(snap.counts.sum()) == len(times)
        assert [s[2] for s in snap.spans] == snap.counts.tolist()
        assert snap.spans[0][0] == spans[0][0] and snap.spans[-1][1] == spans[-1][1]
        assert all(a[1] == b[0] for a, b in pairwise(snap.spans))
        assert np.all((snap.coherence > 0) & (snap.coherence <= 1 + 1e-9))
    assert h.spans == spans and h.levels == levels and np.array_equal(h.tokens, tokens)  # state untouched
    # two budgets at once are one reduction and give the same as asking twice
    big, small = h.contexts([64, 8])
    assert big.spans == h.context(budget=64).spans and small.spans == h.context(budget=8).spans
    # t_now stretches the newest span to now; an earlier t_now changes nothing
    assert h.context(t_now=500.0, budget=8).spans[-1][1] == 500.0
    assert h.context(t_now=1.0, budget=8).spans[-1][1] == spans[-1][1]


def test_change_inside_a_span_is_measured() -> None:
    h = HiCo(4, budget=10, recent=2)
    a, b = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    for k in range(30):
        h.push(k / 30, a)
    for k in range(30, 40):
        h.push(k / 30, b)
    one = h.context(budget=1)
    assert one.max_jump[0] == pytest.approx(1.0)  # the cut from a to b (cos 0) is inside the one span
    assert one.coherence[0] == pytest.approx(math.hypot(30, 10) / 40)
    two = h.context(budget=2)
    assert two.counts.tolist() == [30, 10]  # the cheapest way to two tokens splits at the cut
    assert two.max_jump.tolist() == [0.0, 0.0] and two.coherence.tolist() == pytest.approx([1.0, 1.0])
    # a flat frame (a zero vector) between two pictures: the jump is measured across it
    fade = HiCo(4, budget=10, recent=2)
    for k, v in enumerate([a, a, np.zeros(4), (a + b) / math.sqrt(2)]):
        fade.push(k / 30, v)
    assert fade.context(budget=1).max_jump[0] == pytest.approx(1 - 1 / math.sqrt(2))


def test_reconstruct_gives_the_direction_of_the_token_holding_t() -> None:
    h = HiCo(3, budget=4, recent=1)
    for k, v in enumerate([[1, 0, 0], [1, 0.1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0.1]]):
        h.push(float(k), np.asarray(v, np.float32))
    r = h.reconstruct(2.5)
    assert r.dtype == np.float32 and np.linalg.norm(r) == pytest.approx(1.0)
    assert r == pytest.approx([0, 0, 1])
    assert h.reconstruct(-5.0) == pytest.approx(h.reconstruct(0.0))  # before the stream: the first token
    assert h.reconstruct(99.0) == pytest.approx(np.array([0, 1, 0.1]) / np.linalg.norm([0, 1, 0.1]))  # after: the last


def test_empty_and_single_frame() -> None:
    h = HiCo(3, budget=4, recent=2)
    assert len(h) == 0 and h.spans == [] and h.end is None and h.tokens.shape == (0, 3)
    snap = h.context(budget=2)
    assert len(snap) == 0 and snap.vectors.shape == (0, 3)
    with pytest.raises(ValueError, match="no frames"):
        h.locate([0.0])
    h.push(1.5, np.ones(3))
    assert h.spans == [(1.5, 1.5, 1)]  # one frame: its span ends at its own t
    h.push(1.5, np.ones(3))  # the same time again is allowed (a zero-length span)
    assert h.spans == [(1.5, 1.5, 1), (1.5, 1.5, 1)]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: HiCo(8, budget=65, recent=64), r"^budget must be at least recent \+ 2 = 66 tokens, got 65$"),
    (lambda: HiCo(0), r"^HiCo needs a positive embedding width, got dim=0$"),
    (lambda: HiCo(8, recent=-1), r"^recent must be a whole number of frames >= 0, got -1$"),
])
def test_bad_construction_is_one_clear_sentence(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_bad_pushes_and_budgets_are_refused_and_change_nothing() -> None:
    h = HiCo(4, budget=8, recent=2)
    h.push(2.0, np.ones(4))
    with pytest.raises(ValueError, match=r"^HiCo takes 4-d vectors, got an array shaped \(5,\)$"):
        h.push(3.0, np.ones(5))
    with pytest.raises(ValueError, match=r"^HiCo takes 4-d vectors, got an array shaped \(1, 4\)$"):
        h.push(3.0, np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"^time went backwards: a frame at 1\.000000 s after one at 2\.000000 s$"):
        h.push(1.0, np.ones(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        h.push(3.0, np.array([1.0, np.nan, 0, 0]))
    with pytest.raises(ValueError, match="finite number of seconds"):
        h.push(math.inf, np.ones(4))
    with pytest.raises(ValueError, match=r"^a context needs a budget of at least 1 token, got 0$"):
        h.context(budget=0)
    assert h.spans == [(2.0, 2.0, 1)] and h.frames == 1


def test_uniform_pooling_splits_into_equal_spans() -> None:
    x = np.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]]
    pooled, which = uniform_pooling(x, 4)
    assert which.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert mean_cosine(x, pooled, which) == pytest.approx(1.0)
    pooled, which = uniform_pooling(x, 100)  # more budget than frames: one span per frame
    assert pooled.shape == (8, 4)


def test_bench_on_a_short_real_clip(atari_clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gamecopilot bench hico --video``: the JSON it prints (the 10-minute run is the README's)."""
    from bench.hico import main

    assert main(["--video", str(atari_clip), "--minutes", "0.1", "--budget", "40", "--recent", "8", "--dim", "64",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"budget", "frames", "max_tokens", "cosine", "update_ms", "rss_mb"} <= r.keys()
    assert r["budget"] == 40 and r["frames"] == 180 and r["max_tokens"] == r["tokens"] == 40
    assert r["dim"] == 64 and r["lifted"] is True
    assert set(r["cosine"]) == {"hico", "uniform"} and all(0 < c <= 1 for c in r["cosine"].values())
    assert 0 <= r["update_ms"]["p50"] <= r["update_ms"]["p99"]
    assert r["rss_mb"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "65"], "--budget must be at least --recent + 2 = 66 tokens, got 65"),
    (["--video", "/no/such/clip.mp4"], "/no/such/clip.mp4: no such file"),
    (["--minutes", "0"], "--minutes must be a positive number, got 0.0"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "copilot", "bench", "hico", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"gamecopilot: error: {message}"]
    assert proc.stdout == ""
