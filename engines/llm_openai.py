"""The ``openai`` reasoner backend: any OpenAI-compatible chat-completions server.

vLLM, SGLang, llama.cpp's server (``gamecopilot llm-server``, llama-cpp-python) and Ollama all
serve ``POST {base}/chat/completions`` with server-sent events.  This backend sends the stage's
prompt (and, with ``images: true``, the event's frames as JPEG data URLs), streams
``choices[0].delta.content`` back as it arrives, and turns every way the server can fail into a
one-line :class:`~copilot.advice.BackendError` tagged ``unreachable``, ``http``, ``timeout``,
``malformed`` or ``model``.

Structured output: servers disagree on how to be given a JSON schema.  The first request carries
``{"type": "json_object", "schema": ...}`` (llama.cpp's servers); a server that refuses it (400,
422 or 500) is asked with ``{"type": "json_schema", ...}`` (vLLM, SGLang), and one that refuses
that too gets no ``response_format`` at all (the stage's prompt carries the schema and it makes a
repair attempt itself).  The form that worked is kept for the backend's later calls
(:attr:`OpenAIBackend.structured_output`).  A server whose ``GET /models`` says it is vLLM or
SGLang (``owned_by``) is asked with ``json_schema`` first: those take ``json_object`` too but then
only hold the answer to some JSON, not to the schema.

Retries: a connection failure or a 5xx is tried again ``options.retries`` times with exponential
backoff, only before the first piece of text was yielded; a stalled server is a timeout
(``read_timeout_s`` between two pieces), never retried, so a stuck server cannot hold the
reasoner for minutes.

aiohttp is the only import beyond numpy; PIL (or PyAV when PIL is missing) is imported when the
first image is encoded.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import json
import logging
import os
import re
from collections.abc import AsyncGenerator
from fractions import Fraction
from typing import Any, ClassVar

import aiohttp
import numpy as np

from copilot.advice import ADVICE_SCHEMA, AdviceRequest, BackendError, BackendOptions

log = logging.getLogger(__name__)

#: The ``response_format`` forms in the order they are tried; ``prompt`` sends none.
STRUCTURED_FORMS: tuple[str, ...] = ("json_object", "json_schema", "prompt")
#: Statuses that, answered to a request carrying a ``response_format``, mean "try another form".
FALLBACK_STATUSES = frozenset({400, 422, 500})
#: Servers (GET /models ``owned_by``) that are asked with ``json_schema`` first.
JSON_SCHEMA_SERVERS = frozenset({"vllm", "sglang"})
FIX_HINT = "start one (gamecopilot llm-server) or check --llm-url"
REASON_CHARS = 120
JPEG_QUALITY = 85


def normalise_url(url: str | None) -> str:
    """The server's base URL ending in ``/v1``: ``http://host:8080``, ``http://host:8080/v1/``
    and ``http://host:8080/v1/chat/completions`` all give ``http://host:8080/v1``."""
    if url is None or not url.strip():
        raise BackendError("the openai reasoner needs a server: pass --llm-url URL "
                           "(e.g. http://127.0.0.1:8080/v1, from gamecopilot llm-server)", why="unreachable")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    if not text.startswith(("http://", "https://")):
        raise BackendError(f"--llm-url {url!r}: expected an http:// or https:// URL", why="unreachable")
    text = text.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    if not text.endswith("/v1"):
        text += "/v1"
    return text


def short_reason(body: str | bytes) -> str:
    """A server's error body as a short phrase: the ``error.message`` (or ``detail``) of a JSON
    body, else the text, whitespace collapsed and cut to :data:`REASON_CHARS` characters."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = body
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            text = err if isinstance(err, str) else json.dumps(err, separators=(",", ":"))
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 3] + "..."
    return text or "no reason given"


def encode_jpeg(image: np.ndarray, max_side: int, quality: int = JPEG_QUALITY) -> bytes:
    """An RGB uint8 image (HxWx3; gray HxW and RGBA are accepted) as JPEG bytes, scaled down so its
    longer side is at most ``max_side`` pixels.  PIL when installed, else PyAV's mjpeg encoder."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BackendError(f"cannot send an image shaped {arr.shape} (expected HxWx3 RGB)", why="model")
    arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
    h, w = arr.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side > 0 else 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    try:
        from PIL import Image
    except ImportError:
        return _encode_jpeg_av(arr, size, quality)
    img = Image.fromarray(arr, "RGB")
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_jpeg_av(arr: np.ndarray, size: tuple[int, int], quality: int) -> bytes:
    import av

    # yuvj420p wants even sides.
    width, height = max(2, size[0] - size[0] % 2), max(2, size[1] - size[1] % 2)
    frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(width=width, height=height, format="yuvj420p")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    # qscale 2 (best) .. 31 (worst), roughly what a PIL quality maps to.
    q = round(2 + (100 - quality) * 29 / 100)
    codec.options = {"qmin": str(q), "qmax": str(q)}
    packets = [*codec.encode(frame), *codec.encode(None)]
    return b"".join(bytes(p) for p in packets)


