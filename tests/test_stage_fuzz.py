"""Fuzz: 10,000 malformed multipart messages at a running stage over a real ZeroMQ link.

No crash, every one counted (the Subscriber's ``malformed`` counter and the stage's drop
figures), and a valid message sent after them is still processed.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from copilot.codec import Codec, CodecError
from copilot.links import LinkSpec, Subscriber, contexts
from copilot.messages import WIRE_VERSION, EndOfStream, Envelope, Features, VideoFrame
from copilot.stage import Stage, StageContext, StageRunner

pytestmark = pytest.mark.usefixtures("leak_check")

N_MALFORMED = 10_000


class Recorder(Stage):
    """Keeps what it is given."""

    def __init__(self, ctx: StageContext, params: Any) -> None:
        super().__init__(ctx, params)
        self.seen: list[Envelope] = []

    async def process(self, msg: Envelope) -> None:
        self.seen.append(msg)


def _valid(seq: int, payload: Any) -> list[bytes]:
    env = Envelope.wrap(payload, source="fuzz", seq=seq, t_media=1.5, t_capture_ns=123)
    return [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in Codec().encode(env)]


def _map(**over: Any) -> bytes:
    base: dict[str, Any] = {"v": WIRE_VERSION, "kind": "features", "seq": 1, "source": "x", "t_media": 0.0,
                            "t_capture_ns": 0, "trace": [],
                            "payload": {"type": "features", "name": "n", "values": {}, "text": {}}}
    base.update(over)
    return msgspec.msgpack.encode(base)


def malformed_messages(n: int, seed: int = 0) -> list[list[bytes]]:
    """``n`` multipart messages, each certain to be rejected by the codec, of many kinds."""
    rng = random.Random(seed)
    video = _valid(1, VideoFrame(image=np.zeros((4, 4, 3), np.uint8)))
    feats = _valid(1, Features(name="f", values={"a": 1.0}))

    def garbage() -> list[bytes]:
        return [b"\xc1" + rng.randbytes(rng.randrange(0, 64))]  # 0xc1 is never valid msgpack

    def truncated() -> list[bytes]:
        src = rng.choice([video, feats])
        return [src[0][: rng.randrange(0, len(src[0]))], *src[1:]]

    def trailing() -> list[bytes]:
        return [feats[0] + rng.randbytes(rng.randrange(1, 8))]

    makers = [
        garbage,
        truncated,
        trailing,
        lambda: [_map(v=WIRE_VERSION + rng.randrange(1, 100))],
        lambda: [_map(kind="bogus", payload={"type": f"bogus{rng.randrange(9)}"})],
        lambda: [_map(kind="video")],
        lambda: [_map(kind="control", payload={"type": f"halt{rng.randrange(9)}"})],  # an unknown control tag
        lambda: [_map(kind="control", payload={"type": "control", "action": "eos"})],  # wire version 1's control
        lambda: [video[0]],  # array frame missing
        lambda: [*video, rng.randbytes(3)],  # an extra frame
        lambda: [video[0], video[1][: rng.randrange(0, len(video[1]))]],  # array frame cut short
        lambda: [_map(kind="video", payload={"type": "video", "image": ["|O", [1], 0]}), b"\0" * 8],
        lambda: [b""],
        lambda: [rng.randbytes(rng.randrange(1, 32)) + b"\xc1", b"x"],
    ]
    return [makers[i % len(makers)]() for i in range(n)]


@pytest.mark.parametrize("policy", ["ordered", "latest"])
def test_ten_thousand_malformed_messages_are_counted_and_the_stage_survives(policy: str, tmp_path: Path) -> None:
    messages = malformed_messages(N_MALFORMED)
    codec = Codec()
    for m in messages[:500]:  # the generator itself is honest: each one is rejected
        with pytest.raises(CodecError):
            codec.decode(m)

    endpoint = f"ipc://{tmp_path}/fuzz"
    valid = _valid(1, Features(name="after", values={"x": 42.0}))
    end = _valid(2, EndOfStream(stage="fuzz"))

    async def main() -> tuple[Recorder, Subscriber]:
        sync, _ = contexts()
        raw = sync.socket(zmq.XPUB)
        raw.setsockopt(zmq.XPUB_NODROP, 1)  # the sender blocks rather than lose any
        raw.setsockopt(zmq.SNDHWM, 100)
        raw.bind(endpoint)
        sub = Subscriber(LinkSpec(name="in", endpoint=endpoint, policy=policy, hwm=100))  # type: ignore[arg-type]
        stage = Recorder(StageContext(name="rec"), None)  # type: ignore[arg-type]
        runner = StageRunner(stage, [sub])
        error: list[BaseException] = []

        def send_all() -> None:
            try:
                assert raw.recv() == b"\x01"  # the subscription arrived
                for m in messages:
                    raw.send_multipart(m)
                raw.send_multipart(valid)
                raw.send_multipart(end)
            except BaseException as exc:  # pragma: no cover - reported below
                error.append(exc)

        sender = threading.Thread(target=send_all, name="fuzz-sender")
        sender.start()
        try:
            await asyncio.wait_for(runner.run(), 120)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, sender.join, 30)
            sub.close()
            raw.close(linger=0)
        assert not error, error
        return stage, sub

    stage, sub = asyncio.run(main())
    assert sub.malformed == N_MALFORMED
    assert sub.drops.by_reason.get("malformed") == N_MALFORMED
    assert stage.recorder.snapshot(0).dropped_by_reason["malformed"] == N_MALFORMED
    assert len(stage.seen) == 1
    after = stage.seen[0]
    assert after.payload.name == "after" and after.payload.values == {"x": 42.0} and after.t_media == 1.5
    assert stage.recorder.count == 1
