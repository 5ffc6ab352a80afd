"""Links: the latest and ordered policies on inproc, ipc and tcp, and where they may bind.

Assertions count messages rather than time them: every message sent is either received or
counted as dropped (by reason), which holds however busy the machine is.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq

from copilot.clock import VirtualClock
from copilot.links import LinkSpec, Policy, ProducerGone, Publisher, Subscriber, check_bind_endpoint
from copilot.messages import EndOfStream, Envelope, Features, Heartbeat, VideoFrame
from copilot.testing import make_envelope

pytestmark = pytest.mark.usefixtures("leak_check")

TRANSPORTS = ["inproc", "ipc", "tcp"]


def endpoint(transport: str, tmp_path: Path) -> str:
    if transport == "inproc":
        return f"inproc://test-links/{uuid.uuid4().hex}"
    if transport == "ipc":
        return f"ipc://{tmp_path}/link-{uuid.uuid4().hex[:8]}"
    return "tcp://127.0.0.1:*"


def frame(i: int, clock: VirtualClock | None = None, side: int = 8) -> Envelope:
    img = np.full((side, side, 3), i % 256, dtype=np.uint8)
    return make_envelope(VideoFrame(image=img, frame_index=i), t_media=i / 30, clock=clock)


def feature(i: int) -> Envelope:
    return make_envelope(Features(name="n", values={"i": float(i)}), t_media=i / 30)


def eos() -> Envelope:
    return make_envelope(EndOfStream())


@asynccontextmanager
async def link(
    ep: str, policy: Policy, *, hwm: int = 64, max_age_ms: float | None = None, block_ms: float | None = 2000.0,
    consumers: int = 1, clock: VirtualClock | None = None, lossless: bool = False,
) -> AsyncIterator[tuple[Publisher, list[Subscriber]]]:
    spec = LinkSpec(name="l", endpoint=ep, policy=policy, hwm=hwm, max_age_ms=max_age_ms, block_ms=block_ms)
    kw = {"clock": clock} if clock is not None else {}
    pub = Publisher(spec, lossless=lossless, **kw)  # type: ignore[arg-type]
    bound = LinkSpec(name="l", endpoint=pub.endpoint, policy=policy, hwm=hwm, max_age_ms=max_age_ms,
                     block_ms=block_ms)
    subs = [Subscriber(bound, lossless=lossless, **kw) for _ in range(consumers)]  # type: ignore[arg-type]
    try:
        assert await pub.wait_subscribers(consumers, 10.0)
        yield pub, subs
    finally:
        for s in subs:
            s.close()
        pub.close()


async def read_until_eos(sub: Subscriber, *, latest: bool, delay_s: float = 0.0) -> list[Envelope]:
    out = []
    while True:
        env = await asyncio.wait_for(sub.recv_latest() if latest else sub.recv(), 20.0)
        if env.kind == "control":
            sub.unsubscribe()
            return out
        out.append(env)
        if delay_s:
            await asyncio.sleep(delay_s)


# -- latest ------------------------------------------------------------------------------------
def test_latest_keeps_only_the_newest_and_counts_the_rest() -> None:
    async def main() -> None:
        async with link(endpoint("inproc", Path()), "latest", hwm=64) as (pub, (sub,)):
            for i in range(10):
                assert await pub.send(frame(i))
            env = await asyncio.wait_for(sub.recv_latest(), 10)
            assert env.payload.frame_index == 9 and env.seq == 10
            assert sub.drops.by_reason == {"superseded": 9}
            assert sub.received == 10

    asyncio.run(main())


def test_latest_drops_stale_frames_and_counts_them() -> None:
    async def main() -> None:
        clock = VirtualClock()
        async with link(endpoint("inproc", Path()), "latest", max_age_ms=100, clock=clock) as (pub, (sub,)):
            await pub.send(frame(0, clock))
            clock.advance(200_000_000)  # the frame is now 200 ms old
            reader = asyncio.create_task(sub.recv_latest())
            for _ in range(20):
                await asyncio.sleep(0)
            assert not reader.done(), "a stale frame was handed over"
            await pub.send(frame(1, clock))
            env = await asyncio.wait_for(reader, 10)
            assert env.payload.frame_index == 1
            assert sub.drops.by_reason == {"stale": 1}

    asyncio.run(main())


def test_latest_never_drops_control_messages() -> None:
    async def main() -> None:
        clock = VirtualClock()
        async with link(endpoint("inproc", Path()), "latest", max_age_ms=1, clock=clock) as (pub, (sub,)):
            await pub.send(frame(0, clock))
            await pub.send(make_envelope(Heartbeat(), clock=clock))
            await pub.send(frame(1, clock))
            clock.advance(10_000_000)  # both frames stale
            first = await asyncio.wait_for(sub.recv_latest(), 10)
            assert first.kind == "video"  # the newest frame goes with the pending control message
            second = await asyncio.wait_for(sub.recv_latest(), 10)
            assert second.kind == "control" and isinstance(second.payload, Heartbeat)
            assert sub.drops.by_reason == {"superseded": 1}

    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_latest_accounts_for_every_frame_when_the_consumer_falls_behind(transport: str, tmp_path: Path) -> None:
    """A consumer far behind a small high-water mark: every frame is delivered or counted,
    the producer never blocks, and the end of stream still arrives (it used to be dropped
    by ZeroMQ with the frames, leaving the consumer waiting for ever)."""
    n = 300

    async def main() -> None:
        async with link(endpoint(transport, tmp_path), "latest", hwm=2) as (pub, (sub,)):
            for i in range(n):  # 30 KB frames: far more than socket buffers and queues hold
                assert await pub.send(frame(i, side=100))  # never blocks, never refuses
            assert pub.drops.total == 0
            reader = asyncio.create_task(read_until_eos(sub, latest=True, delay_s=0.002))
            assert await asyncio.wait_for(pub.end_stream(eos()), 20)
            got = await reader
            indices = [e.payload.frame_index for e in got]
            assert indices == sorted(indices) and len(set(indices)) == len(indices)
            assert len(got) + sub.drops.total == n, (len(got), dict(sub.drops.by_reason))
            assert len(got) < n and sub.drops.by_reason["hwm"] > 0

    asyncio.run(main())


def test_a_slow_latest_consumer_does_not_hold_back_a_fast_one() -> None:
    n = 200

    async def main() -> None:
        async with link(endpoint("inproc", Path()), "latest", hwm=2, consumers=2) as (pub, (fast, slow)):
            async def produce() -> None:
                for i in range(n):
                    await pub.send(frame(i))
                    await asyncio.sleep(0.001)
                await pub.end_stream(eos())

            got_fast, got_slow, _ = await asyncio.gather(
                read_until_eos(fast, latest=True),
                read_until_eos(slow, latest=True, delay_s=0.05),
                produce(),
            )
            assert len(got_fast) + fast.drops.total == n
            assert len(got_slow) + slow.drops.total == n
            assert len(got_fast) > len(got_slow)

    asyncio.run(main())


# -- ordered -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ordered_delivers_everything_in_order_with_backpressure(transport: str, tmp_path: Path) -> None:
    n = 400

    async def main() -> None:
        async with link(endpoint(transport, tmp_path), "ordered", hwm=4, block_ms=None) as (pub, (sub,)):
            async def produce() -> None:
                for i in range(n):
                    assert await pub.send(feature(i))
                assert await pub.end_stream(eos())

            got, _ = await asyncio.gather(read_until_eos(sub, latest=False, delay_s=0.0005), produce())
            assert [e.payload.values["i"] for e in got] == [float(i) for i in range(n)]
            assert [e.seq for e in got] == list(range(1, n + 1))
            assert pub.drops.total == 0 and sub.drops.total == 0

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_consumer_in_the_producers_process_may_read_its_inproc_alias(transport: str, tmp_path: Path) -> None:
    """A producer also binds an inproc alias; a consumer in its process that reads it gets the same
    messages as one on the link's own endpoint, by reference (no kernel copy of each frame)."""
    n = 50

    async def main() -> None:
        pub = Publisher(LinkSpec(name="l", endpoint=endpoint(transport, tmp_path), policy="ordered", hwm=4,
                                 block_ms=None))
        spec = LinkSpec(name="l", endpoint=pub.endpoint, policy="ordered", hwm=4, block_ms=None)
        alias = pub.local_endpoint
        assert alias is not None and alias.startswith("inproc://")
        here, there = Subscriber(spec, via=alias), Subscriber(spec)
        try:
            assert here.endpoint == alias and there.endpoint == pub.endpoint
            assert await pub.wait_subscribers(2, 10.0)

            async def produce() -> None:
                for i in range(n):
                    assert await pub.send(frame(i, side=64))
                assert await pub.end_stream(eos())

            got_here, got_there, _ = await asyncio.gather(
                read_until_eos(here, latest=False), read_until_eos(there, latest=False), produce())
            for got in (got_here, got_there):
                assert [e.seq for e in got] == list(range(1, n + 1))
                assert [int(e.payload.image[0, 0, 0]) for e in got] == [i % 256 for i in range(n)]
            assert pub.drops.total == 0 and here.drops.total == 0 and there.drops.total == 0
        finally:
            here.close()
            there.close()
            pub.close()

    asyncio.run(main())


