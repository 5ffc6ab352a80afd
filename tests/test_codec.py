"""Wire codec: every message kind round-trips, arrays zero-copy, bad input is a CodecError."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from copilot.codec import Codec, CodecError
from copilot.messages import (
    KINDS,
    PAYLOAD_TYPES,
    PRIORITIES,
    WIRE_VERSION,
    Advice,
    AudioChunk,
    Context,
    Cue,
    Done,
    EndOfStream,
    Entities,
    Entity,
    Envelope,
    Error,
    Event,
    Features,
    GameState,
    Heartbeat,
    InputsEnded,
    LatencySummary,
    Metrics,
    Question,
    Ready,
    StageMetrics,
    Start,
    Stop,
    TraceStamp,
    Transcript,
    VideoFrame,
)

# -- strategies ---------------------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT63 = st.integers(0, 2**63 - 1)
FLOATS = st.floats(allow_nan=False)
TEXT = st.text(max_size=20)
DTYPES = st.sampled_from(["|u1", "|i1", "<i2", ">i2", "<u2", "<i4", ">i4", "<u4", "<i8", "<u8",
                          "<f2", "<f4", ">f4", "<f8", ">f8", "|b1"])
JSON = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def arrays(dtype: Any = DTYPES, min_dims: int = 0, max_dims: int = 4, max_side: int = 6) -> Any:
    return hnp.arrays(dtype=dtype, shape=hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0,
                                                          max_side=max_side))


def maybe_strided(a: Any) -> Any:
    """Arrays as stages hand them over: sometimes a non-contiguous view (a crop, a stride)."""
    return st.one_of(a, a.filter(lambda x: x.ndim >= 1 and x.shape[0] >= 2).map(lambda x: x[::2]))


images = st.tuples(st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, 3, 4])).flatmap(
    lambda s: hnp.arrays(np.uint8, s)
)
latency = st.builds(LatencySummary, p50=FLOATS, p95=FLOATS, p99=FLOATS)
stage_metrics = st.builds(
    StageMetrics,
    stage=TEXT,
    count=UINT63,
    fps=FLOATS,
    dropped=UINT63,
    dropped_by_reason=st.dictionaries(TEXT, UINT63, max_size=3),
    latency_ms=st.none() | latency,
    queue_age_ms=st.none() | latency,
    busy_ms=st.none() | latency,
    media_s=FLOATS,
    slow=st.booleans(),
    extra_ms=st.dictionaries(TEXT, latency, max_size=2),
    active_s=FLOATS,
)
PAYLOADS: dict[type, Any] = {
    VideoFrame: st.builds(VideoFrame, image=maybe_strided(images),
                          pixel_format=st.sampled_from(["rgb24", "bgra", "gray"]), frame_index=UINT63),
    AudioChunk: st.builds(AudioChunk, samples=maybe_strided(arrays(np.float32, 2, 2, 64)),
                          sample_rate=st.integers(1, 384000), chunk_index=UINT63),
    Features: st.builds(Features, name=TEXT, values=st.dictionaries(TEXT, FLOATS, max_size=5),
                        text=st.dictionaries(TEXT, TEXT, max_size=3), vector=st.none() | arrays(min_dims=1)),
    Cue: st.builds(Cue, t=FLOATS, kind=TEXT, priority=st.sampled_from(PRIORITIES), reason=st.text(max_size=80),
                   evidence=st.dictionaries(TEXT, JSON, max_size=3), weak=st.booleans(), late=st.booleans()),
    GameState: st.builds(GameState, values=st.dictionaries(TEXT, FLOATS, max_size=4),
                         text=st.dictionaries(TEXT, TEXT, max_size=3),
                         previous=st.dictionaries(TEXT, FLOATS, max_size=4),
                         changed_at=st.dictionaries(TEXT, FLOATS, max_size=4)),
    Event: st.builds(Event, t=FLOATS, event_kind=TEXT, priority=st.sampled_from(PRIORITIES), score=FLOATS,
                     evidence=st.dictionaries(TEXT, JSON, max_size=4)),
    Transcript: st.builds(Transcript, text=st.text(max_size=200), t_start=FLOATS, t_end=FLOATS, language=TEXT),
    Question: st.builds(Question, text=st.text(max_size=200), t=st.none() | FLOATS, id=TEXT),
    Advice: st.builds(Advice, t_event=FLOATS, backend=TEXT, text=st.text(max_size=200), t_media=FLOATS,
                      event_kind=TEXT, priority=st.sampled_from(PRIORITIES), model=TEXT,
                      structured=st.dictionaries(TEXT, JSON, max_size=4),
                      latency_ms=st.dictionaries(TEXT, FLOATS, max_size=3), final=st.booleans(), wake=UINT63,
                      question=st.text(max_size=80), saw_images=st.booleans()),
    Entities: st.builds(Entities, t=FLOATS, frame_index=st.integers(0, 2**31), reason=TEXT,
                        event_t=st.none() | FLOATS, model=TEXT,
                        entities=st.lists(st.builds(Entity, label=TEXT, box=st.tuples(FLOATS, FLOATS, FLOATS, FLOATS),
                                                    score=FLOATS, mask_area=FLOATS), max_size=4)),
    Context: st.builds(Context, t=FLOATS, text=st.text(max_size=200),
                       spans=st.lists(st.tuples(FLOATS, FLOATS, st.integers(0, 2**31)), max_size=4),
                       tokens=st.none() | arrays(np.float32, 2, 2, 8), source=TEXT),
    Metrics: st.builds(Metrics, group=TEXT, stages=st.lists(stage_metrics, max_size=3)),
    Heartbeat: st.builds(Heartbeat, pid=st.none() | UINT63),
    Ready: st.builds(Ready),
    Start: st.builds(Start),
    EndOfStream: st.builds(EndOfStream, stage=TEXT),
    Stop: st.builds(Stop),
    Done: st.builds(Done, metrics=st.none() | st.builds(Metrics, group=TEXT,
                                                        stages=st.lists(stage_metrics, max_size=2)),
                    lost_inputs=st.lists(TEXT, max_size=3), signal=st.none() | st.integers(1, 64)),
    Error: st.builds(Error, message=st.text(max_size=200), usage=st.booleans()),
    InputsEnded: st.builds(InputsEnded, links=st.lists(TEXT, max_size=4)),
}
payloads = st.one_of(*PAYLOADS.values())


@st.composite
def envelopes(draw: Any, payload: Any = payloads) -> Envelope:
    return Envelope.wrap(
        draw(payload),
        source=draw(TEXT),
        seq=draw(UINT63),
        t_media=draw(FLOATS),
        t_capture_ns=draw(INT64),
        trace=draw(st.lists(st.builds(TraceStamp, TEXT, INT64, INT64), max_size=4)),
    )


# -- helpers ------------------------------------------------------------------------------------
def assert_same(a: Any, b: Any, path: str = "env") -> None:
    """Deep equality that compares arrays by dtype, shape and content."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), path  # bit for bit (NaN payloads too)
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        for f in msgspec.structs.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def arrays_in(obj: Any) -> list[np.ndarray]:
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, msgspec.Struct):
        return [a for f in msgspec.structs.fields(obj) for a in arrays_in(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [a for x in obj for a in arrays_in(x)]
    if isinstance(obj, dict):
        return [a for x in obj.values() for a in arrays_in(x)]
    return []


def receive(frames: list[Any]) -> list[Any]:
    """What a socket hands the receiver: the header as bytes, each array frame its own buffer."""
    return [bytes(frames[0])] + [bytearray(np.ascontiguousarray(f).tobytes()) for f in frames[1:]]


def header(**overrides: Any) -> bytes:
    base: dict[str, Any] = {"v": WIRE_VERSION, "kind": "control", "seq": 1, "source": "x", "t_media": 0.0,
                            "t_capture_ns": 0, "trace": [], "payload": {"type": "eos", "stage": "x"}}
    base.update(overrides)
    return msgspec.msgpack.encode(base)


def video_header(desc: Any) -> bytes:
    return header(kind="video", payload={"type": "video", "image": desc})


def good_video() -> list[Any]:
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    return Codec().encode(Envelope.wrap(VideoFrame(image=img), source="s", seq=1, t_media=0.5, t_capture_ns=7))


# -- round trips --------------------------------------------------------------------------------
def test_every_kind_has_a_strategy() -> None:
    assert set(PAYLOADS) == set(PAYLOAD_TYPES)
    assert len(KINDS) == len(set(KINDS)) == 13


@pytest.mark.parametrize("kind", PAYLOAD_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roundtrip_every_kind(kind: type, data: st.DataObject) -> None:
    env = data.draw(envelopes(PAYLOADS[kind]))
    codec = Codec()
    frames = codec.encode(env)
    sent_arrays = arrays_in(env.payload)
    assert len(frames) == 1 + len(sent_arrays)
    # send side: a contiguous array goes out as itself, not a copy
    for arr, frame in zip(sent_arrays, frames[1:], strict=True):
        if arr.flags.c_contiguous and arr.size:
            assert np.shares_memory(frame, arr)
    received = receive(frames)
    out = codec.decode(received)
    assert out.kind == env.kind and type(out.payload) is kind
    assert_same(env, out)
    # receive side: every decoded array is a view on the buffer that arrived
    for arr, buf in zip(arrays_in(out.payload), received[1:], strict=True):
        if arr.size:
            assert np.shares_memory(arr, np.frombuffer(buf, dtype=np.uint8))


@settings(max_examples=40, deadline=None)
@given(env=envelopes())
def test_roundtrip_over_a_real_socket_is_zero_copy(env: Envelope) -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    endpoint = f"inproc://test-codec-{uuid.uuid4().hex}"  # an inproc name is released asynchronously
    try:
        a.bind(endpoint)
        b.connect(endpoint)
        a.send_multipart(Codec().encode(env), copy=False)
        frames = b.recv_multipart(copy=False)
        out = Codec().decode(frames)
        assert_same(env, out)
        for arr, frame in zip(arrays_in(out.payload), frames[1:], strict=True):
            if arr.size:
                assert np.shares_memory(arr, np.frombuffer(frame.buffer, dtype=np.uint8))
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_large_frame_is_not_copied_on_receive() -> None:
    img = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    frames = receive(Codec().encode(Envelope.wrap(VideoFrame(image=img), source="s", seq=1, t_media=0,
                                                  t_capture_ns=0)))
    out = Codec().decode(frames)
    assert out.payload.image.ctypes.data == np.frombuffer(frames[1], np.uint8).ctypes.data
    assert np.array_equal(out.payload.image, img)


def test_encode_refuses_object_arrays() -> None:
    env = Envelope.wrap(Features(name="x", vector=np.array([object()])), source="s", seq=1, t_media=0,
                        t_capture_ns=0)
    with pytest.raises(TypeError):
        Codec().encode(env)


# -- rejections -------------------------------------------------------------------------------------
def test_empty_message() -> None:
    with pytest.raises(CodecError):
        Codec().decode([])


def test_every_truncation_of_a_header_is_rejected() -> None:
    frames = good_video()
    head = bytes(frames[0])
    codec = Codec()
    for n in range(len(head)):
        with pytest.raises(CodecError):
            codec.decode([head[:n], *frames[1:]])


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([b"\xc1"], id="never-used-msgpack-byte"),
        pytest.param([b"not msgpack at all"], id="text"),
        pytest.param([header() + b"\x00"], id="trailing-bytes"),
        pytest.param([msgspec.msgpack.encode([1, 2, 3])], id="array-not-map"),
        pytest.param([header(v=WIRE_VERSION + 1)], id="newer-wire-version"),
        pytest.param([header(v=0)], id="older-wire-version"),
        pytest.param([header(kind="bogus", payload={"type": "bogus"})], id="unknown-kind"),
        pytest.param([header(kind="audio")], id="kind-does-not-match-payload"),
        pytest.param([header(payload={"type": "explode"})], id="unknown-control-tag"),
        pytest.param([header(payload={"type": "control", "action": "eos"})], id="control-of-wire-version-1"),
        pytest.param([header(payload={"type": "error", "usage": True})], id="control-missing-a-field"),
        pytest.param([header(payload={"type": "inputs_ended", "links": "audio"})], id="control-field-of-wrong-type"),
        pytest.param([header(kind="metrics")], id="control-payload-under-a-data-kind"),
        pytest.param([header(kind="eos")], id="control-tag-as-the-kind"),
        pytest.param([header(seq="one")], id="wrong-type"),
        pytest.param([msgspec.msgpack.encode({"v": 1, "kind": "control"})], id="missing-fields"),
        pytest.param([header(), b"extra"], id="unreferenced-extra-frame"),
        pytest.param([video_header(["|u1", [2, 3, 3], 0])], id="missing-array-frame"),
        pytest.param([video_header(["|u1", [2, 3, 3], 0]), b"x" * 17], id="array-frame-too-short"),
        pytest.param([video_header(["|u1", [2, 3, 3], 0]), b"x" * 19], id="array-frame-too-long"),
        pytest.param([video_header(["|O", [1], 0]), b"x" * 8], id="object-dtype"),
        pytest.param([video_header(["|V3", [1], 0]), b"xyz"], id="void-dtype"),
        pytest.param([video_header(["<U2", [1], 0]), b"x" * 8], id="unicode-dtype"),
        pytest.param([video_header(["nonsense", [1], 0]), b"x"], id="unknown-dtype"),
        pytest.param([video_header([None, [0], 0]), b""], id="missing-dtype"),
        pytest.param([video_header(["|u1", [-1], 0]), b""], id="negative-shape"),
        pytest.param([video_header(["|u1", [1] * 9, 0]), b"x"], id="too-many-dims"),
        pytest.param([video_header(["|u1", "1", 0]), b"x"], id="shape-is-a-string"),
        pytest.param([video_header(["|u1", [1.0], 0]), b"x"], id="float-shape"),
        pytest.param([video_header(["|u1", [1], 0.0]), b"x"], id="float-index"),
        pytest.param([video_header(["|u1", [1], True]), b"x"], id="bool-index"),
        pytest.param([video_header(["|u1", [1], -1]), b"x"], id="negative-index"),
        pytest.param([video_header(["|u1", [1], 5]), b"x"], id="index-out-of-range"),
        pytest.param([video_header(["|u1", [1], 0, 9]), b"x"], id="descriptor-too-long"),
        pytest.param([video_header({"a": 1, "b": 2, "c": 3}), b"x"], id="descriptor-is-a-map"),
        pytest.param([video_header(["|u1", [2**63, 2**63], 0]), b""], id="overflowing-shape"),
        pytest.param([video_header(["|u1", [2**63, 2], 0]), b""], id="shape-product-wraps-to-zero"),
        pytest.param([video_header(["|u1", [2**64 - 1], 0]), b""], id="uint64-shape"),
    ],
)
def test_malformed_input_is_a_codec_error(frames: list[bytes]) -> None:
    with pytest.raises(CodecError):
        Codec().decode(frames)


def test_an_array_frame_referenced_twice_is_rejected() -> None:
    desc = ["|u1", [1], 0]
    frames = [header(kind="features", payload={"type": "features", "name": "x", "vector": desc,
                                              "values": {}, "text": {}}), b"x"]
    Codec().decode(frames)  # the well-formed one decodes
    two = [header(kind="video", payload={"type": "video", "image": desc, "frame_index": 0}), b"x", b"y"]
    with pytest.raises(CodecError):
        Codec().decode(two)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_never_raise_anything_but_codec_error(frames: list[bytes]) -> None:
    with contextlib.suppress(CodecError):
        Codec().decode(frames)


@settings(max_examples=300, deadline=None)
@given(env=envelopes(), data=st.data())
def test_mutated_messages_never_raise_anything_but_codec_error(env: Envelope, data: st.DataObject) -> None:
    frames = [bytes(f) if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in Codec().encode(env)]
    i = data.draw(st.integers(0, len(frames) - 1))
    buf = bytearray(frames[i])
    op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
    if op == "flip" and buf:
        buf[pos] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        del buf[pos:]
    else:
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    frames[i] = bytes(buf)
    with contextlib.suppress(CodecError):
        Codec().decode(frames)


def test_a_control_message_round_trips_typed() -> None:
    """A control action is its own Struct: what a group sends at its end comes back as a ``Done``
    holding a ``Metrics`` Struct (not a dict to convert), under the envelope kind "control"."""
    metrics = Metrics(group="work", stages=[StageMetrics(stage="hud", count=3, fps=1.5, dropped=1,
                                                         dropped_by_reason={"late": 1},
                                                         latency_ms=LatencySummary(p50=1.0, p95=2.0, p99=3.0))])
    done = Done(metrics=metrics, lost_inputs=["audio"], signal=15)
    frames = Codec().encode(Envelope.wrap(done, source="work", seq=0, t_media=0.0, t_capture_ns=1))
    head = msgspec.msgpack.decode(frames[0])
    assert head["kind"] == "control" and head["payload"]["type"] == "done"
    out = Codec().decode(receive(frames))
    assert out.kind == "control" and out.payload == done
    assert isinstance(out.payload, Done) and isinstance(out.payload.metrics, Metrics)
    assert isinstance(out.payload.metrics.stages[0].latency_ms, LatencySummary)
    for payload in (Heartbeat(), Ready(), Start(), EndOfStream(stage="src"), Stop(), Error(message="bad", usage=True),
                    InputsEnded(links=["video"])):
        env = Codec().decode(receive(Codec().encode(Envelope.wrap(payload, source="s", seq=0, t_media=0.0,
                                                                  t_capture_ns=0))))
        assert env.kind == "control" and env.payload == payload


def test_codec_is_usable_after_an_error() -> None:
    codec = Codec()
    frames = good_video()
    with pytest.raises(CodecError):
        codec.decode([frames[0]])
    out = codec.decode(receive(frames))
    assert out.payload.image.shape == (2, 3, 3)
