"""What the overlay server pushes to its clients (the web page, the native window) and what they answer.

One JSON text message per WebSocket frame, each a msgspec Struct tagged by ``type``, so the page's
JavaScript reads plain JSON and the Python side (the server, the native window, the tests) stays typed:

server -> client
  ``hello``    once, on connect: the protocol version, how long advice stays (``fade_s``), how many
               ticker lines to keep, whether the latency panel starts shown, and the run's name.
  ``advice``   advice as it streams: the same ``wake`` number first with ``final`` false (partial text,
               growing) then once with ``final`` true (the whole text, and the structured fields when
               the answer was valid advice).  ``id`` numbers every push, for the render receipt.
  ``event``    one line for the ticker: an event the trigger decided (what, how urgent, why).
  ``metrics``  the per-stage figures the supervisor gathers, for the latency panel (about once a second).

client -> server
  ``rendered`` the page drew push ``id`` (sent from the next animation frame after it changed the DOM):
               the server times advice emitted -> rendered from it (the overlay stage's ``push_ms``).

Times are media seconds (``t``) as the rest of the copilot tells them; nothing here is wall-clock.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    version: int = PROTOCOL_VERSION
    fade_s: float = 12.0  # advice fades this long after its final text arrived (0: it stays)
    ticker: int = 5  # event lines kept in the ticker
    panel: bool = False  # the latency panel is shown at start (the page toggles it with the L key)
    title: str = ""  # the pipeline's name


class AdvicePush(msgspec.Struct, tag="advice", kw_only=True):
    id: int
    wake: int
    final: bool
    text: str
    t_event: float
    event_kind: str = ""
    priority: str = "high"
    backend: str = ""
    question: str = ""
    # the advice's fields (summary, advice, urgency, ...) when the final answer was valid advice
    structured: dict[str, Any] | None = None


class EventPush(msgspec.Struct, tag="event", kw_only=True):
    id: int
    t: float
    kind: str
    priority: str
    score: float
    why: str = ""  # the first reason or the rarest signals, in a few words


class StageFigures(msgspec.Struct, kw_only=True):
    stage: str
    fps: float  # since the stage started (a source: video frames a second)
    frames: int = 0  # messages handled so far (a source: video frames), for a rate over any window
    p50_ms: float | None = None  # capture to this stage's output
    p95_ms: float | None = None
    dropped: int = 0
    slow: bool = False  # the stage runs slower than real time


class MetricsPush(msgspec.Struct, tag="metrics", kw_only=True):
    id: int
    stages: list[StageFigures]


class Rendered(msgspec.Struct, tag="rendered", kw_only=True):
    id: int


ServerMessage = Hello | AdvicePush | EventPush | MetricsPush
ClientMessage = Rendered

_server_decoder = msgspec.json.Decoder(ServerMessage)
_client_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


def encode(message: ServerMessage | ClientMessage) -> str:
    """The JSON text of one message (a WebSocket text frame)."""
    return _encoder.encode(message).decode()


def decode_server(text: str | bytes) -> ServerMessage:
    """A server message; ``msgspec.ValidationError``/``DecodeError`` for anything else."""
    return _server_decoder.decode(text)


def decode_client(text: str | bytes) -> ClientMessage:
    """A client message; ``msgspec.ValidationError``/``DecodeError`` for anything else."""
    return _client_decoder.decode(text)
