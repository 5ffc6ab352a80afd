"""Test harness that ships with the code: run a stage or a pipeline without a supervisor.

Why it lives in ``copilot/`` and not in ``tests/``: every stage author (and every plugin
outside this repository) needs the same three things to test a stage honestly, and they
must behave like the real runtime, not like a mock of it:

* :func:`run_stage` drives one stage through the real :class:`~copilot.stage.StageRunner`
  lifecycle (``start``, ``process`` per message, ``flush``, ``close``; ``produce`` for a
  source) and returns what it emitted per output port.  Every message in and out goes
  through the wire codec, so a payload that cannot travel (a numpy scalar in a dict, an
  object array) fails here as it would between processes, and arrays arrive read-only as
  they do off a socket.  ``transport="inproc"`` uses real ZeroMQ links instead.
* :func:`run_pipeline` runs every placement group of a pipeline in this process over
  ``inproc://`` links (no spawn), for multi-stage tests.
* :class:`LeakCheck` (the ``leak_check`` fixture in ``tests/conftest.py``): asyncio tasks,
  threads, child processes and ZeroMQ sockets left behind by the code under test.

Time: pass a :class:`~copilot.clock.VirtualClock` (the default) and a paced replay of
minutes of media runs in milliseconds; inputs given as bare payloads are stamped
``step_s`` apart in media time and arrive at their capture time on the virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from copilot.clock import SYSTEM_CLOCK, Clock, VirtualClock
from copilot.codec import Codec, CodecError
from copilot.links import DropCounter, LinkSpec, Publisher, Subscriber, contexts
from copilot.messages import AudioChunk, EndOfStream, Envelope, Heartbeat, Payload, StageMetrics, TraceStamp, VideoFrame
from copilot.registry import resolve_stage
from copilot.stage import Source, Stage, StageContext, StageRunner

T = TypeVar("T")

DEFAULT_STEP_S = 1 / 30


class LeakError(AssertionError):
    """Something the code under test started is still there after it finished."""


class HarnessError(AssertionError):
    """The stage did something the runtime would lose silently (e.g. an undeclared port)."""


# -- message helpers ------------------------------------------------------------------------
def make_envelope(
    payload: Payload,
    *,
    t_media: float = 0.0,
    source: str = "test",
    seq: int = 0,
    t_capture_ns: int | None = None,
    clock: Clock | None = None,
    trace: Sequence[TraceStamp] | None = None,
) -> Envelope:
    """Wrap ``payload`` as a source would: capture time from ``clock`` unless given."""
    cap = t_capture_ns if t_capture_ns is not None else (clock or SYSTEM_CLOCK).now_ns()
    return Envelope.wrap(
        payload,
        source=source,
        seq=seq,
        t_media=t_media,
        t_capture_ns=cap,
        trace=list(trace) if trace is not None else [TraceStamp(source, cap, cap)],
    )


def make_envelopes(
    inputs: Iterable[Payload | Envelope],
    *,
    clock: Clock | None = None,
    step_s: float = DEFAULT_STEP_S,
    t0: float = 0.0,
    source: str = "test",
) -> list[Envelope]:
    """Envelopes for a run: payloads get media time ``t0 + i * step_s`` and the matching
    capture time on ``clock``; envelopes are kept as they are."""
    clk = clock or SYSTEM_CLOCK
    base_ns = clk.now_ns()
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, Envelope):
            out.append(item)
            continue
        cap = base_ns + round(i * step_s * 1e9)
        out.append(make_envelope(item, t_media=round(t0 + i * step_s, 6), source=source, seq=i + 1, t_capture_ns=cap))
    return out


def video_frame(
    height: int = 48, width: int = 64, value: int | None = 0, *, seed: int | None = None, frame_index: int = 0
) -> VideoFrame:
    """An RGB frame filled with ``value``, or random pixels from ``seed``."""
    if seed is not None:
        img = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        img = np.full((height, width, 3), value or 0, dtype=np.uint8)
    return VideoFrame(image=img, frame_index=frame_index)


def audio_chunk(
    n: int = 1024, sample_rate: int = 48000, channels: int = 1, *, amplitude: float = 0.0, freq_hz: float = 440.0,
    chunk_index: int = 0,
) -> AudioChunk:
    """A float32 (n, channels) chunk: silence, or a sine of ``amplitude`` at ``freq_hz``."""
    t = np.arange(n, dtype=np.float32) / sample_rate
    mono = (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return AudioChunk(samples=np.repeat(mono[:, None], channels, axis=1), sample_rate=sample_rate,
                      chunk_index=chunk_index)


def wire_roundtrip(env: Envelope, codec: Codec | None = None) -> Envelope:
    """Encode and decode ``env`` as a socket would, frames copied (arrays come back read-only)."""
    c = codec or Codec()
    frames = [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in c.encode(env)]
    return c.decode(frames)


# -- stand-ins for links (direct transport) ---------------------------------------------------
class FeedSubscriber:
    """Feeds a fixed list of envelopes to a StageRunner, then end of stream.

    Each message goes through the codec; on a :class:`VirtualClock` the clock is moved to the
    message's capture time before it is handed over, as if it had just arrived.
    """

    def __init__(self, envs: Iterable[Envelope], clock: Clock) -> None:
        self._queue = deque(envs)
        self._codec = Codec()
        self.clock = clock
        self.drops = DropCounter()
        self.received = 0
        self.malformed = 0
        self.unsubscribed = False

    async def recv_latest(self) -> Envelope:
        await asyncio.sleep(0)  # let other tasks run between messages, as a socket read would
        if not self._queue:
            return make_envelope(EndOfStream(stage="feed"), source="feed", t_capture_ns=self.clock.now_ns())
        env = self._queue.popleft()
        if isinstance(self.clock, VirtualClock) and env.t_capture_ns > self.clock.now_ns():
            self.clock.advance(env.t_capture_ns - self.clock.now_ns())
        self.received += 1
        return wire_roundtrip(env, self._codec)

    recv = recv_latest

    def unsubscribe(self) -> None:
        self.unsubscribed = True

    def close(self) -> None:
        pass


class CollectingPublisher:
    """Collects what a stage emits on one port (through the codec), like a consumer would."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.envelopes: list[Envelope] = []
        self.heartbeats: list[Envelope] = []  # progress heartbeats, kept apart from the messages
        self.drops = DropCounter()
        self.sent = 0
        self.eos = False
        self._seq = 0
        self._codec = Codec()

    async def send(self, env: Envelope) -> bool:
        self._seq += 1
        env.seq = self._seq
        try:
            out = wire_roundtrip(env, self._codec)
        except CodecError as exc:
            raise HarnessError(
                f"a {env.kind} message emitted on port {self.port!r} encodes but no receiver can decode it "
                f"(it would be dropped as malformed): {exc}"
            ) from exc
        if isinstance(out.payload, EndOfStream):
            self.eos = True
        elif isinstance(out.payload, Heartbeat):
            self.heartbeats.append(out)
        else:
            self.envelopes.append(out)
        self.sent += 1
        return True

    async def end_stream(self, env: Envelope, **_: Any) -> bool:
        return await self.send(env)

    def close(self) -> None:
        pass


