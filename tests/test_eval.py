"""Scoring predicted events against ground truth (copilot.scoring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from copilot.errors import UsageError
from copilot.scoring import (
    MATCHING_RULES,
    evaluate,
    evaluate_files,
    format_report,
    load_events,
    load_truth,
    read_truth,
)

META = {"kind": "meta", "game": "Test", "seconds": 60.0, "fps": 30}


def ev(t: float, kind: str = "x", priority: str = "normal", **kw: Any) -> dict[str, Any]:
    return {"t": t, "kind": kind, "priority": priority, "score": 1.0, "evidence": {}, **kw}


def tr(t: float, kind: str, **kw: Any) -> dict[str, Any]:
    return {"t": t, "kind": kind, "frame": round(t * 30), **kw}


# A truth with every kind, a merged life_lost + game_over moment, events 5+ s apart.
TRUTH = [
    tr(2.0, "reward", value=1),
    tr(8.0, "life_lost", lives=2),
    tr(14.0, "reward", value=1),
    tr(20.0, "life_lost", lives=1),
    tr(26.0, "life_lost", lives=0),
    tr(26.2, "game_over", score=2),
    tr(33.0, "reward", value=5),
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_contract(r: dict[str, Any]) -> None:
    for kind in ("reward", "life_lost", "game_over", "all"):
        assert set(r["per_kind"][kind]) >= {"precision", "recall", "f1", "tp", "fp", "fn"}
    assert set(r["critical"]) >= {"moments", "recall"}
    assert set(r["timing_error_s"]) >= {"mean", "median"}
    for key in ("wake_precision", "wakes_per_min", "false_wakes_per_min"):
        assert isinstance(r[key], float)
    json.dumps(r)  # serialisable as is


def test_truth_against_itself_is_perfect() -> None:
    r = evaluate(TRUTH, [META, *TRUTH])
    check_contract(r)
    for m in r["per_kind"].values():
        assert m["precision"] == m["recall"] == m["f1"] == 1.0
        assert m["fp"] == m["fn"] == 0
    assert r["critical"] == {"moments": 3, "found": 3, "recall": 1.0}
    assert r["wake_precision"] == 1.0
    assert r["false_wakes_per_min"] == 0.0
    assert r["wakes_per_min"] == pytest.approx(len(TRUTH))  # 60 s of footage
    assert r["timing_error_s"]["mean"] == r["timing_error_s"]["median"] == 0.0


def test_shifted_truth_is_not_matched() -> None:
    shifted = [dict(e, t=e["t"] + 2.0) for e in TRUTH]
    r = evaluate(shifted, TRUTH, tolerance=1.0)
    check_contract(r)
    for kind in ("reward", "life_lost", "game_over", "all"):
        assert r["per_kind"][kind]["recall"] == 0.0
        assert r["per_kind"][kind]["tp"] == 0
    assert r["per_kind"]["all"]["precision"] == 0.0
    assert r["timing_error_s"]["mean"] is None


def test_critical_window_is_asymmetric() -> None:
    # ALE's lives counter drops at the respawn, after the death is on screen: a wake up to
    # 4 s before the moment counts, one more than 1.5 s after does not.
    truth = [tr(10.0, "life_lost")]
    for t, found in [(6.0, 1.0), (5.9, 0.0), (11.5, 1.0), (11.6, 0.0), (12.0, 0.0)]:
        r = evaluate([ev(t, priority="critical")], truth)
        assert r["critical"]["recall"] == found, t
    early = [dict(e, t=e["t"] - 2.0) for e in TRUTH]
    assert evaluate(early, TRUTH, tolerance=1.0)["critical"]["recall"] == 1.0


def test_two_predictions_near_one_truth_match_once() -> None:
    truth = [tr(10.0, "reward")]
    pred = [ev(10.3), ev(9.9)]
    r = evaluate(pred, truth)
    a = r["per_kind"]["all"]
    assert (a["tp"], a["fp"], a["fn"]) == (1, 1, 0)
    assert a["precision"] == 0.5 and a["recall"] == 1.0
    assert r["timing_error_s"]["mean"] == pytest.approx(-0.1)  # the closer one won
    assert r["per_kind"]["reward"]["recall"] == 1.0
    assert r["per_kind"]["reward"]["precision"] == 1.0  # no prediction is of kind reward


def test_greedy_takes_the_closest_pair_first() -> None:
    # p0 is 0.1 from t1 and 0.4 from t0; p1 only reaches t1 (0.3): closest first gives
    # p0-t1, then p1 has nothing left and t0 is missed.
    truth = [tr(10.0, "reward"), tr(10.5, "reward")]
    pred = [ev(10.4), ev(10.8)]
    r = evaluate(pred, truth)
    assert r["per_kind"]["all"]["tp"] == 1
    assert r["timing_error_s"]["mean"] == pytest.approx(-0.1)


def test_per_kind_precision_counts_only_that_kind() -> None:
    truth = [tr(5.0, "reward"), tr(10.0, "life_lost")]
    pred = [ev(5.1, "reward"), ev(10.0, "reward"), ev(20.0, "reward"), ev(10.1, "motion")]
    r = evaluate(pred, truth)
    rw = r["per_kind"]["reward"]
    # reward predictions: one matched a reward, one matched the life_lost, one nothing
    assert (rw["pred"], rw["tp"], rw["fp"], rw["fn"]) == (3, 1, 2, 0)
    assert rw["precision"] == pytest.approx(1 / 3) and rw["recall"] == 1.0
    ll = r["per_kind"]["life_lost"]
    assert ll["recall"] == 1.0 and ll["precision"] == 1.0 and ll["pred"] == 0
    assert r["pred_kinds"]["motion"]["count"] == 1


def test_wakes() -> None:
    truth = [tr(10.0, "life_lost"), tr(10.3, "game_over"), tr(30.0, "reward"), tr(50.0, "x")]
    pred = [
        ev(9.0, priority="high"),  # 1 s before the moment: matched first (closest)
        ev(8.0, priority="high"),  # the moment has 2 truth events: a second wake matches
        ev(7.0, priority="critical"),  # a third one is redundant (justified, not matched)
        ev(31.2, priority="high"),  # reward 1.2 s before
        ev(45.0, priority="critical"),  # nothing near: false
        ev(50.0, priority="normal"),  # not a wake
    ]
    r = evaluate(pred, truth, duration_s=120.0)
    assert r["critical"]["moments"] == 1 and r["critical"]["recall"] == 1.0
    assert r["counts"]["wakes"] == 5
    assert r["counts"]["matched_wakes"] == 3
    assert r["counts"]["false_wakes"] == 1 and r["counts"]["redundant_wakes"] == 1
    assert r["wake_precision"] == pytest.approx(3 / 5)
    assert r["wakes_per_min"] == pytest.approx(2.5)
    assert r["false_wakes_per_min"] == pytest.approx(0.5)
    assert [(w["index"], w["outcome"]) for w in r["wakes"]] == [
        (0, "moment"), (1, "moment"), (2, "redundant"), (3, "reward"), (4, "false")]


def test_zero_denominators() -> None:
    r = evaluate([], [])
    check_contract(r)
    assert r["per_kind"]["all"]["precision"] == 1.0 and r["per_kind"]["all"]["recall"] == 1.0
    assert r["critical"]["recall"] == 1.0 and r["wake_precision"] == 1.0
    assert r["wakes_per_min"] == 0.0 and r["timing_error_s"]["median"] is None
    r = evaluate([], TRUTH)
    assert r["per_kind"]["all"]["recall"] == 0.0 and r["per_kind"]["all"]["f1"] == 0.0
    assert r["critical"]["recall"] == 0.0
    r = evaluate([ev(1.0, priority="critical")], [])
    assert r["per_kind"]["all"]["precision"] == 0.0 and r["wake_precision"] == 0.0


def test_files_round_trip_and_empty_files(tmp_path: Path) -> None:
    truth_path = write_jsonl(tmp_path / "truth.jsonl", [META, *TRUTH])
    pred_path = write_jsonl(tmp_path / "pred.jsonl", TRUTH)
    assert load_truth(truth_path) == TRUTH
    meta, events = read_truth(truth_path)
    assert meta == META and events == TRUTH
    r = evaluate_files(pred_path, truth_path)
    assert r["duration_s"] == 60.0 and r["per_kind"]["all"]["f1"] == 1.0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert load_events(empty) == []  # no events predicted (an empty truth file is refused: see below)
    r = evaluate_files(empty, truth_path)
    assert r["per_kind"]["all"]["recall"] == 0.0
    blank_lines = tmp_path / "blank.jsonl"
    blank_lines.write_text("\n" + json.dumps(ev(1.0)) + "\n\n")
    assert len(load_events(blank_lines)) == 1


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"t": 1.0, "kind": "a"}\n{"t": 2.0, "kind": \n', ":2:"),
        ('{"t": 1.0, "kind": "a"}\n[1, 2]\n', ":2:"),
        ('{"t": 1.0}\n', ":1:"),  # no kind
        ('{"t": -0.5, "kind": "a"}\n', ":1:"),  # before the recording starts
        ('{"kind": "a"}\n', ":1:"),
        ('{"t": "soon"}\n', ":1:"),
        ('{"t": NaN}\n', ":1:"),
        ('{"t": 1, "kind": "a", "priority": "urgent"}\n', ":1:"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        load_events(path)
    message = str(err.value)
    assert "\n" not in message and f"{path}{needle}" in message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_events(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="directory"):
        load_truth(tmp_path)
    binary = tmp_path / "video.mp4"
    binary.write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe")
    with pytest.raises(UsageError):
        load_events(binary)
    no_kind = write_jsonl(tmp_path / "t.jsonl", [META, {"t": 1.0}])
    with pytest.raises(UsageError, match=":2:"):
        load_truth(no_kind)
    with pytest.raises(UsageError):
        evaluate([{"kind": "x"}], TRUTH)


def test_report_and_rules() -> None:
    text = format_report(evaluate(TRUTH[:3], TRUTH))
    for word in ("reward", "life_lost", "game_over", "all", "wake precision", "timing"):
        assert word in text
    assert "one-to-one" in MATCHING_RULES and "tolerance" in MATCHING_RULES
    assert format_report(evaluate([], []))  # Nones render too


@pytest.mark.parametrize("kind", ["死亡", "a_very_long_truth_kind_name"])
def test_the_table_stays_aligned_for_wide_and_long_kinds(kind: str) -> None:
    from rich.cells import cell_len

    truth = [*TRUTH, {"t": 50.0, "kind": kind}]
    rows = format_report(evaluate(truth, truth)).split("\n\n")[0].splitlines()
    assert any(row.startswith(kind) for row in rows)
    assert len({cell_len(row) for row in rows}) == 1, rows  # every row as wide as the header


def test_an_empty_truth_file_or_a_bad_footage_length_is_refused(tmp_path: Path) -> None:
    """An empty truth file (a failed recording) used to score a perfect recall; a meta line's
    "seconds" of NaN or -45 gave NaN in --json or 0 wakes a minute for 28 wakes."""
    empty = tmp_path / "empty.truth.jsonl"
    empty.write_text("")
    with pytest.raises(UsageError, match="empty ground truth"):
        load_truth(empty)
    for seconds in ("NaN", "-45", "0", '"90"'):
        bad = tmp_path / "bad.truth.jsonl"
        bad.write_text(f'{{"kind": "meta", "seconds": {seconds}}}\n{{"t": 1.0, "kind": "reward"}}\n')
        with pytest.raises(UsageError, match=r'bad\.truth\.jsonl:1: "seconds" must be the footage length'):
            load_truth(bad)
    nothing_to_find = write_jsonl(tmp_path / "quiet.truth.jsonl", [META])  # a game where nothing happened
    assert load_truth(nothing_to_find) == []


def test_the_report_says_what_pred_counts_when_kinds_differ() -> None:
    """Predictions named hud_change matching reward truth: the reward row says pred 0 beside tp 2,
    and the report explains why instead of leaving it to look like a contradiction."""
    truth = [{"t": 1.0, "kind": "reward"}, {"t": 5.0, "kind": "reward"}]
    pred = [{"t": 1.1, "kind": "hud_change", "priority": "low"}, {"t": 5.1, "kind": "hud_change", "priority": "low"}]
    text = format_report(evaluate(pred, truth))
    reward = next(row.split() for row in text.splitlines() if row.startswith("reward"))
    assert reward[1:4] == ["2", "0", "2"]  # truth 2, pred 0, tp 2
    assert "pred 0 beside a tp over 0" in text and "predictions named that kind" in text
    assert "matched by a prediction of any" in text
