"""Semantic stage: SigLIP2 image embeddings and zero-shot prompts, as signals and cues.

The cheap encoders see *that* the picture changed; they cannot say *what* it shows.  SigLIP2
can: its image and text towers share one embedding space, so "a game over screen" or "a boss
health bar" is a text embedding computed once at start, and each sampled frame's similarity
to it (through the model's own logit scale and bias, a sigmoid, so each prompt is judged on
its own) says how well the frame matches.  The profile's ``semantic.prompts`` (else the stage's
``prompts`` param, the pipeline's generic default) name what to look for::

    semantic:
      prompts:
        - {text: "a game over screen", kind: game_over, priority: critical, threshold: 0.6}
        - {text: "a boss health bar", kind: boss, priority: high}

Every ``every_s`` of media time one frame is encoded (off the event loop) and three things go out:

* ``signals``: ``Features(name="semantic", values={"match": m})`` where ``m`` is the best
  prompt's margin over its threshold (0 when none is above): a graded signal of its own
  family (``semantic``) the TriggerDetector fuses like any encoder's;
* ``cues``: a :class:`~copilot.messages.Cue` when a prompt's probability rises above its
  threshold (rising edge; it re-arms once it has fallen ``hysteresis`` under it), with the
  prompt's event kind and priority and the prompt and probability in its reason and evidence;
* ``embeddings``: ``Features(name="siglip", vector=...)``, the unit-norm image embedding, for
  HiCo (``source: embeddings``) and the learned event scorer.

The engine (:mod:`engines.siglip`) chooses its runtime (TensorRT, ONNX Runtime, torch) and says
which; the stage logs it once and counts it in its notes, so a fallback to the CPU is seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from copilot.config import msgspec_error
from copilot.errors import UsageError
from copilot.messages import Cue, Envelope, Features, Priority, VideoFrame
from copilot.profile import Profile, profile_from_options
from copilot.registry import register_stage
from copilot.signals import Family, Signal
from copilot.stage import Stage, StageContext
from engines.model_registry import DEFAULT_MODELS
from stages._placed import placed_params, report_device
from stages.motion import rgb_view

SEMANTIC = Family("semantic", default_weight=1.0, event_kind="semantic")


class SemanticPrompt(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One zero-shot prompt: the words, the event it suggests and when it fires."""

    text: str
    kind: str = "semantic"
    priority: Priority = "high"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("text: expected a prompt, got an empty one")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not self.kind.strip():
            raise ValueError("kind: expected an event kind, got an empty one")


class SemanticParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str = DEFAULT_MODELS["siglip2"]  # a model id (Hugging Face cache) or a local directory
    runtime: str = "auto"  # auto | torch | onnxruntime | tensorrt
    device: str = "auto"  # auto | cpu | cuda
    onnx_dir: str | None = None  # the files of `gamecopilot export siglip` (runtime onnxruntime / tensorrt)
    allow_download: bool = False
    every_s: float = 0.5  # media seconds between encoded frames
    prompts: list[SemanticPrompt] = []  # used when the profile has no semantic.prompts
    hysteresis: float = 0.1  # a fired prompt re-arms once its probability is this far under its threshold
    emit_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {self.every_s}")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis}")
        if self.runtime not in ("auto", "torch", "onnxruntime", "tensorrt"):
            raise ValueError(f"runtime must be auto, torch, onnxruntime or tensorrt, got {self.runtime!r}")


def profile_prompts(prof: Profile, source: str = "profile") -> list[SemanticPrompt]:
    """The prompts of a profile's ``semantic`` section (validated; errors name the key)."""
    section = dict(prof.semantic)
    raw = section.pop("prompts", [])
    if section:
        raise UsageError(f"{source}: semantic: unknown key {sorted(section)[0]!r} (known: prompts)")
    try:
        return msgspec.convert(raw, list[SemanticPrompt])
    except msgspec.ValidationError as exc:
        raise msgspec_error(source, exc, prefix="semantic.prompts") from exc


@dataclass
class PromptState:
    """A prompt's edge detector: armed until it fires, re-armed once well under its threshold."""

    prompt: SemanticPrompt
    armed: bool = True

    def update(self, p: float, hysteresis: float) -> bool:
        """Whether probability ``p`` fires the prompt now (a rising edge over the threshold)."""
        thr = self.prompt.threshold
        if self.armed and p >= thr:
            self.armed = False
            return True
        if not self.armed and p < thr - hysteresis:
            self.armed = True
        return False


