"""``gamecopilot train scorer``: train the event scorer (the cascade's learned tier) from nothing
but ale-py's ROMs, reproducibly.

1. Recordings: the ``train`` pool (random play; :mod:`bench.pools`) plus the four development
   games once more with sticky play (seed 1; ``--sticky all`` for every game of the pool), 90 s
   each, made if missing under ``--data``.
2. Candidates: the real default pipeline runs over each recording once (``annotate --scorer none
   --features-out``, cached beside it by :mod:`bench.tune_trigger`): every event the trigger
   emits, of every priority, with the signals around it.
3. Labels from the truth (:func:`engines.event_scorer.label`): death when a wake at the candidate
   would match a critical moment, reward when one is within 1.5 s, none otherwise.
4. Cross-validation split by game (no game in two folds): the out-of-fold probabilities give the
   calibration temperature, the thresholds (chosen on those probabilities against the same
   figures ``bench trigger`` reports) and the card's figures.
5. The final model is fitted on every candidate and written, with its card, as one ``.npz``
   (:mod:`engines.event_scorer_model`; no pickle) plus ``<name>.card.md`` beside it.

Tune and train on the Atari-57 ``train`` pool only; ``bench trigger`` judges on ``validation``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import run_tool
from bench.pools import DEV, selection
from bench.tune_trigger import _preparing, cache_paths, prepare_all
from copilot.args import OneLineParser, positive_int, seed_number
from copilot.errors import UsageError, check_writable
from copilot.scoring import evaluate, load_events, read_truth
from engines.event_scorer import (
    SIGNAL_VERSION,
    Cascade,
    Thresholds,
    candidates_from_features,
    critical_moments,
    label,
    model_inputs,
)

CLASS_NAMES = ("death", "reward", "none")
# shallow trees with big leaves: what carries across games, not what tells this game's candidates apart
HGB = {"max_iter": 100, "learning_rate": 0.05, "max_depth": 3, "min_samples_leaf": 40, "l2_regularization": 1.0}


@dataclass
class Recording:
    """One recording's candidates: the trigger's events, their windows (``X``) and labels (``y``)."""

    game: str
    seed: int
    policy: str
    truth: Path
    events: list[dict[str, Any]]
    X: np.ndarray
    y: np.ndarray
    truth_records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.game}_s{self.seed}" + ("" if self.policy == "random" else f"_{self.policy}")


def load_recording(game: str, seed: int, policy: str, video: Path, truth: Path) -> Recording:
    """The candidates of one prepared recording (its features and events cached by the tuner); ``X``
    holds what a model reads (:func:`engines.event_scorer.model_inputs`)."""
    features, events_path = cache_paths(video, None)
    events = [e for e in load_events(events_path) if e.get("kind") != "meta"]
    X, names = candidates_from_features(events, features)
    X = X[:, [names.index(n) for n in model_inputs()]]
    meta, truth_events = read_truth(truth)
    moments = critical_moments(truth_events)
    rewards = sorted(float(e["t"]) for e in truth_events if e.get("kind") == "reward")
    y = np.array([label(float(e["t"]), moments, rewards) for e in events], np.int64)
    return Recording(game, seed, policy, truth, events, X, y, [meta, *truth_events] if meta else truth_events)


def prepare_recordings(wanted: Sequence[tuple[str, int, str]], data: Path, seconds: float, jobs: int,
                       quiet: bool) -> list[Recording]:
    """Make (or reuse) every recording and its cached pipeline output; their candidates."""
    out: list[Recording] = []
    by_policy: dict[str, list[tuple[str, int]]] = {}
    for game, seed, policy in wanted:
        by_policy.setdefault(policy, []).append((game, seed))
    for policy, pairs in by_policy.items():
        if quiet:
            done = prepare_all(pairs, data, seconds, False, jobs, lambda _: None, policy=policy)
        else:
            with _preparing(len(pairs)) as step:
                done = prepare_all(pairs, data, seconds, False, jobs, step, policy=policy)
        for (game, seed), (video, truth) in sorted(done.items()):
            out.append(load_recording(game, seed, policy, video, truth))
    return out


def fit(X: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    missing = [CLASS_NAMES[c] for c in range(3) if not (y == c).any()]
    if missing:
        raise UsageError(f"no {' and no '.join(missing)} among {len(y)} candidates (or in a fold of them): "
                         "train on more recordings or more games")
    clf = HistGradientBoostingClassifier(**HGB, random_state=seed)
    clf.fit(X, y)
    return clf


def softmax(raw: np.ndarray, temperature: float) -> np.ndarray:
    z = raw / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def game_folds(games: Sequence[str], n_splits: int, seed: int) -> list[set[str]]:
    """The games split into ``n_splits`` disjoint folds (shuffled with ``seed``)."""
    names = sorted(set(games))
    if len(names) < n_splits:
        raise UsageError(f"cross-validation by game needs at least {n_splits} games, got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    return [{names[i] for i in order[k::n_splits]} for k in range(n_splits)]


def out_of_fold_raw(recs: Sequence[Recording], n_splits: int, seed: int) -> list[np.ndarray]:
    """Each recording's raw scores from a model that never saw its game."""
    out: list[np.ndarray | None] = [None] * len(recs)
    for fold in game_folds([r.game for r in recs], n_splits, seed):
        train = [r for r in recs if r.game not in fold]
        X = np.concatenate([r.X for r in train])
        y = np.concatenate([r.y for r in train])
        clf = fit(X, y, seed)
        for i, r in enumerate(recs):
            if r.game in fold:
                out[i] = clf._raw_predict(r.X) if len(r.X) else np.zeros((0, 3))
    return [np.asarray(o) for o in out]


