"""The ``transformers`` reasoner backend: a local vision-language model run in-process.

``options.model`` is a local directory (``config.json`` + weights + processor) or a model id
already in the Hugging Face cache; nothing is ever downloaded (``local_files_only``).  The model
is loaded with ``AutoModelForImageTextToText`` and its ``AutoProcessor`` (which carries the chat
template): bf16 on CUDA (FlashAttention 2 when ``flash_attn`` imports, else SDPA), fp32 on the
CPU.  Qwen3-VL is the model this is built and tested for (``engines/tiny_qwen3vl.py`` builds a
tiny random one for the tests and ``bench reasoner``).

A request becomes one chat: the system text, then a user turn holding the event's frames (oldest
first, the keyframe last, scaled to ``options.image_size`` on their longer side) and the prompt.

Optional parts:

* ``options.lora``: a peft LoRA adapter directory, merged into the weights at start.
* ``options.projectors``: :class:`~engines.projector.ProjectorBank` weights.  A request's
  ``embeddings`` (``{source: (n, dim)}``) are projected to the LLM's hidden size and enter the
  prompt beside the images: the user turn gets ``<|vision_start|>`` + one ``<|vision_pad|>`` per
  projected token + ``<|vision_end|>``, the prompt's input embeddings are computed, the
  placeholder rows are overwritten with the projected tokens, and ``generate`` gets
  ``inputs_embeds`` together with ``input_ids`` (which Qwen3-VL needs for its M-RoPE positions
  and to find the ``<|image_pad|>`` rows its vision features replace).  Without weights a
  request's embeddings are ignored (logged once): an untrained bank would only add noise.

Generation runs in a worker thread with a streamer that hands each decoded piece to the event
loop (``call_soon_threadsafe``), so the loop never blocks.  Closing or cancelling the iteration
sets a :class:`threading.Event` that a stopping criterion checks after every token; the worker
ends within one decoding step and is joined.  One generation runs at a time (a lock): a new
request waits for a preempted one to stop.

Only numpy is imported with this module; torch, transformers, peft and PIL are imported by
:meth:`TransformersBackend.start`.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from copilot.advice import AdviceRequest, BackendError, BackendOptions
from copilot.errors import UsageError, first_line

log = logging.getLogger(__name__)

MODEL_FLAG = "--llm-model"
LORA_FLAG = "llm.lora"
PROJECTORS_FLAG = "llm.projectors"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
PLACEHOLDER = "<|vision_pad|>"  # one per projected token; its embedding row is overwritten
JOIN_TIMEOUT_S = 30.0
LOCK_POLL_S = 0.05
ZERO_WIDTH = "\u200b"


def resolve_model(model: str | None) -> Path:
    """The local directory for ``model``: a directory with config.json, or the snapshot of a model
    id already in the Hugging Face cache.  Never downloads; a miss is one UsageError line."""
    if not model or not str(model).strip():
        raise UsageError(f"{MODEL_FLAG}: the transformers backend needs a model (a directory with config.json, "
                         "or a model id already in the Hugging Face cache)")
    text = str(model).strip()
    miss = UsageError(f"{MODEL_FLAG}: no local model at {text} (a directory with config.json, "
                      "or a model id already in the Hugging Face cache)")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return path
        raise miss
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise miss  # a path, not a hub id
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(text, local_files_only=True))
    except Exception:
        raise miss from None
    if not (snap / "config.json").is_file():
        raise miss
    return snap


def pick_device(device: str, torch: Any) -> Any:
    """``auto`` -> cuda when there is one, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"llm.device: unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"llm.device {device}: CUDA is not available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"llm.device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise UsageError(f"llm.device: unsupported device {device!r} (auto, cpu, cuda, cuda:N)")
    return dev


