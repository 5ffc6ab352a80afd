"""``gamecopilot bench bus``: one hop of a 720p RGB frame, our links against raw pyzmq.

For each transport (inproc, ipc, tcp on loopback, and tcp with CurveZMQ as a pipeline across
hosts uses it: encrypted, with the ZAP check at connect) the same frame crosses one link many
times, one message in flight at a time, so what is measured is the hop's latency, not
queueing.  "ours" is the full path a stage pays: :class:`copilot.links.Publisher` encodes an
:class:`~copilot.messages.Envelope` (msgpack header + the image as its own frame,
zero-copy), :class:`copilot.links.Subscriber` decodes it on an asyncio socket into a numpy
view.  "raw" is the floor: a plain PUB/SUB pair sending the same buffer with
``send_multipart(copy=False)`` and wrapping the received frame with ``np.frombuffer``.
Both run in one process and one thread, interleaved in rounds so that a busy machine
disturbs both alike.

``fps`` is messages per second through the hop at one message in flight (1 / mean latency).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from bench.output import check_output_path, emit_result
from copilot.args import OneLineParser
from copilot.curve import CurveKeys, secure_client, secure_server
from copilot.errors import UsageError
from copilot.links import LinkSpec, Publisher, Subscriber, contexts
from copilot.messages import Envelope, VideoFrame
from copilot.net import free_port

FRAME_SHAPE = (720, 1280, 3)
TRANSPORTS = ("inproc", "ipc", "tcp", "tcp+curve")
WARMUP = 20
ROUNDS = 10
HOP_TIMEOUT_S = 5.0


def _keys(transport: str) -> CurveKeys | None:
    """A throwaway keypair for ``tcp+curve`` (the same code paths as ``curve_keys``)."""
    if transport != "tcp+curve":
        return None
    public, secret = zmq.curve_keypair()
    return CurveKeys(public=public, secret=secret)


def _endpoint(transport: str, tmp: str, name: str) -> str:
    if transport == "inproc":
        return f"inproc://bench-bus-{name}"
    if transport == "ipc":
        return f"ipc://{tmp}/{name}"
    return f"tcp://127.0.0.1:{free_port()}"


class _Raw:
    """Plain pyzmq PUB/SUB, zero-copy, the baseline."""

    def __init__(self, endpoint: str, keys: CurveKeys | None = None) -> None:
        ctx, _ = contexts()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        secure_server(self.pub, keys, endpoint)
        self.pub.bind(endpoint)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        secure_client(self.sub, keys, endpoint)
        self.sub.connect(endpoint)
        self.header = np.array([0], dtype=np.int64)

    def connect(self) -> None:
        """PUB/SUB has no handshake: send probes until one arrives (slow joiner)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.pub.send(b"probe")
            if self.sub.poll(20):
                self.sub.recv()
                while self.sub.poll(0):
                    self.sub.recv()
                return
        raise RuntimeError("raw pyzmq link never connected")

    def hop(self, image: np.ndarray) -> float:
        t0 = time.perf_counter_ns()
        self.header[0] = t0
        self.pub.send_multipart([self.header, image], copy=False)
        frames = self.sub.recv_multipart(copy=False)
        arr = np.frombuffer(frames[1].buffer, dtype=np.uint8).reshape(FRAME_SHAPE)
        t1 = time.perf_counter_ns()
        assert arr.shape == FRAME_SHAPE
        return (t1 - t0) / 1e6

    def close(self) -> None:
        self.pub.close(linger=0)
        self.sub.close(linger=0)