def test_a_producer_made_again_in_the_same_process_binds_a_fresh_alias(tmp_path: Path) -> None:
    ep = endpoint("ipc", tmp_path)
    first = Publisher(LinkSpec(name="l", endpoint=ep))
    first.close()
    again = Publisher(LinkSpec(name="l", endpoint=ep))  # its alias never collides with the closing one's
    try:
        assert again.local_endpoint is not None and again.local_endpoint != first.local_endpoint
    finally:
        again.close()
    inproc = Publisher(LinkSpec(name="l", endpoint=endpoint("inproc", tmp_path)))
    try:
        assert inproc.local_endpoint is None  # an inproc link needs no alias
    finally:
        inproc.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ordered_drop_after_block_ms_is_counted_and_warned(
    transport: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that never reads: the producer waits block_ms per message, then drops it,
    counts it and logs a warning; everything it reported as sent does arrive."""

    async def main() -> None:
        async with link(endpoint(transport, tmp_path), "ordered", hwm=2, block_ms=30) as (pub, (sub,)):
            big = np.zeros(32768, dtype=np.float32)  # 128 KiB: socket buffers fill up quickly too
            results: list[bool] = []
            while results.count(False) < 3 and len(results) < 2000:
                env = feature(len(results))
                env.payload.vector = big
                results.append(await pub.send(env))
            sent = results.count(True)
            dropped = results.count(False)
            assert dropped > 0 and pub.drops.by_reason == {"backpressure": dropped}
            assert results[0], "a drop before the queue was full"
            got = []
            while len(got) < sent:
                got.append(await asyncio.wait_for(sub.recv(), 10))
            # what the producer reported as sent arrives, in order; nothing else does
            assert [e.payload.values["i"] for e in got] == [float(i) for i, ok in enumerate(results) if ok]

    with caplog.at_level(logging.WARNING, logger="copilot.links"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert warnings, "a drop on an ordered link must be warned about"


def test_ordered_lossless_waits_for_a_late_consumer() -> None:
    async def main() -> None:
        async with link(endpoint("inproc", Path()), "ordered", hwm=2, block_ms=1, lossless=True) as (pub, (sub,)):
            async def late_reader() -> list[Envelope]:
                await asyncio.sleep(0.3)
                return await read_until_eos(sub, latest=False)

            async def produce() -> None:
                for i in range(50):
                    assert await pub.send(feature(i))
                await pub.end_stream(eos())

            got, _ = await asyncio.gather(late_reader(), produce())
            assert len(got) == 50 and pub.drops.total == 0

    asyncio.run(main())


def test_lossless_makes_a_latest_link_deliver_everything() -> None:
    async def main() -> None:
        async with link(endpoint("ipc", Path("/tmp")), "latest", hwm=2, lossless=True) as (pub, (sub,)):
            async def produce() -> None:
                for i in range(100):
                    await pub.send(frame(i))
                await pub.end_stream(eos())

            got, _ = await asyncio.gather(read_until_eos(sub, latest=True, delay_s=0.001), produce())
            assert [e.payload.frame_index for e in got] == list(range(100))
            assert sub.drops.total == 0

    asyncio.run(main())


# -- end of stream -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_end_stream_returns_when_a_consumer_goes_away_without_reading(transport: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with link(endpoint(transport, tmp_path), "ordered") as (pub, (sub,)):
            await pub.send(feature(0))
            sub.close()
            assert await asyncio.wait_for(pub.end_stream(eos()), 10)

    asyncio.run(main())


def test_end_stream_reaches_a_consumer_that_subscribes_late(tmp_path: Path) -> None:
    """A consumer restarted by the supervisor after the producer ended still gets the end."""

    async def main() -> None:
        ep = endpoint("ipc", tmp_path)
        async with link(ep, "ordered") as (pub, (first,)):
            ending = asyncio.create_task(pub.end_stream(eos(), resend_s=0.02))
            assert (await read_until_eos(first, latest=False)) == []
            late = Subscriber(LinkSpec(name="l", endpoint=ep, policy="ordered"))
            try:
                env = await asyncio.wait_for(late.recv(), 10)
                assert env.kind == "control" and isinstance(env.payload, EndOfStream)
                late.unsubscribe()
                assert await asyncio.wait_for(ending, 10)
            finally:
                ending.cancel()
                late.close()

    asyncio.run(main())


def test_end_stream_gives_up_after_its_timeout() -> None:
    async def main() -> None:
        async with link(endpoint("inproc", Path()), "ordered") as (pub, _subs):
            assert not await pub.end_stream(eos(), timeout_s=0.1)

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["ordered", "latest"])
def test_a_consumer_told_its_producer_is_gone_reads_what_is_queued_then_ends(policy: Policy) -> None:
    """A consumer restarted after its producer's end of stream went out never gets one: told
    the producer is gone, it still takes what is queued, and a waiting read wakes and ends."""
    async def main() -> None:
        async with link(endpoint("inproc", Path()), policy) as (pub, (sub,)):
            await pub.send(feature(0))
            first = await asyncio.wait_for(sub.recv_latest(), 10)
            waiting = asyncio.ensure_future(sub.recv_latest())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            sub.producer_gone()
            with pytest.raises(ProducerGone):
                await asyncio.wait_for(waiting, 5)
            await pub.send(feature(1))
            await asyncio.sleep(0.05)
            queued = await asyncio.wait_for(sub.recv_latest(), 5)  # queued before the read: still read
            with pytest.raises(ProducerGone):
                await asyncio.wait_for(sub.recv_latest(), 5)
            assert [first.payload.values["i"], queued.payload.values["i"]] == [0.0, 1.0]  # type: ignore[union-attr]

    asyncio.run(main())


# -- receiver bookkeeping ----------------------------------------------------------------------
def test_gaps_in_seq_are_counted_as_hwm_drops() -> None:
    async def main() -> None:
        async with link(endpoint("inproc", Path()), "ordered") as (pub, (sub,)):
            await pub.send(feature(0))
            pub.next_seq()  # two messages that never went out
            pub.next_seq()
            await pub.send(feature(3))
            a = await asyncio.wait_for(sub.recv(), 10)
            b = await asyncio.wait_for(sub.recv(), 10)
            assert (a.seq, b.seq) == (1, 4)
            assert sub.drops.by_reason == {"hwm": 2}

    asyncio.run(main())


# -- endpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ep",
    ["tcp://0.0.0.0:*", "tcp://*:5555", "tcp://192.168.1.10:5555", "tcp://eth0:5555", "tcp://[::]:5555",
     "tcp://127.0.0.1.example.com:5555", "tcp://10.0.0.1:*"],
)
def test_binding_a_non_loopback_tcp_address_is_refused(ep: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_bind_endpoint(ep)
    with pytest.raises(ValueError, match="loopback"):
        Publisher(LinkSpec(name="x", endpoint=ep))


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555",
                                "ipc:///tmp/x", "inproc://x"])
def test_loopback_ipc_and_inproc_are_allowed(ep: str) -> None:
    check_bind_endpoint(ep)


def test_curve_allows_a_non_loopback_bind_check() -> None:
    check_bind_endpoint("tcp://0.0.0.0:5555", curve=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_publisher_binds_loopback_tcp_and_reports_its_port(host: str) -> None:
    pub = Publisher(LinkSpec(name="x", endpoint=f"tcp://{host}:*"))
    try:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        assert int(pub.endpoint.rsplit(":", 1)[1]) > 0
    finally:
        pub.close()


def test_missing_consumers_are_counted_at_once_and_warned_about_only_when_gone_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When a group fails, the others see its consumers leave a moment before the supervisor's
    stop reaches them: a warning then only buried the line saying why the run stopped.  Every
    message is still counted as dropped from the first one; the warning waits a second, and
    none comes once the run is stopping."""

    async def main() -> None:
        clock = VirtualClock()
        spec = LinkSpec(name="l", endpoint=f"inproc://test-links/{uuid.uuid4().hex}", policy="latest")
        pub = Publisher(spec, clock=clock)
        pub.expected_consumers = 1  # nobody subscribes
        try:
            with caplog.at_level(logging.WARNING, logger="copilot.links"):
                await pub.send(feature(0))
                clock.advance(500_000_000)
                await pub.send(feature(1))
                assert pub.drops.by_reason["no_consumer"] == 2
                assert not caplog.records
                clock.advance(600_000_000)  # gone 1.1 s
                await pub.send(feature(2))
                assert [r.getMessage() for r in caplog.records] == [
                    "link l: 1 of 1 consumers not connected; their messages are dropped and counted"]
            caplog.clear()
            quiet = Publisher(LinkSpec(name="q", endpoint=f"inproc://test-links/{uuid.uuid4().hex}",
                                       policy="latest"), clock=clock)
            quiet.expected_consumers = 1
            quiet.stopping = True
            try:
                with caplog.at_level(logging.WARNING, logger="copilot.links"):
                    for i in range(3):
                        await quiet.send(feature(i))
                        clock.advance(1_000_000_000)
                assert quiet.drops.by_reason["no_consumer"] == 3 and not caplog.records
            finally:
                quiet.close()
        finally:
            pub.close()

    asyncio.run(main())


_SEND_AND_EXIT = """
import sys
import zmq
from copilot.links import contexts, end_process_context
sock = contexts()[0].socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send(b"done")  # queued: nobody has bound the endpoint yet
sock.close(linger=5000)
if sys.argv[2] == "end":
    end_process_context(timeout_s=10.0)
sys.exit(0)
"""


@pytest.mark.parametrize("end", [True, False])
def test_a_message_queued_just_before_the_process_exits_arrives_once_the_context_is_ended(
        tmp_path: Path, end: bool) -> None:
    """A group's last control message (Done) is queued, then the process exits: pyzmq does not end
    contexts at exit, so without :func:`end_process_context` the message dies with the process;
    with it, it is delivered within the socket's linger (here: to a peer that binds only later)."""
    endpoint = f"ipc://{tmp_path / 'ctrl'}"
    child = subprocess.Popen([sys.executable, "-c", _SEND_AND_EXIT, endpoint, "end" if end else "exit"])
    if not end:
        assert child.wait(timeout=30) == 0  # gone before anyone could take its message
    else:
        time.sleep(0.3)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        router.bind(endpoint)
        got = router.poll(5000 if end else 1000)
        frames = router.recv_multipart() if got else []
    finally:
        router.close()
        ctx.term()
    assert child.wait(timeout=30) == 0
    assert (frames[-1:] == [b"done"]) is end
