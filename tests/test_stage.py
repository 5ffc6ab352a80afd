"""The Stage base class, its runner and the harness in copilot.testing."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest

from copilot.clock import MonotonicClock, VirtualClock
from copilot.messages import AudioChunk, Envelope, Event, Features, Heartbeat, TraceStamp, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Source, Stage, StageContext
from copilot.testing import (
    HarnessError,
    LeakError,
    audio_chunk,
    make_envelope,
    run_pipeline,
    run_stage,
    video_frame,
)

pytestmark = pytest.mark.usefixtures("leak_check")


class CountParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    scale: float = 1.0


class Lifecycle(Stage):
    """Records its lifecycle calls and emits one feature per input plus one on flush."""

    Params = CountParams
    output_ports: ClassVar[tuple[str, ...]] = ("out",)
    calls: ClassVar[list[str]] = []

    async def start(self) -> None:
        type(self).calls = ["start"]

    async def process(self, msg: Envelope) -> None:
        self.calls.append("process")
        await self.emit("out", Features(name="n", values={"v": float(len(self.calls)) * self.params.scale}),
                        parent=msg)

    async def flush(self) -> None:
        self.calls.append("flush")
        await self.emit("out", Features(name="flushed"), t_media=99.0)

    async def close(self) -> None:
        self.calls.append("close")


def test_lifecycle_order_and_outputs() -> None:
    res = run_stage(Lifecycle, [audio_chunk(), audio_chunk()], params={"scale": 2.0})
    assert Lifecycle.calls == ["start", "process", "process", "flush", "close"]
    assert [p.name for p in res["out"]] == ["n", "n", "flushed"]
    assert [p.values.get("v") for p in res["out"][:2]] == [4.0, 6.0]
    assert res.eos == {"out": True}
    assert res.metrics.count == 2


def test_params_are_validated_like_the_config() -> None:
    with pytest.raises(msgspec.ValidationError):
        run_stage(Lifecycle, [], params={"scael": 2.0})


class Exploding(Stage):
    output_ports: ClassVar[tuple[str, ...]] = ("out",)
    closed: ClassVar[bool] = False

    async def process(self, msg: Envelope) -> None:
        raise RuntimeError("boom")

    async def close(self) -> None:
        type(self).closed = True


def test_close_runs_after_an_error_and_the_error_propagates() -> None:
    Exploding.closed = False
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Exploding, [audio_chunk()])
    assert Exploding.closed


class Delay(Stage):
    """Takes 5 ms of (virtual) time per message."""

    output_ports: ClassVar[tuple[str, ...]] = ("out",)

    async def process(self, msg: Envelope) -> None:
        await self.clock.sleep_until_ns(self.clock.now_ns() + 5_000_000)
        await self.emit("out", Features(name="d"), parent=msg)


def test_emit_carries_capture_time_media_time_and_the_trace() -> None:
    clock = VirtualClock()
    parent = make_envelope(Features(name="p"), t_media=3.25, source="up", clock=clock,
                           trace=[TraceStamp("up", clock.now_ns(), clock.now_ns() + 1000)])
    res = run_stage(Delay, [parent], clock=clock)
    (out,) = res.envelopes("out")
    assert out.t_capture_ns == parent.t_capture_ns
    assert out.t_media == 3.25
    assert out.source == "delay"
    assert [s.stage for s in out.trace] == ["up", "delay"]
    stamp = out.trace[-1]
    assert stamp.t_out_ns - stamp.t_in_ns == 5_000_000


def test_latency_figures_follow_the_virtual_clock() -> None:
    res = run_stage(Delay, [audio_chunk() for _ in range(20)])
    m = res.metrics
    assert m.count == 20
    assert m.latency_ms is not None and m.latency_ms.p50 == pytest.approx(5.0)
    assert m.busy_ms is not None and m.busy_ms.p99 == pytest.approx(5.0)
    assert m.media_s == pytest.approx(19 / 30, abs=1e-3)


class Blocking(Stage):
    output_ports: ClassVar[tuple[str, ...]] = ("out",)

    async def process(self, msg: Envelope) -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        name = await self.run_blocking(lambda: (time.sleep(0.15), threading.current_thread().name)[1])
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        await self.emit("out", Features(name="b", text={"thread": name}, values={"ticks": float(ticks)}),
                        parent=msg)


def test_run_blocking_keeps_the_event_loop_running() -> None:
    res = run_stage(Blocking, [audio_chunk()], clock=MonotonicClock())
    (out,) = res["out"]
    assert out.text["thread"].startswith("blocking")
    assert out.text["thread"] != threading.main_thread().name
    assert out.values["ticks"] >= 2  # the loop ticked while the work blocked a thread


class Counter(Source):
    output_ports: ClassVar[tuple[str, ...]] = ("out",)

    async def produce(self) -> None:
        for i in range(5):
            await self.clock.sleep_until_ns(self.clock.now_ns() + 100_000_000)
            await self.emit("out", Features(name="c", values={"i": float(i)}), t_media=i * 0.1)
            self.record_emit(self.clock.now_ns(), i * 0.1)


def test_a_source_produces_then_ends_its_stream() -> None:
    res = run_stage(Counter)
    assert [p.values["i"] for p in res["out"]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert res.eos == {"out": True}
    assert res.metrics.count == 5


def test_inproc_transport_gives_the_same_result_as_direct() -> None:
    frames = [video_frame(seed=i, frame_index=i) for i in range(6)]
    direct = run_stage("frame_diff", frames)
    inproc = run_stage("frame_diff", frames, transport="inproc")
    assert [p.values for p in direct["features"]] == [p.values for p in inproc["features"]]
    assert inproc.eos == {"features": True}


def test_arrays_reach_a_stage_read_only_as_off_a_socket() -> None:
    class Writer(Stage):
        async def process(self, msg: Envelope) -> None:
            msg.payload.image[0, 0, 0] = 1

    with pytest.raises(ValueError, match="read-only"):
        run_stage(Writer, [video_frame()])


def test_an_unencodable_payload_fails_in_the_harness() -> None:
    class Unencodable(Stage):
        output_ports: ClassVar[tuple[str, ...]] = ("out",)

        async def process(self, msg: Envelope) -> None:
            await self.emit("out", Features(name="x", text={"what": object()}), parent=msg)  # type: ignore[dict-item]

    with pytest.raises(TypeError, match="object"):
        run_stage(Unencodable, [audio_chunk()])


def test_a_payload_that_encodes_but_cannot_be_decoded_fails_in_the_harness() -> None:
    class WrongType(Stage):
        output_ports: ClassVar[tuple[str, ...]] = ("out",)

        async def process(self, msg: Envelope) -> None:  # a tuple goes out as an array, not a str
            await self.emit("out", Features(name="x", text={"when": time.gmtime()}), parent=msg)  # type: ignore[dict-item]

    with pytest.raises(HarnessError, match=r"payload\.text"):
        run_stage(WrongType, [audio_chunk()])


def test_numpy_scalars_travel_as_python_numbers() -> None:
    class NumpyScalar(Stage):
        output_ports: ClassVar[tuple[str, ...]] = ("out",)

        async def process(self, msg: Envelope) -> None:
            values = {"f": np.float32(1.5), "i": np.int64(3)}
            await self.emit("out", Features(name="x", values=values), parent=msg)  # type: ignore[arg-type]
            evidence = {"b": np.bool_(True), "u": np.uint8(7)}
            await self.emit("out", Event(t=1.0, event_kind="k", evidence=evidence), parent=msg)

    feat, event = run_stage(NumpyScalar, [audio_chunk()])["out"]
    assert feat.values == {"f": 1.5, "i": 3.0}
    assert event.evidence == {"b": True, "u": 7}
    assert [type(v) for v in event.evidence.values()] == [bool, int]


def test_emitting_on_an_undeclared_port_is_an_error() -> None:
    class Typo(Stage):
        output_ports: ClassVar[tuple[str, ...]] = ("features",)

        async def process(self, msg: Envelope) -> None:
            await self.emit("feature", Features(name="x"), parent=msg)

    with pytest.raises(HarnessError, match="'feature'"):
        run_stage(Typo, [audio_chunk()])


def test_a_task_left_running_is_a_leak() -> None:
    class Leaky(Stage):
        async def start(self) -> None:
            self._t = asyncio.create_task(asyncio.sleep(3600))

        async def process(self, msg: Envelope) -> None:
            pass

    with pytest.raises(LeakError, match="asyncio task"):
        run_stage(Leaky, [audio_chunk()])


def test_a_stage_that_never_finishes_times_out() -> None:
    class Stuck(Stage):
        async def process(self, msg: Envelope) -> None:
            await asyncio.sleep(3600)

    with pytest.raises(TimeoutError, match="did not finish"):
        run_stage(Stuck, [audio_chunk()], timeout_s=0.2)


def test_a_stage_slower_than_real_time_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    class Slow(Stage):
        async def process(self, msg: Envelope) -> None:  # 50 ms of work per 33 ms of media
            await self.clock.sleep_until_ns(self.clock.now_ns() + 50_000_000)

    with caplog.at_level(logging.WARNING, logger="copilot.stage"):
        res = run_stage(Slow, [audio_chunk() for _ in range(90)])
    assert res.metrics.slow
    assert any("slower than real time" in r.getMessage() for r in caplog.records)
    fast = run_stage(Delay, [audio_chunk() for _ in range(90)])
    assert not fast.metrics.slow


def test_clock_semantics() -> None:
    clock = VirtualClock(start_ns=10)
    clock.advance(5)
    assert clock.now_ns() == 15
    with pytest.raises(ValueError):
        clock.advance(-1)
    asyncio.run(clock.sleep_until_ns(100))
    assert clock.now_ns() == 100
    asyncio.run(clock.sleep_until_ns(50))  # the past: no jump back
    assert clock.now_ns() == 100


# -- the bundled stages through the harness ------------------------------------------------------
def test_audio_level_measures_loudness() -> None:
    res = run_stage("audio_level", [audio_chunk(amplitude=0.5), audio_chunk()])
    loud, silent = res["features"]
    assert loud.values["rms_db"] == pytest.approx(-9.03, abs=0.05)
    assert silent.values["rms_db"] == -120.0


def test_jsonl_sink_writes_one_line_per_message(tmp_path: Path) -> None:
    out = tmp_path / "f.jsonl"
    run_stage("jsonl_sink", [Features(name="a", values={"x": 1.0}), video_frame()],
              params={"option": "features_out"}, options={"features_out": str(out)})
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    first = msgspec.json.decode(lines[0])
    assert first["kind"] == "features" and first["values"] == {"x": 1.0}


def test_replay_paced_on_a_virtual_clock(atari_clip: Path) -> None:
    clock = VirtualClock()
    t0 = clock.now_ns()
    res = run_stage("replay", params={"path": str(atari_clip), "start": 2.0, "until": 5.0}, clock=clock)
    video = res.envelopes("video")
    audio = res.envelopes("audio")
    assert len(video) == pytest.approx(90, abs=1)
    assert all(isinstance(e.payload, VideoFrame) and e.payload.image.shape == (480, 640, 3) for e in video)
    assert all(isinstance(e.payload, AudioChunk) for e in audio) and audio
    tv = [e.t_media for e in video]
    assert tv == sorted(tv) and 2.0 - 1e-6 <= tv[0] < 2.05 and tv[-1] < 5.0
    # paced: capture time follows media time at speed 1
    assert (video[-1].t_capture_ns - video[0].t_capture_ns) / 1e9 == pytest.approx(tv[-1] - tv[0], abs=0.05)
    assert (clock.now_ns() - t0) / 1e9 == pytest.approx(3.0, abs=0.1)
    assert res.metrics.media_s == pytest.approx(3.0, abs=0.1)


# -- pipelines in one process -------------------------------------------------------------------
@register_stage("test_slow_sink")
class SlowSink(Stage):
    """A consumer far slower than the frames it is sent (real time)."""

    async def process(self, msg: Envelope) -> None:
        await asyncio.sleep(0.03)


def test_pipeline_ends_when_a_latest_consumer_is_behind(atari_clip: Path) -> None:
    """Frames a slow consumer cannot take are dropped and counted, and the run still ends
    (the end of stream on a latest link used to be lost with the frames: a hang)."""
    cfg = {
        "name": "behind",
        "links": {"frames": {"policy": "latest", "hwm": 2}},
        "stages": [
            {"name": "replay", "kind": "replay", "params": {"until": 3.0, "audio": False},
             "outputs": {"video": "frames"}},
            {"name": "slow", "kind": "test_slow_sink", "inputs": ["frames"]},
        ],
    }
    res = run_pipeline(cfg, input_file=atari_clip, speed=4.0, timeout_s=60)
    sent = res.stages["replay"].count
    slow = res.stages["slow"]
    assert sent == 90
    assert 0 < slow.count < sent
    assert slow.count + slow.dropped == sent, slow.dropped_by_reason


def test_two_groups_in_one_process(atari_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "features.jsonl"
    cfg = {
        "name": "two",
        "links": {"frames": {"policy": "latest", "hwm": 2}, "audio": {"policy": "ordered"},
                  "loud": {"policy": "ordered"}},
        "stages": [
            {"name": "replay", "kind": "replay", "params": {"until": 2.0}, "outputs": {"video": "frames",
                                                                                      "audio": "audio"},
             "placement": {"group": "a"}},
            {"name": "loudness", "kind": "audio_level", "inputs": ["audio"], "outputs": {"features": "loud"},
             "placement": {"group": "b"}},
            {"name": "sink", "kind": "jsonl_sink", "params": {"path": str(out)}, "inputs": ["frames", "loud"],
             "placement": {"group": "b"}},
        ],
    }
    res = run_pipeline(cfg, input_file=atari_clip, speed=None)
    replay, loud, sink = (res.stages[n] for n in ("replay", "loudness", "sink"))
    assert replay.count > 0 and loud.count > 0
    assert sink.count == replay.count  # lossless at max speed: every frame and every loudness value
    assert len(out.read_text().splitlines()) == sink.count
    assert sink.dropped == 0
    assert isinstance(res.stage("sink"), Stage)


def test_stage_context_defaults() -> None:
    ctx = StageContext(name="x")
    assert ctx.speed == 1.0 and ctx.outputs == {} and ctx.options == {}


def _unused(*_: Any) -> None:  # keep imports honest for type checkers
    return None


def test_leak_check_sees_sockets_threads_processes_and_tasks() -> None:
    import subprocess

    import zmq

    from copilot.links import contexts
    from copilot.testing import LeakCheck

    lc = LeakCheck()
    assert lc.problems() == []
    sock = contexts()[0].socket(zmq.PUB)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-behind")
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        found = "; ".join(lc.problems())
        assert "ZeroMQ socket" in found and "left-behind" in found and str(child.pid) in found
    finally:
        sock.close()
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    assert lc.problems() == []

    async def leaves_a_task() -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten")

    lc.wrap_asyncio_run(asyncio.runners.run)(leaves_a_task())  # the real run, not the fixture's
    assert any("forgotten" in p for p in lc.problems())


# -- progress heartbeats ------------------------------------------------------------------------
class OnChange(Stage):
    """Emits the input's value only when it changed (as HUD OCR sends state)."""

    output_ports = ("features",)
    progress_s = 0.1

    def __init__(self, ctx: StageContext, params: msgspec.Struct) -> None:
        super().__init__(ctx, params)
        self.last: float | None = None

    async def process(self, msg: Envelope) -> None:
        value = msg.payload.values["x"]  # type: ignore[union-attr]
        if value != self.last:
            self.last = value
            await self.emit("features", Features(name="x", values={"x": value}), parent=msg)


