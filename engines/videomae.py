"""VideoMAE clip embeddings: what happened over the last few seconds, as one vector.

An image embedding (SigLIP2, thumbnails) sees one moment; a death, a combo or a level change is
a movement across seconds.  VideoMAE (``transformers.VideoMAEModel``) reads a window of 16 frames
(8 tubelets of 2 frames) and its mean-pooled tokens describe the motion in it.  The ``clip_embed``
stage feeds it 16 frames sampled over ~4 s every 2 s; HiCo compresses the stream for the reasoner.

The embedding (:meth:`VideoMAEEngine.encode_clips`): clips ``(N, T, H, W, 3)`` uint8 RGB ->
``(N, dim)`` float32, L2-normalised.  Pooling is the checkpoint's own when it has one: a video
classification checkpoint with ``use_mean_pooling`` (``fc_norm`` weights) gives the mean of the
last hidden state followed by its ``fc_norm``; any other checkpoint (``MCG-NJU/videomae-base`` is
a pre-training one, whose encoder ends in its ``layernorm``) gives the plain mean over tokens of
the last hidden state.  :attr:`VideoMAEEngine.pooling` says which (``fc_norm`` or ``mean``).

Preprocessing runs in numpy (no transformers needed at run time with ONNX Runtime), the way the
checkpoint's processor does it: resize the shortest edge to ``size.shortest_edge`` and centre
crop to ``crop_size`` (or resize to ``size.height`` x ``size.width``), rescale by
``rescale_factor``, normalise with the checkpoint's ``image_mean``/``image_std``.  The resize is
bilinear after a box filter for the integer part of a large reduction (a 1080p frame to 224 px
would alias badly with bilinear alone); it is close to, not bit-identical with, the torchvision
resize of the processor.  :meth:`VideoMAEEngine.prepare_frames` does the resize and crop alone
(uint8 out), so a stage can shrink frames as it samples them and hold 16 small frames instead of
16 full ones; ``encode_clips`` skips the resize for frames already at the crop size.

Runtimes: ``torch`` (transformers), ``onnxruntime`` (the file :func:`export_videomae` writes,
through :class:`engines.onnx_export.OnnxRunner`, with a JSON sidecar holding all the
preprocessing and shape facts, so that path imports neither torch nor transformers), or ``auto``:
ONNX Runtime when ``onnx_dir`` (default: the folder ``gamecopilot export`` writes) holds an export,
else torch.  :func:`tiny_videomae` writes a tiny random checkpoint (marked as such) that loads like
a real one, for tests and benchmarks.

torch, transformers and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError
from engines.engine_common import DEVICES, quiet_hf, read_json, read_sidecar, set_torch_threads, torch_device

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
ONNX_NAME = "videomae.onnx"
SIDECAR_NAME = "videomae.json"
SIDECAR_FORMAT = "gamecopilot.videomae/1"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embedding"
TINY_LABEL = "tiny random VideoMAE (random weights: its embeddings mean nothing)"
IMAGENET_STANDARD = (0.5, 0.5, 0.5)


# -- numpy preprocessing -------------------------------------------------------------------------
def _linear_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` to ``out`` samples (half-pixel centres, edges clamped)."""
    n = x.shape[axis]
    if n == out:
        return x
    src = (np.arange(out, dtype=np.float64) + 0.5) * (n / out) - 0.5
    src = np.clip(src, 0.0, n - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out
    w = w.reshape(shape)
    return np.take(x, i0, axis=axis) * (1.0 - w) + np.take(x, i1, axis=axis) * w


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """The mean of each k x k block of ``(..., H, W, C)`` (H and W multiples of k), float32.

    Summed slice by slice in a small integer type (uint16 while 255 k^2 fits): ten times faster
    than one ``sum`` over a reshaped axis pair, which matters at 1080p on the event loop."""
    acc: type[np.generic] = np.float32
    if x.dtype == np.uint8:
        acc = np.uint16 if 255 * k * k <= np.iinfo(np.uint16).max else np.uint32
    rows = x[..., 0::k, :, :].astype(acc)
    for i in range(1, k):
        rows += x[..., i::k, :, :]
    out = rows[..., 0::k, :].copy()
    for j in range(1, k):
        out += rows[..., j::k, :]
    return out.astype(np.float32) / np.float32(k * k)


def resize_frames(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``(..., H, W, C)`` -> ``(..., out_h, out_w, C)`` float32 (values kept in the input's range).

    A reduction by a factor k >= 2 first averages k x k blocks (the last H % k rows and W % k
    columns are left out: under k pixels), then interpolates bilinearly; an enlargement is
    bilinear only.  Works on any leading dimensions (frames of a clip, clips of a batch).
    """
    x = np.asarray(frames)
    h, w = x.shape[-3], x.shape[-2]
    k = min(h // max(1, out_h), w // max(1, out_w))
    x = _box_mean(x[..., : (h // k) * k, : (w // k) * k, :], k) if k >= 2 else x.astype(np.float32)
    x = _linear_axis(x, x.ndim - 3, out_h)
    x = _linear_axis(x, x.ndim - 2, out_w)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """The checkpoint's image preprocessing, as plain numbers (what the sidecar stores).

    ``shortest_edge`` > 0: resize the shortest edge to it keeping the aspect, then centre crop
    to ``crop``; else resize straight to ``crop``.
    """

    crop: tuple[int, int] = (224, 224)  # (height, width) the model sees
    shortest_edge: int = 224
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_STANDARD
    std: tuple[float, float, float] = IMAGENET_STANDARD

    @classmethod
    def from_config(cls, cfg: dict[str, Any], image_size: int) -> Preprocess:
        """From a ``preprocessor_config.json`` mapping (VideoMAE's image or video processor)."""
        size = cfg.get("size") or {}
        crop = cfg.get("crop_size") or {}
        do_crop = bool(cfg.get("do_center_crop", True))
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            ch, cw = (int(crop.get("height", edge)), int(crop.get("width", edge))) if do_crop else (edge, edge)
        else:
            edge = 0
            ch, cw = int(size.get("height", image_size)), int(size.get("width", image_size))
        mean = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_STANDARD))
        std = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STANDARD))
        return cls(crop=(ch, cw), shortest_edge=edge, rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]))

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        """``(..., H, W, 3)`` uint8 -> ``(..., crop_h, crop_w, 3)`` uint8: resized and cropped only."""
        x = np.asarray(frames)
        ch, cw = self.crop
        h, w = x.shape[-3], x.shape[-2]
        if (h, w) == (ch, cw):
            return x
        if self.shortest_edge > 0:
            e = self.shortest_edge
            nh, nw = (e, max(e, int(e * w / h))) if h <= w else (max(e, int(e * h / w)), e)
            y = resize_frames(x, nh, nw)
            top, left = max(0, (nh - ch) // 2), max(0, (nw - cw) // 2)
            y = y[..., top:top + ch, left:left + cw, :]
            if y.shape[-3:-1] != (ch, cw):  # a crop larger than the resized frame: stretch the rest
                y = resize_frames(y, ch, cw)
        else:
            y = resize_frames(x, ch, cw)
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)

    def normalise(self, frames: np.ndarray) -> np.ndarray:
        """``(..., h, w, 3)`` uint8 at the crop size -> ``(..., 3, h, w)`` float32, rescaled and normalised."""
        x: np.ndarray = np.asarray(frames, dtype=np.float32) * np.float32(self.rescale_factor)
        y: np.ndarray = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(y, -1, -3), dtype=np.float32)


