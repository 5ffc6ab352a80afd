"""Why a connection to a process on another host does not come up, said in one line.

ZeroMQ reconnects silently for ever: a group started by hand on another host whose supervisor
is not running, or whose key file differs, used to wait without a word.  A
:class:`ConnectionWatch` reads the socket's monitor until the first handshake succeeds and
logs one warning per cause on the way: a refused key, a security mechanism on one side only,
or nothing answering at all after ``patience_s``.  It then stops watching (the monitor costs
nothing after that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ConnectionWatch:
    """Watches one connecting socket; create it before ``connect`` so no event is missed."""

    def __init__(self, sock: zmq.Socket[Any], endpoint: str, what: str, actx: zmq.asyncio.Context, *,
                 curve: bool, patience_s: float | None = None, waiting_hint: str = "") -> None:
        self.endpoint = endpoint
        self.what = what
        self.curve = curve
        self.patience_s = patience_s
        self.waiting_hint = waiting_hint
        self.connected = False
        self.said: list[str] = []  # the warnings given, in order
        self._sock = sock
        addr = f"inproc://gamecopilot-monitor-{uuid.uuid4().hex}"
        sock.monitor(addr, _EVENTS)
        self._mon: zmq.asyncio.Socket | None = actx.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(addr)

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.append(text)
            log.warning("%s", text)

    def _failed(self, event: int) -> str:
        where = f"{self.what} at {self.endpoint}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"{where} refused this host's CurveZMQ key (copy the same key file to every host)"
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            side = ("this host has curve_keys and it has not" if self.curve
                    else "it has curve_keys and this host has not")
            return f"{where} speaks another security mechanism: {side} (set the same curve_keys on every host)"
        if self.curve:
            return f"no CurveZMQ handshake with {where}: it holds another key (copy the same key file to every host)"
        return f"the handshake with {where} failed"

    async def run(self) -> None:
        """Until the first handshake succeeds (or cancelled)."""
        mon = self._mon
        if mon is None:
            return
        loop = asyncio.get_running_loop()
        deadline = None if self.patience_s is None else loop.time() + self.patience_s
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    frames = await asyncio.wait_for(mon.recv_multipart(), timeout)
                except TimeoutError:
                    if not self.said:  # (something answers, but a failed handshake was said already)
                        self._say(f"nothing answers at {self.endpoint} ({self.what}) after {self.patience_s:g} s; "
                                  f"still trying{self.waiting_hint}")
                    deadline = None
                    continue
                event = int(parse_monitor_message(frames)["event"])
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = True
                    if self.said:
                        log.warning("reached %s at %s", self.what, self.endpoint)
                    return
                self._say(self._failed(event))
        finally:
            self.close()

    def close(self) -> None:
        if self._mon is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # (the socket is closed already)
            self._sock.disable_monitor()
        self._mon.close()
        self._mon = None