def test_a_stage_that_emits_rarely_sends_heartbeats_while_it_is_quiet() -> None:
    values = [0.0] * 30 + [1.0] * 30  # 2 s at 30 Hz, one change at 1 s
    res = run_stage(OnChange, [Features(name="in", values={"x": v}) for v in values], step_s=1 / 30)
    assert [e.t_media for e in res.envelopes("features")] == pytest.approx([0.0, 1.0])
    beats = [e.t_media for e in res.heartbeats["features"]]
    assert all(isinstance(e.payload, Heartbeat) for e in res.heartbeats["features"])
    # one every progress_s of media time while nothing is emitted, none in the messages
    assert beats == sorted(beats) and len(beats) == pytest.approx(18, abs=2)
    sent = sorted([(t, "beat") for t in beats] + [(0.0, "msg"), (1.0, "msg")])
    since_last = [t - prev for (prev, _), (t, what) in itertools.pairwise(sent) if what == "beat"]
    assert min(since_last) >= 0.1 - 1e-5 and max(since_last) <= 0.1 + 1 / 30 + 1e-5
    # a stage without progress_s sends none
    assert run_stage(Lifecycle, [Features(name="in", values={"x": 1.0})] * 5).heartbeats == {"out": []}


def test_heartbeats_travel_over_real_links() -> None:
    res = run_stage(OnChange, [Features(name="in", values={"x": 0.0})] * 15, step_s=1 / 30, transport="inproc")
    assert len(res.envelopes("features")) == 1
    assert [e.t_media for e in res.heartbeats["features"]] == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.04)