def _processor_config(path: Path) -> dict[str, Any]:
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (path / name).is_file():
            return read_json(path / name)
    return {}


def _as_rgb_clips(clips: np.ndarray) -> np.ndarray:
    x = np.asarray(clips)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be (N, T, H, W, 3) RGB, got shape {x.shape}")
    return x


# -- the torch module that is exported -----------------------------------------------------------
def _embedder(model_dir: Path) -> tuple[Any, Any, str]:
    """``(module, config, pooling)``: a torch module ``pixel_values (N, T, 3, h, w) -> (N, dim)`` unit vectors."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

    config = VideoMAEConfig.from_pretrained(model_dir)
    archs = list(getattr(config, "architectures", None) or [])
    classifier = config.use_mean_pooling and any("ForVideoClassification" in a for a in archs)
    if classifier:
        full = quiet_hf(VideoMAEForVideoClassification.from_pretrained, model_dir)
        backbone, norm, pooling = full.videomae, full.fc_norm, "fc_norm"
    else:
        backbone, norm, pooling = quiet_hf(VideoMAEModel.from_pretrained, model_dir), None, "mean"

    class ClipEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.videomae = backbone
            self.fc_norm = norm

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.videomae(pixel_values=pixel_values).last_hidden_state
            pooled = hidden.mean(dim=1)
            if self.fc_norm is not None:
                pooled = self.fc_norm(pooled)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return ClipEmbedder().eval(), config, pooling


@dataclass
class VideoMAEEngine:
    """A loaded VideoMAE: :meth:`encode_clips` on whichever runtime it was loaded with.

    ``runtime`` is ``torch`` or ``onnxruntime``; ``device`` where it really runs (``cpu``, ``cuda``,
    ``tensorrt``); ``fallback`` one line when that is not what was asked for (else empty).
    """

    model_id: str
    runtime: str
    device: str
    dim: int
    num_frames: int
    preprocess: Preprocess
    pooling: str
    run: Any  # pixel_values float32 (N, T, 3, h, w) -> (N, dim) float32
    fallback: str = ""
    tiny: bool = False
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return TINY_LABEL if self.tiny else f"VideoMAE {self.model_id}"

    def prepare_frames(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``(..., H, W, 3)`` uint8 RGB resized and cropped to what the model sees (uint8)."""
        return self.preprocess.prepare(frames)

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """Clips ``(N, T, H, W, 3)`` uint8 RGB (or one clip ``(T, H, W, 3)``) -> ``(N, dim)`` float32, unit norm.

        ``T`` must be the model's ``num_frames`` (its position embeddings are sized for it)."""
        x = _as_rgb_clips(clips)
        if x.shape[1] != self.num_frames:
            raise ValueError(f"{self.label} takes clips of {self.num_frames} frames, got {x.shape[1]}")
        pixels = self.preprocess.normalise(self.preprocess.prepare(x))
        out = np.asarray(self.run(pixels), dtype=np.float32)
        self.calls += 1
        return out


