"""The one worker thread a stage runs its blocking calls on (model loads, inference, encoding).

Why not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the interpreter
exits, and ``shutdown`` either waits for the running call or leaves it to that join.  A Ctrl-C
while a stage loads a large model then held the whole group until the load finished, past
the supervisor's stop timeout.  Here the thread is a daemon: a stop leaves a running call
behind (:meth:`StageWorker.shutdown` with ``wait=False``), and the process exits without it.
Calls run one at a time, in order, so a stage's ``close`` that queues a last call (a writer's
``close``) still runs after the call in flight.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# Calls queued but not started.  A stage awaits each call, so there is one at a time; this
# bound only catches a stage that fires calls without awaiting them.
MAX_WAITING = 64

_abandoned = threading.Event()


def abandoned_calls() -> bool:
    """True once a worker was shut down with a call still running in this process."""
    return _abandoned.is_set()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``.  If a stop left a call running (a model load in native
    code), interpreter teardown around that thread could crash: everything is closed and
    written by now, so logs and stdio are flushed and the process ends at once."""
    if abandoned_calls():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class StageWorker(concurrent.futures.Executor):
    """A single daemon thread running submitted calls in order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.Queue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None]
        self._queue = queue.Queue(MAX_WAITING)
        self._running: concurrent.futures.Future[Any] | None = None
        self._shutdown = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """A call is running now."""
        return self._running is not None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"stage {self._name}: its worker is shut down")
            try:
                self._queue.put_nowait((fut, functools.partial(fn, *args, **kwargs)))
            except queue.Full:
                raise RuntimeError(f"stage {self._name}: more than {MAX_WAITING} blocking calls waiting "
                                   "(await each run_blocking)") from None
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"{self._name}-worker", daemon=True)
                self._thread.start()
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, call = item
            if not fut.set_running_or_notify_cancel():
                continue
            self._running = fut
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            finally:
                self._running = None
                del fut, call, item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)  # (room: cancelled calls were just taken out, or none may come after shutdown)
        if wait:
            thread.join()
        elif thread.is_alive() and self.busy:
            _abandoned.set()

    def stop(self) -> bool:
        """Cancel the waiting calls and end the thread, without waiting for a call still running
        (True if one was left behind): the stop of a stage, on its event loop."""
        busy = self.busy
        self.shutdown(wait=not busy, cancel_futures=True)
        return busy

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after :meth:`shutdown`); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