def flash_attn_available() -> bool:
    """Whether ``flash_attn`` imports (FlashAttention 2 for CUDA bf16)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def defang(text: str, specials: list[str]) -> str:
    """``text`` with every special-token string broken by a zero-width space, so a prompt that
    quotes ``<|im_end|>`` or ``<|image_pad|>`` (read on screen, heard, typed) stays text."""
    for tok in specials:
        if tok and tok in text:
            text = text.replace(tok, tok[0] + ZERO_WIDTH + tok[1:])
    return text


def to_pil(arr: np.ndarray, max_side: int) -> Any:
    """An RGB uint8 HxWx3 array (gray HxW and RGBA are taken too) as a PIL image at most
    ``max_side`` pixels on its longer side."""
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 1:
        raise BackendError(f"an image of shape {a.shape}: expected HxWx3 RGB", why="malformed")
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a[:, :, :3]))
    w, h = img.size
    if max_side > 0 and max(w, h) > max_side:
        s = max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return img


class TransformersBackend:
    """A local image-text-to-text model (Qwen3-VL) through transformers; see the module docstring."""

    name: ClassVar[str] = "transformers"

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.model: str = options.model or ""
        self.takes_images = True
        self.device: str | None = None  # after start: cpu, cuda, cuda:N
        self.dtype: str | None = None  # after start: float32, bfloat16
        self.attn_implementation: str | None = None  # after start: sdpa, flash_attention_2
        self.path: Path | None = None  # the local directory the model was loaded from
        self.last_stats: dict[str, Any] = {}  # the last generation: prompt/new tokens, seconds, stopped
        self._torch: Any = None
        self._lm: Any = None
        self._processor: Any = None
        self._bank: Any = None
        self._placeholder_id: int | None = None
        self._specials: list[str] = []
        self._lock = threading.Lock()  # one generation at a time
        self._active: set[threading.Event] = set()
        self._warned_embeddings = False

    # -- loading -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, processor, adapter and projectors off the event loop."""
        if self._lm is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        path = resolve_model(self.options.model)
        try:
            import torch
            import transformers
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:
            raise UsageError(f"--reasoner transformers: its libraries are not installed ({exc}); "
                             "pip install 'gameplay-copilot[transformers]'") from None

        transformers.utils.logging.disable_progress_bar()  # no tqdm bars through the console
        device = pick_device(self.options.device, torch)
        if self.options.threads > 0:
            torch.set_num_threads(self.options.threads)
        cuda = device.type == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        attn = "flash_attention_2" if cuda and flash_attn_available() else "sdpa"
        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
            lm = AutoModelForImageTextToText.from_pretrained(
                str(path), dtype=dtype, attn_implementation=attn, local_files_only=True, device_map=str(device))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{MODEL_FLAG}: cannot load {path}: {first_line(exc)}") from None
        except Exception as exc:
            raise BackendError(f"loading {path} failed: {first_line(exc)}", why="model") from None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise UsageError(f"{MODEL_FLAG}: {path} has no tokenizer")
        if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
            raise UsageError(f"{MODEL_FLAG}: {path} has no chat template")
        if self.options.lora:
            lm = self._apply_lora(lm, self.options.lora)
        lm.eval()
        if self.options.projectors:
            from engines.projector import ProjectorBank

            hidden = int(lm.config.get_text_config().hidden_size)
            bank = ProjectorBank.load(self.options.projectors, hidden).to(device=device, dtype=dtype).eval()
            pid = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
            if not isinstance(pid, int) or pid == tokenizer.unk_token_id or \
                    tokenizer.convert_ids_to_tokens(pid) != PLACEHOLDER:
                raise UsageError(f"{PROJECTORS_FLAG}: the model's tokenizer has no {PLACEHOLDER} token "
                                 "to hold the projected tokens")
            self._bank, self._placeholder_id = bank, pid
        self._specials = sorted(set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens),
                                key=len, reverse=True)
        self._torch, self._lm, self._processor = torch, lm, processor
        self.path, self.device, self.dtype, self.attn_implementation = path, str(device), str(dtype)[6:], attn
        log.info("transformers: %s on %s (%s, %s)%s%s", path, device, self.dtype, attn,
                 f", LoRA {self.options.lora}" if self.options.lora else "",
                 f", projectors {', '.join(self._bank.sources)}" if self._bank is not None else "")

    @staticmethod
    def _apply_lora(lm: Any, lora: str) -> Any:
        lp = Path(lora).expanduser()
        if not (lp / "adapter_config.json").is_file():
            raise UsageError(f"{LORA_FLAG}: no LoRA adapter at {lp} "
                             "(a directory with adapter_config.json, saved by peft)")
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise UsageError(f"{LORA_FLAG}: peft is not installed ({exc}); "
                             "pip install 'gameplay-copilot[transformers]'") from None
        try:
            return PeftModel.from_pretrained(lm, str(lp), is_trainable=False).merge_and_unload()
        except Exception as exc:
            raise UsageError(f"{LORA_FLAG}: cannot apply the adapter at {lp}: {first_line(exc)}") from None

    async def close(self) -> None:
        """Stop any generation, then release the model."""
        for ev in list(self._active):
            ev.set()
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        with self._lock:
            torch, self._lm, self._processor, self._bank = self._torch, None, None, None
        gc.collect()
        if torch is not None and self.device and self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- requests --------------------------------------------------------------------------------------

    def _inputs(self, request: AdviceRequest) -> tuple[Any, Any]:
        """(the processor's batch on the model's device, inputs_embeds or None)."""
        torch, processor = self._torch, self._processor
        images = [to_pil(a, self.options.image_size) for a in request.images]
        projected = None
        if request.embeddings:
            if self._bank is not None:
                try:
                    projected = self._bank.project(request.embeddings)
                except UsageError as exc:
                    raise BackendError(str(exc), why="model") from None
            elif not self._warned_embeddings:
                self._warned_embeddings = True
                log.warning("transformers: the request's embeddings (%s) are ignored: no projector weights "
                            "(llm.projectors)", ", ".join(sorted(request.embeddings)))
        n_ctx = 0 if projected is None else int(projected.shape[0])
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        if n_ctx:
            content.append({"type": "text", "text": VISION_START + PLACEHOLDER * n_ctx + VISION_END})
        content.append({"type": "text", "text": defang(request.prompt, self._specials)})
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": [{"type": "text",
                                                            "text": defang(request.system, self._specials)}]})
        messages.append({"role": "user", "content": content})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = processor(text=[text], images=images or None, return_tensors="pt").to(self._lm.device)
        if projected is None or n_ctx == 0:
            return batch, None
        ids = batch["input_ids"]
        mask = ids == self._placeholder_id
        if int(mask.sum()) != n_ctx:
            raise BackendError(f"the prompt holds {int(mask.sum())} {PLACEHOLDER} tokens for {n_ctx} projected tokens",
                               why="malformed")
        with torch.no_grad():
            embeds = self._lm.get_input_embeddings()(ids).clone()
            embeds[mask] = projected.to(device=embeds.device, dtype=embeds.dtype)
        return batch, embeds

    def _apply_threads(self) -> None:
        # torch's CPU thread count is kept per thread (OpenMP): set it where the model runs
        n = self.options.threads
        if n > 0 and self._torch.get_num_threads() != n:
            self._torch.set_num_threads(n)

    def _generate_kwargs(self, request: AdviceRequest, batch: Any, embeds: Any, max_new: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(batch)
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
        kwargs["max_new_tokens"] = max(1, int(max_new))
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(request.temperature))
        else:
            kwargs["do_sample"] = False  # greedy (the model's sampling defaults stay unused)
        return kwargs

    def forward_logits(self, request: AdviceRequest) -> Any:
        """The raw logits (float32, on the CPU, shape ``(vocab,)``) of the first token the model would
        write for ``request``: the same inputs as :meth:`stream`, without streaming (for tests)."""
        if self._lm is None:
            raise BackendError("the transformers backend is not started", why="model")
        with self._lock, self._torch.no_grad():
            self._apply_threads()
            batch, embeds = self._inputs(request)
            kwargs = self._generate_kwargs(request, batch, embeds, 1)
            kwargs["do_sample"] = False
            kwargs.pop("temperature", None)
            out = self._lm.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        return out.logits[0][0].float().cpu()

    async def stream(self, request: AdviceRequest) -> AsyncGenerator[str, None]:
        """The answer as it is generated.  Stopping the iteration (``aclose``, a cancelled task)
        stops the generation within one decoding step and joins its thread."""
        if self._lm is None:
            raise BackendError("the transformers backend is not started", why="model")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening
                stop.set()

        thread = threading.Thread(target=self._worker, args=(request, stop, emit), name="transformers-generate",
                                  daemon=True)
        self._active.add(stop)
        thread.start()
        ended = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield value
                    continue
                ended = True
                if kind == "error":
                    raise value
                return
        finally:
            stop.set()
            try:
                while not ended:  # the worker always ends with "done" or "error"
                    kind, _ = await queue.get()
                    ended = kind != "text"
            finally:
                thread.join(JOIN_TIMEOUT_S)  # it has sent its last item: this returns at once
                self._active.discard(stop)

    def _worker(self, request: AdviceRequest, stop: threading.Event, emit: Callable[[str, Any], None]) -> None:
        # wait for the generation before this one, unless this one is called off meanwhile
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if stop.is_set():
                emit("done", None)
                return
        try:
            if stop.is_set():
                emit("done", None)
                return
            if self._lm is None:
                raise BackendError("the transformers backend was closed", why="model")
            self._generate(request, stop, emit)
        except BackendError as exc:
            emit("error", exc)
        except Exception as exc:
            emit("error", _as_backend_error(exc))
        else:
            emit("done", None)
        finally:
            self._lock.release()

    def _generate(self, request: AdviceRequest, stop: threading.Event, emit: Callable[[str, Any], None]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        torch = self._torch

        class _PieceStreamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    emit("text", text)

        class _StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        t0 = time.perf_counter()
        self._apply_threads()
        with torch.no_grad():
            batch, embeds = self._inputs(request)
            if stop.is_set():
                return
            kwargs = self._generate_kwargs(request, batch, embeds, request.max_tokens)
            streamer = _PieceStreamer(self._processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            stopping = StoppingCriteriaList([_StopOnEvent()])
            out = self._lm.generate(**kwargs, streamer=streamer, stopping_criteria=stopping)
        n_prompt = int(batch["input_ids"].shape[1])
        self.last_stats = {
            "prompt_tokens": n_prompt,
            "new_tokens": int(out.shape[1]) - n_prompt,
            "seconds": time.perf_counter() - t0,
            "stopped": stop.is_set(),
            "projected_tokens": 0 if embeds is None else int((batch["input_ids"] == self._placeholder_id).sum()),
            "threads": int(torch.get_num_threads()),
        }


def _as_backend_error(exc: Exception) -> BackendError:
    text = first_line(exc)
    if "out of memory" in text.lower():
        return BackendError(f"transformers: out of memory ({text[:160]})", why="model")
    return BackendError(f"transformers: {type(exc).__name__}: {text[:200]}", why="model")