def _torch_runner(module: Any, device: str) -> Any:
    import torch

    module = module.to(device)

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(pixels).to(device))
        return out.float().cpu().numpy()

    return run


def _read_sidecar(onnx_dir: Path) -> dict[str, Any]:
    return read_sidecar(onnx_dir, ONNX_NAME, SIDECAR_NAME, SIDECAR_FORMAT, "VideoMAE", "videomae")


def has_export(onnx_dir: Path | None) -> bool:
    """Whether ``onnx_dir`` holds this engine's export (the ONNX file and its sidecar)."""
    return onnx_dir is not None and (onnx_dir / SIDECAR_NAME).is_file() and (onnx_dir / ONNX_NAME).is_file()


def load_videomae(
    model: str,
    *,
    runtime: str = "auto",
    device: str = "auto",
    allow_download: bool = False,
    onnx_dir: Path | str | None = None,
    threads: int = 0,
) -> VideoMAEEngine:
    """Load VideoMAE ``model`` (a checkpoint directory or a Hugging Face id, never downloaded
    unless ``allow_download``) on ``runtime`` (``auto``: ONNX Runtime when ``onnx_dir``, default the
    folder ``gamecopilot export`` writes, holds an export, else torch) and ``device`` (``auto``,
    ``cpu``, ``cuda``; ONNX Runtime also takes ``tensorrt``;
    ``threads``: intra-op threads of ONNX Runtime, or of torch (process-wide, see
    :func:`set_torch_threads`); 0 leaves the default, one per core).  Bad input is one
    :class:`UsageError` line."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown VideoMAE runtime {runtime!r} (auto, torch or onnxruntime)")
    from engines.model_registry import export_dir

    # no onnx_dir: the folder `gamecopilot export videomae` writes by default
    odir = Path(onnx_dir) if onnx_dir is not None else export_dir("videomae", str(model))
    if runtime == "onnxruntime" or (runtime == "auto" and has_export(odir)):
        return _load_onnx(model, odir, device, threads)
    from engines.model_registry import resolve_model

    path = resolve_model(model, allow_download=allow_download)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a VideoMAE checkpoint (no config.json)")
    dev = torch_device(device)
    set_torch_threads(threads)
    module, config, pooling = _embedder(path)
    pre = Preprocess.from_config(_processor_config(path), int(config.image_size))
    return VideoMAEEngine(model_id=model, runtime="torch", device=dev, dim=int(config.hidden_size),
                          num_frames=int(config.num_frames), preprocess=pre, pooling=pooling,
                          run=_torch_runner(module, dev), tiny=bool(getattr(config, "tiny_random", "")),
                          extra={"module": module})


def _load_onnx(model: str, onnx_dir: Path, device: str, threads: int) -> VideoMAEEngine:
    from engines.onnx_export import OnnxRunner
    from engines.onnx_session import SessionConfig

    side = _read_sidecar(onnx_dir)
    if device not in (*DEVICES, "tensorrt"):
        raise UsageError(f"unknown device {device!r} (auto, cpu, cuda or tensorrt)")
    if side.get("model") not in (model, str(model)):
        log.warning("%s was exported from %s, not %s: running the export", onnx_dir, side.get("model"), model)
    runner = OnnxRunner(onnx_dir / ONNX_NAME, SessionConfig(device=device, intra_op_threads=threads))  # type: ignore[arg-type]
    pre = Preprocess(crop=(int(side["crop"][0]), int(side["crop"][1])), shortest_edge=int(side["shortest_edge"]),
                     rescale_factor=float(side["rescale_factor"]),
                     mean=tuple(side["mean"]), std=tuple(side["std"]))  # type: ignore[arg-type]

    def run(pixels: np.ndarray) -> np.ndarray:
        return runner.run({INPUT_NAME: pixels})[0]

    return VideoMAEEngine(model_id=str(side.get("model", model)), runtime="onnxruntime", device=runner.device,
                          dim=int(side["dim"]), num_frames=int(side["num_frames"]), preprocess=pre,
                          pooling=str(side["pooling"]), run=run, fallback=runner.fallback,
                          tiny=bool(side.get("tiny_random")), extra={"runner": runner})


def export_videomae(model: str, out_dir: Path | str, *, allow_download: bool = False) -> dict[str, Path]:
    """Export ``model`` to ``out_dir/videomae.onnx`` (dynamic batch, the unit embedding as output)
    with ``out_dir/videomae.json``: the preprocessing, ``num_frames``, ``dim``, pooling, the
    source model, whether it is a tiny random model, and the parity measured against torch
    right after the export (max abs difference at batch 1 and 2).  Returns ``{"onnx", "sidecar"}``."""
    import torch

    from engines.model_registry import resolve_model
    from engines.onnx_export import DEFAULT_OPSET, OnnxRunner, export_onnx, parity_max_abs
    from engines.onnx_session import SessionConfig

    path = resolve_model(model, allow_download=allow_download)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module, config, pooling = _embedder(path)
    pre = Preprocess.from_config(_processor_config(path), int(config.image_size))
    t, (h, w) = int(config.num_frames), pre.crop
    example = torch.randn(1, t, 3, h, w, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    onnx_path = export_onnx(module, {INPUT_NAME: example}, out / ONNX_NAME, [OUTPUT_NAME])
    export_s = time.perf_counter() - t0
    runner = OnnxRunner(onnx_path, SessionConfig(device="cpu", intra_op_threads=0))
    parity = {}
    for b in (1, 2):
        x = torch.randn(b, t, 3, h, w, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = module(x).numpy()
        parity[f"batch{b}"] = parity_max_abs(ref, runner.run({INPUT_NAME: x.numpy()})[0])
    side = {
        "format": SIDECAR_FORMAT, "model": model, "onnx": ONNX_NAME, "input": INPUT_NAME, "output": OUTPUT_NAME,
        "num_frames": t, "dim": int(config.hidden_size), "pooling": pooling,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(pre).items()},
        "opset": DEFAULT_OPSET, "tiny_random": str(getattr(config, "tiny_random", "") or ""),
        "parity_max_abs": parity, "export_s": round(export_s, 2),
    }
    side_path = out / SIDECAR_NAME
    side_path.write_text(json.dumps(side, indent=2) + "\n")
    log.info("VideoMAE %s -> %s (parity %s)", model, onnx_path, parity)
    return {"onnx": onnx_path, "sidecar": side_path}


def tiny_videomae(out_dir: Path | str, seed: int = 0, *, image_size: int = 32, num_frames: int = 16) -> Path:
    """Write a tiny random VideoMAE checkpoint (image 32, patch 8, tubelet 2, 16 frames, hidden 32,
    2 layers) with its preprocessor config into ``out_dir``; ``load_videomae(str(out_dir))`` loads
    it like a real one.  Its config carries ``tiny_random`` (the label), so everything that shows
    its output can say so.  The same seed writes the same weights."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    if num_frames % 2 or num_frames < 2:
        raise ValueError(f"num_frames must be a positive multiple of the tubelet size 2, got {num_frames}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = VideoMAEConfig(image_size=image_size, patch_size=8, num_frames=num_frames, tubelet_size=2,
                            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            use_mean_pooling=False)
    config.tiny_random = TINY_LABEL  # saved in config.json: whoever loads it can say what it is
    torch.manual_seed(seed)
    model = VideoMAEModel(config).eval()
    quiet_hf(model.save_pretrained, out)
    VideoMAEImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    (out / "README.md").write_text(f"# {TINY_LABEL}\n\nBuilt by engines/videomae.py tiny_videomae(seed={seed}); "
                                   "it proves the VideoMAE path only.\n")
    return out

