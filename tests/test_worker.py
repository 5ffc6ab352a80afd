"""The stage worker thread: calls in order, errors handed back, and a stop that leaves a
running call behind instead of waiting for it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from copilot.stage import Stage, StageContext
from copilot.worker import MAX_WAITING, StageWorker, abandoned_calls

pytestmark = pytest.mark.usefixtures("leak_check")


def test_calls_run_one_at_a_time_in_order_and_errors_come_back() -> None:
    worker = StageWorker("w")
    seen: list[int] = []
    futs = [worker.submit(seen.append, i) for i in range(20)]
    boom = worker.submit(lambda: 1 / 0)
    assert [f.result(10) for f in futs] == [None] * 20
    assert seen == list(range(20))
    with pytest.raises(ZeroDivisionError):
        boom.result(10)
    assert worker.submit(lambda x, *, y: x + y, 1, y=2).result(10) == 3
    worker.shutdown(wait=True)
    assert worker.join(0)
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(print)


def test_a_stop_leaves_a_running_call_behind_and_cancels_the_waiting_ones() -> None:
    worker = StageWorker("w")
    release = threading.Event()
    running = worker.submit(release.wait, 30)
    while not worker.busy:
        time.sleep(0.001)
    waiting = worker.submit(print, "never")
    worker.shutdown(wait=False, cancel_futures=True)  # returns while the call runs
    assert not release.is_set() and not running.done()
    assert waiting.cancelled()
    assert abandoned_calls()
    release.set()
    assert running.result(10) is True  # it finished on its own
    assert worker.join(10)


def test_calls_fired_without_awaiting_them_are_bounded() -> None:
    worker = StageWorker("w")
    release = threading.Event()
    worker.submit(release.wait, 30)
    with pytest.raises(RuntimeError, match=f"more than {MAX_WAITING}"):
        for _ in range(MAX_WAITING + 2):
            worker.submit(print, end="")
    release.set()
    worker.shutdown(wait=True, cancel_futures=True)
    assert worker.join(10)


class Loading(Stage):
    async def process(self, msg: object) -> None:  # pragma: no cover - never reached
        pass


def test_a_stage_cancelled_while_loading_shuts_its_worker_without_blocking_the_loop() -> None:
    stage = Loading(StageContext(name="loading"), Loading.Params())
    release = threading.Event()
    # the load "finishes" after 5 s: a shutdown that waits for it returns only after that
    timer = threading.Timer(5.0, release.set)
    timer.start()

    async def main() -> tuple[bool, StageWorker | None]:
        load = asyncio.ensure_future(stage.run_blocking(release.wait, 30))
        await asyncio.sleep(0.05)
        worker = stage._executor
        load.cancel()
        stage.shutdown_executor()  # the stop: it used to wait here, with the event loop blocked
        return release.is_set(), worker

    released_first, worker = asyncio.run(main())
    timer.cancel()
    timer.join()
    release.set()
    assert not released_first
    assert worker is not None and worker.join(10)
