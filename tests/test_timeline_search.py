"""Questions over a timeline: time anchors, keyword (FTS5) and semantic (MiniLM) ranking, the merge."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from copilot.errors import UsageError
from copilot.messages import Advice, Event
from stages import timeline_search as ts
from stages.timeline import clock_text, describe_advice, describe_event
from stages.timeline_db import TimelineReader, TimelineWriter
from stages.timeline_search import AnchorError, parse_anchor, search, semantic_text

pytestmark = pytest.mark.usefixtures("leak_check")


# -- anchors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("question", "window", "rest"), [
    ("@03:12 why did I die?", (177.0, 207.0, 192.0), "why did I die?"),
    ("@3:12", (177.0, 207.0, 192.0), ""),
    ("@00:00", (0.0, 15.0, 0.0), ""),
    ("@0:05 what was that", (0.0, 20.0, 5.0), "what was that"),
    ("@75:30 boss fight?", (4515.0, 4545.0, 4530.0), "boss fight?"),  # minutes may pass 59
    ("@1:02:03 hm", (3708.0, 3738.0, 3723.0), "hm"),
    ("@3:12.5 why", (177.5, 207.5, 192.5), "why"),
    ("@45 what exploded", (30.0, 60.0, 45.0), "what exploded"),
    ("@ 1m20s", (65.0, 95.0, 80.0), ""),
    ("what happened at 3:20?", (185.0, 215.0, 200.0), "what happened?"),
    ("what was around 45 s", (30.0, 60.0, 45.0), "what was"),
    ("at 1m20s what hit me", (65.0, 95.0, 80.0), "what hit me"),
    ("near 1 min 20 sec, why", (65.0, 95.0, 80.0), "why"),
    ("what happened 2:00?", (105.0, 135.0, 120.0), "what happened?"),
    ("what did I do in the last 30 seconds?", (270.0, 300.0, None), "what did I do?"),
    ("summarise the last 2 minutes", (180.0, 300.0, None), "summarise"),
    ("anything in the last minute?", (240.0, 300.0, None), "anything?"),
    ("last 1m30s", (210.0, 300.0, None), ""),
    ("the last 10 minutes", (0.0, 300.0, None), ""),  # (no earlier than the start)
    ("what happened in the first 45 s", (0.0, 45.0, None), "what happened"),
    ("between 2:00 and 1:00 what", (60.0, 120.0, None), "what"),
    ("from 10 to 20 s, deaths", (10.0, 20.0, None), "deaths"),
    ("what happened after 4:00", (240.0, 270.0, None), "what happened"),
    ("before 0:20 what", (0.0, 20.0, None), "what"),
    ("when did I lose a life?", None, "when did I lose a life?"),
    ("score at 3 ships", None, "score at 3 ships"),  # "3 s" is no time here
    ("what is 2 + 2", None, "what is 2 + 2"),
])
def test_anchor_parsing(question: str, window: tuple[float, float, float | None] | None, rest: str) -> None:
    anchor, q = parse_anchor(question, window_s=15.0, newest=300.0)
    assert q == rest
    if window is None:
        assert anchor is None
    else:
        assert anchor is not None
        assert (anchor.start, anchor.end, anchor.point) == pytest.approx(window)
        assert anchor.text and anchor.text in question


@pytest.mark.parametrize("question", ["@3:75 why", "at 1:60 what", "@1:2:75", "what at 10:99?"])
def test_a_time_that_cannot_be_one_is_a_one_line_error(question: str) -> None:
    with pytest.raises(AnchorError) as e:
        parse_anchor(question)
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value) and "not a time" in str(e.value)


def test_the_window_is_configurable() -> None:
    anchor, _ = parse_anchor("@01:00", window_s=5.0)
    assert anchor is not None and (anchor.start, anchor.end) == (55.0, 65.0)
    with pytest.raises(UsageError):
        parse_anchor("@01:00", window_s=0.0)


def test_semantic_text_drops_the_clock_and_numbers() -> None:
    assert semantic_text("03:12 lives 3 -> 2 (down 1: a life lost)") == "lives # -> # (down #: a life lost)"
    assert semantic_text("75:03 score 1,200 -> 1,210") == "score # -> #"


# -- a small session ----------------------------------------------------------------------------
def revert(t: float) -> Event:
    return Event(t=t, event_kind="hud_revert", priority="critical", score=0.5,
                 evidence={"reasons": ["a HUD area went back to what it showed 6.6 s ago"]})


def build_session(directory: Path) -> dict[str, int]:
    """Five minutes of Breakout as the timeline stage writes it: two lives lost (each a critical event,
    the lives counter going down a second later and the link between them), score steps, speech,
    advice, a loud scene change and GAME OVER read on screen.  Returns the ids of the notable facts."""
    ids: dict[str, int] = {}
    with TimelineWriter(directory) as w:
        w.add_fact(1.0, "state", "00:01 HUD read: lives 3, score 0")
        score = 0
        for i, step in enumerate(range(8, 290, 11)):
            score += 7
            fid = w.add_fact(float(step), "state", f"{clock_text(step)} score {score - 7} -> {score} (up 7)")
            w.add_state(float(step), "score", score, fact=fid)
            if i % 3 == 0:
                ev = Event(t=step - 0.1, event_kind="hud_change", priority="normal", score=0.35,
                           evidence={"reasons": ["a HUD area showed something it never showed"]})
                w.add_fact(ev.t, "event", describe_event(ev), priority="normal")
        ids["speech_shot"] = w.add_fact(30.0, "transcript", "00:30 speech: nice shot", t_end=31.0)
        for name, t, drop_t, old in (("first", 72.4, 73.6, 3), ("second", 192.0, 193.1, 2)):
            ids[f"death_{name}"] = ev_id = w.add_fact(t, "event", describe_event(revert(t)), priority="critical")
            ids[f"drop_{name}"] = drop = w.add_fact(drop_t, "state", f"{clock_text(drop_t)} lives {old} -> {old - 1} "
                                                    "(down 1: a life lost)", priority="high")
            w.add_state(drop_t, "lives", old - 1, fact=drop)
            ids[f"link_{name}"] = link = w.add_fact(
                t, "link", f"{clock_text(drop_t)} lives {old} -> {old - 1}, {drop_t - t:.1f} s after the critical "
                           f"event hud_revert at {clock_text(t)} (life lost)", t_end=drop_t, priority="critical")
            w.add_link(ev_id, drop, "life_lost", fact=link)
        adv = Advice(t_event=72.4, t_media=74.0, backend="rules", text="Keep the paddle under the ball.",
                     event_kind="hud_revert", priority="critical",
                     structured={"analysis": "the ball got past the paddle"})
        ids["advice"] = w.add_fact(72.4, "advice", describe_advice(adv), t_end=74.0, priority="critical")
        ids["scene"] = w.add_fact(130.0, "event", describe_event(Event(
            t=130.0, event_kind="scene_change", priority="high", score=0.8,
            evidence={"families": {"picture": 0.8, "loudness": 0.6}})), priority="high")
        ids["speech_ball"] = w.add_fact(150.0, "transcript", "02:30 speech: where is the ball going", t_end=152.0)
        ids["speech_left"] = w.add_fact(200.0, "transcript", "03:20 speech: I keep missing the ball on the left",
                                        t_end=203.0)
        ids["game_over"] = w.add_fact(280.0, "ocr", "04:40 on screen: status reads 'GAME OVER'")
    return ids


@pytest.fixture
def session(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    return tmp_path, build_session(tmp_path)


@pytest.fixture
def no_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts, "_default", (None, "sentence-transformers is not installed (test)"))


class BagOfWords:
    """A stand-in embedder: hashed bag of words (what it encodes is counted)."""

    name = "bag-of-words-test"

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded += texts
        out = np.zeros((len(texts), 256), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in re.findall(r"[a-z]+", text.lower()):
                out[i, hash(w) % 256] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


LIFE_LOST = ("death_first", "death_second", "link_first", "link_second")


def test_when_did_i_lose_a_life_ranks_the_life_lost_facts_first(session: tuple[Path, dict[str, int]],
                                                                no_embedder: None) -> None:
    d, ids = session
    with TimelineReader(d) as r:
        res = search(r, "when did I lose a life?")
    assert res.method == "fts" and res.anchor is None and res.question == "when did I lose a life?"
    assert "not installed" in res.note
    assert [f.id for f in res.facts[:4]] == [ids[k] for k in ("link_first", "link_second", "death_first",
                                                             "death_second")]
    # the lives counter going down is told by its link, so it is not repeated
    assert not {ids["drop_first"], ids["drop_second"]} & {f.id for f in res.facts}
    scores = [f.score for f in res.facts]
    assert scores == sorted(scores, reverse=True) and len(res.facts) == 5  # (only facts a keyword matched)
    assert all(f.kind == "link" or f.text.startswith(clock_text(f.t)) for f in res.facts)


def test_a_time_anchored_question_returns_only_its_window_nearest_first(session: tuple[Path, dict[str, int]],
                                                                       no_embedder: None) -> None:
    d, ids = session
    with TimelineReader(d) as r:
        everything = {f.id: f for f in r.all_facts()}
        res = search(r, "@03:12 what happened?", k=100)
        assert res.anchor == (177.0, 207.0) and res.point == 192.0 and res.question == "what happened?"
        assert res.method == "time"  # nothing but stop words left: ranked by priority and nearness
        inside = {i for i, f in everything.items() if f.t <= 207.0 and f.t_end >= 177.0}
        inside.discard(ids["drop_second"])  # (told by its link)
        assert {f.id for f in res.facts} == inside and len(inside) < len(everything)
        assert [f.id for f in res.facts[:2]] == [ids["death_second"], ids["link_second"]]

        said = search(r, "@3:15 what did I say about the ball?")
        assert said.method == "fts" and said.anchor == (180.0, 210.0)
        assert said.facts[0].id == ids["speech_left"]  # not the other speech: it is outside the window
        assert all(f.t <= 210.0 and f.t_end >= 180.0 for f in said.facts)
        assert ids["speech_ball"] not in {f.id for f in said.facts}

        recent = search(r, "the last 30 seconds", k=50)
        end = r.duration()
        assert recent.anchor == (end - 30.0, end) and recent.facts
        assert all(f.t_end >= end - 30.0 for f in recent.facts)
        assert search(r, "@20:00 anything?").facts == []  # a window past the end of the session


def test_keyword_only_and_time_only_methods(session: tuple[Path, dict[str, int]]) -> None:
    d, ids = session
    with TimelineReader(d) as r:
        res = search(r, "GAME OVER", method="fts", k=3)
        assert res.method == "fts" and res.facts[0].id == ids["game_over"] and res.note == ""
        assert search(r, "xylophone", method="fts").facts == []
        newest = search(r, "anything", method="time", k=2)
        assert newest.method == "time" and [f.priority for f in newest.facts] == ["critical", "critical"]
        with pytest.raises(UsageError):
            search(r, "x", method="magic")


def test_semantic_and_hybrid_with_a_stand_in_embedder_and_its_cache(session: tuple[Path, dict[str, int]]) -> None:
    d, ids = session
    emb = BagOfWords()
    with TimelineReader(d) as r:
        res = search(r, "paddle ball advice", method="semantic", embedder=emb)
        assert res.method == "semantic" and res.facts[0].id == ids["advice"]
        n_facts = r.count()
        first = len(emb.encoded)
        # numbers and clocks removed: the score steps share one text, so far fewer texts than facts
        assert 1 < first < n_facts / 2
        assert (d / ts.EMBEDDINGS_NAME).is_file()
        emb.encoded.clear()
        again = search(r, "paddle ball advice", embedder=emb)
        assert again.method == "hybrid"
        assert emb.encoded == ["paddle ball advice"]  # the facts' vectors came from the cache
    # a new row is embedded by the next search that needs it
    with TimelineWriter(d) as w:
        w.add_fact(295.0, "transcript", "04:55 speech: brand new words here")
    with TimelineReader(d) as r:
        emb.encoded.clear()
        search(r, "brand new words", embedder=emb)
        assert emb.encoded == ["speech: brand new words here", "brand new words"]


def test_semantic_falls_back_to_keywords_when_the_embedder_is_missing(session: tuple[Path, dict[str, int]],
                                                                      no_embedder: None) -> None:
    d, ids = session
    with TimelineReader(d) as r:
        for method in ("auto", "semantic", "hybrid"):
            res = search(r, "GAME OVER", method=method)
            assert res.method == "fts" and res.facts[0].id == ids["game_over"]
            assert res.note.startswith("semantic ranking unavailable: sentence-transformers is not installed")


def test_find_minilm_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ts.MINILM_ENV, str(tmp_path))
    where, why = ts.find_minilm()
    assert where is None and ts.MINILM_ENV in why


@pytest.fixture(scope="module")
def minilm() -> ts.Embedder:
    emb, why = ts.default_embedder()
    if emb is None:
        pytest.skip(f"all-MiniLM-L6-v2 is not available: {why}")
    return emb


def test_real_minilm_ranks_life_lost_facts_first(session: tuple[Path, dict[str, int]], minilm: ts.Embedder) -> None:
    d, ids = session
    with TimelineReader(d) as r:
        res = search(r, "when did I lose a life?")
        assert res.method == "hybrid" and res.note == ""
        assert set(f.id for f in res.facts[:4]) == {ids[k] for k in LIFE_LOST}
        # no word in common with any fact: the sentence model alone finds the deaths
        para = search(r, "at what moments did my character perish?", method="semantic", k=5)
        assert para.method == "semantic"
        life = {ids[k] for k in (*LIFE_LOST, "drop_first", "drop_second")}
        assert para.facts[0].id in life and sum(f.id in life for f in para.facts[:3]) >= 2
        # anchored: only the window, the death there first
        near = search(r, "@01:13 why did I die?")
        assert near.facts[0].id in (ids["death_first"], ids["link_first"])
        assert all(f.t <= 88.0 and f.t_end >= 58.0 for f in near.facts)
