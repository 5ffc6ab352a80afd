"""Runs one placement group: its stages, their links, heartbeats and metrics.

A group is what one OS process runs.  :func:`group_process_main` is the spawn target the
supervisor starts; :func:`run_group` is the same thing as a coroutine, which tests and the
single-host ``stage`` command call directly.

Protocol with the supervisor (a DEALER to the supervisor's ROUTER, separate from data links),
one control Struct of :mod:`copilot.messages` per step: ``Ready`` once every output link sees
its consumers, then wait for ``Start`` (sources only begin then), ``Heartbeat`` every
``heartbeat_s``, ``Stop`` from the supervisor asks for a graceful end (sources stop, end of
stream flows, stages flush), ``Done`` (with the final ``Metrics``) when every stage of the
group has finished, ``Error`` with one line when it fails.  ``InputsEnded`` from the
supervisor names links whose producing group is done: a group restarted after their end of
stream went out would otherwise wait for it forever.  Metrics go on their own PUSH link,
latest-wins, as the ``Metrics`` Struct itself.

A group started by hand (``gamecopilot stage``) has no supervisor to tell it that: a group
that ends its links leaves a note per link in the run directory (cleared when it starts
again), and a consumer says, in a line, which producer it waits for and whether that one
already finished (:meth:`GroupRunner._wait_notices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from copilot.clock import SYSTEM_CLOCK, Clock
from copilot.codec import Codec, CodecError
from copilot.config import PipelineConfig, curve_keys, link_specs, parse_pipeline
from copilot.curve import is_tcp, secure_client
from copilot.errors import UsageError, first_line
from copilot.links import Publisher, Subscriber, contexts, end_process_context
from copilot.messages import Control, Done, Envelope, Error, Heartbeat, InputsEnded, Metrics, Ready, Start, Stop
from copilot.reach import ConnectionWatch
from copilot.registry import resolve_stage
from copilot.signals import pipeline_signals
from copilot.stage import Source, StageContext, StageRunner
from copilot.worker import exit_process

log = logging.getLogger(__name__)
# how long a failing group waits after queueing its one line for the supervisor (see report_failure)
FAILURE_FLUSH_S = 0.2

SUBSCRIBE_TIMEOUT_S = 10.0
# a group started by hand (``gamecopilot stage``, no supervisor) says what it waits for when an
# input link has brought nothing for this long
WAIT_NOTICE_S = 10.0


@dataclass
class RunOptions:
    """How a run is wired and paced; the same for every group of a run."""

    run_dir: str | None = None  # None: inproc endpoints (all groups in one process)
    control_endpoint: str | None = None
    metrics_endpoint: str | None = None
    speed: float | None = 1.0  # None: as fast as possible
    lossless: bool = False
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_options: dict[str, Any] = field(default_factory=dict)
    incarnation: int = 0
    # set by the supervisor when it restarts a group: when the run's media clock began (monotonic
    # ns, the same in every process of this host) and how far each source had got (media s)
    session_start_ns: int | None = None
    resume_media_s: dict[str, float] = field(default_factory=dict)
    supervisor_pid: int | None = None  # a spawned group stops when this process is gone
    wait_for_start: bool = True
    log_level: int = logging.WARNING


def _encode_ctrl(codec: Codec, payload: Control | Metrics, group: str, clock: Clock) -> list[Any]:
    env = Envelope.wrap(payload, source=group, seq=0, t_media=0.0, t_capture_ns=clock.now_ns())
    return codec.encode(env)


class GroupRunner:
    """Builds and runs the stages of one group."""

    def __init__(self, cfg: PipelineConfig, group: str, opts: RunOptions, clock: Clock = SYSTEM_CLOCK):
        self.cfg = cfg
        self.group = group
        self.opts = opts
        self.clock = clock
        self.codec = Codec()
        self.runners: list[StageRunner] = []
        self.publishers: dict[str, Publisher] = {}
        self.subscribers: list[Subscriber] = []
        self._stop = asyncio.Event()
        self._start = asyncio.Event()
        self._ctrl: Any = None
        self._ctrl_watch: ConnectionWatch | None = None
        self._metrics: Any = None
        # Set in a spawned group: when this parent (the supervisor) dies, the group stops
        # instead of running on as an orphan (SIGKILL gives the supervisor no chance to stop it).
        self.parent_pid: int | None = None
        self.error_reported = False  # the supervisor was told why this group failed
        self.stop_signal: int | None = None  # the signal that stopped it (run_group), for the exit code
        # called when every stage has started, or in a group without a source of its own at its
        # first input from another group (may raise)
        self.on_ready: Callable[[], None] | None = None

    def build(self) -> None:
        # the supervisor's sockets first: a link that cannot bind is then reported to it
        sync, actx = contexts()
        keys = curve_keys(self.cfg)
        if self.opts.control_endpoint:
            self._ctrl = actx.socket(zmq.DEALER)
            self._ctrl.setsockopt(zmq.LINGER, 500)
            self._ctrl.setsockopt(zmq.IDENTITY, f"{self.group}#{self.opts.incarnation}".encode())
            secure_client(self._ctrl, keys, self.opts.control_endpoint)
            if is_tcp(self.opts.control_endpoint):  # a group started by hand on another host
                self._ctrl_watch = ConnectionWatch(
                    self._ctrl, self.opts.control_endpoint, "the supervisor", actx, curve=keys is not None,
                    patience_s=WAIT_NOTICE_S, waiting_hint=" (is the run started on its host? gamecopilot run -c ...)")
            self._ctrl.connect(self.opts.control_endpoint)
        if self.opts.metrics_endpoint:
            self._metrics = sync.socket(zmq.PUSH)
            self._metrics.setsockopt(zmq.LINGER, 500)
            self._metrics.setsockopt(zmq.SNDHWM, 8)
            secure_client(self._metrics, keys, self.opts.metrics_endpoint)
            self._metrics.connect(self.opts.metrics_endpoint)
        specs = link_specs(self.cfg, run_dir=self.opts.run_dir, keys=keys)
        placements = self.cfg.placements()
        sup = self.cfg.supervisor
        for sc in self.cfg.stages_in(self.group):
            for link in sc.outputs.values():
                pub = Publisher(specs[link], lossless=self.opts.lossless, clock=self.clock)
                pub.expected_consumers = len(self.cfg.consumers(link))
                self.publishers[link] = pub
        for sc in self.cfg.stages_in(self.group):
            cls = resolve_stage(sc.kind)
            params_data = {**sc.params, **self.opts.stage_overrides.get(sc.name, {})}
            params = msgspec.convert(params_data, cls.Params)
            ctx = StageContext(
                name=sc.name,
                clock=self.clock,
                outputs={port: [self.publishers[link]] for port, link in sc.outputs.items()},
                speed=self.opts.speed,
                options=self.opts.stage_options,
                incarnation=self.opts.incarnation,
                session_start_ns=self.opts.session_start_ns,
                resume_media_s=self.opts.resume_media_s.get(sc.name),
                input_signals=tuple(pipeline_signals(self.cfg, sc.name)) if cls.reads_signals else (),
                device=placements.local_device(sc.name),
            )
            subs = [
                Subscriber(specs[link], lossless=self.opts.lossless, clock=self.clock,
                           via=self.publishers[link].local_endpoint if link in self.publishers else None)
                for link in sc.inputs
            ]
            self.subscribers.extend(subs)
            self.runners.append(StageRunner(cls(ctx, params), subs))
        del sup
        for link in self.publishers:  # a producer (again): an earlier run's end is no longer news
            marker = self._ended_marker(link)
            if marker is not None:
                with contextlib.suppress(OSError):
                    os.unlink(marker)

    def _ended_marker(self, link: str) -> str | None:
        """Where a group started by hand notes that it ended a link, for a consumer started after.

        Without a supervisor nobody else knows: a consumer started once its producer finished
        would wait without a word.  ``None`` under a supervisor (it sends ``inputs_ended``) and
        for inproc links (one process: nobody comes later)."""
        if self._ctrl is not None or self.opts.run_dir is None:
            return None
        return os.path.join(self.opts.run_dir, f"{link}.ended")

    def _mark_ended(self) -> None:
        for link in self.publishers:
            marker = self._ended_marker(link)
            if marker is not None:
                with contextlib.suppress(OSError), open(marker, "w", encoding="utf-8") as f:
                    f.write(f"{self.group} {time.strftime('%H:%M:%S')}\n")  # wall clock, for people only

    def _producer_group(self, link: str) -> str | None:
        try:
            return self.cfg.producer(link).placement.group
        except KeyError:  # an outside producer (the link has its own endpoint)
            return None

    def _outside_inputs(self) -> list[Subscriber]:
        """The subscribers whose producer is in another group (or outside the pipeline)."""
        return [sub for sub in self.subscribers if self._producer_group(sub.spec.name) != self.group]

    def _producer_hint(self, link: str) -> str:
        group = self._producer_group(link)
        if group is None:
            return "its producer"
        return f"group {group} (gamecopilot stage {group}, with the same -c and -i)"

    async def _wait_notices(self) -> None:
        """A group started by hand says, in a line per producer, what it waits for: a producer
        that ended before this group started (its notes), or one that has sent nothing for a while."""
        subs: dict[str, list[Subscriber]] = {}
        for sub in self._outside_inputs():
            subs.setdefault(sub.spec.name, []).append(sub)
        ended: dict[str, list[str]] = {}  # producer hint -> links it ended
        when: dict[str, str] = {}
        for link in subs:
            marker = self._ended_marker(link)
            if marker is None:
                return
            with contextlib.suppress(OSError), open(marker, encoding="utf-8") as f:
                hint = self._producer_hint(link)
                ended.setdefault(hint, []).append(link)
                when.setdefault(hint, f.read().strip().partition(" ")[2])
        for hint, links in ended.items():
            log.warning("group %s: %s ended %s at %s, before this group started; waiting for it to run again",
                        self.group, hint, _links(links), when[hint])
        await asyncio.sleep(WAIT_NOTICE_S)
        told = {link for links in ended.values() for link in links}
        silent: dict[str, list[str]] = {}
        for link, group_subs in subs.items():
            if link not in told and not any(sub.received for sub in group_subs):
                silent.setdefault(self._producer_hint(link), []).append(link)
        for hint, links in silent.items():
            log.warning("group %s: nothing on %s after %g s; waiting for %s", self.group, _links(links),
                        WAIT_NOTICE_S, hint)

    async def _wait_consumers(self) -> None:
        waits = []
        for link, pub in self.publishers.items():
            n = len(self.cfg.consumers(link))
            waits.append((link, pub, n))
        results = await asyncio.gather(*(p.wait_subscribers(n, SUBSCRIBE_TIMEOUT_S) for _, p, n in waits))
        for (link, _, n), ok in zip(waits, results, strict=True):
            if not ok:
                log.warning("group %s: link %s has fewer than %d consumers connected", self.group, link, n)

    async def _send_ctrl(self, payload: Control) -> None:
        if self._ctrl is not None:
            frames = _encode_ctrl(self.codec, payload, self.group, self.clock)
            await self._ctrl.send_multipart(frames)

    def metrics_snapshot(self) -> Metrics:
        now = self.clock.now_ns()
        stages = []
        for r in self.runners:
            sm = r.stage.recorder.snapshot(now)
            sm.device = r.stage.device_actual or ""  # (where it says it really runs: the supervisor checks it)
            stages.append(sm)
        return Metrics(group=self.group, stages=stages)

    def _push_metrics(self) -> None:
        if self._metrics is None:
            return
        frames = _encode_ctrl(Codec(), self.metrics_snapshot(), self.group, self.clock)
        with contextlib.suppress(zmq.Again):
            self._metrics.send_multipart(frames, flags=zmq.NOBLOCK)

    async def _control_loop(self) -> None:
        codec = Codec()
        while True:
            frames = await self._ctrl.recv_multipart()
            try:
                env = codec.decode(frames)
            except CodecError as exc:
                log.warning("group %s: bad control message (%s)", self.group, exc)
                continue
            p = env.payload
            if isinstance(p, Start):
                self._start.set()
            elif isinstance(p, Stop):
                self.request_stop()
            elif isinstance(p, InputsEnded):
                self.inputs_ended(p.links)

    async def _heartbeat_loop(self) -> None:
        sup = self.cfg.supervisor
        next_metrics = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self.parent_pid is not None and os.getppid() != self.parent_pid and not self._stop.is_set():
                log.warning("group %s: supervisor (pid %d) is gone; stopping", self.group, self.parent_pid)
                self.request_stop()
                # and if the graceful stop hangs, do not outlive the supervisor anyway
                loop.call_later(sup.shutdown_timeout_s, os._exit, 1)
            await self._send_ctrl(Heartbeat(pid=os.getpid()))
            if loop.time() >= next_metrics:
                self._push_metrics()
                next_metrics = loop.time() + sup.metrics_interval_s
            await asyncio.sleep(sup.heartbeat_s)

    @property
    def lost_inputs(self) -> list[str]:
        """Input links that ended without this group taking their end of stream (see ``inputs_ended``)."""
        return sorted({link for r in self.runners for link in r.lost_inputs})

    def inputs_ended(self, links: list[str]) -> None:
        """Their producers have finished: a consumer still waiting on one (this group was
        restarted after the end of stream went out) reads what is queued, then ends."""
        ended = set(links)
        for sub in self.subscribers:
            if sub.spec.name in ended:
                sub.producer_gone()

    def stop_on_signal(self, sig: int) -> None:
        """A signal to this process (not the supervisor's stop): the run was cut short, and says so."""
        self.stop_signal = self.stop_signal or sig
        self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()
        self._start.set()
        for pub in self.publishers.values():
            pub.stopping = True
        for r in self.runners:
            r.request_stop()

    def _ready_or_at_first_input(self, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready`` (the CLI empties its output files then) now, or, for a group that
        only consumes (no source of its own), when the first message comes from another group:
        one started by hand whose producer never comes must not cost the old outputs."""
        outside = self._outside_inputs()
        if not outside or any(isinstance(r.stage, Source) for r in self.runners):
            on_ready()
            return

        def once() -> None:  # whichever input comes first; the others forget it
            for sub in outside:
                sub.on_first_message = None
            on_ready()

        for sub in outside:
            sub.on_first_message = once

    async def build_or_report(self) -> None:
        """:meth:`build`, telling the supervisor if it fails (a link that cannot bind: its
        address is not this host's, or another program holds the port)."""
        try:
            self.build()
        except Exception as exc:
            await self.report_failure(exc)
            self.close()
            raise

    async def report_failure(self, exc: BaseException) -> None:
        """Tell the supervisor why this group fails, in one line: a UsageError (bad input) is not
        worth a restart; anything else is restarted with backoff."""
        if self._ctrl is None:
            return
        message = describe_failure(exc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send_ctrl(Error(message=message, usage=isinstance(exc, UsageError))), 1.0)
            self.error_reported = True
            # the send only queued it: the process exits next, and pyzmq does not flush queued
            # messages at exit, so give ZeroMQ's I/O thread a moment to put this line on the wire
            await asyncio.sleep(FAILURE_FLUSH_S)

    async def run(self) -> None:
        if not self.runners:
            self.build()
        aux: list[asyncio.Task[None]] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            if self._ctrl is not None:
                aux.append(asyncio.create_task(self._control_loop()))
                aux.append(asyncio.create_task(self._heartbeat_loop()))
            for watch in [self._ctrl_watch, *(sub.watch for sub in self.subscribers)]:
                if watch is not None:
                    aux.append(asyncio.create_task(watch.run()))
            # Every stage starts (models load, files open, a replay decodes ahead) before the group
            # says it is ready: the run's clock starts when all can keep up, and a stage that cannot
            # start (a model that does not load) fails the run before any output file is touched.
            await self._until_stopped(asyncio.ensure_future(self._start_all()))
            if self.on_ready is not None and not self._stop.is_set():  # (a stop while starting: nothing is due)
                self._ready_or_at_first_input(self.on_ready)
            for r in self.runners:
                if not isinstance(r.stage, Source):
                    tasks.append(asyncio.create_task(r.run(), name=r.stage.name))
            if self._ctrl is None and self.subscribers:
                aux.append(asyncio.create_task(self._wait_notices()))
            await self._send_ctrl(Ready())
            if self._ctrl is not None and self.opts.wait_for_start:
                await self._start.wait()
            for r in self.runners:
                if isinstance(r.stage, Source):
                    if self._stop.is_set():
                        r.request_stop()
                    tasks.append(asyncio.create_task(r.run(), name=r.stage.name))
            await self._wait_tasks(tasks)
            self._mark_ended()
            self._push_metrics()
            await self._send_ctrl(Done(metrics=self.metrics_snapshot(), lost_inputs=self.lost_inputs,
                                       signal=self.stop_signal))
        except Exception as exc:
            await self.report_failure(exc)
            raise
        finally:
            for t in [*tasks, *aux]:
                t.cancel()
            await asyncio.gather(*tasks, *aux, return_exceptions=True)
            self.close()

    async def _start_all(self) -> None:
        """Connect the outputs and start every stage; the first that fails cancels the rest."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._wait_consumers())
                for r in self.runners:
                    tg.create_task(r.prepare(), name=f"{r.stage.name}.start")
        except ExceptionGroup as group:
            raise group.exceptions[0] from None  # the failure itself (a UsageError stays one)

    async def _until_stopped(self, work: asyncio.Future[Any]) -> None:
        """Await ``work`` (connecting, starting the stages) unless a stop comes first: a Ctrl-C during
        start-up must wait neither for consumers that will never come nor for a model to load."""
        stopped = asyncio.ensure_future(self._stop.wait())
        abandoned = False
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not work.done():
                abandoned = work.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)
        if not abandoned:  # (a cancelled gather may end with a CancelledError set, not as cancelled)
            work.result()  # a stage that failed to start raises here

    async def _wait_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for every stage; after a stop, give consumers a bounded time to drain."""
        pending: set[asyncio.Future[Any]] = set(tasks)
        # the stop itself wakes this wait: a group without a source whose upstream is gone (stopped
        # while starting) has no task that would ever finish to start the drain countdown
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            while pending:
                done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopped)
                for t in done:
                    if t is not stopped and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                if self._stop.is_set() and pending:
                    timeout = self.cfg.supervisor.shutdown_timeout_s / 2
                    done, pending = await asyncio.wait(pending, timeout=timeout)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return
        finally:
            stopped.cancel()
            await asyncio.gather(stopped, return_exceptions=True)

    def close(self) -> None:
        for pub in self.publishers.values():
            pub.close()
        for sub in self.subscribers:
            sub.close()
        if self._ctrl_watch is not None:
            self._ctrl_watch.close()
        if self._ctrl is not None:
            self._ctrl.close(linger=200)
        if self._metrics is not None:
            self._metrics.close(linger=200)


async def run_group(cfg: PipelineConfig, group: str, opts: RunOptions, clock: Clock = SYSTEM_CLOCK,
                    on_ready: Callable[[], None] | None = None) -> GroupRunner:
    runner = GroupRunner(cfg, group, opts, clock)
    runner.on_ready = on_ready
    await runner.build_or_report()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, runner.stop_on_signal, sig)
    await runner.run()
    return runner


def _links(names: list[str]) -> str:
    return f"link{'s' if len(names) > 1 else ''} {', '.join(names)}"


def describe_failure(exc: BaseException) -> str:
    """A failure in one line: a UsageError's own message, else the exception's type and first line."""
    text = first_line(exc, "")
    return text if isinstance(exc, UsageError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def group_process_main(cfg_data: Any, source: str, group: str, opts: RunOptions) -> None:
    """Spawn target: one process per placement group."""
    from copilot.logs import setup_logging
    from copilot.proctitle import set_group_title

    set_group_title(group)  # ps tells the groups apart (all are multiprocessing.spawn otherwise)
    setup_logging(opts.log_level)
    # The supervisor's pid comes from the supervisor: reading getppid() here would miss a
    # supervisor that died while this process was still starting.
    parent = opts.supervisor_pid if opts.supervisor_pid is not None else os.getppid()
    # Ctrl-C reaches the whole process group; the supervisor coordinates the shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = parse_pipeline(cfg_data, source)

    runners: list[GroupRunner] = []

    async def main() -> None:
        runner = GroupRunner(cfg, group, opts)
        runners.append(runner)
        runner.parent_pid = parent
        await runner.build_or_report()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, runner.stop_on_signal, signal.SIGTERM)
        await runner.run()

    code = 0
    try:
        asyncio.run(main())
    except UsageError:
        # Already reported to the supervisor, which prints it once: no traceback here.
        code = 2
    except Exception as exc:
        # A crash is restarted by the supervisor, which logs each one in a line: a traceback per
        # restart buried that (it is still there with -v).  One that came before the run could
        # report it is logged here, in a line.
        log.debug("group %s crashed", group, exc_info=True)
        if not (runners and runners[0].error_reported):
            log.error("group %s failed: %s", group, describe_failure(exc))
        code = 1
    end_process_context()  # what the control socket still holds (Done, an Error) reaches the supervisor
    exit_process(code)  # (without teardown if a stop left a stage's call running)
