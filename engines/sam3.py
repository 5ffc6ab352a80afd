"""SAM3 concept segmentation: which things the prompts name are on a frame, where, how big.

SAM3 (``transformers.Sam3Model``) takes an image and a short noun phrase ("enemy", "health bar")
and returns every instance of that concept: a score, a box and a mask per query.  It is the most
expensive model of the copilot (a 32-layer ViT at 1008 px), so the ``segment`` stage runs it only
on the keyframes its cascade chooses; here is the model alone.

:meth:`Sam3Engine.segment` ``(image HxWx3 uint8 RGB, prompts) -> list[Entity]``: for each prompt
the instances scoring above ``threshold`` (at most ``max_entities`` per prompt, best first), each a
:class:`copilot.messages.Entity` with the prompt as label, the box as fractions of the frame
(x0, y0, x1, y1), the score and ``mask_area`` (mask pixels / frame pixels).  Post-processing is a
numpy equivalent of ``Sam3Processor.post_process_instance_segmentation``: score = sigmoid(query
logit) x sigmoid(presence logit), kept when above ``threshold``; the model's boxes are already
normalised xyxy; a mask is its sigmoid above ``mask_threshold``.  The mask area is counted on
the model's own mask grid (288 x 288 for the real model), which covers the whole frame: the
processor would first upsample each mask to the frame's size, which gives the same fraction to
within the grid's resolution and costs a full-size array per instance.

Where each part runs.  ``Sam3Model.forward`` accepts precomputed vision features
(``vision_embeds``, a ``Sam3VisionEncoderOutput``), so the model splits cleanly in two:

* the vision backbone (ViT + FPN neck): ``pixel_values (N, 3, S, S) -> fpn0, fpn1, fpn2``, the
  three pyramid levels the heads read (``Sam3Model.forward`` drops the fourth, 0.5x level, so the
  export leaves it out);
* the rest (CLIP text encoder, DETR encoder/decoder, dot-product scoring, mask head), in torch,
  fed those features; the FPN's sine position encodings depend only on the levels' shapes and
  are computed in torch by the model's own ``Sam3SinePositionEmbedding``.

With ``runtime="torch"`` both halves run in torch.  With ``runtime="onnxruntime"`` the backbone
runs in ONNX Runtime (the file :func:`export_sam3_backbone` writes; the torch ViT and FPN are
freed after loading) and the rest in torch.  ``auto`` takes ONNX Runtime when ``onnx_dir`` (default:
the folder ``gamecopilot export`` writes) holds an export.  Text features are cached per prompt
list (the prompts of a run do not change), so a frame costs one backbone pass and one batched
head pass over its prompts.

Preprocessing runs in numpy: resize to the processor's ``size`` (a square: SAM3 stretches the
frame), rescale, normalise with the checkpoint's mean/std.  :func:`tiny_sam3` writes a tiny
random checkpoint with a tiny CLIP tokenizer trained in-process, marked as such, that
``load_sam3`` loads like a real one.  Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from copilot.errors import UsageError
from copilot.messages import Entity
from engines.engine_common import quiet_hf, read_json, read_sidecar, set_torch_threads, torch_device
from engines.videomae import IMAGENET_STANDARD, resize_frames

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
ONNX_NAME = "sam3_backbone.onnx"
SIDECAR_NAME = "sam3_backbone.json"
SIDECAR_FORMAT = "gamecopilot.sam3-backbone/1"
INPUT_NAME = "pixel_values"
FPN_OUTPUTS = ("fpn0", "fpn1", "fpn2")
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to 32 tokens
TINY_LABEL = "tiny random SAM3 (random weights: its entities mean nothing)"


@dataclass(frozen=True)
class ImagePrep:
    """SAM3's image preprocessing as numbers: a square resize, rescale, normalise."""

    size: tuple[int, int] = (1008, 1008)  # (height, width)
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_STANDARD
    std: tuple[float, float, float] = IMAGENET_STANDARD

    @classmethod
    def from_config(cls, cfg: dict[str, Any], image_size: int) -> ImagePrep:
        size = cfg.get("size") or {}
        mean = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_STANDARD))
        std = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STANDARD))
        return cls(size=(int(size.get("height", image_size)), int(size.get("width", image_size))),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(1, 3, S, S)`` float32."""
        x = np.asarray(image)
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3) RGB, got shape {x.shape}")
        y: np.ndarray = resize_frames(x, *self.size) * np.float32(self.rescale_factor)
        z: np.ndarray = (y - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(z, -1, 0)[None], dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def entities_from_outputs(
    prompts: list[str],
    logits: np.ndarray,
    presence: np.ndarray | None,
    boxes: np.ndarray,
    masks: np.ndarray,
    *,
    threshold: float,
    mask_threshold: float = 0.5,
    max_entities: int = 5,
) -> list[Entity]:
    """The entities of one frame from the heads' outputs, one row per prompt: ``logits`` (P, Q),
    ``presence`` (P, 1) or None, ``boxes`` (P, Q, 4) normalised xyxy, ``masks`` (P, Q, h, w) logits.
    Per prompt: queries scoring above ``threshold``, best first, at most ``max_entities``."""
    scores = _sigmoid(logits)
    if presence is not None:
        scores = scores * _sigmoid(presence).reshape(-1, 1)
    out: list[Entity] = []
    for p, label in enumerate(prompts):
        keep = np.flatnonzero(scores[p] > threshold)
        keep = keep[np.argsort(-scores[p][keep], kind="stable")][:max_entities]
        for q in keep:
            x0, y0, x1, y1 = (float(v) for v in np.clip(boxes[p, q], 0.0, 1.0))
            area = float(np.mean(_sigmoid(masks[p, q]) > mask_threshold))
            out.append(Entity(label=label, box=(round(x0, 5), round(y0, 5), round(x1, 5), round(y1, 5)),
                              score=round(float(scores[p, q]), 5), mask_area=round(area, 6)))
    return out


# -- torch side ----------------------------------------------------------------------------------
def _backbone_module(model: Any) -> Any:
    """A torch module ``pixel_values -> (fpn0, fpn1, fpn2)``: the vision encoder and the levels the heads read."""
    import torch

    vision = model.vision_encoder

    class Sam3Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = vision

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            levels = self.vision(pixel_values).fpn_hidden_states
            return tuple(levels[: len(FPN_OUTPUTS)])

    return Sam3Backbone().eval()


def _load_torch_model(path: Path) -> tuple[Any, Any]:
    """``(Sam3Model, Sam3Processor)`` from a checkpoint directory, in eval mode."""
    from transformers import Sam3Model, Sam3Processor

    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a SAM3 checkpoint (no config.json)")
    model = quiet_hf(Sam3Model.from_pretrained, path).eval()
    processor = Sam3Processor.from_pretrained(path)
    return model, processor


@dataclass
class Sam3Engine:
    """A loaded SAM3: :meth:`segment` one frame with text prompts.

    ``runtime`` says where the vision backbone runs (``torch`` or ``onnxruntime``; the heads always
    run in torch), ``device`` the torch device of the heads, ``backbone_device`` the backbone's,
    ``fallback`` one line when the backbone does not run where it was asked to.  ``calls`` counts
    the frames segmented.
    """

    model_id: str
    runtime: str
    device: str
    backbone_device: str
    model: Any  # the torch Sam3Model (its vision encoder freed when the backbone runs in ONNX Runtime)
    tokenizer: Any
    prep: ImagePrep
    backbone: Any  # pixel_values float32 (N, 3, S, S) -> list of the FPN levels (numpy or torch)
    pos_enc: Any  # the model's Sam3SinePositionEmbedding: (shape, device, dtype) -> a level's position encoding
    threshold: float = 0.5
    mask_threshold: float = 0.5
    max_entities: int = 5
    fallback: str = ""
    tiny: bool = False
    calls: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)  # the last call's backbone / heads times
    text_cache: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return TINY_LABEL if self.tiny else f"SAM3 {self.model_id}"

    def _text_features(self, prompts: tuple[str, ...]) -> tuple[Any, Any]:
        """``(text outputs, attention mask)`` for ``prompts``, computed once per prompt list."""
        import torch

        hit = self.text_cache.get(prompts)
        if hit is None:
            if len(self.text_cache) >= 8:  # a caller cycling through prompt lists: keep the memory bounded
                self.text_cache.clear()
            enc = self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            with torch.inference_mode():
                feats = self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
            hit = self.text_cache[prompts] = (feats, mask)
        return hit  # type: ignore[no-any-return]

    def vision_features(self, pixels: np.ndarray) -> list[Any]:
        """The three FPN levels for preprocessed ``pixels`` (1, 3, S, S), as torch tensors on ``device``."""
        import torch

        levels = self.backbone(pixels)
        return [torch.as_tensor(x).to(self.device) if isinstance(x, np.ndarray) else x.to(self.device)
                for x in levels]

    def encode_backbone(self, images: np.ndarray) -> np.ndarray:
        """The vision backbone alone on a batch of frames ``(N, H, W, 3)`` uint8 RGB, in one call: the
        three FPN levels of each frame flattened into one row, ``(N, D)`` float32.  What benchmarks
        time and compare across runtimes (the backbone is the bulk of a frame's cost)."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if not len(x):
            raise ValueError("encode_backbone: no frames")
        pixels = np.concatenate([self.prep(img) for img in x])
        levels = self.backbone(pixels)
        return np.concatenate([np.asarray(lvl.float().cpu().numpy() if hasattr(lvl, "cpu") else lvl,
                                          dtype=np.float32).reshape(len(x), -1) for lvl in levels], axis=1)

    def heads(self, levels: list[Any], prompts: list[str]) -> dict[str, np.ndarray]:
        """The heads (text encoder cached, DETR, scoring, masks) over ``prompts`` on one frame's FPN levels:
        ``logits`` (P, Q), ``presence`` (P, 1), ``boxes`` (P, Q, 4), ``masks`` (P, Q, h, w) as numpy."""
        import torch
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        text, mask = self._text_features(tuple(prompts))
        n = len(prompts)
        pos_enc = self.pos_enc
        fpn = tuple(x.expand(n, *x.shape[1:]) for x in levels)
        pos = tuple(pos_enc(x.shape, x.device, x.dtype) for x in fpn)
        # Sam3Model.forward drops the last level it is given (the 0.5x one the heads never read)
        none: Any = None
        vision = Sam3VisionEncoderOutput(fpn_hidden_states=(*fpn, none), fpn_position_encoding=(*pos, none))
        with torch.inference_mode():
            out = self.model(vision_embeds=vision, text_embeds=text, attention_mask=mask)
        presence = out.presence_logits
        return {
            "logits": out.pred_logits.float().cpu().numpy(),
            "presence": None if presence is None else presence.float().cpu().numpy(),
            "boxes": out.pred_boxes.float().cpu().numpy(),
            "masks": out.pred_masks.float().cpu().numpy(),
        }

    def segment(self, image: np.ndarray, prompts: list[str]) -> list[Entity]:
        """Entities on ``image`` (HxWx3 uint8 RGB) for each of ``prompts`` (see the module docstring)."""
        if not prompts:
            return []
        t0 = time.perf_counter()
        levels = self.vision_features(self.prep(image))
        t1 = time.perf_counter()
        raw = self.heads(levels, list(prompts))
        ents = entities_from_outputs(list(prompts), raw["logits"], raw["presence"], raw["boxes"], raw["masks"],
                                     threshold=self.threshold, mask_threshold=self.mask_threshold,
                                     max_entities=self.max_entities)
        t2 = time.perf_counter()
        self.timings_ms = {"backbone_ms": (t1 - t0) * 1e3, "heads_ms": (t2 - t1) * 1e3}
        self.calls += 1
        return ents


def has_export(onnx_dir: Path | None) -> bool:
    """Whether ``onnx_dir`` holds this engine's export (the ONNX file and its sidecar)."""
    return onnx_dir is not None and (onnx_dir / SIDECAR_NAME).is_file() and (onnx_dir / ONNX_NAME).is_file()


def _read_sidecar(onnx_dir: Path) -> dict[str, Any]:
    return read_sidecar(onnx_dir, ONNX_NAME, SIDECAR_NAME, SIDECAR_FORMAT, "SAM3 backbone", "sam3")


def _processor_config(path: Path) -> dict[str, Any]:
    f = path / "preprocessor_config.json"
    if not f.is_file():
        f = path / "processor_config.json"
    if not f.is_file():
        return {}
    data = read_json(f)
    return data.get("image_processor", data) if isinstance(data.get("image_processor"), dict) else data


def load_sam3(
    model: str,
    *,
    runtime: str = "auto",
    device: str = "auto",
    allow_download: bool = False,
    onnx_dir: Path | str | None = None,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    max_entities: int = 5,
    threads: int = 0,
) -> Sam3Engine:
    """Load SAM3 ``model`` (a checkpoint directory or a Hugging Face id, never downloaded unless
    ``allow_download``).  ``runtime``: where the vision backbone runs (``torch``, ``onnxruntime``
    from ``onnx_dir``, default the folder ``gamecopilot export`` writes, or ``auto``: ONNX Runtime
    when that folder holds an export); ``device``:
    ``auto``, ``cpu`` or ``cuda`` (the heads' torch device; the ONNX backbone uses the matching
    provider); ``threads``: intra-op threads of ONNX Runtime and torch (torch's are process-wide, see
    :func:`engines.videomae.set_torch_threads`; 0 leaves the default, one per core).  Bad input is one
    :class:`UsageError` line."""
    import torch

    if runtime not in RUNTIMES:
        raise UsageError(f"unknown SAM3 runtime {runtime!r} (auto, torch or onnxruntime)")
    if not 0.0 <= threshold < 1.0 or not 0.0 < mask_threshold < 1.0:
        raise UsageError(f"SAM3 thresholds must be in [0, 1): threshold {threshold}, mask_threshold {mask_threshold}")
    if max_entities < 1:
        raise UsageError(f"max_entities must be >= 1, got {max_entities}")
    from engines.model_registry import export_dir

    # no onnx_dir: the folder `gamecopilot export sam3` writes by default
    odir = Path(onnx_dir) if onnx_dir is not None else export_dir("sam3", str(model))
    use_onnx = runtime == "onnxruntime" or (runtime == "auto" and has_export(odir))
    side = _read_sidecar(odir) if use_onnx else None
    from engines.model_registry import resolve_model

    path = resolve_model(model, allow_download=allow_download)
    dev = torch_device(device)
    set_torch_threads(threads)
    sam, processor = _load_torch_model(path)
    sam = sam.to(dev)
    config = sam.config
    prep = ImagePrep.from_config(_processor_config(path), int(config.vision_config.backbone_config.image_size))
    pos_enc = sam.vision_encoder.neck.position_encoding
    fallback = ""
    if side is not None and odir is not None:
        from engines.onnx_export import OnnxRunner
        from engines.onnx_session import SessionConfig

        if tuple(side["size"]) != prep.size:
            raise UsageError(f"{odir}: the backbone was exported for {side['size']} px images, the checkpoint "
                             f"takes {list(prep.size)} (export it again)")
        if side.get("model") != model:
            log.warning("%s was exported from %s, not %s: running the export", odir, side.get("model"), model)
        runner = OnnxRunner(odir / ONNX_NAME, SessionConfig(device=device, intra_op_threads=threads))  # type: ignore[arg-type]

        def backbone(pixels: np.ndarray) -> list[Any]:
            return list(runner.run({INPUT_NAME: pixels}))

        sam.vision_encoder = torch.nn.Identity()  # the ViT and FPN now live in the ONNX file
        rt, bdev, fallback = "onnxruntime", runner.device, runner.fallback
    else:
        module = _backbone_module(sam)

        def backbone(pixels: np.ndarray) -> list[Any]:
            with torch.inference_mode():
                return list(module(torch.from_numpy(pixels).to(dev)))

        rt, bdev = "torch", dev
    eng = Sam3Engine(model_id=model, runtime=rt, device=dev, backbone_device=bdev, model=sam,
                     tokenizer=processor.tokenizer, prep=prep, backbone=backbone, pos_enc=pos_enc, threshold=threshold,
                     mask_threshold=mask_threshold, max_entities=max_entities, fallback=fallback,
                     tiny=bool(getattr(config, "tiny_random", "")))
    return eng


def export_sam3_backbone(model: str, out_dir: Path | str, *, allow_download: bool = False) -> dict[str, Path]:
    """Export SAM3's vision backbone (ViT + FPN, the three levels the heads read) of ``model`` to
    ``out_dir/sam3_backbone.onnx`` (dynamic batch) with ``out_dir/sam3_backbone.json``: the source
    model, the image preprocessing, the outputs' shapes, whether it is a tiny random model, and
    the parity against torch measured right after the export (max abs, batch 1 and 2).  Returns
    ``{"onnx", "sidecar"}``."""
    import torch

    from engines.model_registry import resolve_model
    from engines.onnx_export import DEFAULT_OPSET, OnnxRunner, export_onnx, parity_max_abs
    from engines.onnx_session import SessionConfig

    path = resolve_model(model, allow_download=allow_download)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sam, _ = _load_torch_model(path)
    config = sam.config
    prep = ImagePrep.from_config(_processor_config(path), int(config.vision_config.backbone_config.image_size))
    module = _backbone_module(sam)
    h, w = prep.size
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    onnx_path = export_onnx(module, {INPUT_NAME: example}, out / ONNX_NAME, list(FPN_OUTPUTS))
    export_s = time.perf_counter() - t0
    runner = OnnxRunner(onnx_path, SessionConfig(device="cpu", intra_op_threads=0))
    parity: dict[str, float] = {}
    shapes: list[list[int]] = []
    for b in (1, 2):
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = [t.numpy() for t in module(x)]
        got = runner.run({INPUT_NAME: x.numpy()})
        parity[f"batch{b}"] = max(parity_max_abs(r, g) for r, g in zip(ref, got, strict=True))
        shapes = [list(r.shape[1:]) for r in ref]
    side = {
        "format": SIDECAR_FORMAT, "model": model, "onnx": ONNX_NAME, "input": INPUT_NAME,
        "outputs": list(FPN_OUTPUTS), "output_shapes": shapes, "size": list(prep.size),
        "rescale_factor": prep.rescale_factor, "mean": list(prep.mean), "std": list(prep.std), "opset": DEFAULT_OPSET,
        "tiny_random": str(getattr(config, "tiny_random", "") or ""), "parity_max_abs": parity,
        "export_s": round(export_s, 2),
        "runs_in_torch": "text encoder, DETR encoder/decoder, scoring and mask head (fed these FPN levels)",
    }
    side_path = out / SIDECAR_NAME
    side_path.write_text(json.dumps(side, indent=2) + "\n")
    log.info("SAM3 backbone %s -> %s (parity %s)", model, onnx_path, parity)
    return {"onnx": onnx_path, "sidecar": side_path}


# -- the tiny random model -----------------------------------------------------------------------
_TINY_TEXT = """\
player enemy ball paddle brick score lives health bar boss door key coin bullet ship car tree menu
button text timer map wall ladder fire water gun sword shield heart star flag goal monster ghost
a the of on in an with left right top bottom small large red blue green yellow white black
"""


def _tiny_tokenizer() -> Any:
    """A CLIP tokenizer (byte-level BPE with ``</w>`` word ends, CLIP's special tokens) trained on a
    short built-in text; every byte alone and as a word end is in the vocabulary, so any prompt encodes."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 200, initial_alphabet=alphabet, min_frequency=1,
                                  show_progress=False, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>")
    tok.train_from_iterator([_TINY_TEXT] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
    for ch in alphabet:
        for piece in (ch, ch + "</w>"):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=cast(Any, merges), model_max_length=TEXT_LENGTH)


def tiny_sam3(out_dir: Path | str, seed: int = 0, *, image_size: int = 112) -> Path:
    """Write a tiny random SAM3 checkpoint into ``out_dir``: ViT hidden 32 (2 layers, patch 14, 112 px:
    an 8 x 8 grid), FPN/DETR/mask hidden 128 with the 4 scale factors, 16 queries, a one-layer CLIP
    text encoder over a tokenizer trained here, and the processor config.  ``load_sam3(str(out_dir))``
    loads it like a real one; its config carries ``tiny_random`` (the label).  Same seed, same weights."""
    import torch
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    grid = image_size // 14
    hidden = 128
    vision = {
        "backbone_config": {"model_type": "sam3_vit_model", "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                            "patch_size": 14, "window_size": max(1, grid // 2), "global_attn_indexes": [1],
                            "pretrain_image_size": image_size},
        "fpn_hidden_size": hidden,
        "backbone_feature_sizes": [[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
        "scale_factors": [4.0, 2.0, 1.0, 0.5],
    }
    text = {"model_type": "clip_text_model", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": TEXT_LENGTH, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    small = {"hidden_size": hidden, "num_attention_heads": 2, "intermediate_size": 64}
    config = Sam3Config(vision_config=vision, text_config=text,
                        geometry_encoder_config={**small, "num_layers": 1},
                        detr_encoder_config={**small, "num_layers": 1},
                        detr_decoder_config={**small, "num_layers": 1, "num_queries": 16},
                        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2})
    config.tiny_random = TINY_LABEL  # saved in config.json: whoever loads it can say what it is
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    image_processor = Sam3ImageProcessor(size={"height": image_size, "width": image_size},
                                         mask_size={"height": grid * 4, "width": grid * 4})
    processor = Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)
    quiet_hf(model.save_pretrained, out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(f"# {TINY_LABEL}\n\nBuilt by engines/sam3.py tiny_sam3(seed={seed}); "
                                   "it proves the SAM3 path only.\n")
    return out
