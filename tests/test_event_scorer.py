"""The event scorer: labels from the truth at the window borders, folds split by game, calibration
on held-out games, the session's death signature, the policy, and the stage (run through the real
runner: its scores equal the offline ones computed from a features file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.messages import Event, Features
from copilot.testing import make_envelope, run_stage
from engines.event_scorer import (
    LOOKAHEAD_S,
    SIGNAL_VERSION,
    SessionSignature,
    Thresholds,
    candidates_from_features,
    critical_moments,
    decide,
    feature_names,
    label,
    session_probabilities,
)

# ---------------------------------------------------------------- labels


def test_a_candidate_is_a_death_exactly_inside_the_critical_window_of_a_moment() -> None:
    truth = [{"t": 10.0, "kind": "life_lost"}, {"t": 10.4, "kind": "game_over"}, {"t": 30.0, "kind": "life_lost"}]
    moments = critical_moments(truth)
    assert moments == [(10.0, 10.4), (30.0, 30.0)]  # closer than 0.5 s: one moment
    # from 4 s before the first event to 1.5 s after the last, both ends in
    assert label(6.0, moments, []) == 0
    assert label(5.99, moments, []) == 2
    assert label(11.9, moments, []) == 0
    assert label(11.91, moments, []) == 2
    assert label(31.5, moments, []) == 0 and label(31.52, moments, []) == 2


def test_a_reward_within_its_window_labels_a_candidate_and_a_death_wins_over_it() -> None:
    moments = critical_moments([{"t": 20.0, "kind": "life_lost"}])
    rewards = [5.0, 19.0]
    assert label(6.5, moments, rewards) == 1 and label(3.5, moments, rewards) == 1  # 1.5 s either side
    assert label(6.51, moments, rewards) == 2 and label(3.49, moments, rewards) == 2
    assert label(19.0, moments, rewards) == 0  # also 1 s before a death: the death


# ---------------------------------------------------------------- folds and calibration


def test_cross_validation_folds_never_put_a_game_on_both_sides() -> None:
    from bench.train_scorer import game_folds

    games = [f"G{i}" for i in range(23)] * 3
    folds = game_folds(games, 5, seed=0)
    assert len(folds) == 5
    assert set().union(*folds) == set(games)
    for i, a in enumerate(folds):
        for b in folds[i + 1:]:
            assert not a & b
    assert folds == game_folds(games, 5, seed=0) and folds != game_folds(games, 5, seed=1)


def _synthetic_recordings(n_games: int = 12, per_game: int = 120, seed: int = 0) -> list[Any]:
    """Recordings whose candidates carry their class in a few window features, with game-specific offsets."""
    from bench.train_scorer import Recording

    rng = np.random.default_rng(seed)
    names = feature_names()
    recs = []
    for g in range(n_games):
        y = rng.choice(3, size=per_game, p=[0.25, 0.25, 0.5])
        X = rng.normal(size=(per_game, len(names)))
        X[:, 0] += 1.5 * (y == 0) + rng.normal() * 0.3  # a death sounds like one, on every game
        X[:, 1] += 1.5 * (y == 1)
        events = [{"t": float(i), "kind": "moment", "priority": "normal", "score": 1.0, "evidence": {}}
                  for i in range(per_game)]
        recs.append(Recording(f"Game{g}", 0, "random", Path(f"/nonexistent/g{g}.truth.jsonl"), events, X, y))
    return recs


def test_out_of_fold_probabilities_are_calibrated_on_games_the_model_never_saw() -> None:
    pytest.importorskip("sklearn")
    from bench.train_scorer import calibration, fit_temperature, out_of_fold_raw, softmax

    recs = _synthetic_recordings()
    raw = out_of_fold_raw(recs, 4, seed=0)
    y = np.concatenate([r.y for r in recs])
    t = fit_temperature(np.concatenate(raw), y)
    p = softmax(np.concatenate(raw), t)[:, 0]
    bins = calibration(p, y == 0)
    assert sum(b["n"] for b in bins) == len(y)
    # predicted against observed death rates, bin by bin, on held-out games: within 0.05 plus the
    # sampling error of the bin's observed rate (2.5 standard errors)
    for b in bins:
        if b["n"] >= 50:
            q = b["predicted"]
            assert abs(q - b["observed"]) < 0.05 + 2.5 * (q * (1 - q) / b["n"]) ** 0.5, bins
    # and the scores separate: deaths rank above the rest
    from bench.train_scorer import auc

    assert auc(p, y == 0) > 0.8


# ---------------------------------------------------------------- policy and adaptation


def _event(priority: str = "high", cues: list[str] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"t": 5.0, "kind": "moment", "priority": priority, "score": 1.2, "evidence": {}}
    if cues:
        ev["evidence"]["cues"] = cues
    return ev


def test_the_policy_rescores_the_cheap_tiers_candidates_and_keeps_a_rules_priority() -> None:
    th = Thresholds(death=0.6, drop=0.8, event=0.7)
    assert decide(_event("low"), [0.7, 0.1, 0.2], th) == "critical"  # promoted: a death the cheap tier annotated
    assert decide(_event("normal"), [0.3, 0.5, 0.2], th) == "high"  # something happened, not surely a death
    assert decide(_event("normal"), [0.3, 0.3, 0.4], th) == "normal"
    assert decide(_event("high"), [0.1, 0.1, 0.8], th) == "normal"  # a wake the scorer finds to be noise
    assert decide(_event("high"), [0.1, 0.2, 0.7], th) == "high"  # not sure enough: the cheap tier's wake stays
    assert decide(_event("critical"), [0.5, 0.2, 0.3], th) == "critical"
    # a profile rule (its own cue kind, e.g. life_lost from the lives counter) is not second-guessed
    assert decide(_event("critical", ["life_lost"]), [0.0, 0.0, 1.0], th) == "critical"
    # the generic HUD cues are: they fire on any HUD step
    assert decide(_event("critical", ["hud_revert"]), [0.0, 0.0, 1.0], th) == "normal"
    # every threshold above 1: the cheap tier's priorities, whatever the scores
    cheap_only = Thresholds(death=1.01, drop=1.01, event=1.01)
    for prio in ("critical", "high", "normal", "low"):
        for probs in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
            assert decide(_event(prio), probs, cheap_only) == prio


def test_the_session_signature_raises_candidates_like_a_confirmed_death_and_no_others() -> None:
    rng = np.random.default_rng(0)
    death = rng.normal(size=50)
    other = rng.normal(size=50)
    sig = SessionSignature(confirm=0.85, similar=0.9, boost=0.5)
    before = sig.adjust(_event(), death + 0.05 * rng.normal(size=50), [0.3, 0.2, 0.5])
    assert np.allclose(before, [0.3, 0.2, 0.5])  # nothing confirmed yet
    sig.adjust(_event(), death, [0.95, 0.0, 0.05])  # the model is sure: the session learns this window
    lifted = sig.adjust(_event(), death + 0.05 * rng.normal(size=50), [0.3, 0.2, 0.5])
    assert lifted[0] > 0.5 and abs(lifted.sum() - 1.0) < 1e-9
    unlike = sig.adjust(_event(), other, [0.3, 0.2, 0.5])
    assert np.allclose(unlike, [0.3, 0.2, 0.5])
    # a death the game confirms through a rule teaches it too
    sig2 = SessionSignature()
    sig2.adjust(_event("critical", ["life_lost"]), other, [0.2, 0.2, 0.6])
    assert sig2.adjust(_event(), other, [0.3, 0.2, 0.5])[0] > 0.3


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (small) model over this build's window features: loud sound near the moment = death."""
    ensemble = pytest.importorskip("sklearn.ensemble")
    from engines.event_scorer_model import EventScorerModel

    names = feature_names()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, len(names)))
    y = rng.choice(3, size=600)
    X[:, names.index("audio.onset.near_max")] += 3.0 * (y == 0)
    X[:, names.index("mel.db.delta")] += 3.0 * (y == 1)
    X[:, names.index("session.pct.audio.onset.near_max")] += 3.0 * (y == 0)  # the session's features count too
    clf = ensemble.HistGradientBoostingClassifier(max_iter=20, max_depth=3, random_state=0).fit(X, y)
    path = tmp_path_factory.mktemp("scorer") / "tiny.npz"
    EventScorerModel.from_sklearn(clf, names, signal_version=SIGNAL_VERSION,
                                  thresholds={"death": 0.5, "drop": 0.8, "event": 0.9},
                                  card={"name": "tiny"}).save(path)
    return path