class _Outputs(dict):  # type: ignore[type-arg]
    """``ctx.outputs`` for the harness: emitting on an undeclared port is an error, not a loss."""

    def __init__(self, stage_kind: str, ports: Sequence[str]) -> None:
        super().__init__({p: [CollectingPublisher(p)] for p in ports})
        self._kind = stage_kind

    def get(self, port: str, default: Any = None) -> Any:
        if port not in self:
            raise HarnessError(
                f"stage {self._kind!r} emitted on port {port!r}, which is not in its output_ports "
                f"{tuple(self)}: in a pipeline that message would go nowhere"
            )
        return super().get(port, default)


# -- results ----------------------------------------------------------------------------------
@dataclass
class StageResult:
    """What one stage run produced."""

    stage: Stage
    outputs: dict[str, list[Envelope]]
    metrics: StageMetrics
    eos: dict[str, bool] = field(default_factory=dict)
    heartbeats: dict[str, list[Envelope]] = field(default_factory=dict)  # progress heartbeats per port

    def envelopes(self, port: str | None = None) -> list[Envelope]:
        return self.outputs[self._port(port)]

    def payloads(self, port: str | None = None) -> list[Any]:
        return [e.payload for e in self.envelopes(port)]

    def __getitem__(self, port: str) -> list[Any]:
        return self.payloads(port)

    def _port(self, port: str | None) -> str:
        if port is not None:
            if port not in self.outputs:
                raise KeyError(f"no output port {port!r} (ports: {', '.join(self.outputs) or 'none'})")
            return port
        if len(self.outputs) != 1:
            raise KeyError(f"say which port: {', '.join(self.outputs) or 'none'}")
        return next(iter(self.outputs))


