"""SigLIP2 image and text embeddings on torch, ONNX Runtime or TensorRT, with zero-shot scores.

One engine, three runtimes, the same numbers: every runtime is fed by the same numpy
preprocessing and the same tokenizer, and runs the same two wrapped towers (image -> L2-normalised
embedding, token ids -> L2-normalised embedding).  torch runs the wrappers directly; ONNX Runtime
and TensorRT run what :func:`export_siglip` exported from them.  So the ONNX path needs neither
torch nor transformers at run time: what it needs besides the two ``.onnx`` files is in the
``siglip.json`` sidecar (image size, mean/std, logit scale and bias, dimension) and the tokenizer
files copied next to it.

Checkpoints: ``Siglip2Model`` (model_type ``siglip2``, the NaFlex checkpoints) and plain
``SiglipModel`` (model_type ``siglip``; Google's fixed-resolution SigLIP2 checkpoints such as
``google/siglip2-so400m-patch14-384`` are stored in this architecture).  NaFlex choice: Siglip2's
vision tower takes patchified pixels with a per-image ``spatial_shapes`` and a padding mask, so
that each image keeps its aspect ratio within ``max_num_patches``.  Here every image is resized
to one square grid of ``floor(sqrt(max_num_patches))`` patches a side (16 x 16 for the usual 256),
so every image has the same patch count, no padding and the same ``spatial_shapes``: the wrapper
patchifies inside the graph and passes the constant grid, the mask is omitted (no padding), and
the export has one fixed input shape with a dynamic batch.  Game frames are all one aspect ratio,
so nothing is lost that varying shapes would keep, and a fixed shape is what TensorRT wants.

Text: the towers were trained on ids padded to ``max_length`` (64) with no attention mask (the
pooled token is the last one), so both runtimes pad to the text tower's length and pass only the
ids.  The tokenizer is the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library when
there is one (no transformers needed), else transformers' ``AutoTokenizer`` (SentencePiece-only
checkpoints).

``auto`` picks TensorRT when tensorrt and a CUDA GPU are there, else ONNX Runtime when an export
exists, else torch; the choice and why is the engine's ``choice`` and a log line, and a GPU
provider that fell back is its ``fallback``: what runs is never silent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError
from engines.model_registry import DEFAULT_MODELS, export_dir, resolve_model

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
SIDECAR = "siglip.json"
VISION_FILE = "vision.onnx"
TEXT_FILE = "text.onnx"
TRT_DIR = "tensorrt"
DEFAULT_BATCH_SIZES = (1, 8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
ENGINES_HINT = "pip install 'gameplay-copilot[engines]'"
TINY_WORDS = ("a photo of a game screen the player dies explodes loses a life wins gets a reward menu pause "
              "boss enemy score points level up game over health low bright flash dark text on screen")

Box = tuple[float, float, float, float]


# -- what the exported files need: the spec ------------------------------------------------------------------


@dataclass
class SiglipSpec:
    """Everything needed to run the exported towers without transformers (the ``siglip.json`` sidecar)."""

    model_id: str
    arch: str  # siglip2 | siglip
    image_size: int
    patch_size: int
    mean: list[float]
    std: list[float]
    rescale: float
    logit_scale: float  # raw: the scale is exp(logit_scale), as in the model
    logit_bias: float
    dim: int
    text_length: int
    pad_id: int
    tiny_random: bool = False
    tokenizer_dir: str = "."
    files: dict[str, str] = field(default_factory=lambda: {"vision": VISION_FILE, "text": TEXT_FILE})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def read(cls, path: Path) -> SiglipSpec:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: not a readable SigLIP export sidecar ({exc})") from None


def _preprocessor(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _size_value(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        for key in ("height", "shortest_edge", "width"):
            if isinstance(size.get(key), int):
                return int(size[key])
    return None


def _pad_id(model_dir: Path, text_cfg: Any) -> int:
    """The id ids are padded with: the tokenizer's pad token, else the text config's pad_token_id, else 0."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        pad = data.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            tok_json = model_dir / "tokenizer.json"
            if tok_json.is_file():
                from tokenizers import Tokenizer

                tid = Tokenizer.from_file(str(tok_json)).token_to_id(pad)
                if tid is not None:
                    return int(tid)
    pad_id = getattr(text_cfg, "pad_token_id", None)
    return int(pad_id) if isinstance(pad_id, int) else 0


