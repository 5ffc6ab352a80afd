"""ZeroMQ links between stages, with the two delivery policies of the design.

A link has exactly one producer, which binds an XPUB socket, and any number of consumers,
which connect SUB sockets.  XPUB (rather than PUB) lets the producer see subscriptions arrive,
so a run can wait for every consumer before the first frame instead of losing it to the
"slow joiner" problem.

``latest`` (video, anything whose value decays)
    Small high-water marks on both ends.  A consumer that falls behind loses frames inside
    ZeroMQ; it sees the gap in ``seq`` and counts it (reason ``hwm``).  On receive it drains
    whatever is queued and keeps only the newest (``superseded``), and drops a frame older than
    ``max_age_ms`` (``stale``), as lerobot's ``read_latest(max_age_ms)`` does.  A slow consumer
    never slows the producer or the other consumers.

``ordered`` (audio, events, advice, control)
    ``XPUB_NODROP``: when any consumer's queue is full the send fails and the producer waits
    (backpressure) up to ``block_ms``; past that the message is dropped, counted and warned
    about.  ``block_ms=None`` blocks for ever (lossless runs such as ``--speed max``).

Control messages (end of stream) always take the ordered path, even on a latest link.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import zmq
import zmq.asyncio

from copilot.clock import SYSTEM_CLOCK, Clock
from copilot.codec import Codec, CodecError
from copilot.curve import CurveKeys, is_tcp, secure_client, secure_server
from copilot.errors import UsageError
from copilot.messages import Envelope, Heartbeat
from copilot.reach import ConnectionWatch

log = logging.getLogger(__name__)

Policy = Literal["latest", "ordered"]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# a link warns that consumers are missing once they have been gone this long (they are counted at once)
MISSING_WARN_AFTER_S = 1.0


@dataclass(frozen=True)
class LinkSpec:
    """Everything both ends of a link must agree on."""

    name: str
    endpoint: str
    policy: Policy = "ordered"
    hwm: int = 64
    max_age_ms: float | None = None
    block_ms: float | None = 2000.0
    # the pipeline's CurveZMQ keypair: set on tcp:// links when the pipeline has curve_keys
    curve: CurveKeys | None = None


@dataclass
class DropCounter:
    """Counts messages lost on one end of a link, by reason."""

    by_reason: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.by_reason[reason] += n

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


_contexts: dict[int, tuple[zmq.Context, zmq.asyncio.Context]] = {}


def contexts() -> tuple[zmq.Context, zmq.asyncio.Context]:
    """The process's ZeroMQ context, as a sync and an asyncio view of the same libzmq context.

    Sharing one libzmq context is what makes ``inproc://`` work between sync and async sockets.
    A forked or spawned child gets its own.
    """
    pid = os.getpid()
    if pid not in _contexts:
        sync = zmq.Context()
        _contexts.clear()
        _contexts[pid] = (sync, zmq.asyncio.Context.shadow(sync.underlying))
    return _contexts[pid]


def end_process_context(timeout_s: float = 2.0) -> None:
    """Terminate this process's ZeroMQ context before the process exits, so the messages its
    closed sockets still hold are sent within each socket's linger (a group's ``Done`` on the
    control socket).  pyzmq does not terminate contexts at interpreter exit, and the I/O thread
    dies with the process: on a loaded machine a message just queued was lost.  Bounded: a socket
    left open would block the termination, which then is given up after ``timeout_s``."""
    ctx = _contexts.pop(os.getpid(), None)
    if ctx is None:
        return
    ender = threading.Thread(target=ctx[0].term, name="zmq-term", daemon=True)
    ender.start()
    ender.join(timeout_s)


def check_bind_endpoint(endpoint: str, *, curve: bool = False) -> None:
    """Refuse to bind anything but loopback unless CurveZMQ is configured."""
    if not endpoint.startswith("tcp://"):
        return
    host = urlparse(endpoint.replace("tcp://", "tcp://", 1)).hostname or ""
    if host not in LOOPBACK_HOSTS and not curve:
        raise ValueError(
            f"refusing to bind {endpoint}: only loopback is allowed without CurveZMQ keys "
            "(make a keypair with gamecopilot keys DIR and set curve_keys: DIR/copilot.key_secret)"
        )


def bind(sock: zmq.Socket[Any], endpoint: str, what: str, keys: CurveKeys | None,
         binder: str = "the link's producer") -> None:
    """``sock.bind`` as a CURVE server when ``keys`` are set (tcp:// only), with an address this
    host cannot take (not one of its own, a port another program holds, a privileged port)
    reported as bad input in one line instead of a crash the supervisor would restart in vain."""
    secure_server(sock, keys, endpoint)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EACCES, errno.EINVAL, errno.ENODEV):
            hint = f" (it must be an address of the host that binds it: {binder}'s)" \
                if exc.errno == errno.EADDRNOTAVAIL else ""
            raise UsageError(f"{what}: cannot bind {endpoint}: {os.strerror(exc.errno)}{hint}") from None
        raise


IPC_PATH_MAX = 107  # a Unix socket path: sun_path holds 108 bytes with the final NUL


def check_ipc_endpoint(endpoint: str) -> None:
    """Refuse an ``ipc://`` path too long for a Unix socket (ZeroMQ would fail at bind time)."""
    if endpoint.startswith("ipc://") and len(endpoint[len("ipc://"):].encode()) > IPC_PATH_MAX:
        raise ValueError(f"the socket path {endpoint[len('ipc://'):]} is longer than {IPC_PATH_MAX} bytes "
                         "(a shorter TMPDIR, pipeline name or link name fixes it)")


def prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)


