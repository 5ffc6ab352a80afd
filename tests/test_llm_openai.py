"""The openai reasoner backend against a small local fault server (aiohttp.web on 127.0.0.1).

The fake server plays a good stream, errors, stalls, garbage and refusals of a response_format;
each test checks the one-line BackendError and its ``why``, the counters, and that the same
backend answers again once the server behaves (the pipeline keeps running after a failure).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from copilot.advice import ADVICE_SCHEMA, SCHEMA_TEXT, AdviceRequest, BackendError, BackendOptions, parse_advice
from copilot.net import free_port
from engines.llm_openai import OpenAIBackend, normalise_url, short_reason

pytestmark = pytest.mark.usefixtures("leak_check")

ADVICE = {
    "game_state": "Breakout, 3 lives left, score 12",
    "analysis": "The ball passed the paddle on the left while the paddle was moving right.",
    "advice": "Stay under the ball and move early toward where it will land.",
}
FAST = {"connect_timeout_s": 1.0, "read_timeout_s": 0.4, "retries": 2, "backoff_s": 0.01}

Handler = Callable[["Fake", web.Request, dict[str, Any], int], Awaitable[web.StreamResponse]]


def request(**kw: Any) -> AdviceRequest:
    return AdviceRequest(system="You are a game copilot. Answer with JSON only.",
                         prompt=f"A life was lost. Schema: {SCHEMA_TEXT}", max_tokens=123, temperature=0.3, **kw)


def chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> str:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    obj = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(obj)}\n\n"


def good_lines(text: str | None = None, size: int = 9) -> list[str]:
    text = json.dumps(ADVICE) if text is None else text
    lines = [": ping - keep-alive\n\n", chunk(role="assistant", content="")]
    lines += [chunk(text[i:i + size]) for i in range(0, len(text), size)]
    lines += [chunk(finish="stop"), "data: [DONE]\n\n"]
    return lines


class Fake:
    """The fault server's state: the recorded chat requests and how to answer the next one."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.models_status = 200
        self.owned_by = "llamacpp"
        self.handler: Handler = good
        self.release = asyncio.Event()  # set at teardown: stalled handlers end
        self.disconnected = asyncio.Event()

    def forms(self) -> list[str]:
        return [r.get("response_format", {}).get("type", "prompt") for r in self.requests]

    async def models(self, req: web.Request) -> web.StreamResponse:
        if self.models_status != 200:
            return web.json_response({"error": "no models here"}, status=self.models_status)
        return web.json_response({"object": "list",
                                  "data": [{"id": "fake-model", "object": "model", "owned_by": self.owned_by}]})

    async def chat(self, req: web.Request) -> web.StreamResponse:
        body = await req.json()
        self.requests.append(body)
        self.headers.append(dict(req.headers))
        try:
            return await self.handler(self, req, body, len(self.requests) - 1)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise


async def sse(req: web.Request, lines: list[str], delay: float = 0.0) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(req)
    for line in lines:
        await resp.write(line.encode())
        if delay:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