def spec_from_model(model_id: str, model_dir: Path, model: Any) -> SiglipSpec:
    """The spec of a loaded transformers SigLIP/SigLIP2 model and its checkpoint directory."""
    cfg = model.config
    arch = "siglip2" if cfg.model_type == "siglip2" else "siglip"
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    pre = _preprocessor(model_dir)
    patch = int(pre.get("patch_size") or vcfg.patch_size)
    if arch == "siglip2":
        max_patches = int(pre.get("max_num_patches") or vcfg.num_patches)
        image_size = math.isqrt(max_patches) * patch
    else:
        image_size = _size_value(pre.get("size")) or int(vcfg.image_size)
    mean = [float(v) for v in (pre.get("image_mean") or [0.5, 0.5, 0.5])]
    std = [float(v) for v in (pre.get("image_std") or [0.5, 0.5, 0.5])]
    return SiglipSpec(
        model_id=model_id,
        arch=arch,
        image_size=int(image_size),
        patch_size=patch,
        mean=mean,
        std=std,
        rescale=float(pre.get("rescale_factor") or 1 / 255),
        logit_scale=float(model.logit_scale.detach().float().reshape(-1)[0]),
        logit_bias=float(model.logit_bias.detach().float().reshape(-1)[0]),
        dim=int(getattr(vcfg, "projection_size", None) or vcfg.hidden_size),
        text_length=int(tcfg.max_position_embeddings),
        pad_id=_pad_id(model_dir, tcfg),
        tiny_random=bool(getattr(cfg, "tiny_random", False)),
    )


