"""The session timeline: the stage's facts, keyframes and links, and the database's durability."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.clock import VirtualClock
from copilot.errors import UsageError
from copilot.messages import Advice, Envelope, Event, GameState, Transcript, VideoFrame
from copilot.testing import make_envelope, run_stage
from stages import timeline as timeline_mod
from stages.timeline import TimelineStage, clock_text, describe_event
from stages.timeline_db import (
    APPLICATION_ID,
    DB_NAME,
    SCHEMA_VERSION,
    TimelineReader,
    TimelineWriter,
    keyframe_name,
)

pytestmark = pytest.mark.usefixtures("leak_check")
REPO = Path(__file__).resolve().parent.parent


def revert(t: float, priority: str = "critical", kind: str = "hud_revert") -> Event:
    return Event(t=t, event_kind=kind, priority=priority, score=0.5,  # type: ignore[arg-type]
                 evidence={"decided_at": t + 0.45, "families": {"hud": 0.5},
                           "reasons": ["a HUD area went back to what it showed 6.6 s ago"]})


def lives(t: float, value: float, before: float | None = None, changed: float | None = None) -> GameState:
    prev = {"lives": before} if before is not None else {}
    at = {"lives": changed if changed is not None else t} if before is not None else {}
    return GameState(values={"lives": value, "score": 10.0}, text={"lives": f"{value:g}", "score": "10"},
                     previous=prev, changed_at=at)


def session_inputs(clock: VirtualClock) -> list[Envelope]:
    """25 s of a game at 10 fps (frames of rising grey), with what happens in it, in arrival order:

    * 0.5 s: the HUD is first read (lives 3, score 10); 2 s: speech;
    * 5.1 s: a critical hud_revert, decided at 5.55; its advice (final, after a partial) at 6 s;
    * 6.3 s: lives 3 -> 2 (1.2 s after the event: a link);
    * 8.0 s: a normal event decided before any frame at 8 s has come (its keyframe waits);
    * 12 s: a low event (no keyframe); 15 s: GAME OVER read on screen;
    * 20.0 s: lives 2 -> 1 arrives before its cause, a critical event at 19.8 decided at 20.25.
    """
    base = clock.now_ns()
    items: list[tuple[float, Any]] = []
    for i in range(251):
        t = round(i * 0.1, 3)
        items.append((t, VideoFrame(image=np.full((96, 128, 3), i % 256, dtype=np.uint8), frame_index=i)))
    items += [
        (0.5, lives(0.5, 3)),
        (2.5, Transcript(text="watch out for the   ball", t_start=2.0, t_end=2.5, language="en")),
        (5.55, revert(5.1)),
        (5.8, Advice(t_event=5.1, backend="rules", text="Keep the", final=False, event_kind="hud_revert",
                     priority="critical", wake=1)),
        (6.0, Advice(t_event=5.1, t_media=6.0, backend="rules", text="Keep the paddle under the ball.",
                     event_kind="hud_revert", priority="critical", wake=1,
                     structured={"game_state": "x", "analysis": "the ball got past the paddle",
                                 "advice": "Keep the paddle under the ball."})),
        (6.3, lives(6.3, 2, before=3)),
        (7.95, revert(8.0, priority="normal", kind="hud_change")),
        (12.4, revert(12.0, priority="low", kind="hud_change")),
        (15.0, GameState(values={"lives": 2.0}, text={"lives": "2", "status": "GAME OVER"},
                         changed_at={"status": 15.0})),
        (20.0, lives(20.0, 1, before=2)),
        (20.25, revert(19.8)),
    ]
    items.sort(key=lambda it: it[0])  # (a stable sort: a message after the frame of its moment)
    return [make_envelope(p, t_media=t, t_capture_ns=base + round(t * 1e9), seq=i + 1)
            for i, (t, p) in enumerate(items)]


def run_timeline(tmp_path: Path, **params: Any) -> tuple[Any, Path]:
    clock = VirtualClock()
    session = tmp_path / "session"
    session.mkdir()
    res = run_stage(TimelineStage, session_inputs(clock), params=params, clock=clock,
                    options={"session": str(session), "pipeline_name": "test"})
    return res, session


def test_the_stage_writes_facts_keyframes_and_links(tmp_path: Path) -> None:
    res, session = run_timeline(tmp_path)
    assert res.metrics.notes.get("write_errors", 0) == 0
    with TimelineReader(session) as r:
        facts = r.all_facts()
        by_kind: dict[str, list[Any]] = {}
        for f in facts:
            by_kind.setdefault(f.kind, []).append(f)
        assert set(by_kind) == {"event", "state", "ocr", "transcript", "advice", "link"}

        events = {f.t: f for f in by_kind["event"]}
        assert set(events) == {5.1, 8.0, 12.0, 19.8}
        crit = events[5.1]
        assert crit.priority == "critical"
        assert crit.text == ("00:05 critical event hud_revert (score 0.50): a HUD area went back to what it "
                             "showed 6.6 s ago; likely a life lost or death")
        assert crit.data["evidence"]["reasons"]
        # keyframes: the frame nearest each event of priority normal or more, none for the low one
        assert crit.keyframe is not None and crit.keyframe.name == "00m05.100_hud_revert.jpg"
        assert events[8.0].keyframe is not None and events[8.0].keyframe.name == "00m08.000_hud_change.jpg"
        assert events[12.0].keyframe is None
        assert events[19.8].keyframe is not None
        from PIL import Image

        for f in (crit, events[8.0]):
            assert f.keyframe is not None
            with Image.open(f.keyframe) as img:
                assert img.format == "JPEG" and img.width <= 320
                pixel = np.asarray(img.convert("L"))[10, 10]
            assert abs(int(pixel) - round(f.t * 10)) <= 3  # the frame of its moment (grey = frame index)
        assert sorted(p.name for p in (session / "keyframes").iterdir()) == sorted(
            f.keyframe.name for f in by_kind["event"] if f.keyframe is not None)
        assert [t for t, _ in r.keyframes()] == [5.1, 8.0, 19.8]

        states = by_kind["state"]
        assert states[0].text == "00:00 HUD read: lives 3, score 10"
        drops = [f.text for f in states[1:]]
        assert drops == ["00:06 lives 3 -> 2 (down 1: a life lost)", "00:20 lives 2 -> 1 (down 1: a life lost)"]
        assert [(s.t, s.value) for s in r.states("lives")] == [(0.5, 3.0), (6.3, 2.0), (20.0, 1.0)]
        assert [f.text for f in by_kind["ocr"]] == ["00:15 on screen: status reads 'GAME OVER'"]
        assert [f.text for f in by_kind["transcript"]] == ["00:02 speech: watch out for the ball"]
        assert by_kind["transcript"][0].t_end == 2.5
        (adv,) = by_kind["advice"]  # the final advice only
        assert adv.text == ("00:05 advice on the critical hud_revert at 00:05: Keep the paddle under the ball. "
                            "(why: the ball got past the paddle)")

        links = by_kind["link"]
        assert [f.text for f in links] == [
            "00:06 lives 3 -> 2, 1.2 s after the critical event hud_revert at 00:05 (life lost)",
            "00:20 lives 2 -> 1, 0.2 s after the critical event hud_revert at 00:19 (life lost)",
        ]
        assert all(f.priority == "critical" for f in links)
        assert [(lk.cause, lk.effect, lk.kind) for lk in r.links()] == [
            (crit.id, states[1].id, "life_lost"), (events[19.8].id, states[2].id, "life_lost")]
        info = r.session()
        assert info["format"] == "gamecopilot-timeline" and info["pipeline_name"] == "test"
        assert float(info["media_s"]) == pytest.approx(25.0)
        assert r.duration() == pytest.approx(20.0)
    assert res.metrics.notes["keyframes"] == 3
    assert res.metrics.notes["rows"] > 0


def test_without_the_session_option_the_stage_writes_nothing(tmp_path: Path) -> None:
    clock = VirtualClock()
    res = run_stage(TimelineStage, session_inputs(clock), clock=clock, options={"pipeline_name": "x"})
    stage = res.stage
    assert isinstance(stage, TimelineStage) and not stage.active
    assert not any(tmp_path.iterdir())
    assert res.metrics.count > 0 and not res.metrics.notes


def test_a_write_error_is_one_warning_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    class FailingWriter(TimelineWriter):
        def flush(self) -> int:
            if self.pending and self.batches >= 1:  # the session rows go in; nothing after them
                with self._lock:
                    self.lost += len(self._ops)
                    self._ops = []
                raise sqlite3.OperationalError("disk I/O error")
            return super().flush()

    monkeypatch.setattr(timeline_mod, "TimelineWriter", FailingWriter)
    res, _session = run_timeline(tmp_path, batch_rows=4)
    assert res.metrics.notes["write_errors"] >= 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "timeline" in r.getMessage()]
    assert len(warnings) == 1 and "disk I/O error" in warnings[0] and "\n" not in warnings[0]


def test_a_reader_reads_while_the_writer_holds_the_database(tmp_path: Path) -> None:
    w = TimelineWriter(tmp_path, batch_rows=1000, batch_s=60.0)
    try:
        for i in range(10):
            w.add_fact(float(i), "event", f"event number {i}")
        assert not w.due()
        w.flush()
        with TimelineReader(tmp_path) as r:
            assert r.count() == 10
            w.add_fact(10.0, "transcript", "not committed yet")
            assert r.count() == 10 and w.pending == 1
            w.flush()  # the reader's open connection does not block a commit
            assert r.count() == 11
            assert [f.text for f in r.facts(9.5, 10.5)] == ["not committed yet"]
            assert r.connection.execute("SELECT count(*) FROM facts_fts WHERE facts_fts MATCH 'committed'"
                                        ).fetchone()[0] == 1
            with pytest.raises(sqlite3.OperationalError):  # read-only
                r.connection.execute("DELETE FROM facts")
    finally:
        w.close()


def test_the_writer_commits_in_batches_of_rows_or_wall_time(tmp_path: Path) -> None:
    now = [0.0]
    w = TimelineWriter(tmp_path, batch_rows=3, batch_s=0.5, clock=lambda: now[0])
    try:
        w.add_fact(1.0, "event", "a")
        assert not w.due()
        now[0] = 0.6
        assert w.due()  # waited batch_s
        w.flush()
        w.add_fact(2.0, "event", "b")
        w.add_fact(3.0, "event", "c")
        assert not w.due()
        w.add_fact(4.0, "event", "d")
        assert w.due()  # batch_rows
    finally:
        w.close()
    with TimelineReader(tmp_path) as r:
        assert [f.text for f in r.all_facts()] == ["a", "b", "c", "d"]


def test_a_writer_killed_outright_leaves_every_committed_row(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from stages.timeline_db import TimelineWriter
        w = TimelineWriter({str(tmp_path)!r}, batch_rows=10, batch_s=3600)
        for i in range(35):
            prio = "critical" if i % 7 == 0 else "normal"
            fid = w.add_fact(float(i), "event", f"committed fact {{i}}", priority=prio)
            w.add_state(float(i), "lives", 3 - i % 3, fact=fid)
            if w.pending >= 20:
                w.flush()
                print("flushed", i + 1, flush=True)
        w.add_fact(99.0, "event", "never committed")
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("ready"):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    committed = max(int(n) for word, n in (ln for ln in lines if ln[0] == "flushed"))
    assert committed == 30
    assert (tmp_path / (DB_NAME + "-wal")).exists()  # what the writer committed is in its WAL
    with TimelineReader(tmp_path) as r:
        facts = r.all_facts()
        assert [f.text for f in facts] == [f"committed fact {i}" for i in range(committed)]
        assert len(r.states("lives")) == committed
        hits = r.connection.execute("SELECT rowid FROM facts_fts WHERE facts_fts MATCH 'committed'").fetchall()
        assert len(hits) == committed
    # and a new writer (a restarted run) goes on after the last committed id
    with TimelineWriter(tmp_path) as w:
        assert w.add_fact(100.0, "event", "after the restart") == committed + 1


def test_what_is_not_a_timeline_is_refused_in_one_line(tmp_path: Path) -> None:
    def refused(where: Path, *words: str) -> None:
        with pytest.raises(UsageError) as e:
            TimelineReader(where)
        msg = str(e.value)
        assert "\n" not in msg and str(where) in msg
        for w in words:
            assert w in msg

    refused(tmp_path / "missing", "no such session directory")
    refused(tmp_path, "not a session directory")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / DB_NAME).write_bytes(b"this is not sqlite at all, just some bytes" * 100)
    refused(junk, "not a timeline database")
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / DB_NAME) as c:
        c.execute("CREATE TABLE t(x)")
    refused(other, "not a gamecopilot timeline")
    with pytest.raises(UsageError, match="not a gamecopilot timeline"):
        TimelineWriter(other)

    for version, word in ((SCHEMA_VERSION + 1, "newer"), (SCHEMA_VERSION - 1, "older")):
        d = tmp_path / f"v{version}"
        TimelineWriter(d).close()
        with sqlite3.connect(d / DB_NAME) as c:
            c.execute(f"PRAGMA user_version = {version}")
            assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        refused(d, word, f"version {version}")
        with pytest.raises(UsageError, match=word):
            TimelineWriter(d)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        TimelineWriter(tmp_path / "afile")


@pytest.mark.parametrize(("t", "kind", "name"), [
    (0.0, "hud_revert", "00m00.000_hud_revert.jpg"),
    (192.345, "hud_revert", "03m12.345_hud_revert.jpg"),
    (6000.5, "a/b c", "100m00.500_a_b_c.jpg"),
    (59.9999, "x", "01m00.000_x.jpg"),
])
def test_keyframe_names(t: float, kind: str, name: str) -> None:
    assert keyframe_name(t, kind) == name


def test_event_text_says_what_priorities_mean() -> None:
    assert clock_text(4530.2) == "75:30"
    ev = Event(t=72.0, event_kind="hud_quiet_change", priority="high", score=0.7,
               evidence={"state_before": {"lives": 3, "score": 5}, "state_after": {"lives": 2, "score": 5}})
    assert describe_event(ev) == ("01:12 high event hud_quiet_change (score 0.70): HUD lives 3 -> 2; "
                                  "a major moment")
    assert describe_event(Event(t=1.0, event_kind="sound", priority="low")) == "00:01 low event sound (score 0.00)"
    twice = Event(t=4.2, event_kind="hud_change", priority="low", score=0.23,
                  evidence={"reasons": ["a HUD area changed", "a HUD area changed"]})
    assert describe_event(twice) == "00:04 low event hud_change (score 0.23): a HUD area changed"


def test_a_live_run_commits_by_wall_time_so_a_reader_sees_it_before_the_end(tmp_path: Path) -> None:
    import asyncio

    from copilot.stage import StageContext
    from stages.timeline import TimelineParams

    async def scenario() -> tuple[int, int]:
        ctx = StageContext(name="timeline", options={"session": str(tmp_path)})
        stage = TimelineStage(ctx, TimelineParams(batch_s=0.2))
        await stage.start()
        try:
            await stage.process(make_envelope(revert(3.0), t_media=3.45))
            assert stage.writer is not None and stage.writer.pending == 1  # (not a full batch: it waits)
            with TimelineReader(tmp_path) as r:
                before = r.count()
                for _ in range(100):  # the ticker commits it within about batch_s of wall time
                    await asyncio.sleep(0.05)
                    if r.count():
                        break
                during = r.count()
            await stage.flush()
        finally:
            await stage.close()
            stage.shutdown_executor()
        return before, during

    assert asyncio.run(scenario()) == (0, 1)


def test_the_keyframe_ring_is_small_bounded_and_reads_every_pixel_format(tmp_path: Path) -> None:
    from PIL import Image

    from stages.timeline import KeyframeRing, save_jpeg

    ring = KeyframeRing(fps=4.0, keep_s=2.0, width=320)
    bgra = np.zeros((720, 1280, 4), dtype=np.uint8)
    bgra[..., 0] = 200  # blue in BGRA
    assert ring.offer(0.0, bgra, "bgra")
    assert not ring.offer(0.1, bgra, "bgra")  # 4 a second
    _t, img = ring.frames[-1]
    assert img.shape == (180, 320, 3) and tuple(img[0, 0]) == (0, 0, 200) and img.flags.c_contiguous
    assert ring.offer(0.25, np.full((480, 640), 77, dtype=np.uint8), "gray")
    assert ring.frames[-1][1].shape == (240, 320, 3)
    for i in range(2, 40):
        ring.offer(i * 0.25, np.zeros((600, 1000, 3), dtype=np.uint8))
    assert len(ring.frames) == 10  # keep_s * fps + 2
    assert ring.frames[-1][1].shape == (200, 334, 3)  # stride 3: under twice the width, resized on writing
    got = ring.nearest(8.3)
    assert got is not None and got[0] == 8.25
    save_jpeg(got[1], tmp_path / "k" / "x.jpg", 320, 80)
    with Image.open(tmp_path / "k" / "x.jpg") as im:
        assert im.size == (320, 192)
    assert not any(p.name.endswith(".part") for p in (tmp_path / "k").iterdir())


def test_entities_from_a_keyframe_become_one_searchable_fact(tmp_path: Path) -> None:
    from copilot.messages import Entities, Entity

    clock = VirtualClock()
    session = tmp_path / "session"
    session.mkdir()
    es = Entities(t=5.1, frame_index=51, reason="event:life_lost", event_t=5.1, model="facebook/sam3", entities=[
        Entity(label="player", box=(0.05, 0.8, 0.15, 0.95), score=0.91, mask_area=0.02),
        Entity(label="enemy", box=(0.4, 0.1, 0.5, 0.2), score=0.8, mask_area=0.01),
        Entity(label="enemy", box=(0.6, 0.1, 0.7, 0.2), score=0.6, mask_area=0.01)])
    empty = Entities(t=9.0, reason="periodic", entities=[])
    base = clock.now_ns()
    envs = [make_envelope(p, t_media=t, t_capture_ns=base + round(t * 1e9), seq=i + 1)
            for i, (t, p) in enumerate([(5.6, es), (9.0, empty)])]
    run_stage(TimelineStage, envs, clock=clock, options={"session": str(session), "pipeline_name": "test"})
    with TimelineReader(session) as r:
        facts = [f for f in r.all_facts() if f.kind == "entities"]
    assert len(facts) == 1  # a keyframe where nothing was found says nothing
    f = facts[0]
    assert f.t == 5.1
    assert f.text == ("00:05 seen on the keyframe of event life_lost: player (0.91, lower left, 2% of the screen), "
                      "enemy x2 (best 0.80)")
    assert [e["label"] for e in f.data["entities"]] == ["player", "enemy", "enemy"]
    assert f.data["entities"][0]["box"] == [0.05, 0.8, 0.15, 0.95] and f.data["reason"] == "event:life_lost"