def fit_temperature(raw: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the log loss of ``softmax(raw / T)`` against ``y``."""
    best_t, best = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.3), np.log(5.0), 60)):
        p = softmax(raw, float(t))
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
        if loss < best:
            best_t, best = float(t), loss
    return best_t


def figures(recs: Sequence[Recording], events_of: Sequence[list[dict[str, Any]]]) -> dict[str, Any]:
    """The figures ``bench trigger`` reports, for one list of events per recording."""
    per: dict[str, dict[str, float]] = {}
    wakes = matched = 0
    for r, events in zip(recs, events_of, strict=True):
        res = evaluate(events, r.truth_records)
        wakes += res["counts"]["wakes"]
        matched += res["counts"]["matched_wakes"]
        per[r.key] = {"critical_recall": res["critical"]["recall"], "moments": res["critical"]["moments"],
                      "wake_precision": res["wake_precision"], "wakes_per_min": res["wakes_per_min"],
                      "false_wakes_per_min": res["false_wakes_per_min"], "wakes": res["counts"]["wakes"]}
    judged = [v["critical_recall"] for v in per.values() if v["moments"] >= 2]
    return {
        "critical_recall": float(np.mean(judged)) if judged else float("nan"),
        "recordings_with_2_moments": len(judged),
        "wake_precision_pooled": matched / wakes if wakes else 1.0,
        "wakes_per_min": float(np.mean([v["wakes_per_min"] for v in per.values()])),
        "false_wakes_per_min": float(np.mean([v["false_wakes_per_min"] for v in per.values()])),
        "per_game": per,
    }


def rescored(recs: Sequence[Recording], probs: Sequence[np.ndarray], th: Thresholds,
             model: str) -> list[list[dict[str, Any]]]:
    out = []
    for r, pr in zip(recs, probs, strict=True):
        cascade = Cascade(th, model)
        out.append([cascade.rescore(e, p) for e, p in zip(r.events, pr, strict=True)])
    return out


def choose_thresholds(recs: Sequence[Recording], probs: Sequence[np.ndarray], *, max_false_per_min: float = 0.8,
                      min_precision: float = 0.8) -> tuple[Thresholds, dict[str, Any]]:
    """The thresholds with the highest mean critical recall whose false wakes and pooled wake
    precision stay within the lines (else the best recall + precision), on out-of-fold scores."""
    best: tuple[tuple[float, ...], Thresholds, dict[str, Any]] | None = None
    # every threshold above 1 is the cheap tier itself: the choice is never worse than it on these scores
    grid = (0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
    for death, drop, event in itertools.product(grid, grid, (0.7, 0.9, 1.01)):
        th = Thresholds(death=death, drop=drop, event=event)
        f = figures(recs, rescored(recs, probs, th, "cv"))
        ok = f["false_wakes_per_min"] <= max_false_per_min and f["wake_precision_pooled"] >= min_precision
        key = (float(ok), f["critical_recall"] if ok else f["critical_recall"] + f["wake_precision_pooled"],
               f["wake_precision_pooled"])
        if best is None or key > best[0]:
            best = (key, th, f)
    assert best is not None
    best[2]["threshold_rule"] = (
        f"the highest mean critical recall with at most {max_false_per_min:g} false wakes a minute and pooled "
        f"wake precision at least {min_precision:g}" if best[0][0] else
        f"no setting kept both at most {max_false_per_min:g} false wakes a minute and pooled wake precision at "
        f"least {min_precision:g} (the cheap tier does not either): the highest critical recall + precision")
    return best[1], best[2]


def train(recs: Sequence[Recording], *, seed: int, folds: int) -> tuple[Any, float, Thresholds, dict[str, Any]]:
    """(fitted classifier, temperature, thresholds, cross-validated figures)."""
    raw = out_of_fold_raw(recs, folds, seed)
    y = np.concatenate([r.y for r in recs])
    temperature = fit_temperature(np.concatenate(raw), y)
    probs = [softmax(r, temperature) for r in raw]
    th, cv = choose_thresholds(recs, probs)
    cheap = figures(recs, [r.events for r in recs])
    allp = np.concatenate(probs)
    cv_summary = {
        "cascade": {k: v for k, v in cv.items() if k not in ("per_game", "threshold_rule")},
        "threshold_rule": cv["threshold_rule"],
        "cheap": {k: v for k, v in cheap.items() if k != "per_game"},
        "calibration": calibration(allp[:, 0], y == 0),
        "auc_death": auc(allp[:, 0], y == 0),
        "auc_death_vs_reward": auc(allp[y != 2, 0], y[y != 2] == 0),
    }
    clf = fit(np.concatenate([r.X for r in recs]), y, seed)
    return clf, temperature, th, cv_summary


def calibration(p: np.ndarray, hit: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    """Mean predicted probability against the observed rate, in bins of the prediction."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = (p >= lo) & ((p < hi) if hi < 1.0 else (p <= hi))
        if m.any():
            out.append({"from": round(float(lo), 2), "to": round(float(hi), 2), "n": int(m.sum()),
                        "predicted": round(float(p[m].mean()), 4), "observed": round(float(hit[m].mean()), 4)})
    return out


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by ranks (ties share their mean rank); NaN without both classes."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    ranks[order] = np.arange(1, len(score) + 1)
    for v in np.unique(score):
        tie = score == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def card_markdown(card: dict[str, Any]) -> str:
    cv = card["cross_validated"]
    lines = [
        f"# Event scorer `{card['name']}`", "",
        f"Trained {card['trained']} by `gamecopilot train scorer` "
        f"(seed {card['seed']}, {card['folds']} folds by game).",
        f"Signal version {card['signal_version']}; {card['features']} input features "
        "(relative ones: engines.event_scorer.model_inputs); "
        f"{card['candidates']} candidates ({card['labels']}).", "",
        "Games: " + ", ".join(card["games"]) + ".",
        "Recordings: " + ", ".join(card["recordings"]) + ".", "",
        f"Temperature {card['temperature']:.3f} (fitted on out-of-fold scores). Thresholds: "
        + ", ".join(f"{k} {v}" for k, v in card["thresholds"].items())
        + f", chosen on out-of-fold scores: {cv['threshold_rule']}.", "",
        "| cross-validated by game | critical recall | wake precision (pooled) | wakes/min | false wakes/min |",
        "|---|---|---|---|---|",
    ]
    for name in ("cheap", "cascade"):
        f = cv[name]
        lines.append(f"| {name} | {f['critical_recall']:.3f} | {f['wake_precision_pooled']:.3f} | "
                     f"{f['wakes_per_min']:.2f} | {f['false_wakes_per_min']:.2f} |")
    lines += ["", f"ROC AUC death vs rest {cv['auc_death']:.3f}, death vs reward {cv['auc_death_vs_reward']:.3f}.", "",
              "Calibration of p_death (out of fold): " + "; ".join(
                  f"{b['from']}-{b['to']}: predicted {b['predicted']:.2f}, observed {b['observed']:.2f} (n {b['n']})"
                  for b in cv["calibration"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="gamecopilot train", description="Train a model of the copilot.")
    sub = ap.add_subparsers(dest="what", metavar="WHAT", parser_class=OneLineParser)
    p = sub.add_parser("scorer", help="the event scorer: rescores the trigger's candidates (death/reward/none)")
    p.add_argument("--pool", default="train", choices=["train", "dev"],
                   help="Atari-57 games to train on (default train)")
    p.add_argument("--games", nargs="+", default=[], help="instead of a pool: these Atari-57 games (with --seeds)")
    p.add_argument("--seeds", nargs="+", type=seed_number, default=[0], help="with --games: seeds (default 0)")
    p.add_argument("--sticky", choices=["dev", "all", "none"], default="dev",
                   help="games recorded once more with sticky play (held actions), at seed --sticky-seed: the four "
                   "development games (dev, the default), every game of the pool (all; twice the time), or none")
    p.add_argument("--sticky-seed", type=seed_number, default=1, help="seed of the sticky recordings (default 1)")
    p.add_argument("--data", default=str(Path.home() / ".cache" / "gameplay-copilot" / "atari"),
                   help="where recordings and their cached pipeline output go "
                   "(default ~/.cache/gameplay-copilot/atari)")
    p.add_argument("--seconds", type=float, default=90.0, help="length of each recording (default 90)")
    p.add_argument("--jobs", type=positive_int, default=2, help="recordings prepared at once (default 2)")
    p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds, split by game (default 5)")
    p.add_argument("--seed", type=seed_number, default=0, help="training seed (default 0)")
    p.add_argument("-o", "--output", default="event_scorer.npz", help="model file to write (default event_scorer.npz)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.what != "scorer":
        ap.error("say what to train: scorer")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("train scorer needs scikit-learn: pip install 'gameplay-copilot[train]'") from None
    out = Path(args.output)
    check_writable(str(out), "-o")
    t0 = time.monotonic()
    pairs = selection(None if args.games else args.pool, args.games, args.seeds)
    wanted = [(g, s, "random") for g, s in pairs]
    if args.sticky != "none":
        every = dict.fromkeys(g for g, _ in pairs)
        games = every if args.sticky == "all" else [g for g in DEV if g in every]
        wanted += [(g, args.sticky_seed, "sticky") for g in games]
    recs = prepare_recordings(wanted, Path(args.data), args.seconds, args.jobs, args.quiet)
    clf, temperature, th, cv = train(recs, seed=args.seed, folds=args.folds)
    from engines.event_scorer_model import EventScorerModel

    y = np.concatenate([r.y for r in recs])
    card = {
        "name": out.stem, "trained": time.strftime("%Y-%m-%d"), "seed": args.seed, "folds": args.folds,
        "signal_version": SIGNAL_VERSION, "features": len(model_inputs()), "candidates": len(y),
        "labels": ", ".join(f"{n} {int((y == i).sum())}" for i, n in enumerate(CLASS_NAMES)),
        "games": sorted({r.game for r in recs}), "recordings": [r.key for r in recs], "pool": args.pool,
        "temperature": temperature, "hgb": HGB,
        "thresholds": {"death": th.death, "drop": th.drop, "event": th.event, "gap_s": th.gap_s},
        "cross_validated": cv, "seconds": round(time.monotonic() - t0, 1),
    }
    model = EventScorerModel.from_sklearn(clf, model_inputs(), signal_version=SIGNAL_VERSION,
                                          temperature=temperature, thresholds=card["thresholds"], card=card)
    model.save(out)
    out.with_suffix(".card.md").write_text(card_markdown(card), encoding="utf-8")
    c, k = cv["cheap"], cv["cascade"]
    print(f"{out}: {len(y)} candidates from {len(recs)} recordings of {len(card['games'])} games in "
          f"{card['seconds']:.0f} s; cross-validated by game: critical recall {c['critical_recall']:.3f} -> "
          f"{k['critical_recall']:.3f}, pooled wake precision {c['wake_precision_pooled']:.3f} -> "
          f"{k['wake_precision_pooled']:.3f}, false wakes/min {c['false_wakes_per_min']:.2f} -> "
          f"{k['false_wakes_per_min']:.2f}; thresholds {card['thresholds']}")
    print(json.dumps({"auc_death": cv["auc_death"], "auc_death_vs_reward": cv["auc_death_vs_reward"]}))
    return 0


def run() -> None:
    run_tool(main, "gamecopilot train")


if __name__ == "__main__":
    run()