class Progress(Stage):
    """Records what reaches process and what reaches on_progress."""

    output_ports = ("out",)

    def __init__(self, ctx: StageContext, params: msgspec.Struct) -> None:
        super().__init__(ctx, params)
        self.seen: list[tuple[str, float]] = []

    async def process(self, msg: Envelope) -> None:
        self.seen.append(("process", msg.t_media))

    async def on_progress(self, msg: Envelope) -> None:
        self.seen.append(("progress", msg.t_media))


def test_a_consumer_gets_heartbeats_in_on_progress_not_in_process() -> None:
    inputs = [make_envelope(Features(name="x"), t_media=0.0, source="a"),
              make_envelope(Heartbeat(), t_media=0.5, source="a"),
              make_envelope(Features(name="x"), t_media=0.6, source="a")]
    res = run_stage(Progress, inputs)
    assert res.stage.seen == [("process", 0.0), ("progress", 0.5), ("process", 0.6)]  # type: ignore[attr-defined]


def test_the_metrics_table_lists_each_stage_s_own_timings() -> None:
    from copilot.messages import LatencySummary, StageMetrics
    from copilot.report import metrics_table, stage_timings

    trig = StageMetrics(stage="trigger", count=10, fps=30.0, dropped=0, extra_ms={
        "emit_lag_ms": LatencySummary(p50=310.0, p95=360.0, p99=365.5),
        "decision_delay_ms": LatencySummary(p50=253.0, p95=265.0, p99=266.0)})
    plain = StageMetrics(stage="motion", count=10, fps=30.0, dropped=0)
    assert stage_timings([plain, trig]) == [
        "trigger decision delay: p50 253, p95 265, p99 266 ms",
        "trigger emit lag: p50 310, p95 360, p99 366 ms",
    ]
    table = metrics_table([plain, trig])
    assert "trigger emit lag" in str(table.caption)
    # every column is labelled; the "note" column is there only when a stage is slow
    headers = [str(c.header) for c in table.columns]
    assert all(headers) and "note" not in headers
    slow = StageMetrics(stage="hud", count=10, fps=20.0, dropped=0, slow=True)
    table = metrics_table([plain, slow])
    assert [str(c.header) for c in table.columns][-1] == "note"
    assert list(table.columns[-1].cells) == ["", "[yellow]slow[/]"]


