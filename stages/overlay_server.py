"""The overlay's web server: one page at ``/`` and a WebSocket at ``/ws`` that pushes what the copilot says.

aiohttp serves both on the stage's own event loop.  The page (``overlay_page.html`` beside this file)
is self-contained, no CDN: streaming PCs are often offline.  Every client gets its own bounded send
queue and writer task, so a slow browser never holds the pipeline or the other clients back: when its
queue is full the oldest message waiting for it goes (counted by the caller through ``on_drop``).

Bound to loopback by default.  Bound beyond loopback, a ``token`` is required: a request to ``/`` or
``/ws`` without ``?token=`` equal to it gets 403 and nothing else, since an overlay on a LAN would
otherwise show a player's session to anyone who finds the port.

A client that just connected gets ``hello`` and then the current state (the advice still on screen, the
ticker, the latest figures), so an OBS source reloaded mid-game shows what the others show.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from copilot.net import is_loopback
from stages.overlay_protocol import Hello, Rendered, ServerMessage, decode_client, encode

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("overlay_page.html")
def address(scheme: str, host: str, port: int, path: str, token: str | None) -> str:
    """``scheme://host:port/path?token=...`` for a server bound to ``host`` (a wildcard bind is
    reached at this machine's loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    host = f"[{host}]" if ":" in host else host
    query = f"?token={token}" if token else ""
    return f"{scheme}://{host}:{port}{path}{query}"


class _Client:
    """One connected page or window: its socket, its bounded queue and the task writing it."""

    def __init__(self, ws: Any, queue_size: int) -> None:
        self.ws = ws
        self.queue: deque[str] = deque()
        self.size = queue_size
        self.ready = asyncio.Event()
        self.dropped = 0

    def put(self, text: str) -> bool:
        """Queue ``text``; False when the oldest waiting message had to go to make room."""
        dropped = len(self.queue) >= self.size
        if dropped:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(text)
        self.ready.set()
        return not dropped

    async def write(self) -> None:
        while not self.ws.closed:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                await self.ws.send_str(self.queue.popleft())


class OverlayServer:
    """Serves the page and pushes messages to every connected client."""

    def __init__(self, *, host: str, port: int, token: str | None, hello: Hello, max_clients: int = 16,
                 queue_size: int = 64, on_rendered: Callable[[int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"overlay bound to {host} (beyond loopback) needs a token")
        self.host = host
        self.port = port
        self.token = token
        self.hello = hello
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.on_rendered = on_rendered
        self.on_drop = on_drop
        self.clients: set[_Client] = set()
        self.state: Callable[[], list[ServerMessage]] = list  # what a new client is shown first
        self._runner: Any = None
        self._page = ""

    def _address(self, scheme: str, path: str) -> str:
        return address(scheme, self.host, self.port, path, self.token)

    @property
    def url(self) -> str:
        """The page's address (with the token when one is needed), to print and to open."""
        return self._address("http", "/")

    @property
    def ws_url(self) -> str:
        """The WebSocket's address (the native window connects to it)."""
        return self._address("ws", "/ws")

    async def start(self) -> None:
        from aiohttp import web

        self._page = PAGE.read_text(encoding="utf-8")
        app = web.Application()
        app.router.add_get("/", self._serve_page)
        app.router.add_get("/ws", self._serve_ws)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:  # (tests) the port the system chose
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])

    async def close(self) -> None:
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                await c.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def broadcast(self, message: ServerMessage) -> None:
        """Queue ``message`` for every client (never waits: each client's writer sends it)."""
        if not self.clients:
            return
        text = encode(message)
        for c in self.clients:
            if not c.put(text) and self.on_drop is not None:
                self.on_drop("slow_client")

    # -- handlers ----------------------------------------------------------------------------
    def _allowed(self, request: Any) -> bool:
        if not self.token:
            return True
        given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _serve_page(self, request: Any) -> Any:
        from aiohttp import web

        if not self._allowed(request):
            return web.Response(status=403, text="forbidden: this overlay needs its token (?token=...)\n")
        return web.Response(text=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _serve_ws(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        if not self._allowed(request):
            return web.Response(status=403, text="forbidden: this overlay needs its token (?token=...)\n")
        if len(self.clients) >= self.max_clients:
            return web.Response(status=503, text="too many overlay clients\n")
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=1 << 16)
        await ws.prepare(request)
        client = _Client(ws, self.queue_size)
        client.put(encode(self.hello))
        for message in self.state():
            client.put(encode(message))
        self.clients.add(client)
        writer = asyncio.create_task(client.write(), name="overlay-client-writer")
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    answer = decode_client(msg.data)
                except Exception:
                    log.debug("overlay: a client sent something that is not a receipt; ignored")
                    continue
                if isinstance(answer, Rendered) and self.on_rendered is not None:
                    self.on_rendered(answer.id)
        finally:
            self.clients.discard(client)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        return ws