def _stream(seconds: float) -> list[tuple[float, Features]]:
    """Features as the encoders send them: motion/thumb/hud at 30 Hz, audio at 50 Hz, mel at 10 Hz, a loud
    onset at 5.0 s."""
    out: list[tuple[float, Features]] = []
    for i in range(int(seconds * 30)):
        t = i / 30
        out += [(t, Features(name="motion", values={"diff": 0.01, "flash": 0.0, "reset": 0.0, "vanish": 0.0,
                                                     "hist": 0.0})),
                (t, Features(name="thumb", values={"novelty": 0.01, "novelty_long": 0.0})),
                (t, Features(name="hud", values={"steps": 0.0, "small": 0.0, "areas": 0.0}))]
    for i in range(int(seconds * 50)):
        t = i / 50
        loud = abs(t - 5.0) < 0.05
        out.append((t, Features(name="audio", values={"onset": 9.0 if loud else 0.1, "rise": 0.0, "novelty": 0.0,
                                                      "flux": 0.1, "rms_db": -20.0})))
    for i in range(int(seconds * 10)):
        t = i / 10
        bands = {f"b{k:02d}": -60.0 + (30.0 if abs(t - 5.0) < 0.15 else 0.0) for k in range(16)}
        out.append((t, Features(name="mel", values={**bands, "db": -40.0})))
    out.sort(key=lambda x: x[0])
    return out