class VideoOnly(Stage[CountParams]):
    """Declares the one payload type it takes: the runner keeps everything else from ``process``."""

    Params = CountParams
    accepts = (VideoFrame,)
    output_ports: ClassVar[tuple[str, ...]] = ("out",)

    async def process(self, msg: Envelope) -> None:
        frame = msg.payload_as(VideoFrame)
        await self.emit("out", Features(name="w", values={"w": frame.image.shape[1] * self.params.scale}), parent=msg)


def test_the_runner_drops_and_counts_a_payload_the_stage_does_not_accept(caplog: pytest.LogCaptureFixture) -> None:
    inputs = [video_frame(), audio_chunk(), Features(name="x"), audio_chunk(), video_frame()]
    with caplog.at_level(logging.WARNING, logger="copilot.stage"):
        res = run_stage(VideoOnly, inputs, params={"scale": 0.5})
    assert [f.values["w"] for f in res["out"]] == [video_frame().image.shape[1] * 0.5] * 2
    assert res.metrics.count == 2  # only what it processed
    assert res.metrics.dropped == 3
    assert res.metrics.dropped_by_reason == {"unaccepted_audio": 2, "unaccepted_features": 1}
    warned = [r.getMessage() for r in caplog.records if "takes no" in r.getMessage()]
    assert len(warned) == 2  # once per kind