async def good(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
    return await sse(req, good_lines())


def status(code: int, then: Handler | None = None, times: int = 10**9) -> Handler:
    async def handler(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        if i < times or then is None:
            return web.json_response({"error": {"message": f"server trouble {code}\nsecond line " + "x" * 300}},
                                     status=code)
        return await then(fake, req, body, i)
    return handler


@contextlib.asynccontextmanager
async def serve(fake: Fake, port: int = 0) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        fake.release.set()
        await runner.cleanup()


async def collect(backend: OpenAIBackend, req: AdviceRequest | None = None) -> list[str]:
    return [piece async for piece in backend.stream(req or request())]


async def failing(backend: OpenAIBackend, req: AdviceRequest | None = None) -> BackendError:
    with pytest.raises(BackendError) as info:
        await collect(backend, req)
    return info.value


def assert_one_line(exc: BackendError, url: str) -> None:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, text
    assert url in text, text
    assert len(text) < 400, text


def make(url: str, **kw: Any) -> OpenAIBackend:
    return OpenAIBackend(BackendOptions(url=url, **{**FAST, **kw}))


# -- the good path ------------------------------------------------------------------------------

def test_good_stream_is_valid_advice_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GC_TEST_LLM_KEY", "sekrit")

    async def main() -> None:
        fake = Fake()
        async with serve(fake) as base:
            backend = make(base, api_key_env="GC_TEST_LLM_KEY")  # no /v1: added
            assert backend.url == base + "/v1" and backend.name == "openai" and not backend.takes_images
            await backend.start()
            assert backend.model == "fake-model"
            pieces = await collect(backend)
            await backend.close()
        assert len(pieces) >= 5 and all(pieces)
        assert parse_advice("".join(pieces)) == ADVICE
        body = fake.requests[0]
        assert body["stream"] is True and body["model"] == "fake-model"
        assert body["max_tokens"] == 123 and body["temperature"] == 0.3
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["messages"][1]["content"] == request().prompt
        assert body["response_format"] == {"type": "json_object", "schema": ADVICE_SCHEMA}
        assert fake.headers[0]["Authorization"] == "Bearer sekrit"
        assert backend.structured_output == "json_object"
        assert backend.retries_done == 0 and not backend.failures

    asyncio.run(main())


def test_model_given_or_undiscoverable_and_stream_without_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    async def main() -> None:
        fake = Fake()
        fake.models_status = 404
        async with serve(fake) as base:
            given = make(base + "/v1/", model="my-model")
            await given.start()
            assert given.model == "my-model"
            assert parse_advice("".join(await collect(given))) == ADVICE
            await given.close()
            unknown = make(base)
            assert parse_advice("".join(await collect(unknown))) == ADVICE  # never started
            assert unknown.model == "default"
            await unknown.close()
        assert [r["model"] for r in fake.requests] == ["my-model", "default"]
        assert "Authorization" not in fake.headers[0]

    asyncio.run(main())


# -- HTTP errors and retries --------------------------------------------------------------------

def test_500_on_every_request_is_one_line_http_error_then_recovers() -> None:
    async def main() -> None:
        fake = Fake()
        fake.handler = status(500)
        async with serve(fake) as base:
            backend = make(base)
            await backend.start()
            t0 = time.monotonic()
            exc = await failing(backend)
            assert time.monotonic() - t0 < 3
            assert exc.why == "http" and "500" in str(exc) and "server trouble" in str(exc)
            assert_one_line(exc, backend.url)
            # both structured forms are tried once, then the plain request with its retries
            assert fake.forms() == ["json_object", "json_schema", "prompt", "prompt", "prompt"]
            assert backend.retries_done == 2 and backend.failures["http"] == 1
            assert backend.structured_output == "json_object"  # nothing worked: nothing learnt
            fake.handler = good
            fake.requests.clear()
            assert parse_advice("".join(await collect(backend))) == ADVICE
            assert fake.forms() == ["json_object"]
            await backend.close()

    asyncio.run(main())


def test_503_twice_then_success_is_retried() -> None:
    async def main() -> None:
        fake = Fake()
        fake.handler = status(503, then=good, times=2)
        async with serve(fake) as base:
            backend = make(base)
            pieces = await collect(backend)
            await backend.close()
        assert parse_advice("".join(pieces)) == ADVICE
        assert backend.retries_done == 2 and not backend.failures
        assert fake.forms() == ["json_object"] * 3

    asyncio.run(main())


def test_a_client_error_is_not_retried() -> None:
    async def main() -> None:
        fake = Fake()
        fake.handler = status(404)
        async with serve(fake) as base:
            backend = make(base)
            exc = await failing(backend)
            await backend.close()
        assert exc.why == "http" and "404" in str(exc)
        assert_one_line(exc, backend.url)
        assert len(fake.requests) == 1 and backend.retries_done == 0

    asyncio.run(main())


# -- structured output fallback -----------------------------------------------------------------

def test_json_object_refused_falls_back_to_json_schema_and_remembers() -> None:
    async def handler(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        if body.get("response_format", {}).get("type") != "json_schema":
            return web.json_response({"error": {"message": "unsupported response_format"}}, status=500)
        return await sse(req, good_lines())

    async def main() -> None:
        fake = Fake()
        fake.handler = handler
        async with serve(fake) as base:
            backend = make(base)
            await backend.start()
            first = await collect(backend)
            assert fake.forms() == ["json_object", "json_schema"]
            assert backend.structured_output == "json_schema"
            second = await collect(backend)
            await backend.close()
        assert fake.forms() == ["json_object", "json_schema", "json_schema"]
        assert fake.requests[1]["response_format"]["json_schema"] == {"name": "advice", "schema": ADVICE_SCHEMA,
                                                                      "strict": True}
        assert parse_advice("".join(first)) == parse_advice("".join(second)) == ADVICE
        assert backend.retries_done == 0 and not backend.failures

    asyncio.run(main())


@pytest.mark.parametrize("owner", ["vllm", "sglang"])
def test_vllm_and_sglang_are_asked_with_json_schema_first(owner: str) -> None:
    async def main() -> None:
        fake = Fake()
        fake.owned_by = owner
        async with serve(fake) as base:
            backend = make(base)
            await backend.start()
            assert backend.server == owner and backend.structured_output == "json_schema"
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()
        assert fake.forms() == ["json_schema"]

    asyncio.run(main())


def test_a_server_refusing_every_response_format_gets_the_plain_prompt() -> None:
    async def handler(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        if "response_format" in body:
            return web.json_response({"detail": [{"msg": "Input should be 'text'"}]}, status=422)
        return await sse(req, good_lines())

    async def main() -> None:
        fake = Fake()
        fake.handler = handler
        async with serve(fake) as base:
            backend = make(base)
            await collect(backend)
            await collect(backend)
            await backend.close()
        assert fake.forms() == ["json_object", "json_schema", "prompt", "prompt"]
        assert backend.structured_output == "prompt"

    asyncio.run(main())


# -- timeouts -------------------------------------------------------------------------------------

def test_a_server_that_never_answers_times_out() -> None:
    async def silent(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        await fake.release.wait()
        return web.Response(status=503)

    async def main() -> None:
        fake = Fake()
        fake.handler = silent
        async with serve(fake) as base:
            backend = make(base)
            t0 = time.monotonic()
            exc = await failing(backend)
            assert time.monotonic() - t0 < 2  # read timeouts are not retried
            assert exc.why == "timeout" and backend.failures["timeout"] == 1
            assert_one_line(exc, backend.url)
            assert len(fake.requests) == 1
            fake.handler = good
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()

    asyncio.run(main())


def test_a_stream_that_stalls_mid_answer_times_out_after_its_pieces() -> None:
    async def stalls(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for line in good_lines()[:4]:
            await resp.write(line.encode())
        await fake.release.wait()
        return resp

    async def main() -> None:
        fake = Fake()
        fake.handler = stalls
        async with serve(fake) as base:
            backend = make(base)
            got: list[str] = []
            with pytest.raises(BackendError) as info:
                async for piece in backend.stream(request()):
                    got.append(piece)
            assert info.value.why == "timeout" and "mid-answer" in str(info.value)
            assert_one_line(info.value, backend.url)
            assert len(got) == 2 and len(fake.requests) == 1  # no retry once text was yielded
            fake.handler = good
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()

    asyncio.run(main())


# -- malformed streams ----------------------------------------------------------------------------

MALFORMED = {
    "garbage": [*good_lines()[:3], "data: {this is not json\n\n", *good_lines()[3:]],
    "cut_before_done": good_lines()[:-2],
    "no_choices": [*good_lines()[:3], 'data: {"id": "c1", "object": "chat.completion.chunk"}\n\n'],
    "not_an_object": ["data: [1, 2, 3]\n\n"],
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_stream_is_one_line_malformed(kind: str) -> None:
    async def bad(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        return await sse(req, MALFORMED[kind])

    async def main() -> None:
        fake = Fake()
        fake.handler = bad
        async with serve(fake) as base:
            backend = make(base)
            exc = await failing(backend)
            assert exc.why == "malformed" and backend.failures == {"malformed": 1}
            assert_one_line(exc, backend.url)
            fake.handler = good
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()

    asyncio.run(main())


def test_a_stream_ending_with_finish_reason_but_no_done_is_accepted() -> None:
    async def no_done(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        return await sse(req, good_lines()[:-1])

    async def main() -> None:
        fake = Fake()
        fake.handler = no_done
        async with serve(fake) as base:
            backend = make(base)
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()

    asyncio.run(main())


# -- unreachable ------------------------------------------------------------------------------------

def test_unreachable_in_start_and_stream_then_the_server_comes_up() -> None:
    async def main() -> None:
        port = free_port()
        backend = make(f"http://127.0.0.1:{port}")
        with pytest.raises(BackendError) as info:
            await backend.start()
        exc = info.value
        assert exc.why == "unreachable" and "connection refused" in str(exc) and "gamecopilot llm-server" in str(exc)
        assert_one_line(exc, f"http://127.0.0.1:{port}/v1")
        t0 = time.monotonic()
        exc = await failing(backend)  # the stage keeps calling stream() after a failed start
        assert time.monotonic() - t0 < 2
        assert exc.why == "unreachable" and "--llm-url" in str(exc)
        assert_one_line(exc, backend.url)
        assert backend.failures["unreachable"] == 2 and backend.retries_done == 2
        fake = Fake()
        async with serve(fake, port=port):  # the server is started late: the backend answers
            pieces = await collect(backend)
        assert parse_advice("".join(pieces)) == ADVICE
        assert backend.model == "fake-model"  # learnt on the first call that reached the server
        await backend.close()

    asyncio.run(main())


def test_no_url_is_one_line_naming_the_flag() -> None:
    with pytest.raises(BackendError) as info:
        OpenAIBackend(BackendOptions())
    assert "--llm-url" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("url", "want"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1"),
    ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
    ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1"),
    ("http://127.0.0.1:8080/v1/chat/completions", "http://127.0.0.1:8080/v1"),
    ("localhost:11434", "http://localhost:11434/v1"),
    ("https://example.test/api/v1", "https://example.test/api/v1"),
])
def test_url_normalisation(url: str, want: str) -> None:
    assert normalise_url(url) == want


def test_short_reason_is_one_short_line() -> None:
    assert short_reason(b'{"error": {"message": "bad\\nthing"}}') == "bad thing"
    assert short_reason('{"detail": "nope"}') == "nope"
    long = short_reason("x\n" * 500)
    assert "\n" not in long and len(long) <= 120


# -- images -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("images", [True, False])
def test_images_travel_as_jpeg_data_urls_only_when_enabled(images: bool) -> None:
    from PIL import Image

    frames = [np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8) for i in range(2)]

    async def main() -> None:
        fake = Fake()
        async with serve(fake) as base:
            backend = make(base, images=images, image_size=320)
            assert backend.takes_images is images
            await collect(backend, request(images=frames, image_times=[1.0, 2.0]))
            await backend.close()
        content = fake.requests[0]["messages"][1]["content"]
        if not images:
            assert content == request().prompt
            assert "data:image" not in json.dumps(fake.requests[0])
            return
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        texts = [p["text"] for p in content if p["type"] == "text"]
        assert len(urls) == 2 and texts == [request().prompt]
        for url in urls:
            assert url.startswith("data:image/jpeg;base64,")
            img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert img.format == "JPEG" and img.size == (320, 240)

    asyncio.run(main())


def test_jpeg_without_pillow_uses_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from engines.llm_openai import encode_jpeg

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    data = encode_jpeg(np.zeros((100, 300, 3), np.uint8), 150)
    monkeypatch.undo()
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (150, 50)


# -- cancellation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_stopping_the_iteration_closes_the_response(how: str) -> None:
    async def endless(fake: Fake, req: web.Request, body: dict[str, Any], i: int) -> web.StreamResponse:
        return await sse(req, [chunk("tick ")] * 10_000, delay=0.02)

    async def main() -> None:
        fake = Fake()
        fake.handler = endless
        async with serve(fake) as base:
            backend = make(base, read_timeout_s=5.0)
            got: list[str] = []

            async def consume() -> None:
                async with contextlib.aclosing(backend.stream(request())) as pieces:
                    async for piece in pieces:
                        got.append(piece)
                        if len(got) == 3 and how == "aclose":
                            break

            task = asyncio.ensure_future(consume())
            if how == "cancel":
                while len(got) < 3:
                    await asyncio.sleep(0.01)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(fake.disconnected.wait(), 2)  # the server saw the client go
            assert 3 <= len(got) < 20
            fake.handler = good
            assert parse_advice("".join(await collect(backend))) == ADVICE
            await backend.close()

    asyncio.run(main())
