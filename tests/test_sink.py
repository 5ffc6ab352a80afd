"""The JSONL sink's event reordering: an events file reads in order of ``t``."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import msgspec
import pytest

from copilot.clock import MonotonicClock
from copilot.config import parse_pipeline
from copilot.errors import UsageError
from copilot.messages import Event, Features
from copilot.stage import StageContext
from copilot.testing import make_envelope, run_stage
from stages.sink import EventReorder, JsonlSinkParams, JsonlSinkStage

pytestmark = pytest.mark.usefixtures("leak_check")


def event(t: float, decided_at: float, kind: str = "moment") -> Event:
    return Event(t=t, event_kind=kind, priority="normal", score=1.0, evidence={"decided_at": decided_at})


def times(path: Path) -> list[float]:
    return [msgspec.json.decode(line)["t"] for line in path.read_text().splitlines()]


def test_reorder_releases_an_event_once_nothing_earlier_can_come() -> None:
    r = EventReorder(0.5)
    assert r.push(event(2.0, 2.2), b"a", 0) == []  # an event decided at up to 2.7 may still start before 2.0
    assert r.push(event(1.9, 2.3), b"b", 0) == []
    assert r.push(event(2.5, 2.8), b"c", 0) == [b"b", b"a"]  # decided at 2.8: nothing before 2.3 is still to come
    assert len(r) == 1
    assert r.drain() == [b"c"] and len(r) == 0


def test_reorder_expires_events_held_long_enough_in_wall_time() -> None:
    r = EventReorder(0.5)
    r.push(event(3.0, 3.1), b"a", now_ns=0)
    r.push(event(2.9, 3.3), b"b", now_ns=400_000_000)
    r.push(event(3.2, 3.35), b"c", now_ns=450_000_000)
    assert r.expire(now_ns=499_000_000) == []
    # "a" has waited 0.5 s, so it goes, and "b" (earlier) with it; "c" came later and stays
    assert r.expire(now_ns=500_000_000) == [b"b", b"a"]
    assert r.expire(now_ns=950_000_000) == [b"c"]


def test_reorder_takes_an_event_without_a_decision_time_as_decided_at_its_t() -> None:
    r = EventReorder(0.5)
    r.push(Event(t=1.0, event_kind="x"), b"a", 0)
    assert r.push(Event(t=1.6, event_kind="x", evidence={"decided_at": "soon"}), b"b", 0) == [b"a"]


def test_sink_writes_events_in_order_of_t_and_everything_else_at_once(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    decided_order = [event(1.0, 1.3), event(0.9, 1.35), event(5.0, 5.1), event(4.8, 5.2), event(7.0, 7.2)]
    res = run_stage("jsonl_sink", [*decided_order[:2], Features(name="f", values={"x": 1.0}), *decided_order[2:]],
                    params={"option": "events_out", "reorder_s": 0.5}, options={"events_out": str(out)})
    lines = [msgspec.json.decode(line) for line in out.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["features"] + ["moment"] * 5  # only events are held
    assert times(out)[1:] == [0.9, 1.0, 4.8, 5.0, 7.0]
    assert res.stage.recorder.snapshot(0).count == 6


def test_sink_without_reorder_keeps_the_order_of_arrival(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    run_stage("jsonl_sink", [event(1.0, 1.3), event(0.9, 1.35)], params={"path": str(out)})
    assert times(out) == [1.0, 0.9]


def _sink(path: str, reorder_s: float) -> JsonlSinkStage:
    ctx = StageContext(name="events", clock=MonotonicClock())
    return JsonlSinkStage(ctx, JsonlSinkParams(path=path, reorder_s=reorder_s))


def test_a_held_event_is_written_after_reorder_s_without_another_event(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"

    async def main() -> list[float]:
        sink = _sink(str(out), 0.1)
        await sink.start()
        try:
            await sink.process(make_envelope(event(3.0, 3.05), t_media=3.0))
            assert out.read_text() == ""  # held: an earlier event may still be decided
            for _ in range(50):
                await asyncio.sleep(0.02)
                if out.read_text():
                    break
            return times(out)
        finally:
            await sink.close()

    assert asyncio.run(main()) == [3.0]


def test_a_stop_writes_the_events_still_held(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"

    async def main() -> None:
        sink = _sink(str(out), 5.0)
        await sink.start()
        await sink.process(make_envelope(event(3.0, 3.2), t_media=3.0))
        await sink.process(make_envelope(event(2.9, 3.25), t_media=2.9))
        await sink.close()  # no flush: the run was stopped, not ended

    asyncio.run(main())
    assert times(out) == [2.9, 3.0]


def test_a_full_disk_met_while_expiring_ends_the_run_with_one_line() -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")

    async def main() -> None:
        sink = _sink("/dev/full", 0.05)
        await sink.start()
        try:
            await sink.process(make_envelope(event(3.0, 3.0), t_media=3.0))
            assert sink._reorder is not None and len(sink._reorder) == 1  # held, not yet written
            await asyncio.sleep(0.3)  # the expiry task tries to write, and fails
            with pytest.raises(UsageError, match=r"^events: cannot write /dev/full \(No space left on device\)$"):
                await sink.process(make_envelope(event(4.0, 4.1), t_media=4.0))
        finally:
            await sink.close()

    asyncio.run(main())


@pytest.mark.parametrize("value", [-0.1, 11.0])
def test_reorder_s_out_of_range_is_a_config_error(value: float) -> None:
    cfg: dict[str, Any] = {
        "name": "t",
        "links": {"v": {"policy": "latest"}},
        "stages": [
            {"name": "r", "kind": "replay", "outputs": {"video": "v"}},
            {"name": "s", "kind": "jsonl_sink", "inputs": ["v"], "params": {"reorder_s": value}},
        ],
    }
    with pytest.raises(UsageError, match=r"reorder_s"):
        parse_pipeline(copy.deepcopy(cfg), "t.yaml")