def _stage_class(stage: type[Stage] | str) -> type[Stage]:
    if isinstance(stage, str):
        cls: type[Stage] = resolve_stage(stage)
        return cls
    return stage


def _params(cls: type[Stage], params: msgspec.Struct | dict[str, Any] | None) -> msgspec.Struct:
    if isinstance(params, msgspec.Struct):
        return params
    return msgspec.convert(params or {}, cls.Params)


def _new_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    cur = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t not in before and t is not cur and not t.done()]


async def _settle_tasks(before: set[asyncio.Task[Any]], *, what: str, check: bool) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    left = _new_tasks(before)
    if left:
        for t in left:
            t.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if check:
            names = ", ".join(t.get_name() + ":" + getattr(t.get_coro(), "__qualname__", "?") for t in left)
            raise LeakError(f"{what} left {len(left)} asyncio task(s) running: {names}")


async def arun_stage(
    stage: type[Stage] | str,
    inputs: Iterable[Payload | Envelope] = (),
    *,
    params: msgspec.Struct | dict[str, Any] | None = None,
    clock: Clock | None = None,
    options: dict[str, Any] | None = None,
    speed: float | None = 1.0,
    step_s: float = DEFAULT_STEP_S,
    name: str | None = None,
    transport: str = "direct",
    timeout_s: float = 60.0,
    check_leaks: bool = True,
    restart: dict[str, Any] | None = None,
    input_signals: Iterable[tuple[str, Any]] = (),
) -> StageResult:
    """Coroutine form of :func:`run_stage`, for tests that already run an event loop."""
    cls = _stage_class(stage)
    clk: Clock = clock if clock is not None else VirtualClock()
    stage_name = name or cls.kind or cls.__name__.lower()
    envs = make_envelopes(inputs, clock=clk, step_s=step_s)
    before = set(asyncio.all_tasks())
    restart = {**(restart or {}), "input_signals": tuple(input_signals)}
    if transport == "direct":
        outputs = _Outputs(stage_name, cls.output_ports)
        ctx = StageContext(name=stage_name, clock=clk, outputs=outputs, speed=speed, options=dict(options or {}),
                           **(restart or {}))
        inst = cls(ctx, _params(cls, params))
        subs: list[Any] = [] if issubclass(cls, Source) else [FeedSubscriber(envs, clk)]
        runner = StageRunner(inst, subs)
        try:
            await asyncio.wait_for(runner.run(), timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"stage {stage_name!r} did not finish within {timeout_s} s") from exc
        await _settle_tasks(before, what=f"stage {stage_name!r}", check=check_leaks)
        collected = {p: outputs[p][0].envelopes for p in outputs}
        eos = {p: outputs[p][0].eos for p in outputs}
        beats = {p: outputs[p][0].heartbeats for p in outputs}
    elif transport == "inproc":
        inst, collected, eos, beats = await _run_inproc(cls, stage_name, envs, params, clk, options, speed,
                                                        timeout_s, restart)
        await _settle_tasks(before, what=f"stage {stage_name!r}", check=check_leaks)
    else:
        raise ValueError(f"transport must be 'direct' or 'inproc', not {transport!r}")
    return StageResult(stage=inst, outputs=collected, metrics=inst.recorder.snapshot(clk.now_ns()), eos=eos,
                       heartbeats=beats)


