"""The ``clip_embed`` stage (stages/clip_embed.py): 16 frames sampled every 0.25 s, one VideoMAE clip
embedding every 2 s, as ``Features(name="videomae")`` that HiCo takes as its source."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Context, Envelope, Event, Features, VideoFrame
from copilot.testing import make_envelope, run_stage
from stages import clip_embed as clip_mod
from stages.clip_embed import ClipEmbedParams, ClipEmbedStage
from stages.hico import HicoStage

pytestmark = pytest.mark.usefixtures("leak_check")

FPS = 30


def frames(seconds: float, *, h: int = 48, w: int = 64, pixel_format: str = "rgb24") -> list[Envelope]:
    out = []
    for k in range(round(seconds * FPS)):
        t = round(k / FPS, 6)
        c = 4 if pixel_format == "bgra" else 3
        img = np.full((h, w, c), (k * 7) % 256, np.uint8)
        img[: h // 2, : w // 2] = 255 - (k * 3) % 256  # something that moves from frame to frame
        out.append(make_envelope(VideoFrame(image=img, frame_index=k, pixel_format=pixel_format),  # type: ignore[arg-type]
                                 t_media=t, source="replay", t_capture_ns=int(t * 1e9)))
    return out


class FakeVideoMAE:
    """Stands in for the engine: remembers the clips it was given; the embedding encodes their mean."""

    model_id = "fake-videomae"
    runtime = "torch"
    device = "cpu"
    fallback = ""
    num_frames = 16
    pooling = "mean"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.clips: list[np.ndarray] = []
        self.gate = gate

    def prepare_frames(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image[::4, ::4])

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(10.0)
        self.clips.append(clips)
        v = np.array([[1.0, float(clips.mean()) / 255.0, 0.0, 0.0]], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from engines.videomae import tiny_videomae

    return tiny_videomae(tmp_path_factory.mktemp("videomae") / "tiny")


def test_a_clip_every_2_s_once_16_frames_cover_4_s(tiny: Path) -> None:
    res = run_stage(ClipEmbedStage, frames(10.0), params={"model": str(tiny), "runtime": "torch", "device": "cpu"},
                    speed=None)
    envs = res.envelopes("features")
    # samples at the first frame at or after 0, 0.25, 0.5 ... (30 fps: 0.2667, 0.5, 0.7667 ...); the ring is
    # full at 3.75 s; then a clip every 2 s
    assert [e.t_media for e in envs] == pytest.approx([3.75, 5.75, 7.75, 9.75], abs=1 / FPS)
    for env in envs:
        f = env.payload
        assert isinstance(f, Features) and f.name == "videomae"
        assert set(f.values) == {"clip_s"} and f.values["clip_s"] == pytest.approx(3.75, abs=1 / FPS)
        assert f.vector is not None and f.vector.shape == (32,) and f.vector.dtype == np.float32
        assert abs(float(np.linalg.norm(f.vector)) - 1.0) < 1e-5
        assert env.t_capture_ns == int(env.t_media * 1e9)  # latency counts from the clip's newest frame
    vecs = np.stack([f.vector for f in res["features"]])
    assert float(np.min(vecs @ vecs.T)) < 0.99999  # the clips differ
    notes = res.metrics.notes
    assert notes["clips"] == 4 and notes["frames_sampled"] == 40 and notes["runtime_torch_cpu"] == 1
    assert res.metrics.extra_ms["encode_ms"].p50 > 0


def test_hico_takes_the_clip_embeddings_as_its_source(tiny: Path) -> None:
    res = run_stage(ClipEmbedStage, frames(16.0), params={"model": str(tiny), "runtime": "torch", "device": "cpu"},
                    speed=None)
    feats = res.envelopes("features")
    assert len(feats) == 7  # 3.75, 5.75 ... 15.75
    ev = make_envelope(Event(t=9.0, event_kind="life_lost", priority="high"), t_media=9.0, source="trigger")
    stream = [*feats[:3], ev, *feats[3:]]  # the event after the clip at 7.75
    ctx_res = run_stage(HicoStage, stream, params={"source": "videomae", "every_s": 100.0, "budget": 8, "recent": 2,
                                                   "context_tokens": 4})
    ctxs = ctx_res["context"]
    assert all(isinstance(c, Context) for c in ctxs) and len(ctxs) == 2  # after the event, at the end
    last = ctxs[-1]
    assert last.source == "videomae" and sum(s[2] for s in last.spans) == 7
    assert last.tokens is not None and last.tokens.shape == (4, 32)
    assert "life_lost (high)" in last.text
    assert ctx_res.metrics.dropped == 0


def test_frames_are_shrunk_as_they_are_sampled_and_bgra_is_read_as_rgb(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = FakeVideoMAE()
    monkeypatch.setattr(clip_mod, "load_engine", lambda p: eng)
    res = run_stage(ClipEmbedStage, frames(5.0, pixel_format="bgra"), params={"every_s": 1.0}, speed=None)
    assert [e.t_media for e in res.envelopes("features")] == pytest.approx([3.75, 4.75], abs=1 / FPS)
    assert len(eng.clips) == 2 and eng.clips[0].shape == (1, 16, 12, 16, 3)
    ring = res.stage.ring  # type: ignore[attr-defined]
    assert len(ring) == 16 and ring[0][1].shape == (12, 16, 3)


def test_a_clip_due_while_one_encodes_is_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    eng = FakeVideoMAE(gate=gate)
    monkeypatch.setattr(clip_mod, "load_engine", lambda p: eng)
    last = 12 * FPS - 1

    class Gated(ClipEmbedStage):
        async def process(self, msg: Envelope) -> None:
            await super().process(msg)
            if isinstance(msg.payload, VideoFrame) and msg.payload.frame_index == last:
                gate.set()

    res = run_stage(Gated, frames(12.0), speed=1.0)
    # the first clip (3.75 s) holds the engine until the end: the ones due at 5.75, 7.75, 9.75, 11.75 are dropped
    assert [e.t_media for e in res.envelopes("features")] == pytest.approx([3.75], abs=1 / FPS)
    assert res.metrics.dropped_by_reason == {"busy": 4}


def test_params_and_missing_models_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ({"sample_every_s": 0}, {"every_s": -1}, {"runtime": "tensorrt"}, {"bogus": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, ClipEmbedParams)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError, match=r"^model MCG-NJU/videomae-base not found locally or in the Hugging Face"):
        ClipEmbedStage.check(ClipEmbedParams())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # (the default export folder: empty)
    with pytest.raises(UsageError, match=r"^clip_embed: runtime onnxruntime, but .* holds no videomae export"):
        ClipEmbedStage.check(ClipEmbedParams(runtime="onnxruntime"))
    with pytest.raises(UsageError, match=r"^clip_embed: onnx_dir .* is not a directory$"):
        ClipEmbedStage.check(ClipEmbedParams(model=str(tmp_path), onnx_dir=str(tmp_path / "none")))


def test_registered_as_the_clip_embed_kind() -> None:
    from copilot.registry import resolve

    cls: Any = resolve("stages.clip_embed:ClipEmbedStage")
    assert cls is ClipEmbedStage and cls.output_ports == ("features",)
