"""The supervisor: one OS process per placement group, watched and restarted.

It binds the control socket (ROUTER) and the metrics socket (PULL), spawns each local group
with the ``spawn`` start method, waits until every group is ready (its consumers subscribed),
then says ``start``.  It restarts a group that dies or stops sending heartbeats, with backoff,
and on SIGINT/SIGTERM asks every group to stop gracefully (sources stop, stages flush), then
terminates what is left.  No process it started outlives it.

Each group's process gets the environment its placement asks for (:mod:`copilot.placement`:
``CUDA_VISIBLE_DEVICES`` pinned to its GPUs, or empty for a CPU group in a pipeline that places
others on GPUs).  Once every group is ready it logs a line per group (pid, device, the variable,
its stages), and it warns when a stage says it really runs on another kind of device than it was
placed on (``Stage.device_actual``: a GPU stage whose engine fell back to the CPU).

It also publishes the merged per-stage figures, at every report, on a PUB socket of its own (the
metrics feed, ``ipc://`` in the run directory; its endpoint reaches every stage as the run option
``metrics_feed``): the overlay's latency panel shows them.  A feed nobody reads costs one small encode
per report, and a reader that falls behind loses old reports (PUB drops at its high-water mark), never
slows the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing import resource_tracker
from typing import Any

import msgspec
import zmq

from copilot.clock import SYSTEM_CLOCK
from copilot.codec import Codec, CodecError
from copilot.config import PipelineConfig, curve_keys, is_local_host, link_specs
from copilot.errors import UsageError
from copilot.group import RunOptions, group_process_main
from copilot.links import bind, check_ipc_endpoint, contexts, prepare_ipc
from copilot.messages import (
    Control,
    Done,
    Envelope,
    Error,
    Heartbeat,
    InputsEnded,
    Metrics,
    Ready,
    StageMetrics,
    Start,
    Stop,
)
from copilot.placement import device_mismatch

log = logging.getLogger(__name__)

TICK_S = 0.05
# a group that exits by itself says why just before (Done, or its bad input's one line) through the
# control socket; on a loaded machine the exit can be seen first, and the message this long after it
EXIT_MESSAGE_GRACE_S = 2.0


@dataclass
class GroupState:
    name: str
    incarnation: int = 0
    process: Any = None
    ready: bool = False
    done: bool = False
    last_seen: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    local: bool = True
    error: str | None = None  # the last error the group reported
    failed: bool = False  # given up on: a usage error, or too many restarts
    gone_at: float | None = None  # when it was seen gone by itself (exit 0 or 2), its message not yet come
    pid: int | None = None  # its process as its heartbeats say (a group started on another host too)


@dataclass
class RunResult:
    wall_s: float
    media_s: float
    stages: list[StageMetrics]
    restarts: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    # group -> one-line reason, for groups the supervisor gave up on
    failed: dict[str, str] = field(default_factory=dict)
    usage_error: str | None = None  # a group reported bad input (the CLI's exit code 2)
    stop_signal: int | None = None  # the signal that stopped the run (the CLI exits 128 + it)
    started: bool = False  # every group became ready and was told to start
    # group -> input links that ended while it was down (restarted after its producers finished)
    lost_inputs: dict[str, list[str]] = field(default_factory=dict)


class Supervisor:
    def __init__(
        self,
        cfg: PipelineConfig,
        cfg_data: Any,
        source: str,
        opts: RunOptions,
        *,
        on_metrics: Callable[[list[StageMetrics]], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        groups: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.cfg_data = cfg_data
        self.source = source
        self.opts = opts
        self.on_metrics = on_metrics
        # called once, when every group has started its stages and before any source begins: the
        # CLI empties its output files then, so a stage that cannot start leaves them as they were
        self.on_ready = on_ready
        self._lost_inputs: dict[str, list[str]] = {}
        names = groups or cfg.groups()
        self.groups = {g: GroupState(g, local=self._is_local(g)) for g in names}
        self._snapshots: dict[tuple[str, int], Metrics] = {}
        self._stopping = False
        self._interrupted = False
        self._stop_signal: int | None = None
        self._usage_error: str | None = None
        self._usage_exit: str | None = None  # a group exited on bad input before its message came
        self._ctrl: Any = None  # the control ROUTER socket, bound by run()
        self._ctx = mp.get_context("spawn")
        self._run_dir = ""  # made by run(), removed when it ends
        self._feed_ep: str | None = None  # the metrics feed, bound by run()
        self.clock = SYSTEM_CLOCK
        # each local group's environment (its GPUs), worked out now: a GPU index beyond the
        # CUDA_VISIBLE_DEVICES this run was started with is bad input before anything starts
        self.placements = cfg.placements()
        self._envs = {g: self.placements.env(g) for g, st in self.groups.items() if st.local}
        self._device_said: dict[str, str] = {}  # stage -> where it last said it runs

    def _is_local(self, group: str) -> bool:
        return all(is_local_host(s.placement.host) for s in self.cfg.stages_in(group))

    # -- processes ----------------------------------------------------------------------------
    def _group_env(self, group: str) -> dict[str, str]:
        """What the group's process gets on top of this one's environment (copilot.placement)."""
        return self._envs.get(group, {})

    def placement_report(self) -> list[str]:
        """A line per group: ``group NAME (pid P): device cuda:1 (CUDA_VISIBLE_DEVICES=1): stages a, b``."""
        lines = []
        for g in self.groups.values():
            pid = g.process.pid if g.local and g.process is not None else g.pid
            lines.append(self.placements.describe(g.name, env=self._envs.get(g.name) if g.local else None,
                                                  pid=pid, local=g.local))
        return lines

    def _check_devices(self, metrics: Metrics) -> None:
        """Say once where each stage says it really runs, and warn when that is another kind of
        device than its placement (a GPU stage whose engine fell back to the CPU)."""
        for sm in metrics.stages:
            if not sm.device or self._device_said.get(sm.stage) == sm.device:
                continue
            self._device_said[sm.stage] = sm.device
            try:
                planned = self.placements.planned(sm.stage)
            except KeyError:
                continue
            if device_mismatch(planned, sm.device):
                log.warning("stage %s (group %s) was placed on %s but runs on %s", sm.stage, metrics.group,
                            planned, sm.device)
            else:
                log.info("stage %s (group %s) runs on %s", sm.stage, metrics.group, sm.device)

    def _spawn(self, st: GroupState) -> None:
        opts = replace(
            self.opts,
            run_dir=self.opts.run_dir or self._run_dir,
            control_endpoint=self._control_ep,
            metrics_endpoint=self._metrics_ep,
            stage_options={**self.opts.stage_options, **({"metrics_feed": self._feed_ep} if self._feed_ep else {})},
            incarnation=st.incarnation,
            supervisor_pid=os.getpid(),
        )
        if st.incarnation > 0 and self._started:  # a restart: the run's media time goes on
            opts = replace(opts, session_start_ns=self._t_start_ns, resume_media_s=self._media_reached(st.name))
        env = self._group_env(st.name)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        # The child inherits an ignored SIGINT (multiprocessing's spawn clears the signal mask but
        # keeps an ignored disposition): a Ctrl-C (sent to the whole process group) while it is
        # still importing would otherwise end it with a KeyboardInterrupt traceback.  The
        # supervisor alone handles Ctrl-C and stops the groups over the control socket.  SIGINT
        # is blocked here as well, so a Ctrl-C meant for the supervisor during the spawn stays
        # pending (Linux never discards a blocked signal as ignored) and arrives once the
        # handler is back, instead of being lost.
        # (multiprocessing's resource tracker, started by the first spawn, unblocks SIGINT when it
        # is up: started first, it cannot open the window in which a Ctrl-C would be ignored)
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = self._ctx.Process(
                target=group_process_main,
                args=(self.cfg_data, self.source, st.name, opts),
                name=f"gamecopilot-{st.name}",
                daemon=True,
            )
            proc.start()
        finally:
            signal.signal(signal.SIGINT, sigint)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        st.process = proc
        st.ready = False
        st.last_seen = asyncio.get_running_loop().time()

    def _media_reached(self, group: str) -> dict[str, float]:
        """How far (media s) each stage of ``group`` had got by its last metrics report."""
        reached: dict[str, float] = {}
        for (name, _inc), snap in self._snapshots.items():
            if name == group:
                for sm in snap.stages:
                    reached[sm.stage] = max(reached.get(sm.stage, 0.0), sm.media_s)
        return reached

    def kill_group(self, name: str) -> None:
        """Hard-kill a group (used by tests and by the heartbeat watchdog)."""
        proc = self.groups[name].process
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)

    # -- control ------------------------------------------------------------------------------
    def _send(self, st: GroupState, payload: Control) -> None:
        if self._ctrl is None:  # not bound yet, or the run is over
            return
        env = Envelope.wrap(payload, source="supervisor", seq=0, t_media=0.0, t_capture_ns=self.clock.now_ns())
        ident = f"{st.name}#{st.incarnation}".encode()
        with contextlib.suppress(zmq.ZMQError):
            self._ctrl.send_multipart([ident, *self._codec.encode(env)], flags=zmq.NOBLOCK)

    def _read_control(self, now: float) -> None:
        """Handle every control message that has come (none before :meth:`run` binds the socket)."""
        if self._ctrl is not None:
            for frames in _drain(self._ctrl):
                self._handle_ctrl(frames, now)

    def _handle_ctrl(self, frames: list[bytes], now: float) -> None:
        ident = frames[0].decode(errors="replace")
        name, _, inc = ident.rpartition("#")
        st = self.groups.get(name)
        if st is None or str(st.incarnation) != inc:
            return
        try:
            env = self._codec.decode(frames[1:])
        except CodecError:
            return
        st.last_seen = now
        p = env.payload
        if isinstance(p, Heartbeat):
            st.pid = p.pid if p.pid is not None else st.pid
        elif isinstance(p, Ready):
            st.ready = True
            if self._started:
                self._pending_start.add(name)
            if not self._stopping:
                self._tell_inputs_ended(st)
        elif isinstance(p, Error):
            st.error = p.message
            if p.usage:
                st.failed = True
                if self._usage_error is None:
                    self._usage_error = st.error
                log.debug("group %s: %s", name, st.error)
                self.request_stop(interrupted=False)
            else:
                log.warning("group %s failed: %s", name, st.error)
        elif isinstance(p, Done):
            st.done = True
            if p.metrics is not None:
                self._snapshots[(name, st.incarnation)] = p.metrics
                self._check_devices(p.metrics)
            if p.lost_inputs and not self._stopping:
                self._lost_inputs[name] = list(p.lost_inputs)
            sig = p.signal
            if sig is not None and not self._stopping:
                # a signal sent to the group itself ended it early: the whole run stops as if sent here
                log.warning("group %s was stopped by signal %d; stopping the run", name, sig)
                self._on_signal(sig)
            if not self._stopping:  # (in a stop, groups end without waiting for their consumers)
                for other in self.groups.values():
                    if other.ready and not other.done:
                        self._tell_inputs_ended(other)

    def _tell_inputs_ended(self, st: GroupState) -> None:
        """Tell ``st`` which of its input links come from groups that are done.

        A group's end of stream waits for every subscribed consumer to take it, so a consumer
        that was running has it already and ignores this; one restarted after it went out
        (or while it went out) would wait for it forever.
        """
        mine = {link for sc in self.cfg.stages_in(st.name) for link in sc.inputs}
        ended = sorted(
            link
            for g in self.groups.values()
            if g.done and g is not st
            for sc in self.cfg.stages_in(g.name)
            for link in sc.outputs.values()
            if link in mine
        )
        if ended:
            self._send(st, InputsEnded(links=ended))

    def _handle_metrics(self, frames: list[bytes]) -> None:
        try:
            env = self._codec.decode(frames)
        except CodecError:
            return
        m = env.payload
        if isinstance(m, Metrics):
            st = self.groups.get(m.group)
            if st is not None:
                self._snapshots[(m.group, st.incarnation)] = m
                self._check_devices(m)

    def stage_metrics(self) -> list[StageMetrics]:
        """Figures per stage, summed over a group's incarnations (restarts reset counters)."""
        merged: dict[str, StageMetrics] = {}
        for (_, _inc), snap in sorted(self._snapshots.items(), key=lambda kv: kv[0][1]):
            for sm in snap.stages:
                prev = merged.get(sm.stage)
                if prev is None:
                    merged[sm.stage] = msgspec.structs.replace(sm)
                    continue
                reasons = dict(prev.dropped_by_reason)
                for k, v in sm.dropped_by_reason.items():
                    reasons[k] = reasons.get(k, 0) + v
                merged[sm.stage] = msgspec.structs.replace(
                    sm,
                    count=prev.count + sm.count,
                    video_frames=prev.video_frames + sm.video_frames,
                    dropped=prev.dropped + sm.dropped,
                    dropped_by_reason=reasons,
                    media_s=max(prev.media_s, sm.media_s),
                    latency_ms=sm.latency_ms or prev.latency_ms,
                )
        order = [s.name for s in self.cfg.stages]
        return sorted(merged.values(), key=lambda m: order.index(m.stage) if m.stage in order else 1e9)

    def _publish(self, stages: list[StageMetrics]) -> None:
        """The merged figures on the metrics feed (dropped, never waited for, when no one keeps up)."""
        if not stages:
            return
        self._feed_seq += 1
        env = Envelope.wrap(Metrics(group="", stages=stages), source="supervisor", seq=self._feed_seq,
                            t_media=max(m.media_s for m in stages), t_capture_ns=self.clock.now_ns())
        with contextlib.suppress(zmq.Again):
            self._feed.send_multipart(self._codec.encode(env), flags=zmq.NOBLOCK)

    def _on_signal(self, sig: int) -> None:
        if not self._stopping:
            self._stop_signal = sig
        self.request_stop()

    def request_stop(self, interrupted: bool = True) -> None:
        if not self._stopping:
            self._stopping = True
            self._interrupted = interrupted
            self._stop_sent = False

    # -- main loop ----------------------------------------------------------------------------
    async def run(self) -> RunResult:
        self._run_dir = tempfile.mkdtemp(prefix="gamecopilot-")
        try:
            return await self._run()
        finally:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _run(self) -> RunResult:
        sync, _ = contexts()
        self._codec = Codec()
        sup = self.cfg.supervisor
        self._control_ep = sup.control_endpoint or f"ipc://{self._run_dir}/control"
        self._metrics_ep = sup.metrics_endpoint or f"ipc://{self._run_dir}/metrics"
        self._feed_ep = f"ipc://{self._run_dir}/metrics-feed"
        for what, endpoint in (("control", self._control_ep), ("metrics", self._metrics_ep)):
            try:
                check_ipc_endpoint(endpoint)
            except ValueError as exc:
                raise UsageError(f"supervisor {what} socket: {exc}") from None
        keys = curve_keys(self.cfg, self.source)
        # (a link's path too long: refused here)
        link_specs(self.cfg, run_dir=self.opts.run_dir or self._run_dir, keys=keys)
        prepare_ipc(self._control_ep)
        prepare_ipc(self._metrics_ep)
        prepare_ipc(self._feed_ep)
        self._feed = sync.socket(zmq.PUB)
        self._feed.setsockopt(zmq.LINGER, 0)
        self._feed.setsockopt(zmq.SNDHWM, 4)
        self._feed.bind(self._feed_ep)
        self._feed_seq = 0
        self._ctrl = ctrl = sync.socket(zmq.ROUTER)
        ctrl.setsockopt(zmq.LINGER, 0)
        self._metrics_sock = sync.socket(zmq.PULL)
        self._metrics_sock.setsockopt(zmq.LINGER, 0)
        try:
            bind(ctrl, self._control_ep, "supervisor.control_endpoint", keys, "the supervisor")
            bind(self._metrics_sock, self._metrics_ep, "supervisor.metrics_endpoint", keys, "the supervisor")
        except UsageError:
            ctrl.close()
            self._ctrl = None
            self._metrics_sock.close()
            self._feed.close()
            raise
        self._started = False
        self._pending_start: set[str] = set()
        self._stop_sent = False
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        # the CLI holds SIGINT blocked until here (cli._dispatch): from now on the handler above takes it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        t_start_ns = self.clock.now_ns()
        try:
            for st in self.groups.values():
                if st.local:
                    self._spawn(st)
            await self._loop(loop)
            t_start_ns = self._t_start_ns
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self._reap()
            ctrl.close(linger=0)
            self._ctrl = None
            self._metrics_sock.close(linger=0)
            self._feed.close(linger=0)
        wall_s = (self._t_end_ns - t_start_ns) / 1e9
        stages = self.stage_metrics()
        media_s = max((m.media_s for m in stages), default=0.0)
        return RunResult(
            wall_s=wall_s,
            media_s=media_s,
            stages=stages,
            restarts={g.name: g.restarts for g in self.groups.values()},
            interrupted=self._interrupted,
            stop_signal=self._stop_signal if self._interrupted else None,
            started=self._started,
            lost_inputs=dict(self._lost_inputs),
            failed={g.name: g.error or "failed" for g in self.groups.values() if g.failed},
            usage_error=self._usage_error or self._usage_exit,
        )

    async def _loop(self, loop: asyncio.AbstractEventLoop) -> None:
        sup = self.cfg.supervisor
        ready_deadline = loop.time() + sup.ready_timeout_s
        self._t_start_ns = self.clock.now_ns()
        next_report = loop.time() + sup.metrics_interval_s
        stop_deadline: float | None = None
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            self._read_control(now)
            for frames in _drain(self._metrics_sock):
                self._handle_metrics(frames)
            # start once every group is ready
            if not self._started and not self._stopping:
                if all(g.ready for g in self.groups.values()):
                    self._started = True
                    log.info("every group is ready (%s): the run starts", ", ".join(self.groups))
                    for line in self.placement_report():
                        log.info("%s", line)
                    if self.on_ready is not None:
                        self.on_ready()
                    self._t_start_ns = self.clock.now_ns()
                    for g in self.groups.values():
                        self._send(g, Start())
                elif now > ready_deadline:
                    missing = [g.name for g in self.groups.values() if not g.ready]
                    remote = [g for g in missing if not self.groups[g].local]
                    same_keys = ", with the same curve_keys file" if self.cfg.curve_keys else ""
                    hint = (f" (start each on its host: gamecopilot stage GROUP -c {self.source}{same_keys})"
                            if remote else "")
                    log.error("groups never became ready: %s%s", ", ".join(missing), hint)
                    for name in missing:
                        self.groups[name].failed = True
                        self.groups[name].error = self.groups[name].error or (
                            f"not ready after {sup.ready_timeout_s:g} s" + hint)
                    self.request_stop(interrupted=False)
            for name in list(self._pending_start):
                self._send(self.groups[name], Start())
                self._pending_start.discard(name)
            self._watch(now)
            if self._stopping and not self._stop_sent:
                self._stop_sent = True
                stop_deadline = now + sup.shutdown_timeout_s
                for g in self.groups.values():
                    if g.ready:
                        self._send(g, Stop())
                    elif g.process is not None and self._alive(g):
                        # still starting: it cannot hear "stop" yet and holds nothing to flush
                        g.process.terminate()
            if now >= next_report:
                next_report = now + sup.metrics_interval_s
                stages = self.stage_metrics()
                self._publish(stages)
                if self.on_metrics is not None:
                    self.on_metrics(stages)
            if all(g.done or (self._stopping and not self._alive(g)) for g in self.groups.values()):
                break
            if stop_deadline is not None and now > stop_deadline:
                late = [g.name for g in self.groups.values() if not g.done and self._alive(g)]
                log.warning("groups did not stop within %.1f s (%s); terminating", sup.shutdown_timeout_s,
                            ", ".join(late))
                break
        self._t_end_ns = self.clock.now_ns()

    @staticmethod
    def _alive(g: GroupState) -> bool:
        return g.process is not None and g.process.is_alive()

    def _watch(self, now: float) -> None:
        """Restart groups that died or went silent, with backoff."""
        sup = self.cfg.supervisor
        for g in self.groups.values():
            if g.done or g.failed or self._stopping:
                continue
            if not g.local:
                # started by hand on its host: it cannot be restarted from here, but a silent one
                # must not leave the run waiting for ever
                if g.ready and now - g.last_seen > sup.heartbeat_timeout_s:
                    log.error("group %s (on another host) missed heartbeats for %.1f s; stopping the run",
                              g.name, now - g.last_seen)
                    g.failed = True
                    g.error = f"no heartbeat for {now - g.last_seen:.1f} s"
                    self.request_stop(interrupted=False)
                continue
            if g.restart_at is not None:
                if now >= g.restart_at:
                    g.restart_at = None
                    g.incarnation += 1
                    self._spawn(g)
                continue
            alive = self._alive(g)
            if not alive:
                self._read_control(now)  # what it said just before it exited comes first
                if g.done or g.failed or self._stopping:
                    continue
            if not alive and g.process is not None and g.process.exitcode in (0, UsageError.exit_code):
                # it said why (Done, or its bad input's line) through the socket, and the exit came
                # through the process: the message may still be on the way, wait for it a little
                if g.gone_at is None:
                    g.gone_at = now
                if now - g.gone_at < EXIT_MESSAGE_GRACE_S:
                    continue
            if not alive and g.process is not None and g.process.exitcode == UsageError.exit_code:
                # bad input: a restart would only fail again
                log.debug("group %s exited on bad input and did not say why", g.name)
                g.failed = True
                if g.error is None:
                    g.error = f"exited with code {UsageError.exit_code} (bad input)"
                if self._usage_exit is None:
                    self._usage_exit = f"group {g.name} stopped on bad input"
                self.request_stop(interrupted=False)
                continue
            if not alive and g.process is not None and g.process.exitcode == -signal.SIGTERM:
                # terminated from outside before it could stop gracefully (still starting): a stop
                # request for the run, as a SIGTERM to a running group is, not a crash to restart
                log.warning("group %s was terminated (SIGTERM); stopping the run", g.name)
                self._on_signal(signal.SIGTERM)
                continue
            silent = alive and now - g.last_seen > sup.heartbeat_timeout_s + (0 if g.ready else 30)
            if silent:
                log.warning("group %s missed heartbeats for %.1f s; killing it", g.name, now - g.last_seen)
                self.kill_group(g.name)
            if not alive or silent:
                if g.restarts >= sup.max_restarts:
                    log.error("group %s died %d times; giving up", g.name, g.restarts + 1)
                    g.failed = True
                    if g.error is None:
                        code = g.process.exitcode if g.process is not None else None
                        g.error = f"exited with code {code}"
                    self.request_stop(interrupted=False)
                    continue
                backoff = sup.restart_backoff_s[min(g.restarts, len(sup.restart_backoff_s) - 1)]
                code = g.process.exitcode if g.process is not None else None
                log.warning("group %s exited (code %s); restarting in %.1f s", g.name, code, backoff)
                g.gone_at = None
                g.restarts += 1
                g.restart_at = now + backoff

    def _reap(self) -> None:
        procs = [g.process for g in self.groups.values() if g.process is not None]
        for p in procs:
            p.join(timeout=2.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)


def _drain(sock: zmq.Socket, limit: int = 1000) -> list[list[bytes]]:  # type: ignore[type-arg]
    out = []
    for _ in range(limit):
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            break
    return out