class Publisher:
    """The producing end of a link (binds an XPUB)."""

    def __init__(self, spec: LinkSpec, *, lossless: bool = False, clock: Clock = SYSTEM_CLOCK):
        self.spec = spec
        self.lossless = lossless
        self.clock = clock
        self.codec = Codec()
        self.drops = DropCounter()
        self.sent = 0
        self.subscriptions = 0
        # How many consumers the pipeline declares (set by the group).  While fewer are
        # subscribed (a consumer group died and is being restarted, or never started), each
        # message is counted as dropped for every missing one: ZeroMQ would lose it silently.
        self.expected_consumers: int | None = None
        self._missing_warned = False
        self._missing_since_ns: int | None = None
        # set when the run is stopping: consumers leaving then is expected, so missing ones are
        # still counted but no longer warned about (the warnings buried the line saying why it stopped)
        self.stopping = False
        self._seq = 0
        sync_ctx, _ = contexts()
        sock = sync_ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        # Every unsubscription too (not only the last one), so :meth:`end_stream` knows when
        # each consumer has taken the end of stream or gone away.
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        ordered = spec.policy == "ordered" or lossless
        if ordered:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDHWM, max(1, spec.hwm))
        try:
            check_bind_endpoint(spec.endpoint, curve=spec.curve is not None)
            prepare_ipc(spec.endpoint)
            bind(sock, spec.endpoint, f"links.{spec.name}", spec.curve)
            last = sock.getsockopt(zmq.LAST_ENDPOINT)  # before the alias is bound
            self._bound = last.decode() if isinstance(last, bytes) and last else spec.endpoint
            # An inproc:// alias for consumers in this process (see Subscriber's ``via``): they take
            # each message by reference, where every ipc:// or tcp:// consumer costs the producer a
            # copy through the kernel (a 640x480 frame is 0.9 MB).  Unique per socket, so a producer
            # made again in this process never finds its name still taken by the last one.  Not on
            # a CURVE link: the socket's security would apply to the alias too.
            self.local_endpoint: str | None = None
            if not spec.endpoint.startswith("inproc://") and spec.curve is None:
                self.local_endpoint = f"inproc://link-alias/{spec.name}/{uuid.uuid4().hex}"
                sock.bind(self.local_endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock
        self._ordered = ordered

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (a ``tcp://127.0.0.1:*`` wildcard resolved to its port)."""
        return self._bound

    def _poll_subscriptions(self) -> None:
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscriptions += 1
            elif msg[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)

    async def wait_subscribers(self, n: int, timeout_s: float) -> bool:
        """Wait until ``n`` consumers have subscribed (True) or the timeout passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._poll_subscriptions()
            if self.subscriptions >= n:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _count_missing_consumers(self) -> None:
        if self.expected_consumers is None:
            return
        self._poll_subscriptions()
        missing = self.expected_consumers - self.subscriptions
        if missing > 0:
            self.drops.add("no_consumer", missing)
            now = self.clock.now_ns()
            if self._missing_since_ns is None:
                self._missing_since_ns = now
            # warned only once consumers have been gone a while: when a group fails, the others
            # see its consumers leave a moment before the supervisor's stop reaches them
            gone_long = now - self._missing_since_ns >= MISSING_WARN_AFTER_S * 1e9
            if gone_long and not self._missing_warned and not self.stopping:
                self._missing_warned = True
                log.warning("link %s: %d of %d consumers not connected; their messages are dropped and counted",
                            self.spec.name, missing, self.expected_consumers)
        else:
            self._missing_since_ns = None
            if self._missing_warned and not self.stopping:
                self._missing_warned = False
                log.warning("link %s: all %d consumers connected again", self.spec.name, self.expected_consumers)

    async def send(self, env: Envelope) -> bool:
        """Send ``env`` (its ``seq`` is assigned here).  False if it was dropped and counted."""
        env.seq = self.next_seq()
        frames = self.codec.encode(env)
        if env.kind != "control":
            self._count_missing_consumers()
        ordered = self._ordered or env.kind == "control"
        if not ordered:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # pragma: no cover - plain XPUB drops silently instead
                self.drops.add("hwm")
                return False
            self.sent += 1
            return True
        return await self._send_ordered(frames, env)

    async def _send_ordered(self, frames: list, env: Envelope) -> bool:  # type: ignore[type-arg]
        # the end of stream must get through; a heartbeat is only a hint and may be dropped like data
        must_arrive = env.kind == "control" and not isinstance(env.payload, Heartbeat)
        block_ms = None if (self.lossless or must_arrive) else self.spec.block_ms
        loop = asyncio.get_running_loop()
        deadline = None if block_ms is None else loop.time() + block_ms / 1000
        # Control on a latest link: a plain XPUB drops silently when a consumer's queue is full,
        # which lost the end of stream whenever a consumer was behind (it then waited for ever).
        # XPUB_NODROP is read at send time, so it is switched on for this one send.
        toggle = not self._ordered
        if toggle:
            self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            return await self._send_retry(frames, env, block_ms, deadline, loop)
        finally:
            if toggle:
                self._sock.setsockopt(zmq.XPUB_NODROP, 0)

    async def _send_retry(
        self, frames: list, env: Envelope, block_ms: float | None, deadline: float | None,  # type: ignore[type-arg]
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        backoff = 0.0002
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
                return True
            except zmq.Again:
                if deadline is not None and loop.time() >= deadline:
                    self.drops.add("backpressure")
                    log.warning(
                        "link %s: consumer blocked for %.0f ms, dropped a %s message",
                        self.spec.name,
                        block_ms,
                        env.kind,
                    )
                    return False
                self._poll_subscriptions()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.005)

    async def end_stream(self, env: Envelope, *, timeout_s: float | None = None, resend_s: float = 0.05) -> bool:
        """Send the end of stream ``env`` and wait until every consumer has taken it.

        A consumer unsubscribes when it reads the end of stream (or its socket goes away), so
        the producer knows nothing it sent is still in flight before it closes its socket
        (closing with ``linger=0`` would discard queued messages).  The end of stream is sent
        again every ``resend_s``: a latest link's consumer that fell behind may have had it
        dropped by ZeroMQ, and a consumer restarted by the supervisor subscribes afresh.
        Resends carry the same ``seq``, so they never look like lost messages.  Returns False
        if consumers were still subscribed after ``timeout_s`` (None waits as long as it takes:
        a stop request cancels the wait).
        """
        env.seq = self.next_seq()
        frames = self.codec.encode(env)
        await self._send_ordered(frames, env)
        self.stopping = True  # consumers now leave as they take it
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            self._poll_subscriptions()
            if self.subscriptions <= 0:
                return True
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(resend_s)
            with contextlib.suppress(zmq.Again):  # a full ordered queue: the first copy is still in it
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        self._sock.close(linger=0)


class ProducerGone(Exception):
    """Raised by a :class:`Subscriber` whose producer finished (see ``producer_gone``)."""


class Subscriber:
    """The consuming end of a link (connects a SUB).

    Receiving uses a plain socket: a non-blocking read first, and only when nothing is
    queued does it wait on the socket's file descriptor in the event loop.  That skips
    zmq.asyncio's per-call futures and poller, about half of our per-hop overhead.
    """

    def __init__(self, spec: LinkSpec, *, lossless: bool = False, clock: Clock = SYSTEM_CLOCK,
                 via: str | None = None):
        """``via``: connect there instead of ``spec.endpoint`` (the ``local_endpoint`` of a
        producer in this process)."""
        self.spec = spec
        self.lossless = lossless
        self.clock = clock
        self.codec = Codec()
        self.drops = DropCounter()
        self.received = 0
        self.malformed = 0
        # called once, as the first message is taken (before any stage sees it)
        self.on_first_message: Callable[[], None] | None = None
        self._last_seq: int | None = None
        sync_ctx, _ = contexts()
        sock: zmq.Socket[bytes] = sync_ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        hwm = spec.hwm if (spec.policy == "ordered" or lossless) else max(1, spec.hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoint = via or spec.endpoint  # where this consumer reads from
        secure_client(sock, spec.curve, self.endpoint)
        # across hosts, a handshake that fails (another key file) is said, not retried in silence;
        # a consumer reading its producer's inproc alias has no handshake to watch
        self.watch: ConnectionWatch | None = None
        if is_tcp(self.endpoint):
            self.watch = ConnectionWatch(sock, self.endpoint, f"the producer of link {spec.name}", contexts()[1],
                                         curve=spec.curve is not None)
        sock.connect(self.endpoint)
        self._sock = sock
        self._sync = sock
        self._fd = int(sock.getsockopt(zmq.FD))  # type: ignore[arg-type]
        self._latest = spec.policy == "latest" and not lossless
        self._pending: deque[Envelope] = deque()
        self._unsubscribed = False
        self._producer_gone = False
        self._waiting: asyncio.Future[None] | None = None

    def _decode(self, frames: list) -> Envelope | None:  # type: ignore[type-arg]
        try:
            env = self.codec.decode(frames)
        except CodecError as exc:
            self.malformed += 1
            self.drops.add("malformed")
            if self.malformed <= 3 or self.malformed % 1000 == 0:
                log.warning("link %s: dropped malformed message (%s)", self.spec.name, exc)
            return None
        if self._last_seq is not None and env.seq > self._last_seq + 1:
            self.drops.add("hwm", env.seq - self._last_seq - 1)
        self._last_seq = env.seq
        self.received += 1
        if self.on_first_message is not None:
            first, self.on_first_message = self.on_first_message, None
            first()
        return env

    def _drain_nowait(self) -> list:  # type: ignore[type-arg]
        out = []
        while True:
            try:
                out.append(self._sync.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return out

    async def _recv_frames(self) -> list:  # type: ignore[type-arg]
        """The next multipart message, waiting in the event loop only when none is queued."""
        sock = self._sock
        while True:
            try:
                return sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            if self._producer_gone:
                raise ProducerGone(self.spec.name)
            await self._readable()

    async def _readable(self) -> None:
        """Wait until the socket may have a message.

        ZeroMQ's descriptor is edge-triggered: it signals that the socket's state changed,
        not that data is there.  So after arming, the events are read once (which also
        re-arms the edge) and the wait is skipped if a message arrived in between.
        """
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        self._waiting = ready
        try:
            if int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            await ready
        finally:
            self._waiting = None
            loop.remove_reader(self._fd)

    def producer_gone(self) -> None:
        """The producer has finished without this consumer taking its end of stream.

        That happens to a consumer restarted after its producer ended: nothing will ever
        arrive again.  What is already queued is still read; then receiving raises
        :class:`ProducerGone`, which the stage takes as the end of stream.
        """
        self._producer_gone = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def recv(self) -> Envelope:
        """Next message in order (the ``ordered`` policy); malformed ones are skipped."""
        while True:
            frames = await self._recv_frames()
            env = self._decode(frames)
            if env is not None:
                return env

    async def recv_latest(self) -> Envelope:
        """Newest fresh message: older queued ones are dropped, stale ones too.

        Control messages are never dropped: they are returned first, in order.
        """
        if not self._latest:
            return await self.recv()
        max_age_ns = None if self.spec.max_age_ms is None else int(self.spec.max_age_ms * 1e6)
        while True:
            if self._pending:
                return self._pending.popleft()
            batch = [await self._recv_frames(), *self._drain_nowait()]
            envs = [e for e in (self._decode(f) for f in batch) if e is not None]
            data = [e for e in envs if e.kind != "control"]
            self._pending.extend(e for e in envs if e.kind == "control")
            if not data:
                continue
            self.drops.add("superseded", len(data) - 1)
            newest = data[-1]
            stale = max_age_ns is not None and self.clock.now_ns() - newest.t_capture_ns > max_age_ns
            if stale and not self._pending:
                self.drops.add("stale")
                continue
            return newest

    def unsubscribe(self) -> None:
        """Tell the producer this consumer takes nothing more (it has read the end of stream)."""
        if not self._unsubscribed and not self._sock.closed:
            self._unsubscribed = True
            with contextlib.suppress(zmq.ZMQError):  # the context may already be gone
                self._sock.setsockopt(zmq.UNSUBSCRIBE, b"")

    def close(self) -> None:
        # An inproc XPUB learns of a closed consumer only from an explicit unsubscription.
        self.unsubscribe()
        if self.watch is not None:
            self.watch.close()
        self._sock.close(linger=0)
