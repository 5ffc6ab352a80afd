"""The reasoner's wake schedule on a virtual clock: coalescing, preemption, staleness, the in-flight
cap and the wake cap (stages/reasoner_queue.py)."""

from __future__ import annotations

from copilot.clock import VirtualClock
from copilot.messages import Priority
from stages.reasoner_queue import ScheduleSettings, Wake, WakeSchedule

S = 1_000_000_000


def wake(i: int, t: float, priority: Priority, clock: VirtualClock, question: str = "") -> Wake:
    return Wake(id=i, t=t, priority=priority, kind=f"k{i}", emitted_ns=clock.now_ns(),
                event={"t": t, "kind": f"k{i}", "priority": priority}, question=question)


def test_events_below_the_wake_priority_wake_nothing() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(min_priority="high"))
    assert sched.offer(wake(1, 1.0, "normal", clock), clock.now_ns()) == "below_priority"
    assert sched.offer(wake(2, 5.0, "low", clock), clock.now_ns()) == "below_priority"
    assert sched.take(clock.now_ns()) is None
    assert sched.counts["below_priority"] == 2 and sched.counts["wakes"] == 0


def test_events_close_in_media_time_share_one_wake_led_by_the_most_urgent() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(coalesce_s=2.0))
    assert sched.offer(wake(1, 10.0, "high", clock), clock.now_ns()) == "queued"
    assert sched.offer(wake(2, 11.5, "critical", clock), clock.now_ns()) == "merged"
    assert sched.offer(wake(3, 14.0, "high", clock), clock.now_ns()) == "queued"  # 4 s later: its own wake
    first = sched.take(clock.now_ns())
    assert first is not None and first.priority == "critical" and first.kind == "k2"
    assert [m["kind"] for m in first.merged] == ["k1"]
    assert sched.counts["merged"] == 1 and sched.counts["wakes"] == 3


def test_an_event_joins_the_wake_already_running_for_its_moment() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(coalesce_s=2.0))
    sched.offer(wake(1, 10.0, "critical", clock), clock.now_ns())
    running = sched.take(clock.now_ns())
    assert running is not None
    assert sched.offer(wake(2, 10.5, "high", clock), clock.now_ns()) == "merged"
    assert running.merged and not sched.pending


def test_the_in_flight_cap_holds_wakes_until_a_slot_frees() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(max_in_flight=2, coalesce_s=0.0))
    for i in range(4):
        sched.offer(wake(i, 10.0 * i, "high", clock), clock.now_ns())
        clock.advance(S // 10)
    a, b = sched.take(clock.now_ns()), sched.take(clock.now_ns())
    assert a is not None and b is not None and (a.id, b.id) == (3, 2)  # the newest first
    assert sched.take(clock.now_ns()) is None and len(sched.running) == 2
    sched.finished(a, "advised")
    c = sched.take(clock.now_ns())
    assert c is not None and c.id == 1
    sched.offer(wake(9, 90.0, "critical", clock), clock.now_ns())
    sched.finished(b, "advised")
    d = sched.take(clock.now_ns())
    assert d is not None and d.id == 9  # the most urgent before any newer one
    assert sched.counts["advised"] == 2


def test_a_more_urgent_event_preempts_the_running_one() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(max_in_flight=1, coalesce_s=1.0))
    sched.offer(wake(1, 10.0, "high", clock), clock.now_ns())
    running = sched.take(clock.now_ns())
    assert running is not None and sched.to_preempt() is None
    clock.advance(2 * S)
    sched.offer(wake(2, 20.0, "critical", clock), clock.now_ns())
    assert sched.to_preempt() is running
    sched.finished(running, "preempted")
    nxt = sched.take(clock.now_ns())
    assert nxt is not None and nxt.priority == "critical"
    assert sched.counts["preempted"] == 1
    # an equal priority never preempts
    sched.offer(wake(3, 40.0, "critical", clock), clock.now_ns())
    assert sched.to_preempt() is None


def test_wakes_waiting_past_the_staleness_limit_are_dropped_and_counted() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(stale_s=5.0, max_in_flight=1, coalesce_s=0.0))
    sched.offer(wake(1, 1.0, "high", clock), clock.now_ns())
    sched.offer(wake(2, 2.0, "high", clock), clock.now_ns())
    first = sched.take(clock.now_ns())
    assert first is not None
    clock.advance(6 * S)
    assert sched.is_stale(first, clock.now_ns())  # its advice would come too late
    sched.finished(first, "stale_advice")
    assert sched.take(clock.now_ns()) is None
    assert sched.counts["stale"] == 1 and not sched.pending


def test_the_wake_cap_drops_starts_over_the_budget_for_a_minute() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(max_wakes_per_min=2, coalesce_s=0.0, max_in_flight=4))
    for i in range(3):
        sched.offer(wake(i, 10.0 * i, "critical", clock), clock.now_ns())
    started = [sched.take(clock.now_ns()) for _ in range(3)]
    assert [w is not None for w in started] == [True, True, False]
    assert sched.counts["wake_capped"] == 1
    clock.advance(61 * S)
    sched.offer(wake(9, 100.0, "critical", clock), clock.now_ns())
    assert sched.take(clock.now_ns()) is not None


def test_a_full_queue_drops_its_least_urgent_oldest_wake() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(max_pending=2, coalesce_s=0.0))
    sched.offer(wake(1, 1.0, "high", clock), clock.now_ns())
    sched.offer(wake(2, 5.0, "critical", clock), clock.now_ns())
    assert sched.offer(wake(3, 9.0, "high", clock), clock.now_ns()) == "queued"
    assert {w.id for w in sched.pending} == {2, 3} and sched.counts["queue_full"] == 1


def test_a_question_is_answered_whatever_the_priority_and_budget() -> None:
    clock = VirtualClock()
    sched = WakeSchedule(ScheduleSettings(max_wakes_per_min=1, min_priority="critical"))
    sched.offer(wake(1, 1.0, "critical", clock), clock.now_ns())
    assert sched.take(clock.now_ns()) is not None
    q = wake(2, 1.5, "low", clock, question="why did I die?")
    assert sched.offer(q, clock.now_ns()) == "queued"  # not merged with the event, not below priority
    sched.finished(sched.running[0], "advised")
    assert sched.take(clock.now_ns()) is q