async def _run_inproc(
    cls: type[Stage], stage_name: str, envs: list[Envelope], params: Any, clk: Clock,
    options: dict[str, Any] | None, speed: float | None, timeout_s: float, restart: dict[str, Any] | None = None,
) -> tuple[Stage, dict[str, list[Envelope]], dict[str, bool], dict[str, list[Envelope]]]:
    """Real ZeroMQ links over ``inproc://``: one feeding publisher, one collector per port."""
    base = f"inproc://gamecopilot-testing/{uuid.uuid4().hex}"
    specs = {p: LinkSpec(name=p, endpoint=f"{base}/out/{p}", policy="ordered") for p in cls.output_ports}
    pubs = {p: Publisher(s, lossless=True, clock=clk) for p, s in specs.items()}
    collectors = {p: Subscriber(s, lossless=True, clock=clk) for p, s in specs.items()}
    in_spec = LinkSpec(name="in", endpoint=f"{base}/in", policy="ordered")
    feed_pub = None if issubclass(cls, Source) else Publisher(in_spec, lossless=True, clock=clk)
    subs = [] if feed_pub is None else [Subscriber(in_spec, lossless=True, clock=clk)]
    ctx = StageContext(name=stage_name, clock=clk, outputs={p: [pub] for p, pub in pubs.items()}, speed=speed,
                       options=dict(options or {}), **(restart or {}))
    inst = cls(ctx, _params(cls, params))
    runner = StageRunner(inst, subs)  # type: ignore[arg-type]
    collected: dict[str, list[Envelope]] = {p: [] for p in pubs}
    beats: dict[str, list[Envelope]] = {p: [] for p in pubs}
    eos = dict.fromkeys(pubs, False)

    async def collect(port: str, sub: Subscriber) -> None:
        while True:
            env = await sub.recv()
            if isinstance(env.payload, EndOfStream):
                eos[port] = True
                sub.unsubscribe()
                return
            (beats if isinstance(env.payload, Heartbeat) else collected)[port].append(env)

    async def feed() -> None:
        assert feed_pub is not None
        await feed_pub.wait_subscribers(1, 10.0)
        for env in envs:
            if isinstance(clk, VirtualClock) and env.t_capture_ns > clk.now_ns():
                clk.advance(env.t_capture_ns - clk.now_ns())
            await feed_pub.send(msgspec.structs.replace(env))
        await feed_pub.end_stream(make_envelope(EndOfStream(stage="feed"), source="feed", clock=clk))

    try:
        await asyncio.gather(*(p.wait_subscribers(1, 10.0) for p in pubs.values()))
        jobs = [runner.run(), *(collect(p, s) for p, s in collectors.items())]
        if feed_pub is not None:
            jobs.append(feed())
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"stage {stage_name!r} did not finish within {timeout_s} s") from exc
    finally:
        for s in [*subs, *collectors.values()]:
            s.close()
        for p in [*pubs.values(), *([feed_pub] if feed_pub else [])]:
            p.close()
    return inst, collected, eos, beats


def run_stage(
    stage: type[Stage] | str,
    inputs: Iterable[Payload | Envelope] = (),
    *,
    params: msgspec.Struct | dict[str, Any] | None = None,
    clock: Clock | None = None,
    options: dict[str, Any] | None = None,
    speed: float | None = 1.0,
    step_s: float = DEFAULT_STEP_S,
    name: str | None = None,
    transport: str = "direct",
    timeout_s: float = 60.0,
    check_leaks: bool = True,
    restart: dict[str, Any] | None = None,
    input_signals: Iterable[tuple[str, Any]] = (),
) -> StageResult:
    """Run one stage (a class or a registered kind) over ``inputs`` and return its outputs.

    ``inputs`` are payloads (stamped ``step_s`` apart) or ready envelopes, all delivered in
    order on one input.  ``params`` is a dict (validated as the config would be) or a Params
    instance.  ``options`` are the run options a stage reads (e.g. ``events_out``).  A source
    stage takes no inputs and runs its ``produce``.  The stage must finish within
    ``timeout_s``; tasks it leaves running raise :class:`LeakError`.  ``restart`` runs it as a
    group restart would (the :class:`StageContext` fields ``incarnation``,
    ``session_start_ns``, ``resume_media_s``).  ``input_signals`` are the ``(producer, Signal)`` pairs a
    stage that reads declared signals (the trigger) gets from its pipeline (``StageContext.input_signals``).

    >>> res = run_stage("audio_level", [audio_chunk(amplitude=0.5)])      # doctest: +SKIP
    >>> res["features"][0].values["rms_db"]                               # doctest: +SKIP
    """
    return asyncio.run(
        arun_stage(stage, inputs, params=params, clock=clock, options=options, speed=speed, step_s=step_s,
                   name=name, transport=transport, timeout_s=timeout_s, check_leaks=check_leaks, restart=restart,
                   input_signals=input_signals)
    )


