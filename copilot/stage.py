"""The Stage base class: one method to override, an explicit lifecycle.

A stage receives envelopes on its input links and emits payloads on named output ports::

    class FrameDiffParams(msgspec.Struct, forbid_unknown_fields=True):
        stride: int = 4

    @register_stage("frame_diff")
    class FrameDiff(Stage[FrameDiffParams]):
        Params = FrameDiffParams
        accepts = (VideoFrame,)

        async def process(self, msg: Envelope) -> None:
            frame = msg.payload_as(VideoFrame)
            ...  # self.params is a FrameDiffParams
            await self.emit("features", Features(name="motion", values={...}), parent=msg)

``Stage`` is generic in its params so ``self.params`` is typed in a subclass; a plain
``Stage`` subclass (untyped params) works the same at run time.  ``accepts`` names the
payload types the stage takes: the runner drops and counts anything else before
``process`` (an empty tuple takes everything).

Lifecycle, driven by :class:`StageRunner`: ``start()`` once before the first message,
``process(msg)`` for each message, ``flush()`` when every input has reached end of stream
(emit whatever is pending), ``close()`` always, last.  Sources override :meth:`Source.produce`
instead of ``process``.

``emit(..., parent=msg)`` carries the parent's capture time forward and appends this stage's
``(name, t_in, t_out)`` stamp to the trace, so capture-to-output latency is known everywhere.
Blocking work (model inference, OCR) goes through :meth:`run_blocking`, which runs it on the
stage's own worker thread so the event loop keeps receiving.

Progress: a consumer that orders its inputs by media time (the trigger) must know when an
input has nothing earlier to say, or it waits.  A stage that emits rarely (state only when
it changes) but has said all it will about an input once ``process`` returns sets
``progress_s``: when one of its ports has been quiet that long in media time, the runner
sends a :class:`~copilot.messages.Heartbeat` on it stamped with the input's media time.
Consumers see heartbeats in :meth:`Stage.on_progress`, never in ``process``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from copilot.clock import SYSTEM_CLOCK, Clock
from copilot.links import ProducerGone, Publisher, Subscriber
from copilot.messages import EndOfStream, Envelope, Heartbeat, Payload, TraceStamp, VideoFrame
from copilot.metrics import StageRecorder
from copilot.signals import Signal
from copilot.worker import StageWorker

log = logging.getLogger(__name__)
R = TypeVar("R")
# A stage's params type.  (No TypeVar default: a bare ``Stage`` subclass is read as Stage[Any].)
P = TypeVar("P", bound=msgspec.Struct)

# A stage whose own work takes more than this fraction of the media time it covers is slower
# than real time (livekit's SLOW_INFERENCE_THRESHOLD idea, applied to a whole stage).
SLOW_FRACTION = 0.9
SLOW_CHECK_MEDIA_S = 2.0


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    pass


@dataclass
class StageContext:
    """What a stage gets from the runner: its name, clock, output publishers, run options."""

    name: str
    clock: Clock = SYSTEM_CLOCK
    outputs: dict[str, list[Publisher]] = field(default_factory=dict)
    speed: float | None = 1.0  # None = as fast as possible
    options: dict[str, Any] = field(default_factory=dict)
    # After a restart (see :class:`copilot.group.RunOptions`): this stage runs again in a run that
    # began at ``session_start_ns`` (monotonic ns); a source continues the run's media time from
    # there instead of starting over at 0, and ``resume_media_s`` is how far it had got before.
    incarnation: int = 0
    session_start_ns: int | None = None
    resume_media_s: float | None = None
    # ``(producer stage, Signal)`` for every graded signal the stages feeding this one declare (see
    # :mod:`copilot.signals`); filled by the group for a stage class that sets ``reads_signals``
    input_signals: tuple[tuple[str, Signal], ...] = ()
    # where the stage runs as its own process names it (copilot.placement): cpu, cuda:0 (the group's
    # first GPU: the launcher pins each group's GPUs), cuda (a group of several GPUs); None when the
    # pipeline places nothing, and the stage's own params (device: auto) decide
    device: str | None = None


class Stage(Generic[P]):
    """Base class of every stage.  Override :meth:`process` (or :meth:`Source.produce`)."""

    kind: ClassVar[str] = ""
    # (a ClassVar cannot mention P: keep it the same class as P by hand)
    Params: ClassVar[type[msgspec.Struct]] = NoParams
    # the payload types process() takes; the runner drops and counts the rest.  () = all of them
    accepts: ClassVar[tuple[type, ...]] = ()
    output_ports: ClassVar[tuple[str, ...]] = ()
    # the graded signals this stage emits as Features values (see copilot.signals): what the trigger scores
    signals: ClassVar[tuple[Signal, ...]] = ()
    # True: the group fills ctx.input_signals with what the stages feeding this one declare (the trigger)
    reads_signals: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 1
    # > 0: after an input, a port quiet this long (media s) gets a progress heartbeat (see above)
    progress_s: ClassVar[float] = 0.0
    # where the stage really runs (cpu, cuda:0, tensorrt), set once it knows (its model loaded, an ONNX
    # session that fell back to the CPU): it travels in its metrics (StageMetrics.device), and the
    # supervisor warns when it is not the kind of device the stage was placed on
    device_actual: str | None = None

    def __init__(self, ctx: StageContext, params: P) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.params: P = params
        self.clock = ctx.clock
        self.log = logging.getLogger(f"stage.{self.name}")
        self.recorder = StageRecorder(self.name, ctx.clock.now_ns())
        self._executor: StageWorker | None = None
        self._t_in_ns = 0
        self._prev_out_ns: int | None = None
        self._seq = 0
        self._port_t: dict[str, float] = {}  # media time of the last message or heartbeat per port
        self._warned: set[str] = set()

    def warn_once(self, key: str, line: str) -> None:
        """One warning line per kind of trouble (``key``) for the stage's life; repeats go to debug, so a
        fault that recurs on every input does not flood the console (count it in the metrics instead)."""
        if key in self._warned:
            self.log.debug("%s", line)
            return
        self._warned.add(key)
        self.log.warning("%s", line)

    @classmethod
    def check(cls, params: P) -> object:
        """Validate ``params`` against the world (a file exists, a device opens); raise
        :class:`~copilot.errors.UsageError` if they cannot work.  By default there is nothing
        to check and it returns None.

        ``prepare_run`` calls it for every stage of the pipeline before any group starts and
        before any output file is emptied, so bad params end the run in one line with exit
        code 2 and leave earlier outputs as they were.  What it returns is read for a
        ``duration_s`` (a replay's media length sizes the run's progress).
        """
        return None

    @classmethod
    def announce(cls, params: P, options: dict[str, Any]) -> str | None:
        """A line the command line prints before the run starts (the reasoner: which backend answers
        and why), given the stage's params and the run options; or None.  May raise
        :class:`~copilot.errors.UsageError` for options that cannot work together."""
        return None

    @classmethod
    def check_profile(cls, prof: Any, source: str, cfg: Any, name: str) -> None:
        """Validate the game-profile sections this stage owns (the trigger its ``trigger`` section
        and the weights, the HUD stage its ``hud`` section); raise :class:`~copilot.errors.UsageError`
        naming ``source`` and the key.  Called with the parsed pipeline ``cfg`` and this stage's
        ``name`` before anything runs (:func:`copilot.profile.check_sections`).  By default the stage
        owns no section."""

    # -- lifecycle (override what you need) ---------------------------------------------------
    async def start(self) -> None:
        """Load models, open files.  Runs before any message."""

    async def process(self, msg: Envelope) -> None:
        """Handle one input message.  The one method a processing stage overrides."""
        raise NotImplementedError(f"{type(self).__name__}.process")

    async def flush(self) -> None:
        """All inputs ended: emit anything still pending."""

    async def close(self) -> None:
        """Release resources.  Always runs, even after an error."""

    async def on_progress(self, msg: Envelope) -> None:
        """A producer on an input has nothing more to say before ``msg.t_media`` (a heartbeat)."""

    # -- helpers for subclasses --------------------------------------------------------------
    async def emit(
        self,
        port: str,
        payload: Payload,
        *,
        parent: Envelope | None = None,
        t_media: float | None = None,
        t_capture_ns: int | None = None,
    ) -> bool:
        """Send ``payload`` on output ``port``; False if any link dropped it."""
        now = self.clock.now_ns()
        if parent is not None:
            trace = [*parent.trace, TraceStamp(self.name, self._t_in_ns, now)]
            cap = parent.t_capture_ns if t_capture_ns is None else t_capture_ns
            tm = parent.t_media if t_media is None else t_media
        else:
            cap = now if t_capture_ns is None else t_capture_ns
            trace = [TraceStamp(self.name, cap, now)]
            tm = 0.0 if t_media is None else t_media
        self._seq += 1
        env = Envelope.wrap(payload, source=self.name, seq=self._seq, t_media=tm, t_capture_ns=cap, trace=trace)
        self._port_t[port] = max(self._port_t.get(port, tm), tm)
        if isinstance(payload, VideoFrame):  # a source's fps is its video rate (see StageRecorder)
            self.recorder.video_frames += 1
        ok = True
        for pub in self.ctx.outputs.get(port, []):
            ok = await pub.send(env) and ok
        return ok

    async def send_progress(self, t_media: float, t_capture_ns: int | None = None) -> None:
        """A heartbeat on every port quiet for ``progress_s`` of media time before ``t_media``
        (stamped with the input's capture time, so latency downstream still counts from it)."""
        for port in self.output_ports:
            last = self._port_t.get(port)
            if last is not None and t_media - last < self.progress_s - 1e-6:  # media times are rounded to us
                continue
            self._port_t[port] = t_media
            cap = self.clock.now_ns() if t_capture_ns is None else t_capture_ns
            env = Envelope.wrap(Heartbeat(), source=self.name, seq=0, t_media=t_media,
                                t_capture_ns=cap)
            for pub in self.ctx.outputs.get(port, []):
                await pub.send(env)

    async def run_blocking(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking work on this stage's worker thread, off the event loop (one call at a
        time, in order)."""
        if self._executor is None:
            self._executor = StageWorker(self.name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown_executor(self) -> None:
        """End the worker thread once the stage is closed.  A call still running (a model load
        a stop cut short) is left to finish on its own: waiting for it here would block the
        event loop, and with it the group's heartbeats and its stop, for as long as it takes."""
        if self._executor is not None:
            if self._executor.stop():
                self.log.info("stopped with a blocking call still running (it is left behind)")
            self._executor = None


class Source(Stage[P]):
    """A stage with no inputs: override :meth:`produce`, which returns at end of stream."""

    min_inputs: ClassVar[int] = 0

    async def produce(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}.produce")

    async def process(self, msg: Envelope) -> None:  # sources take no input
        return None

    def resume_media_s(self) -> float | None:
        """After a group restart, the media time (s from the run's start) to go on from: where the
        run's clock says the media is now, or at max speed as far as this source had got.  None
        on the run's first incarnation, which starts at the beginning."""
        ctx = self.ctx
        if ctx.session_start_ns is None:
            return None
        if ctx.speed is None:
            return ctx.resume_media_s or 0.0
        return max(0.0, (self.clock.now_ns() - ctx.session_start_ns) / 1e9 * ctx.speed)

    def record_emit(self, t_capture_ns: int, t_media: float) -> None:
        now = self.clock.now_ns()
        self.recorder.observe(
            t_capture_ns=t_capture_ns, t_in_ns=t_capture_ns, t_out_ns=now, t_prev_out_ns=None, t_media=t_media
        )


class StageRunner:
    """Drives one stage: receives from its inputs, calls the lifecycle, records metrics."""

    def __init__(self, stage: Stage, inputs: list[Subscriber]) -> None:
        self.stage = stage
        self.inputs = inputs
        self.done = asyncio.Event()
        self._lock = asyncio.Lock()
        self._prepared = False
        self._work_since_check_ns = 0
        self._media_mark: float | None = None
        self._slow_warned = False
        self._stopping = False
        self._produce_task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.lost_inputs: list[str] = []  # links that ended without their end of stream (ProducerGone)
        self._closed = False
        self._refused: set[str] = set()  # kinds of payload dropped as not accepted (warned once each)

    def request_stop(self) -> None:
        """Graceful stop: a source stops producing; the end of stream then flows downstream."""
        self._stopping = True
        if self._produce_task is not None:
            self._produce_task.cancel()

    async def prepare(self) -> None:
        """Run the stage's ``start`` ahead of :meth:`run`.

        The group runner prepares sources before it reports ready, so a replay has its file
        open and its first frames decoded when the run starts: pacing begins on time and
        ``wall_s`` measures the media, not the warm-up.  If ``start`` fails the stage is
        closed here, since :meth:`run` will never be called.
        """
        if self._prepared:
            return
        self._prepared = True
        try:
            await self.stage.start()
        except BaseException:
            self._closed = True
            try:
                await self.stage.close()
            finally:
                self.stage.shutdown_executor()
                self.done.set()
            raise

    async def run(self) -> None:
        st = self.stage
        if self._closed:  # its start failed or was cancelled (a stop while starting): closed already
            return
        try:
            if not self._prepared:
                self._prepared = True
                await st.start()
            if isinstance(st, Source):
                if not self._stopping:  # (one stopped before it started, at Ctrl-C during start-up, makes nothing)
                    self._produce_task = asyncio.ensure_future(st.produce())
                    try:
                        await self._produce_task
                    except asyncio.CancelledError:
                        if not self._stopping:
                            raise
                self._sync_drops()
            else:
                await asyncio.gather(*(self._read(sub) for sub in self.inputs))
                await st.flush()
            await self._send_eos()
        finally:
            try:
                await st.close()
            finally:
                st.shutdown_executor()
                self.done.set()

    async def _send_eos(self) -> None:
        """End of stream on every output, and wait until each consumer has taken it."""
        pubs = {id(p): p for ps in self.stage.ctx.outputs.values() for p in ps}
        await asyncio.gather(*(
            p.end_stream(
                Envelope.wrap(
                    EndOfStream(stage=self.stage.name),
                    source=self.stage.name,
                    seq=0,
                    t_media=0.0,
                    t_capture_ns=self.stage.clock.now_ns(),
                )
            )
            for p in pubs.values()
        ))

    async def _read(self, sub: Subscriber) -> None:
        st = self.stage
        while True:
            try:
                msg = await sub.recv_latest()
            except ProducerGone:
                log.warning("stage %s: link %s ended while this stage was down; what it sent then is lost",
                            st.name, sub.spec.name)
                self.lost_inputs.append(sub.spec.name)
                sub.unsubscribe()
                self._sync_drops()
                return
            if msg.kind == "control":
                if isinstance(msg.payload, EndOfStream):
                    sub.unsubscribe()
                    self._sync_drops()
                    return
                if isinstance(msg.payload, Heartbeat):
                    async with self._lock:
                        await st.on_progress(msg)
                continue
            if st.accepts and not isinstance(msg.payload, st.accepts):
                await self._refuse(msg)
                continue
            async with self._lock:
                t_in = st.clock.now_ns()
                st._t_in_ns = t_in
                await st.process(msg)
                if st.progress_s > 0:
                    await st.send_progress(msg.t_media, msg.t_capture_ns)
                t_out = st.clock.now_ns()
            prev_out = msg.trace[-1].t_out_ns if msg.trace else msg.t_capture_ns
            st.recorder.observe(
                t_capture_ns=msg.t_capture_ns, t_in_ns=t_in, t_out_ns=t_out, t_prev_out_ns=prev_out,
                t_media=msg.t_media,
            )
            self._sync_drops()
            self._check_slow(t_out - t_in, msg.t_media)

    async def _refuse(self, msg: Envelope) -> None:
        """A payload the stage does not accept (a link wired to the wrong stage): dropped and
        counted as ``unaccepted_<kind>``, never seen by ``process``.  It still moves the stage's
        progress on, as an input the stage had nothing to say about did before."""
        st = self.stage
        st.recorder.drop(f"unaccepted_{msg.kind}")
        if msg.kind not in self._refused:
            self._refused.add(msg.kind)
            log.warning("stage %s takes no %s messages (from %s); dropping them", st.name, msg.kind, msg.source)
        if st.progress_s > 0:
            async with self._lock:
                await st.send_progress(msg.t_media, msg.t_capture_ns)

    def _sync_drops(self) -> None:
        links: Counter[str] = Counter()
        for sub in self.inputs:
            for reason, n in sub.drops.by_reason.items():
                links[reason] += n
        for pubs in self.stage.ctx.outputs.values():
            for pub in pubs:
                for reason, n in pub.drops.by_reason.items():
                    links["out_" + reason] += n
        self.stage.recorder.link_dropped = links

    def _check_slow(self, busy_ns: int, t_media: float) -> None:
        if self._media_mark is None:
            self._media_mark = t_media
        self._work_since_check_ns += busy_ns
        span = t_media - self._media_mark
        if span >= SLOW_CHECK_MEDIA_S:
            ratio = self._work_since_check_ns / 1e9 / span
            slow = ratio > SLOW_FRACTION
            self.stage.recorder.slow = slow
            if slow and not self._slow_warned:
                log.warning(
                    "stage %s is slower than real time: %.2f s of work per second of media",
                    self.stage.name,
                    ratio,
                )
                self._slow_warned = True
            self._media_mark = t_media
            self._work_since_check_ns = 0