def _inputs(seconds: float, events: list[Event]) -> list[Any]:
    """The stream with each event sent once the trigger could have decided it (0.3 s after its moment)."""
    items = [(t, make_envelope(f, t_media=t, source=f.name)) for t, f in _stream(seconds)]
    items += [(e.t + 0.3, make_envelope(e, t_media=e.t + 0.3, source="trigger")) for e in events]
    items.sort(key=lambda x: x[0])
    return [env for _, env in items]


def test_the_stage_scores_every_candidate_as_the_offline_tools_do(tiny_model: Path, tmp_path: Path) -> None:
    # enough earlier candidates that the last ones are ranked against the session
    quiet = [Event(t=7.0 + k, event_kind="moment", priority="normal", score=0.5 + 0.1 * k, evidence={})
             for k in range(7)]
    events = [Event(t=5.0, event_kind="hud_change+sound", priority="low", score=0.8, evidence={"cues": ["hud_change"]}),
              *quiet, Event(t=14.5, event_kind="moment", priority="high", score=1.3, evidence={})]
    res = run_stage("event_scorer", _inputs(17.0, events), params={"model": str(tiny_model)}, speed=None)
    out = res["events"]
    assert [e.t for e in out] == [e.t for e in events]  # every candidate, in order
    for e in out:
        s = e.evidence["scorer"]
        assert set(s) >= {"p_death", "p_reward", "p_none", "model"} and s["model"] == "tiny"
        assert abs(s["p_death"] + s["p_reward"] + s["p_none"] - 1.0) < 1e-3
    assert out[0].evidence["scorer"]["p_death"] > 0.5 and out[0].priority == "critical"  # promoted from low
    assert out[0].evidence["scorer"]["cheap_priority"] == "low"
    assert res.metrics.notes["promoted"] >= 1
    # offline, from a features file holding the same stream: the same probabilities
    feats = tmp_path / "f.jsonl"
    with open(feats, "w") as fh:
        for t, f in _stream(17.0):
            fh.write(json.dumps({"t": t, "kind": "features", "source": f.name, "name": f.name,
                                 "values": f.values}) + "\n")
    from engines.event_scorer_model import EventScorerModel

    records = [e.record() for e in events]
    X, names = candidates_from_features(records, feats)
    ranked = X[:, names.index("session.pct.cheap.score")]
    assert np.isnan(ranked[:5]).all() and ranked[-1] == 1.0  # ranked once 5 came before; the last is the top
    offline = session_probabilities(records, X, EventScorerModel.load(tiny_model).predict_proba(X), Thresholds())
    online = np.array([[e.evidence["scorer"][k] for k in ("p_death", "p_reward", "p_none")] for e in out])
    assert np.allclose(online, offline, atol=1e-4)


def test_a_wake_waits_for_its_window_and_no_longer(tiny_model: Path) -> None:
    """At real time a candidate leaves once the streams pass LOOKAHEAD_S after its moment."""
    events = [Event(t=5.0, event_kind="moment", priority="high", score=1.3, evidence={})]
    res = run_stage("event_scorer", _inputs(8.0, events), params={"model": str(tiny_model)}, speed=1.0)
    (out,) = res.envelopes("events")
    assert LOOKAHEAD_S <= out.t_media - 5.0 <= 1.0  # decided at most 1 s of media after its moment
    assert res.metrics.extra_ms["delay_ms"].p99 <= 1000.0


def test_scorer_none_passes_the_triggers_events_through_untouched() -> None:
    events = [Event(t=5.0, event_kind="moment", priority="high", score=1.3, evidence={"reasons": ["x"]})]
    res = run_stage("event_scorer", _inputs(6.0, events), params={"model": "none"})
    assert [e.record() for e in res["events"]] == [events[0].record()]