# -- whole pipelines in one process -----------------------------------------------------------
@dataclass
class PipelineResult:
    stages: dict[str, StageMetrics]
    runners: dict[str, Any]  # group name -> GroupRunner
    wall_s: float

    def stage(self, name: str) -> Stage:
        for g in self.runners.values():
            for r in g.runners:
                if r.stage.name == name:
                    return r.stage  # type: ignore[no-any-return]
        raise KeyError(name)


async def arun_pipeline(
    config: Any,
    *,
    input_file: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    speed: float | None = None,
    options: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    timeout_s: float = 120.0,
) -> PipelineResult:
    """Run every group of a pipeline (a dict, a YAML path or a PipelineConfig) in this process.

    Links are ``inproc://`` (named uniquely per run), there is no supervisor and no spawn.
    ``input_file`` feeds every ``replay`` stage; ``speed=None`` is as fast as possible with
    lossless links, otherwise pacing follows ``clock`` (real time unless a VirtualClock).
    """
    from copilot.config import PipelineConfig, load_yaml, parse_pipeline
    from copilot.group import GroupRunner, RunOptions

    if isinstance(config, PipelineConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = parse_pipeline(load_yaml(config), str(config))
    else:
        cfg = parse_pipeline(config, "<test config>")
    cfg = msgspec.structs.replace(cfg, name=f"{cfg.name}-{uuid.uuid4().hex[:8]}")
    ovr = {k: dict(v) for k, v in (overrides or {}).items()}
    if input_file is not None:
        for s in cfg.stages:
            if s.kind == "replay":
                ovr.setdefault(s.name, {})["path"] = str(input_file)
    clk: Clock = clock if clock is not None else SYSTEM_CLOCK
    opts = RunOptions(run_dir=None, speed=speed, lossless=speed is None, stage_overrides=ovr,
                      stage_options=dict(options or {}))
    groups = {g: GroupRunner(cfg, g, opts, clk) for g in cfg.groups()}
    for g in groups.values():  # every subscriber exists before any source starts
        g.build()
    before = set(asyncio.all_tasks())
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(g.run() for g in groups.values())), timeout_s)
    except TimeoutError as exc:
        raise TimeoutError(f"pipeline {cfg.name!r} did not finish within {timeout_s} s") from exc
    finally:
        for g in groups.values():
            g.close()
    wall = time.perf_counter() - t0
    await _settle_tasks(before, what=f"pipeline {cfg.name!r}", check=True)
    metrics = {m.stage: m for g in groups.values() for m in g.metrics_snapshot().stages}
    return PipelineResult(stages=metrics, runners=groups, wall_s=wall)


def run_pipeline(config: Any, **kwargs: Any) -> PipelineResult:
    """Synchronous :func:`arun_pipeline`."""
    return asyncio.run(arun_pipeline(config, **kwargs))