class _Ours:
    """Our Publisher/Subscriber pair on an ordered link (codec, asyncio socket, policy checks).

    Ordered rather than latest: a latest link's tiny high-water mark lets libzmq drop a
    message silently when hops come faster than it processes its pipe-credit commands
    (about once a millisecond), which a real 30-60 fps stream never does but a tight
    one-in-flight loop does; the receiver would then wait for ever for the lost frame.
    """

    def __init__(self, endpoint: str, keys: CurveKeys | None = None) -> None:
        spec = LinkSpec(name="bench", endpoint=endpoint, policy="ordered", hwm=64, block_ms=None, curve=keys)
        self.pub = Publisher(spec)
        self.sub = Subscriber(spec)

    async def connect(self) -> None:
        if not await self.pub.wait_subscribers(1, 5.0):
            raise RuntimeError("our link never connected")

    async def hop(self, image: np.ndarray) -> float:
        t0 = time.perf_counter_ns()
        env = Envelope.wrap(VideoFrame(image=image), source="bench", seq=0, t_media=0.0,
                            t_capture_ns=time.monotonic_ns())
        await self.pub.send(env)
        got = await asyncio.wait_for(self.sub.recv(), HOP_TIMEOUT_S)
        t1 = time.perf_counter_ns()
        assert got.payload.image.shape == FRAME_SHAPE  # type: ignore[union-attr]
        return (t1 - t0) / 1e6

    def close(self) -> None:
        self.pub.close()
        self.sub.close()


def _summary(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    p50, p99 = np.percentile(arr, (50, 99))
    return {"n": len(samples), "p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4),
            "fps": round(1000.0 / float(arr.mean()), 1)}


async def _bench_transport(transport: str, frames: int, tmp: str) -> dict[str, dict[str, float]]:
    image = np.random.default_rng(0).integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
    keys = _keys(transport)
    raw = _Raw(_endpoint(transport, tmp, "raw"), keys)
    ours = _Ours(_endpoint(transport, tmp, "ours"), keys)
    try:
        raw.connect()
        await ours.connect()
        for _ in range(WARMUP):
            raw.hop(image)
            await ours.hop(image)
        raw_s: list[float] = []
        our_s: list[float] = []
        for r in range(ROUNDS):  # interleaved, so background load hits both alike; `frames` hops in all
            per_round = frames // ROUNDS + (1 if r < frames % ROUNDS else 0)
            raw_s.extend(raw.hop(image) for _ in range(per_round))
            for _ in range(per_round):
                our_s.append(await ours.hop(image))
        return {"ours": _summary(our_s), "raw": _summary(raw_s)}
    finally:
        raw.close()
        ours.close()


def run_bench(frames: int = 300, transports: tuple[str, ...] = TRANSPORTS) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="gamecopilot-bus-")
    try:
        results = {t: asyncio.run(_bench_transport(t, frames, tmp)) for t in transports}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"frame_shape": list(FRAME_SHAPE), "frames": frames, "cpus": os.cpu_count(), "transports": results}


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    h, w, c = result["frame_shape"]
    table = Table(title=f"one hop of a {w}x{h}x{c} uint8 frame ({result['frames']} frames per transport)",
                  title_justify="left")
    for col in ("transport", "path", "p50 ms", "p99 ms", "msgs/s", "ours / raw p50"):
        table.add_column(col, justify="left" if col in ("transport", "path") else "right")
    for name, r in result["transports"].items():
        ratio = r["ours"]["p50_ms"] / r["raw"]["p50_ms"] if r["raw"]["p50_ms"] else float("nan")
        table.add_row(name, "ours", f"{r['ours']['p50_ms']:.3f}", f"{r['ours']['p99_ms']:.3f}",
                      f"{r['ours']['fps']:.0f}", f"{ratio:.2f}x")
        table.add_row("", "raw pyzmq", f"{r['raw']['p50_ms']:.3f}", f"{r['raw']['p99_ms']:.3f}",
                      f"{r['raw']['fps']:.0f}", "")
    return table


def main(argv: list[str] | None = None) -> int:
    """``gamecopilot bench bus`` (and ``python -m bench.bus``)."""
    ap = OneLineParser(prog="gamecopilot bench bus", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=300, help="frames per transport (default 300)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS),
                    help="comma-separated, from inproc, ipc, tcp, tcp+curve (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("-o", "--output", help="also write the JSON here")
    args = ap.parse_args(argv)
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports:
        unknown = ", ".join(bad) or "empty list"
        raise UsageError(f"--transports: unknown {unknown} (choose from {', '.join(TRANSPORTS)})")
    if args.frames < ROUNDS:
        raise UsageError(f"--frames must be at least {ROUNDS}")
    check_output_path(args.output)
    result = run_bench(args.frames, transports)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