# -- numpy preprocessing (shared by every runtime) -------------------------------------------------------------


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (n_out, taps), of an antialiased linear (triangle) resize
    along one axis.

    The triangle widens with the reduction factor (as PIL's and torch's ``antialias`` do), so a
    large frame shrunk to the model's size averages its pixels instead of sampling a few.  Kept
    as a few taps per output rather than a dense matrix: a dense (384 x 1080) product per axis
    costs gigaflops, the taps a few million multiply-adds.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    taps = math.ceil(2 * support) + 1
    pos = (np.floor(centers - support).astype(np.int64) + 1)[:, None] + np.arange(taps)[None, :]
    w = np.clip(1.0 - np.abs(pos - centers[:, None]) / support, 0.0, None)
    w[(pos < 0) | (pos >= n_in)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(pos, 0, n_in - 1), w.astype(np.float32)


def _box(img: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """The mean of each kh x kw block (the image cut to whole blocks), as float32: sums of
    strided views, which numpy does at memory speed (a reshape-and-mean over two axes is ~10x slower)."""
    h2, w2 = img.shape[0] // kh * kh, img.shape[1] // kw * kw
    x = img[:h2, :w2]
    wide = np.uint16 if kh * kw <= 257 else np.uint32  # 257 * 255 still fits 16 bits
    acc: np.ndarray = x[0::kh].astype(wide)
    for j in range(1, kh):
        np.add(acc, x[j::kh], out=acc)
    if kw > 1:
        cols: np.ndarray = acc[:, 0::kw].copy()
        for j in range(1, kw):
            np.add(cols, acc[:, j::kw], out=cols)
        acc = cols
    return acc.astype(np.float32) * np.float32(1.0 / (kh * kw))


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) image resized to (size, size, 3) float32 in 0..255, antialiased.

    An integer box average first takes the image to within 2x of the target (cheap), then the
    triangle filter makes the exact size, one axis at a time.  At the target size already, the
    image comes back unchanged (as float32).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image {img.shape}")
    kh, kw = max(1, h // (2 * size)), max(1, w // (2 * size))
    x = _box(img, kh, kw) if kh > 1 or kw > 1 else img.astype(np.float32)
    idx, wts = _taps(x.shape[0], size)
    x = np.einsum("st,stwc->swc", wts, x[idx])
    idx, wts = _taps(x.shape[1], size)
    x = np.einsum("st,hstc->hsc", wts, x[:, idx])
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(images: np.ndarray | Sequence[np.ndarray], spec: SiglipSpec) -> np.ndarray:
    """RGB uint8 frames of any size -> (N, 3, S, S) float32, rescaled and normalised as the checkpoint says."""
    batch: list[np.ndarray] = []
    if isinstance(images, np.ndarray) and images.ndim == 3:
        batch.append(images)
    else:
        batch.extend(np.asarray(img) for img in images)
    s = spec.image_size
    out = np.empty((len(batch), 3, s, s), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    for i, img in enumerate(batch):
        x = resize_rgb(img, s) * np.float32(spec.rescale)
        out[i] = ((x - mean) / std).transpose(2, 0, 1)
    return out


def crop_boxes(image: np.ndarray, boxes: Sequence[Box]) -> list[np.ndarray]:
    """The regions of ``image`` given as (x0, y0, x1, y1) fractions of its width and height (at least one pixel)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    crops = []
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box is (x0, y0, x1, y1) fractions, got {box!r}")
        x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {box!r}: x1 < x0 or y1 < y0")
        c0, r0 = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
        c1, r1 = max(c0 + 1, math.ceil(x1 * w)), max(r0 + 1, math.ceil(y1 * h))
        crops.append(img[r0:r1, c0:c1])
    return crops


# -- tokenizer --------------------------------------------------------------------------------------------------


class TextTokenizer:
    """Texts -> (N, text_length) int64 ids padded (and cut) to the text tower's length."""

    def __init__(self, directory: Path, length: int, pad_id: int) -> None:
        self.length = int(length)
        self.pad_id = int(pad_id)
        tok_json = directory / "tokenizer.json"
        self._fast: Any = None
        self._hf: Any = None
        if tok_json.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(tok_json))
            self._fast.no_padding()
            self._fast.no_truncation()
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise UsageError(f"{directory}: no tokenizer.json, and transformers is not installed to read "
                                 f"its tokenizer ({ENGINES_HINT})") from None
            self._hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        if self._fast is not None:
            rows = [enc.ids for enc in self._fast.encode_batch(list(texts))]
        else:
            rows = [list(self._hf(t)["input_ids"]) for t in texts]
        out = np.full((len(rows), self.length), self.pad_id, dtype=np.int64)
        for i, ids in enumerate(rows):
            ids = ids[: self.length]
            out[i, : len(ids)] = ids
        return out


# -- the towers as torch modules (run by torch, exported for the others) ---------------------------------------


def _pooled(out: Any) -> Any:
    """transformers 5 returns an output object from get_*_features, older versions a tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def make_towers(model: Any, spec: SiglipSpec) -> tuple[Any, Any]:
    """(vision, text) torch modules: ``pixel_values`` (B, 3, S, S) -> normalised (B, D);
    ``input_ids`` (B, L) -> normalised (B, D).  See the module docstring for the NaFlex choice."""
    import torch

    grid = spec.image_size // spec.patch_size
    patch = spec.patch_size
    siglip2 = spec.arch == "siglip2"

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            b = pixel_values.shape[0]
            dtype = self.model.logit_scale.dtype
            x = pixel_values.to(dtype)
            if siglip2:
                # (B, 3, G*p, G*p) -> (B, G*G, p*p*3), patches in rows, each patch (row, col, channel) as the
                # Siglip2 image processor lays them out
                x = x.reshape(b, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, grid * grid, -1)
                shapes = torch.full((b, 2), grid, dtype=torch.long, device=x.device)
                emb = _pooled(self.model.get_image_features(pixel_values=x, pixel_attention_mask=None,
                                                            spatial_shapes=shapes))
            else:
                emb = _pooled(self.model.get_image_features(pixel_values=x))
            emb = emb.float()
            return emb / emb.norm(p=2, dim=-1, keepdim=True)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            emb = _pooled(self.model.get_text_features(input_ids=input_ids)).float()
            return emb / emb.norm(p=2, dim=-1, keepdim=True)

    return Vision().eval(), Text().eval()


def _load_torch_model(path: Path, dtype: Any = None, device: Any = None) -> Any:
    try:
        import torch  # noqa: F401
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise UsageError(f"torch and transformers are needed to load {path} ({ENGINES_HINT})") from None
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a transformers checkpoint ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    if cfg.model_type not in ("siglip", "siglip2"):
        raise UsageError(f"{path}: model type {cfg.model_type!r} is not SigLIP or SigLIP2")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModel.from_pretrained(str(path), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


# -- the engine -------------------------------------------------------------------------------------------------


Runner = Callable[[np.ndarray], np.ndarray]


class SiglipEngine:
    """Image, region and text embeddings and zero-shot probabilities from one SigLIP/SigLIP2 model.

    ``runtime`` (torch | onnxruntime | tensorrt) and ``device`` say what really runs; ``choice``
    says why it was chosen; ``fallback`` is non-empty when a GPU provider asked for is not the one
    running.  Every output embedding is float32 and L2-normalised.
    """

    def __init__(self, *, spec: SiglipSpec, runtime: str, device: str, tokenizer: TextTokenizer,
                 vision: Runner, text: Runner, max_batch: int, choice: str = "", fallback: str = "") -> None:
        self.spec = spec
        self.model_id = spec.model_id
        self.dim = spec.dim
        self.runtime = runtime
        self.device = device
        self.choice = choice
        self.fallback = fallback
        self.tiny_random = spec.tiny_random
        self.tokenizer = tokenizer
        self._vision = vision
        self._text = text
        self.max_batch = max(1, int(max_batch))
        self.logit_scale = float(np.exp(spec.logit_scale))
        self.logit_bias = float(spec.logit_bias)

    def _batched(self, fn: Runner, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [fn(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)

    def pixels(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """The model's input for ``images``: (N, 3, S, S) float32 (exposed for parity checks)."""
        return preprocess(images, self.spec)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of already preprocessed pixels (N, 3, S, S)."""
        return self._batched(self._vision, np.asarray(pixels, dtype=np.float32))

    def encode_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB frames (or a list of frames of any sizes) -> (N, dim) normalised."""
        return self.encode_pixels(self.pixels(images))

    def encode_regions(self, image: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
        """One embedding per box ((x0, y0, x1, y1) as fractions of the frame), all crops in one batch."""
        return self.encode_images(crop_boxes(image, boxes)) if boxes else np.zeros((0, self.dim), np.float32)

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings of token ids (N, text_length)."""
        return self._batched(self._text, np.asarray(ids, dtype=np.int64))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, dim) normalised."""
        return self.encode_ids(self.tokenizer(texts))

    def zero_shot(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """(N, D) image and (M, D) text embeddings -> (N, M) probabilities, the model's own
        ``sigmoid(exp(logit_scale) * cos + logit_bias)`` (SigLIP scores each pair on its own: no softmax)."""
        a = np.asarray(image_emb, dtype=np.float32)
        b = np.asarray(text_emb, dtype=np.float32)
        logits = self.logit_scale * (a @ b.T) + self.logit_bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float32)

    def __repr__(self) -> str:
        return f"SiglipEngine({self.model_id}, runtime={self.runtime}, device={self.device}, dim={self.dim})"


# -- export -----------------------------------------------------------------------------------------------------


def export_dir_ready(directory: Path | None) -> bool:
    """True when ``directory`` holds a complete export (sidecar and both towers)."""
    if directory is None:
        return False
    side = directory / SIDECAR
    return side.is_file() and (directory / VISION_FILE).is_file() and (directory / TEXT_FILE).is_file()


def default_export_dir(model: str) -> Path:
    """Where exports made on demand go when no ``onnx_dir`` is given (also ``gamecopilot export
    siglip`` without ``--out``), so ``runtime: auto`` finds an export made earlier."""
    return export_dir("siglip", model)


def export_siglip(model: str, out_dir: Path, *, allow_download: bool = False) -> dict[str, Path]:
    """Export ``model``'s towers to ``out_dir``: ``vision.onnx``, ``text.onnx``, ``siglip.json``
    and the tokenizer files; returns them by name (vision, text, sidecar, then each tokenizer file)."""
    import torch

    from engines.onnx_export import export_onnx

    path = resolve_model(model, allow_download=allow_download)
    if not path.is_dir():
        raise UsageError(f"model {model}: {path} is not a checkpoint directory")
    hf = _load_torch_model(path, dtype=torch.float32)
    spec = spec_from_model(str(model), path, hf)
    vision, text = make_towers(hf, spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = torch.zeros((1, 3, spec.image_size, spec.image_size), dtype=torch.float32)
    ids = torch.full((1, spec.text_length), spec.pad_id, dtype=torch.long)
    written: dict[str, Path] = {}
    written["vision"] = export_onnx(vision, {"pixel_values": pixels}, out_dir / VISION_FILE, ["image_embeds"])
    written["text"] = export_onnx(text, {"input_ids": ids}, out_dir / TEXT_FILE, ["text_embeds"])
    with torch.no_grad():
        spec.dim = int(vision(pixels).shape[-1])
    copied: dict[str, Path] = {}
    for name in TOKENIZER_FILES:
        src = path / name
        if src.is_file():
            dst = out_dir / name
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            copied[name] = dst
    tmp = out_dir / f".{SIDECAR}.tmp"
    tmp.write_text(spec.to_json())
    os.replace(tmp, out_dir / SIDECAR)
    written["sidecar"] = out_dir / SIDECAR
    written.update(copied)
    log.info("siglip: exported %s to %s", model, out_dir)
    return written


# -- loading ----------------------------------------------------------------------------------------------------


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _check_choice(runtime: str, device: str) -> None:
    if runtime not in RUNTIMES:
        raise UsageError(f"siglip: unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
    if device not in DEVICES:
        raise UsageError(f"siglip: unknown device {device!r} (one of {', '.join(DEVICES)})")


def _torch_engine(model: str, device: str, allow_download: bool, max_batch: int, choice: str) -> SiglipEngine:
    try:
        import torch
    except ImportError:
        raise UsageError(f"torch is not installed ({ENGINES_HINT})") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("siglip: device 'cuda' asked for, but torch sees no CUDA GPU")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    path = resolve_model(model, allow_download=allow_download)
    if not path.is_dir():
        raise UsageError(f"model {model}: {path} is not a checkpoint directory")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    hf = _load_torch_model(path, dtype=dtype, device=dev)
    spec = spec_from_model(str(model), path, hf)
    vision, text = make_towers(hf, spec)

    def run_vision(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(vision(torch.from_numpy(x).to(dev)).cpu().numpy(), dtype=np.float32)

    def run_text(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(text(torch.from_numpy(ids).to(dev)).cpu().numpy(), dtype=np.float32)

    tok = TextTokenizer(path, spec.text_length, spec.pad_id)
    return SiglipEngine(spec=spec, runtime="torch", device=dev.type, tokenizer=tok, vision=run_vision,
                        text=run_text, max_batch=max_batch, choice=choice)


def _exported_engine(directory: Path, runtime: str, device: str, max_batch: int, choice: str,
                     threads: int) -> SiglipEngine:
    spec = SiglipSpec.read(directory / SIDECAR)
    tok = TextTokenizer((directory / spec.tokenizer_dir).resolve(), spec.text_length, spec.pad_id)
    vision_path, text_path = directory / spec.files["vision"], directory / spec.files["text"]
    if runtime == "tensorrt":
        from engines.tensorrt_engine import TensorRTRunner

        cache = directory / TRT_DIR
        runners: list[Any] = [TensorRTRunner.from_onnx(p, cache, max_batch=max_batch, opt_batch=1)
                              for p in (vision_path, text_path)]
    else:
        from engines.onnx_export import OnnxRunner
        from engines.onnx_session import SessionConfig

        cfg = SessionConfig(device="auto" if device == "auto" else "cuda" if device == "cuda" else "cpu",
                            intra_op_threads=threads)
        runners = [OnnxRunner(vision_path, cfg), OnnxRunner(text_path, cfg)]
    vision_runner, text_runner = runners
    fallback = "; ".join(r.fallback for r in runners if getattr(r, "fallback", ""))

    def run_vision(x: np.ndarray) -> np.ndarray:
        return np.asarray(vision_runner.run({"pixel_values": x})[0], dtype=np.float32)

    def run_text(ids: np.ndarray) -> np.ndarray:
        return np.asarray(text_runner.run({"input_ids": ids})[0], dtype=np.float32)

    return SiglipEngine(spec=spec, runtime=runtime, device=vision_runner.device, tokenizer=tok, vision=run_vision,
                        text=run_text, max_batch=max_batch, choice=choice, fallback=fallback)


def load_siglip(model: str = DEFAULT_MODELS["siglip2"], *, runtime: str = "auto", device: str = "auto",
                allow_download: bool = False, onnx_dir: Path | None = None,
                batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, threads: int = 1) -> SiglipEngine:
    """A :class:`SiglipEngine` for ``model`` (a local checkpoint or a Hugging Face id, offline unless
    ``allow_download``) on ``runtime`` (auto | torch | onnxruntime | tensorrt) and ``device``
    (auto | cpu | cuda).

    ``onnx_dir`` holds (or receives) the export of :func:`export_siglip`; ``onnxruntime`` and
    ``tensorrt`` export into it (default: a per-model folder in the user's cache) when it holds
    none.  ``batch_sizes``: the batch sizes the caller will use; the largest is the TensorRT
    profile's maximum and bigger batches run in slices of it.  ``threads``: ONNX Runtime's
    intra-op threads.  The choice is logged and kept in ``engine.choice``.
    """
    _check_choice(runtime, device)
    sizes = [int(b) for b in batch_sizes] or list(DEFAULT_BATCH_SIZES)
    if min(sizes) < 1:
        raise UsageError(f"siglip: batch sizes must be >= 1, got {list(batch_sizes)}")
    max_batch = max(sizes)
    directory = Path(onnx_dir) if onnx_dir is not None else default_export_dir(model)
    ready = export_dir_ready(directory)
    if ready:
        side = SiglipSpec.read(directory / SIDECAR)
        if not _same_model(side.model_id, str(model)):
            raise UsageError(f"siglip: {directory} holds an export of {side.model_id}, not {model} "
                             "(export this model there, or give another onnx_dir)")

    chosen = runtime
    notes: list[str] = []
    if runtime == "auto":
        from engines.tensorrt_engine import tensorrt_usable

        if device != "cpu" and tensorrt_usable():
            chosen = "tensorrt"
            notes.append("tensorrt and a CUDA GPU are here")
        else:
            notes.append("tensorrt: not usable here (not installed or no CUDA GPU)" if device != "cpu"
                         else "tensorrt: device cpu asked for")
            if ready:
                chosen = "onnxruntime"
                notes.append(f"onnxruntime: export found in {directory}")
            else:
                chosen = "torch"
                notes.append(f"onnxruntime: no export in {directory}")
    elif runtime == "tensorrt":
        from engines.tensorrt_engine import import_tensorrt, tensorrt_usable

        import_tensorrt()  # one line when it is missing
        if device == "cpu" or not tensorrt_usable():
            raise UsageError("siglip: runtime 'tensorrt' asked for, but there is no CUDA GPU here (or device cpu)")
    choice = f"{chosen} ({'; '.join(notes)})" if notes else f"{chosen} (asked for)"

    if chosen == "torch":
        engine = _torch_engine(model, device, allow_download, max_batch, choice)
    else:
        if not ready:
            log.info("siglip: exporting %s to %s for %s", model, directory, chosen)
            export_siglip(model, directory, allow_download=allow_download)
        engine = _exported_engine(directory, chosen, device, max_batch, choice, threads)
    log.info("siglip %s: runtime %s on %s; %s%s", engine.model_id, engine.runtime, engine.device, choice,
             f"; FALLBACK: {engine.fallback}" if engine.fallback else "")
    return engine


# -- a tiny random model for tests and benches ---------------------------------------------------------------------


def _tiny_config(config_cls: Any, vocab: int, pad_id: int, eos_id: int) -> Any:
    return config_cls(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": pad_id,
                     "eos_token_id": eos_id, "bos_token_id": eos_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_channels": 3, "patch_size": 8, "num_patches": 16},
    )


def tiny_siglip2(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Siglip2 checkpoint to ``out_dir`` (a few seconds, no download) and return it.

    Two layers of width 32 in each tower, 32-pixel images in 8-pixel patches (a 4 x 4 grid), a
    16-token text length and a word-level tokenizer trained here on a handful of prompt words.
    Its config carries ``tiny_random: true`` (and the export's sidecar too), so anything that
    measures it can say it measured a random model.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TINY_WORDS], trainers.WordLevelTrainer(special_tokens=specials))
    eos, pad = (int(tok.token_to_id(t) or 0) for t in ("<eos>", "<pad>"))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   model_max_length=16)
    fast.save_pretrained(str(out_dir))

    torch.manual_seed(seed)
    vocab = tok.get_vocab_size()
    cfg = _tiny_config(Siglip2Config, vocab, pad, eos)
    cfg.tiny_random = True
    cfg.name_or_path = "tiny-random-siglip2"
    model = Siglip2Model(cfg).eval()
    with torch.no_grad():  # a believable scale and bias instead of randn
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    model.save_pretrained(str(out_dir))
    pre = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 8, "max_num_patches": 16,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
           "do_resize": True, "do_rescale": True, "do_normalize": True, "resample": 2}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return out_dir