def test_a_stage_that_declares_nothing_takes_every_payload() -> None:
    res = run_stage(Lifecycle, [video_frame(), audio_chunk(), Features(name="x")])
    assert res.metrics.count == 3 and res.metrics.dropped == 0


def test_payload_as_names_a_mismatch() -> None:
    env = make_envelope(audio_chunk(), source="mic")
    assert env.payload_as(AudioChunk) is env.payload
    with pytest.raises(TypeError, match="AudioChunk payload from mic where a VideoFrame was expected"):
        env.payload_as(VideoFrame)


def test_check_on_the_base_class_has_nothing_to_check() -> None:
    from copilot.stage import NoParams

    assert Stage.check(NoParams()) is None
    assert Lifecycle.check(CountParams()) is None  # inherited by a stage that does not define it


class Picky(Stage[CountParams]):
    """Refuses a scale of zero before the run starts."""

    Params = CountParams

    @classmethod
    def check(cls, params: CountParams) -> None:
        if params.scale == 0:
            from copilot.errors import UsageError

            raise UsageError("picky: scale must not be 0")


def test_prepare_run_calls_every_stage_s_check(tmp_path: Path) -> None:
    from copilot.commands import prepare_run
    from copilot.errors import UsageError

    def pipeline(scale: float) -> str:
        cfg = tmp_path / f"p{scale}.yaml"
        stages = [{"name": "src", "kind": "tests.test_stage:Counter", "outputs": {"out": "x"}},
                  {"name": "picky", "kind": "tests.test_stage:Picky", "inputs": ["x"], "params": {"scale": scale}}]
        cfg.write_bytes(msgspec.json.encode({"name": "p", "links": {"x": {}}, "stages": stages}))  # (JSON is YAML)
        return str(cfg)

    prepare_run(pipeline(2.0), input_file=None)
    with pytest.raises(UsageError, match="picky: scale must not be 0"):
        prepare_run(pipeline(0.0), input_file=None)


def test_an_analyzer_stage_must_declare_its_input_type() -> None:
    from stages._analyzer import AnalyzerStage

    with pytest.raises(TypeError, match="accepts"):

        class NoInput(AnalyzerStage[CountParams, VideoFrame]):
            Params = CountParams