# -- leak checks --------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of ``pid`` from /proc, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    return int(rest[1]), rest[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_table() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc (Linux; empty elsewhere)."""
    out: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                out[int(name)] = st[0]
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` in the process tree (zombies excluded)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for p, pp in table.items():
        children.setdefault(pp, []).append(p)
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return {p for p in out if pid_alive(p)}


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def _is_helper(pid: int) -> bool:
    # multiprocessing's resource tracker lives as long as the interpreter that started it
    return "multiprocessing.resource_tracker" in _cmdline(pid)


def _is_helper_thread(t: threading.Thread) -> bool:
    # pyzmq's zero-copy garbage collector: one per process, started on the first big send; and
    # the CurveZMQ handler (copilot.curve), one per process, started by the first secured bind
    name = type(t).__name__
    return name in ("GarbageCollectorThread", "AuthenticationThread") and type(t).__module__.startswith("zmq.")


def open_zmq_sockets() -> list[Any]:
    """Sockets of this process's shared ZeroMQ context that are not closed (but the CurveZMQ
    handler's, which live as long as the process)."""
    from copilot.curve import helper_sockets

    helpers = helper_sockets()
    out = []
    for ctx in contexts():
        for s in list(getattr(ctx, "_sockets", ())):
            if not s.closed and id(s) not in helpers:
                out.append(s)
    return out


class LeakCheck:
    """Snapshot what exists now; :meth:`check` reports what was started since and is left.

    Checked: child processes (of this process, any depth; multiprocessing's resource tracker
    is allowed), Python threads, sockets of the shared ZeroMQ context, and asyncio tasks that
    were still pending when an ``asyncio.run`` under :meth:`watch_asyncio_run` returned
    (``asyncio.run`` cancels them silently, which hides leaks).
    """

    def __init__(self) -> None:
        self.pids = descendants(os.getpid())
        self.threads = set(threading.enumerate())
        self.sockets = {id(s) for s in open_zmq_sockets()}
        self.leaked_tasks: list[str] = []

    def wrap_asyncio_run(self, real_run: Callable[..., Any]) -> Callable[..., Any]:
        """An ``asyncio.run`` that records tasks its main coroutine left pending."""

        def run(main: Coroutine[Any, Any, T], **kwargs: Any) -> T:
            async def wrapper() -> T:
                before = set(asyncio.all_tasks())
                result = await main
                for _ in range(5):
                    await asyncio.sleep(0)
                for t in _new_tasks(before):
                    self.leaked_tasks.append(t.get_name() + ":" + getattr(t.get_coro(), "__qualname__", "?"))
                return result

            return real_run(wrapper(), **kwargs)  # type: ignore[no-any-return]

        return run

    def problems(self) -> list[str]:
        out = []
        pids = {p for p in descendants(os.getpid()) - self.pids if not _is_helper(p)}
        if pids:
            out.append("child processes left: " + ", ".join(f"{p} ({_cmdline(p)[:80]})" for p in sorted(pids)))
        threads = [
            t for t in threading.enumerate() if t not in self.threads and t.is_alive() and not _is_helper_thread(t)
        ]
        if threads:
            out.append("threads left: " + ", ".join(t.name for t in threads))
        gc.collect()
        socks = [s for s in open_zmq_sockets() if id(s) not in self.sockets]
        if socks:
            out.append(f"{len(socks)} ZeroMQ socket(s) left open: " + ", ".join(
                f"{type(s).__name__}({s.type})" for s in socks))
        if self.leaked_tasks:
            out.append("asyncio tasks left pending: " + ", ".join(self.leaked_tasks))
        return out

    def check(self, grace_s: float = 3.0) -> None:
        """Raise :class:`LeakError` if anything is still left after ``grace_s``."""
        deadline = time.monotonic() + grace_s
        while True:
            problems = self.problems()
            if not problems or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if problems:
            raise LeakError("; ".join(problems))


@contextlib.contextmanager
def no_leaks(grace_s: float = 3.0) -> Any:
    """Context manager form of :class:`LeakCheck` (asyncio.run is watched inside it)."""
    lc = LeakCheck()
    real = asyncio.run
    asyncio.run = lc.wrap_asyncio_run(real)  # type: ignore[assignment]
    try:
        yield lc
    finally:
        asyncio.run = real  # type: ignore[assignment]
    lc.check(grace_s)
