"""MediaTimeOrder: the one media-time merge of the core (the trigger uses it; HiCo and the
reasoner will)."""

from __future__ import annotations

import pytest

from copilot.order import MediaTimeOrder


def test_inputs_from_several_streams_are_released_in_media_time_order() -> None:
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)
    o.push(0.10, "audio", "a1")
    o.push(0.20, "audio", "a2")
    assert o.pop_ready() == [(0.10, "a1"), (0.20, "a2")]  # one stream: nothing to wait for
    o.push(0.30, "audio", "a3")
    o.push(0.05, "hud", "h1")  # a slower encoder, behind
    assert [t for t, _ in o.pop_ready()] == [0.05]  # audio at 0.30 waits until hud gets there
    o.push(0.40, "hud", "h2")
    assert [t for t, _ in o.pop_ready()] == [0.30]
    for k in range(5, 30):  # hud goes quiet: after idle_s it no longer holds audio back
        o.push(k / 10, "audio", f"a{k}")
    assert [t for t, _ in o.pop_ready()][-1] == pytest.approx(2.9)
    assert o.pop_ready(all_=True) == []


def test_equal_times_leave_in_stream_then_rank_order_whatever_order_they_came_in() -> None:
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)
    for stream, rank in (("thumb", 1), ("audio", 1), ("motion", 1), ("hud", 1), ("hud", 0)):
        o.push(0.5, stream, f"{stream}/{rank}", rank=rank)
    assert [item for _, item in o.pop_ready()] == ["audio/1", "hud/0", "hud/1", "motion/1", "thumb/1"]


def test_a_late_input_stamped_in_the_past_never_holds_the_other_streams_back() -> None:
    """Whisper's text (or a keyword read by full-frame OCR) comes long after its moment: waiting
    for that producer would delay every event past the causal limit."""
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)
    o.push(10.0, "hud", "h")
    o.push(10.0, "audio", "a")
    assert [item for _, item in o.pop_ready()] == ["a", "h"]
    o.push(9.6, "asr", "look out", late=True)
    o.push(10.1, "hud", "h2")
    o.push(10.1, "audio", "a2")
    assert o.watermark == 10.1
    assert [item for _, item in o.pop_ready()] == ["look out", "a2", "h2"]


def test_a_producer_is_one_stream_of_progress_whatever_its_inputs_are_called() -> None:
    """The VAD stage sends per-window ``vad`` features and, rarely, ``speech`` edges stamped a
    little in the past: progress is the producer's, so an old edge holds nothing back."""
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)
    o.push(5.0, "hud", "h", source="hud")
    o.push(5.0, "vad", "v", source="vad")
    o.push(4.6, "speech", "edge", source="vad")
    o.push(5.5, "hud", "h", source="hud")
    o.push(5.5, "vad", "v", source="vad")
    assert o.watermark == 5.5
    keyed_by_name: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)  # keying by name: the edge held all at 4.6
    for t, name in ((5.0, "hud"), (5.0, "vad"), (4.6, "speech"), (5.5, "hud"), (5.5, "vad")):
        keyed_by_name.push(t, name, name)
    assert keyed_by_name.watermark == 4.6


def test_heartbeats_advance_a_producer_that_sent_nothing() -> None:
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)
    o.push(1.0, "hud", "h", source="hud")
    o.advance("hud_ocr", 0.5)  # a rare producer said "nothing before 0.5"
    assert o.pop_ready() == []
    o.advance("hud_ocr", 1.0)
    assert o.pop_ready() == [(1.0, "h")]


def test_with_a_clock_a_producer_far_behind_holds_the_others_until_it_falls_silent() -> None:
    """A lossless run (``--speed max``): media time runs as fast as the slowest encoder, so a
    producer seconds of media behind is slower, not gone; only wall-clock silence says it stopped."""
    from copilot.clock import VirtualClock

    clock = VirtualClock()
    o: MediaTimeOrder[str] = MediaTimeOrder(idle_s=10.0, clock=clock)
    o.push(0.0, "hud", "h0")
    for k in range(1, 60):  # audio races 6 s of media ahead in well under a second of wall time
        o.push(k / 10, "audio", f"a{k}")
        clock.advance(10_000_000)
    assert [item for _, item in o.pop_ready()] == ["h0"]  # everything else waits for the hud
    o.push(3.0, "hud", "h30")
    assert [t for t, _ in o.pop_ready()][-1] == pytest.approx(3.0)
    clock.advance(10_500_000_000)  # the hud says nothing for 10.5 s: it has stopped
    o.push(6.0, "audio", "a60")
    assert [t for t, _ in o.pop_ready()][-1] == pytest.approx(6.0)
    media_only: MediaTimeOrder[str] = MediaTimeOrder(idle_s=1.0)  # real time: 1 s of media behind is gone
    media_only.push(0.0, "hud", "h0")
    for k in range(1, 60):
        media_only.push(k / 10, "audio", f"a{k}")
    assert [t for t, _ in media_only.pop_ready()][-1] == pytest.approx(5.9)
