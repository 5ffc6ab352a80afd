"""The contract between the reasoner stage and its backends.

The reasoner stage (``stages/reasoner.py``) decides *when* to ask and *what* goes into the
question; a backend (``engines/llm_*.py``: ``rules``, ``openai``, ``transformers``) only answers.
Between them:

* :class:`AdviceRequest`: what a backend is asked.  The text prompt the stage built, the event's
  frames (RGB uint8, oldest first, the keyframe last), embedding tokens for a ProjectorBank
  (HiCo, thumbnails: ``{source: (n, dim) float32}``), and the facts the prompt was built from
  (the event record, the game state, the last events, the profile's notes) for a backend that
  reasons without a model (rules).
* :class:`AdviceBackend`: ``start()``, ``stream(request)`` yielding text as it is generated,
  ``close()``.  A failure the user must hear about is a :class:`BackendError` with one line.
* The advice JSON every backend produces: ``{"game_state", "analysis", "advice"}``, three
  strings (:data:`ADVICE_SCHEMA`), checked by :func:`parse_advice`.  A backend whose server can
  be given the schema (``response_format``) passes it on; otherwise the schema is in the prompt
  and the stage makes one repair attempt (:func:`repair_request`).

Backends register as ``gamecopilot.reasoners`` entry points (pyproject.toml); the core names none.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec
import numpy as np

from copilot.errors import UsageError

ADVICE_FIELDS: tuple[str, ...] = ("game_state", "analysis", "advice")
ADVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "game_state": {"type": "string", "minLength": 1, "maxLength": 100,
                       "description": "what is on screen and in the HUD right now"},
        "analysis": {"type": "string", "minLength": 1, "maxLength": 140, "description": "what just happened and why"},
        "advice": {"type": "string", "minLength": 1, "maxLength": 140,
                   "description": "one short, concrete thing the player should do next"},
    },
    "required": list(ADVICE_FIELDS),
    "additionalProperties": False,
}
# maxLength: advice is read at a glance beside a game, and a bound on the answer's length is a bound
# on its latency (a server that takes the schema stops the fields there; parse_advice does not check it)
SCHEMA_TEXT = json.dumps(ADVICE_SCHEMA, separators=(",", ":"))


class BackendError(Exception):
    """A backend could not answer, in one line fit for the console (``why``: a short tag the
    reasoner counts failures by: ``unreachable``, ``http``, ``timeout``, ``malformed``, ``model``)."""

    def __init__(self, message: str, why: str = "model", retryable: bool = False) -> None:
        super().__init__(message)
        self.why = why
        self.retryable = retryable


class AdviceRequest(msgspec.Struct, kw_only=True):
    """One question to a backend.  ``prompt`` is complete on its own; the other fields say what
    it was built from, for a backend that uses them directly."""

    system: str
    prompt: str
    images: list[np.ndarray] = []  # RGB uint8 HxWx3, oldest first, the event's keyframe last
    image_times: list[float] = []  # media time of each image (s)
    embeddings: dict[str, np.ndarray] = {}  # source -> (n, dim) float32 tokens for a ProjectorBank
    event: dict[str, Any] = {}  # the event's record (events JSONL format); {} for a question
    question: str = ""  # a player's question, when the wake is one
    state: dict[str, Any] = {}  # the current game state: {"values", "previous", "changed_at"}
    recent: list[dict[str, Any]] = []  # the last events before this one (records)
    notes: str = ""  # the profile's game notes
    context: str = ""  # HiCo context and timeline facts (empty until those exist)
    max_tokens: int = 200
    temperature: float = 0.2


class BackendOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How a backend is made: the reasoner stage's ``backend:`` params with the command line's
    ``--llm-url``/``--llm-model`` over them.  Each backend reads what it needs."""

    url: str | None = None  # openai: the server's base URL (http://127.0.0.1:8080/v1)
    model: str | None = None  # openai: the served model's id; transformers: a local path or a HF cache id
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the API key (if any)
    images: bool = False  # openai: the model takes images (JPEG data URLs); off: text evidence only
    image_size: int = 448  # images are scaled down to at most this many pixels on their longer side
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0  # openai: longest wait for the next streamed piece
    retries: int = 2  # openai: further tries after a connection failure or a 5xx, with backoff
    backoff_s: float = 0.5
    lora: str | None = None  # transformers: a peft LoRA adapter directory
    projectors: str | None = None  # transformers: ProjectorBank weights (off without them)
    device: str = "auto"  # transformers: auto (cuda when there is one), cpu, cuda, cuda:N
    threads: int = 0  # transformers on the CPU: torch threads (0: torch's default)
    rules: list[dict[str, Any]] = []  # rules: the profile's ``advice`` rules


@runtime_checkable
class AdviceBackend(Protocol):
    """What the reasoner stage drives.  ``name``: the backend kind (rules, openai, transformers);
    ``model``: what answers (a model id, a path, ``rules``); ``takes_images``: whether the
    request's images reach the model (a text-only model gets the text evidence)."""

    name: ClassVar[str]
    model: str
    takes_images: bool

    def __init__(self, options: BackendOptions) -> None: ...

    async def start(self) -> None:
        """Load the model or check the server; raise :class:`BackendError` (or UsageError for a bad
        path) in one line."""

    def stream(self, request: AdviceRequest) -> AsyncIterator[str]:
        """The answer as it is generated, in pieces of text.  Cancelling the iteration stops the
        generation (a higher-priority event preempted it)."""
        ...

    async def close(self) -> None:
        """Release the model, the connection pool."""