def load_engine(p: SemanticParams) -> Any:
    """The SigLIP2 engine the params ask for (a seam tests replace)."""
    from engines.siglip import load_siglip

    return load_siglip(p.model, runtime=p.runtime, device=p.device, allow_download=p.allow_download,
                       onnx_dir=None if p.onnx_dir is None else Path(p.onnx_dir))


@register_stage("semantic")
class SemanticStage(Stage[SemanticParams]):
    """SigLIP2 on sampled frames: zero-shot prompt matches as a signal and cues, and image embeddings."""

    Params = SemanticParams
    accepts = (VideoFrame,)
    output_ports = ("signals", "cues", "embeddings")
    signals = (Signal("semantic.match", SEMANTIC, floor=0.0),)
    # the trigger merges its inputs by media time: between sampled frames the ports say "nothing before t"
    progress_s = 0.5

    @classmethod
    def check(cls, params: SemanticParams) -> object:
        """The model must be there (a local path or the Hugging Face cache) before any group starts:
        one line naming it and the cache, not a group failing minutes into loading."""
        from engines.model_registry import resolve_model, stage_hint

        if params.onnx_dir is not None and not Path(params.onnx_dir).is_dir():
            raise UsageError(f"semantic: onnx_dir {params.onnx_dir} is not a directory "
                             "(make it with: gamecopilot export siglip --to onnx --out DIR)")
        resolve_model(params.model, allow_download=params.allow_download, hint=stage_hint("semantic"))
        return None

    @classmethod
    def check_profile(cls, prof: Any, source: str, cfg: Any, name: str) -> None:
        profile_prompts(prof, source)

    def __init__(self, ctx: StageContext, params: SemanticParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.engine: Any = None
        self.states: list[PromptState] = []
        self.text_emb: np.ndarray | None = None
        self._next_t = -math.inf

    async def start(self) -> None:
        prompts = profile_prompts(profile_from_options(self.ctx.options)) or list(self.p.prompts)
        self.states = [PromptState(pr) for pr in prompts]
        self.engine = await self.run_blocking(load_engine, placed_params(self, self.p))
        report_device(self, self.engine)
        eng = self.engine
        self.log.info("SigLIP2 %s on %s (%s)%s", eng.model_id, eng.device, eng.runtime,
                      f": {eng.fallback}" if getattr(eng, "fallback", "") else "")
        self.recorder.note(f"runtime_{eng.runtime}_{eng.device}")
        if prompts:
            self.text_emb = await self.run_blocking(eng.encode_texts, [pr.text for pr in prompts])
        else:
            self.log.info("no semantic prompts (profile semantic.prompts): embeddings only")

    async def process(self, msg: Envelope) -> None:
        t = msg.t_media
        if t < self._next_t or self.engine is None:
            return
        self._next_t = t + self.p.every_s
        frame = msg.payload_as(VideoFrame)
        image = np.ascontiguousarray(rgb_view(frame.image, frame.pixel_format))
        emb = (await self.run_blocking(self.engine.encode_images, image[None]))[0]
        self.recorder.note("encoded")
        if self.text_emb is not None:
            probs = self.engine.zero_shot(emb[None], self.text_emb)[0]
            await self._judge(probs, msg)
        if self.p.emit_embeddings:
            await self.emit("embeddings", Features(name="siglip", vector=emb.astype(np.float32)), parent=msg)

    async def _judge(self, probs: np.ndarray, msg: Envelope) -> None:
        best_margin = 0.0
        values: dict[str, float] = {}
        for i, st in enumerate(self.states):
            p = float(probs[i])
            best_margin = max(best_margin, p - st.prompt.threshold)
            values[f"p{i}"] = round(p, 4)
            if st.update(p, self.p.hysteresis):
                pr = st.prompt
                self.recorder.note("cues")
                await self.emit("cues", Cue(
                    t=msg.t_media, kind=pr.kind, priority=pr.priority,
                    reason=f'SigLIP: "{pr.text}" p={p:.2f} (threshold {pr.threshold:g})',
                    evidence={"prompt": pr.text, "p": round(p, 4), "threshold": pr.threshold}), parent=msg)
        values["match"] = round(best_margin, 4)
        await self.emit("signals", Features(name="semantic", values=values), parent=msg)