def data_url(image: np.ndarray, max_side: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image, max_side)).decode("ascii")


class _Refused(Exception):
    """One HTTP attempt answered with an error status (internal to the retry loop)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.reason = reason


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server as an :class:`~copilot.advice.AdviceBackend`.

    ``failures`` counts the BackendErrors raised, by ``why``; ``retries_done`` the extra tries
    after a connection failure or a 5xx; ``structured_output`` is the ``response_format`` form in
    use (``json_object``, ``json_schema`` or ``prompt``: none, the schema is in the prompt)."""

    name: ClassVar[str] = "openai"

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.url = normalise_url(options.url)
        self.model: str = options.model or "default"
        self.takes_images: bool = bool(options.images)
        self.structured_output: str = STRUCTURED_FORMS[0]
        self.failures: collections.Counter[str] = collections.Counter()
        self.retries_done = 0
        self.server: str | None = None  # who serves it, from GET /models ``owned_by`` (vllm, sglang, ...)
        self._model_known = options.model is not None
        self._tried_forms = False  # a chat request has told which response_format works
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=options.connect_timeout_s,
                                              sock_connect=options.connect_timeout_s,
                                              sock_read=options.read_timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool and check the server (``GET /models``), learning the model's
        id when none was given.  An unreachable server is a BackendError in one line; the backend
        still works afterwards (each :meth:`stream` tries again)."""
        self._ensure_session()
        try:
            await self._discover(strict=True)
        except BackendError as exc:
            self.failures[exc.why] += 1
            raise

    async def close(self) -> None:
        session, self._session, self._session_loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    # -- the answer ----------------------------------------------------------------------------

    async def stream(self, request: AdviceRequest) -> AsyncGenerator[str, None]:
        """POST the request with ``stream: true`` and yield the answer's pieces as they arrive.
        Closing the iteration (``aclose``, a cancelled task) closes the HTTP response at once, so
        the server stops generating."""
        try:
            messages = self._messages(request)
        except BackendError as exc:
            self.failures[exc.why] += 1
            raise
        resp = await self._open(messages, request)
        done = False
        try:
            async with contextlib.aclosing(self._pieces(resp)) as pieces:
                async for piece in pieces:
                    yield piece
            done = True
        finally:
            if done:
                resp.release()
            else:
                resp.close()

    # -- internals -----------------------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session belongs to its loop; one left over from another loop cannot be closed here.
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers())
            self._session_loop = loop
        return self._session

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.options.api_key_env, "").strip() if self.options.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _fail(self, message: str, why: str) -> BackendError:
        """A BackendError, counted in :attr:`failures` (raise it)."""
        self.failures[why] += 1
        return BackendError(message, why=why, retryable=why in ("unreachable", "http", "timeout"))

    def _unreachable(self, exc: BaseException) -> tuple[str, str]:
        """The message and ``why`` of a failed connection."""
        if isinstance(exc, TimeoutError):
            return (f"cannot reach the LLM server at {self.url} (no connection within "
                    f"{self.options.connect_timeout_s:g} s): {FIX_HINT}", "timeout")
        return f"cannot reach the LLM server at {self.url} ({_conn_reason(exc)}): {FIX_HINT}", "unreachable"

    async def _discover(self, *, strict: bool) -> None:
        """``GET /models``: reachability and, when no model was given, the served model's id.
        ``strict`` (start): failures are BackendErrors (not counted here).  Otherwise a connection
        failure propagates as the aiohttp exception (for the retry loop) and anything else
        leaves the model at ``default``."""
        session = self._ensure_session()
        try:
            async with session.get(f"{self.url}/models") as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
            if not strict:
                raise
            if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise BackendError(f"the LLM server at {self.url} did not answer GET /models within "
                                   f"{self.options.read_timeout_s:g} s: {FIX_HINT}", why="timeout") from None
            message, why = self._unreachable(exc)
            raise BackendError(message, why=why, retryable=True) from None
        except aiohttp.ClientError as exc:
            if strict:
                raise BackendError(f"the LLM server at {self.url} answered GET /models badly "
                                   f"({_conn_reason(exc)}): {FIX_HINT}", why="http") from None
            return
        if status in (401, 403):
            if strict:
                raise BackendError(f"the LLM server at {self.url} refused the API key (HTTP {status}, "
                                   f"{short_reason(body)}): set {self.options.api_key_env}", why="http")
            return
        first: dict[str, Any] = {}
        if status == 200:
            try:
                first = json.loads(body)["data"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                first = {}
            if not isinstance(first, dict):
                first = {}
        owner = first.get("owned_by")
        self.server = owner if isinstance(owner, str) else None
        if not self._tried_forms and self.server in JSON_SCHEMA_SERVERS:
            # vLLM and SGLang also accept json_object but then ignore its schema: ask them with theirs
            self.structured_output = "json_schema"
        if self._model_known:
            return
        model_id = first.get("id")
        if isinstance(model_id, str) and model_id:
            self.model = model_id
        else:
            log.info("the LLM server at %s names no model (GET /models: HTTP %s); using %r",
                     self.url, status, self.model)
        self._model_known = True

    def _messages(self, request: AdviceRequest) -> list[dict[str, Any]]:
        content: str | list[dict[str, Any]] = request.prompt
        if self.takes_images and request.images:
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": data_url(img, self.options.image_size)}}
                for img in request.images
            ]
            parts.append({"type": "text", "text": request.prompt})
            content = parts
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": content})
        return messages

    def _payload(self, messages: list[dict[str, Any]], request: AdviceRequest, form: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if form == "json_object":
            payload["response_format"] = {"type": "json_object", "schema": ADVICE_SCHEMA}
        elif form == "json_schema":
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "advice", "schema": ADVICE_SCHEMA, "strict": True}}
        return payload

    async def _post(self, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """One attempt: the open response (status 200) or :class:`_Refused`."""
        session = self._ensure_session()
        resp = await session.post(f"{self.url}/chat/completions", json=payload)
        if resp.status == 200:
            return resp
        try:
            body = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            body = b""
        finally:
            resp.close()
        raise _Refused(resp.status, short_reason(body) if body else (resp.reason or "no reason given"))

    async def _open(self, messages: list[dict[str, Any]], request: AdviceRequest) -> aiohttp.ClientResponse:
        """The streaming response, after the response_format fallback and the retries."""
        form_index = STRUCTURED_FORMS.index(self.structured_output)
        refusals: list[str] = []
        tries = 0
        while True:
            form = STRUCTURED_FORMS[form_index]
            try:
                if not self._model_known:
                    await self._discover(strict=False)
                resp = await self._post(self._payload(messages, request, form))
            except _Refused as exc:
                if exc.status in FALLBACK_STATUSES and form != "prompt":
                    refusals.append(f"{form}: HTTP {exc.status} ({exc.reason})")
                    log.info("the LLM server at %s refused response_format %s (HTTP %s: %s); trying the next form",
                             self.url, form, exc.status, exc.reason)
                    form_index += 1
                    continue
                if exc.status >= 500 and tries < self.options.retries:
                    await self._backoff(tries)
                    tries += 1
                    continue
                after = f" after {tries + 1} tries" if tries else ""
                hint = f": check {self.options.api_key_env}" if exc.status in (401, 403) else ""
                raise self._fail(f"the LLM server at {self.url} answered HTTP {exc.status} ({exc.reason}){after}{hint}",
                                 "http") from None
            except TimeoutError as exc:
                if isinstance(exc, aiohttp.ConnectionTimeoutError) and tries < self.options.retries:
                    await self._backoff(tries)
                    tries += 1
                    continue
                if isinstance(exc, aiohttp.ConnectionTimeoutError):
                    raise self._fail(*self._unreachable(exc)) from None
                raise self._fail(f"the LLM server at {self.url} sent no answer within "
                                 f"{self.options.read_timeout_s:g} s (read_timeout_s): it is stuck or overloaded",
                                 "timeout") from None
            except (aiohttp.ClientConnectionError, OSError) as exc:
                if tries < self.options.retries:
                    await self._backoff(tries)
                    tries += 1
                    continue
                raise self._fail(*self._unreachable(exc)) from None
            except aiohttp.ClientError as exc:
                raise self._fail(f"the LLM server at {self.url} answered badly ({_conn_reason(exc)})",
                                 "malformed") from None
            # A success that needed retries may have been a passing outage rather than a refusal:
            # then the preferred form is kept for the next call.
            self._tried_forms = True
            if form != self.structured_output and tries == 0:
                log.info("the LLM server at %s takes response_format %s (%s)", self.url, form, "; ".join(refusals))
                self.structured_output = form
            return resp

    async def _backoff(self, tries: int) -> None:
        self.retries_done += 1
        await asyncio.sleep(max(0.0, self.options.backoff_s) * 2**tries)

    async def _pieces(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
        """The text pieces of a chat-completions SSE stream."""
        finished = False
        try:
            while True:
                raw = await resp.content.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue  # event separators, comments (pings), event:/id:/retry: fields
                data = line[5:].removeprefix(" ")
                if data.strip() == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise self._fail(f"the LLM server at {self.url} sent a malformed stream "
                                     f"(not JSON: {short_reason(data)})", "malformed") from None
                if not isinstance(chunk, dict):
                    raise self._fail(f"the LLM server at {self.url} sent a malformed stream "
                                     f"(a chunk that is not an object: {short_reason(data)})", "malformed")
                if "error" in chunk and "choices" not in chunk:
                    raise self._fail(f"the LLM server at {self.url} failed mid-answer "
                                     f"({short_reason(data)})", "model")
                choices = chunk.get("choices")
                if not isinstance(choices, list):
                    raise self._fail(f"the LLM server at {self.url} sent a malformed stream "
                                     f"(a chunk without choices: {short_reason(data)})", "malformed")
                if not choices:
                    continue  # a usage-only chunk
                choice = choices[0]
                if not isinstance(choice, dict):
                    raise self._fail(f"the LLM server at {self.url} sent a malformed stream "
                                     f"(a choice that is not an object: {short_reason(data)})", "malformed")
                delta = choice.get("delta")
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str) and content:
                    yield content
                if choice.get("finish_reason"):
                    finished = True
        except TimeoutError:
            raise self._fail(f"the LLM server at {self.url} sent nothing for {self.options.read_timeout_s:g} s "
                             "mid-answer (read_timeout_s): it is stuck or overloaded", "timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise self._fail(f"the LLM server at {self.url} broke off the answer ({_conn_reason(exc)})",
                             "malformed") from None
        if not finished:
            raise self._fail(f"the LLM server at {self.url} sent a malformed stream (it ended without "
                             "[DONE] or a finish_reason)", "malformed")


def _conn_reason(exc: BaseException) -> str:
    """A connection failure in a few words: ``connection refused``, ``name not resolved``, ..."""
    inner: BaseException | None = exc
    while inner is not None:
        if isinstance(inner, aiohttp.ClientConnectorDNSError):
            return "host name not resolved"
        if isinstance(inner, aiohttp.ServerDisconnectedError):
            return "the server closed the connection"
        if isinstance(inner, OSError) and inner.errno:
            # asyncio's "Connect call failed (...)" hides the errno's own words
            return os.strerror(inner.errno).lower()
        inner = getattr(inner, "os_error", None) or inner.__cause__
    text = re.sub(r"\s+", " ", str(exc)).strip()
    text = text[:REASON_CHARS] if text else type(exc).__name__
    return text


__all__ = [
    "FALLBACK_STATUSES",
    "JSON_SCHEMA_SERVERS",
    "STRUCTURED_FORMS",
    "OpenAIBackend",
    "data_url",
    "encode_jpeg",
    "normalise_url",
    "short_reason",
]