def format_value(v: Any) -> str:
    """A HUD value as a prompt or a rule line shows it: ``3`` not ``3.0``."""
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def schema_problems(obj: Any) -> list[str]:
    """What makes ``obj`` not advice: empty when it fits :data:`ADVICE_SCHEMA`."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing {k!r}" for k in ADVICE_FIELDS if k not in obj]
    problems += [f"{k!r} is not a string" for k in ADVICE_FIELDS if k in obj and not isinstance(obj[k], str)]
    problems += [f"{k!r} is empty" for k in ADVICE_FIELDS if isinstance(obj.get(k), str) and not obj[k].strip()]
    problems += [f"unexpected key {k!r}" for k in obj if k not in ADVICE_FIELDS]
    return problems


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_advice(text: str) -> dict[str, str] | None:
    """The advice in a model's answer, or None.  Takes the whole answer as JSON, else a fenced
    code block, else the first balanced ``{...}`` in it (small models wrap JSON in prose); keys
    outside the schema are dropped, the three fields must be non-empty strings."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    obj_text = _first_object(text)
    if obj_text:
        candidates.append(obj_text)
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            obj = {k: v for k, v in obj.items() if k in ADVICE_FIELDS}
            if not schema_problems(obj):
                return {k: obj[k].strip() for k in ADVICE_FIELDS}
    return None


def _first_object(text: str) -> str | None:
    start = text.find("{")
    if start < 0:
        return None
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def streamed_field(text: str, key: str = "advice") -> str:
    """The value of ``key`` in JSON still being generated (``{"advice": "Jump ov`` gives ``Jump ov``):
    what a partial Advice shows while the model writes.  Empty until the key's string has begun."""
    m = re.search(r'"' + re.escape(key) + r'"\s*:\s*"', text)
    if not m:
        return ""
    out: list[str] = []
    esc = False
    for c in text[m.end():]:
        if esc:
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/"}.get(c, c))
            esc = False
        elif c == "\\":
            esc = True
        elif c == '"':
            break
        else:
            out.append(c)
    return "".join(out)


def repair_request(request: AdviceRequest, answer: str) -> AdviceRequest:
    """The one repair attempt: the same facts, the bad answer, and the schema once more."""
    problems = "; ".join(_answer_problems(answer)) or "not valid JSON"
    prompt = (f"{request.prompt}\n\nYour previous answer was not valid advice JSON ({problems}):\n"
              f"{answer[:800]}\n\nAnswer again with only one JSON object with exactly these string fields: "
              f"game_state, analysis, advice. Schema: {SCHEMA_TEXT}")
    return msgspec.structs.replace(request, prompt=prompt, images=[], image_times=[], embeddings={})


def _answer_problems(answer: str) -> list[str]:
    obj_text = _first_object(answer)
    if obj_text is None:
        return ["no JSON object"]
    try:
        return schema_problems(json.loads(obj_text))
    except ValueError:
        return ["the JSON does not parse"]


BACKENDS = ("rules", "openai", "transformers")


def choose_backend(kind: str, url: str | None, model: str | None) -> tuple[str, str]:
    """The backend to run for ``--reasoner kind`` and why, in words for the one line the CLI prints.

    ``auto`` takes a configured local model (``--llm-model`` without ``--llm-url``, or a model
    path that is a directory), else a configured endpoint (``--llm-url``), else rules.  A backend
    asked for by name without what it needs is a :class:`~copilot.errors.UsageError`.
    """
    if kind == "auto":
        if model and (not url or Path(model).expanduser().is_dir()):
            return "transformers", f"auto: the local model {model}"
        if url:
            return "openai", f"auto: the server at {url}" + (f" ({model})" if model else "")
        return "rules", "auto: no model configured (--llm-url URL or --llm-model PATH to use one)"
    if ":" in kind:  # module.path:Class, a backend of the user's own (see copilot/registry.py)
        return kind, f"the backend {kind}"
    if kind == "openai" and not url:
        raise UsageError("--reasoner openai needs --llm-url URL (an OpenAI-compatible server: vLLM, SGLang, "
                         "llama.cpp's server, Ollama; `gamecopilot llm-server` starts a small one on the CPU)")
    if kind == "transformers" and not model:
        raise UsageError("--reasoner transformers needs --llm-model PATH (a local checkpoint, e.g. "
                         "Qwen3-VL-8B-Instruct)")
    if kind not in (*BACKENDS, "none"):
        raise UsageError(f"--reasoner: unknown backend {kind!r} (auto, {', '.join(BACKENDS)}, none)")
    what = {"rules": "profile rules, no model", "openai": f"the server at {url}",
            "transformers": f"the local model {model}", "none": "off"}[kind]
    return kind, what