def test_a_model_for_other_signals_is_refused_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    import subprocess
    import sys

    from engines.event_scorer_model import EventScorerModel

    old = EventScorerModel.load(tiny_model)
    old.signal_version = SIGNAL_VERSION + 7
    bad = tmp_path / "old.npz"
    old.save(bad)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "copilot", "annotate", str(root / "bench/data/breakout_s0.mp4"),
                           "-o", str(tmp_path / "e.jsonl"), "--scorer", str(bad), "-q"],
                          capture_output=True, text=True, timeout=120, cwd=root, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "signal version" in lines[0] and str(bad) in lines[0], proc.stderr
    assert not (tmp_path / "e.jsonl").exists()


def test_a_wake_soon_after_the_scorers_last_one_is_kept_as_a_repeat() -> None:
    from engines.event_scorer import Cascade

    cascade = Cascade(Thresholds(death=0.5, gap_s=2.0), "m")
    death = [0.9, 0.05, 0.05]
    first = cascade.rescore({**_event("low"), "t": 10.0}, death)
    again = cascade.rescore({**_event("low"), "t": 11.5}, death)
    later = cascade.rescore({**_event("low"), "t": 12.1}, death)
    assert first["priority"] == "critical" and first["evidence"]["scorer"]["cheap_priority"] == "low"
    assert again["priority"] == "normal" and again["evidence"]["scorer"]["repeat"] is True
    assert later["priority"] == "critical"  # 2.1 s after the last wake the scorer made
    # a rule's wake is never held back, and does not start a gap of its own
    rule = cascade.rescore({**_event("critical", ["life_lost"]), "t": 12.5}, [0.0, 0.0, 1.0])
    assert rule["priority"] == "critical" and "repeat" not in rule["evidence"]["scorer"]


# ---------------------------------------------------------------- the session's features


def test_a_candidate_is_ranked_against_the_sessions_earlier_candidates_only() -> None:
    from engines.event_session import HISTORY, MIN_HISTORY, SessionContext, session_feature_names

    def cand(t: float, priority: str = "normal") -> dict[str, Any]:
        return {"t": t, "kind": "moment", "priority": priority}

    ctx = SessionContext()
    firsts = [ctx.features(cand(float(k)), {"audio.onset.near_max": float(k)}) for k in range(MIN_HISTORY)]
    assert all(np.isnan(f["session.pct.audio.onset.near_max"]) for f in firsts)  # too few to rank against
    assert set(firsts[0]) == set(session_feature_names())
    # louder than 3 of the 5 before it, as loud as one (half), quieter than one: 3.5 / 5
    f = ctx.features(cand(10.0, "high"), {"audio.onset.near_max": 3.0})
    assert f["session.pct.audio.onset.near_max"] == pytest.approx(3.5 / 5)
    assert np.isnan(f["session.pct.motion.diff.near_max"])  # a statistic the window lacked
    assert f["session.rate_60s"] == 5.0 and f["session.since_prev"] == pytest.approx(6.0)
    assert f["session.wake_rate_60s"] == 0.0 and f["session.since_wake"] == 60.0  # no wake before it
    # 70 s later: the minute before holds nothing; the wake at 10 s is the newest
    later = ctx.features(cand(80.0), {"audio.onset.near_max": 100.0})
    assert later["session.rate_60s"] == 0.0 and later["session.since_wake"] == 60.0  # capped
    assert later["session.pct.audio.onset.near_max"] == 1.0
    assert ctx.features(cand(81.0), {})["session.since_wake"] == 60.0 and len(ctx.history) == MIN_HISTORY + 3
    for k in range(2 * HISTORY):  # bounded
        ctx.features(cand(100.0 + k), {})
    assert len(ctx.history) == HISTORY


def test_the_session_features_of_a_candidate_do_not_depend_on_later_ones() -> None:
    from engines.event_session import SessionContext

    rng = np.random.default_rng(3)
    cands = [({"t": float(t), "priority": rng.choice(["high", "normal", "low"])},
              {"cheap.score": float(rng.random()), "mel.db.delta": float(rng.normal())})
             for t in np.cumsum(rng.uniform(1, 20, 40))]
    full = SessionContext()
    all_rows = [full.features(e, w) for e, w in cands]
    part = SessionContext()
    first_rows = [part.features(e, w) for e, w in cands[:25]]
    for a, b in zip(first_rows, all_rows[:25], strict=True):
        assert a.keys() == b.keys()
        assert all((np.isnan(a[k]) and np.isnan(b[k])) or a[k] == b[k] for k in a)
