"""``gamecopilot bench trigger``: the cheap trigger alone against the cascade with the event scorer,
on the same recordings, with the figures the scorer's acceptance is judged on.

Each recording of the pool (default ``validation``, never trained or tuned on) is made if missing
and run once through the real default pipeline with ``--scorer none`` (cached beside it by
:mod:`bench.tune_trigger`): those events are the cheap variant.  The cascade rescores the same
candidates with the model (:class:`engines.event_scorer.Cascade` over the windows of
:func:`engines.event_scorer.candidates_from_features`, what the running stage computes in a
lossless run).  Both are scored with :mod:`copilot.scoring`:

* ``critical_recall``: the mean over recordings with at least two critical moments;
* ``wake_precision_pooled``: matched wakes over all wakes of the pool;
* ``wakes_per_min``, ``false_wakes_per_min``: means over recordings;
* ``curve``: mean critical recall against wakes per minute as the wake threshold sweeps (the
  cascade's ``death``, the p_death from which a candidate is a critical wake; the cheap trigger's
  ``high_score``/``critical_score``, replayed by the tuner's detector);
* ``adaptation``: the cascade with and without the per-session signature
  (:class:`engines.event_scorer.SessionSignature`);
* ``separation``: how well the model ranks the candidates themselves, whatever the thresholds
  (:func:`separation`): what a new signal or model has to raise before the figures above can move.

``--json`` prints ``{"games", "variants": {"cheap", "cascade"}, ...}``; ``--plot FILE.png`` draws the
curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.output import check_output_path, emit_result, run_tool
from bench.pools import POOLS, selection
from bench.train_scorer import CLASS_NAMES, Recording, auc, figures, prepare_recordings
from bench.tune_trigger import cache_paths, observations, replay_detector, with_trigger
from copilot.args import OneLineParser, positive_int, seed_number
from copilot.errors import UsageError
from copilot.profile import load_profile, resolve_profile
from engines.event_scorer import Cascade, Thresholds, model_inputs, session_probabilities


def model_columns(model: Any) -> list[int]:
    """The columns of ``Recording.X`` (:func:`engines.event_scorer.model_inputs`) a model reads, in its order."""
    names = model_inputs()
    missing = [n for n in model.feature_names if n not in names]
    if missing:
        raise UsageError(f"bench trigger: the model reads {len(missing)} feature(s) this build's training does not "
                         f"compute ({', '.join(missing[:3])}...): train it again with `gamecopilot train scorer`")
    return [names.index(n) for n in model.feature_names]


def model_probabilities(recs: list[Recording], model: Any) -> list[np.ndarray]:
    """Each recording's candidates' probabilities (death, reward, none) from ``model``."""
    cols = model_columns(model)
    return [model.predict_proba(r.X[:, cols]) if len(r.X) else np.zeros((0, 3)) for r in recs]


def cascade_events(recs: list[Recording], model: Any, th: Thresholds, adapt: bool,
                   probs: list[np.ndarray]) -> list[list[dict[str, Any]]]:
    """Each recording's candidates rescored from ``probs`` (:func:`model_probabilities`)."""
    out = []
    cols = model_columns(model)
    for r, p in zip(recs, probs, strict=True):
        if adapt:
            p = session_probabilities(r.events, r.X[:, cols], p, th)
        cascade = Cascade(th, model.card.get("name", "model"))
        out.append([cascade.rescore(e, q) for e, q in zip(r.events, p, strict=True)])
    return out


def separation(recs: list[Recording], probs: list[np.ndarray]) -> dict[str, Any]:
    """How the model ranks the pool's candidates, labelled from the truth as training labels them:
    ROC AUC of ``p_death`` for a death against the rest and against a reward, and of ``p_none`` for
    noise among the cheap tier's wakes (1.0: every noise wake could be dropped and no true one;
    0.5: chance).  The counts say how many of each there were."""
    y = np.concatenate([r.y for r in recs]) if recs else np.zeros(0, np.int64)
    p = np.concatenate(probs) if probs else np.zeros((0, 3))
    wake = np.array([e.get("priority") in ("critical", "high") for r in recs for e in r.events], bool)

    def count(mask: np.ndarray) -> dict[str, int]:
        return {name: int(((y == i) & mask).sum()) for i, name in enumerate(CLASS_NAMES)}

    return {
        "auc_death": auc(p[:, 0], y == 0),
        "auc_death_vs_reward": auc(p[y != 2, 0], y[y != 2] == 0),
        "auc_noise_among_cheap_wakes": auc(p[wake, 2], y[wake] == 2),
        "candidates": count(np.ones(len(y), bool)),
        "cheap_wakes": count(wake),
    }


def cheap_curve(recs: list[Recording], data_videos: dict[str, Path]) -> list[dict[str, float]]:
    profile = load_profile(resolve_profile(None))
    obs = {r.key: observations(cache_paths(data_videos[r.key], None)[0]) for r in recs}
    points = []
    for factor in (0.5, 0.7, 0.85, 1.0, 1.25, 1.6, 2.2, 3.0):
        p = with_trigger(profile, {"high_score": round(1.15 * factor, 3), "critical_score": round(2.5 * factor, 3)})
        f = figures(recs, [replay_detector(obs[r.key], p) for r in recs])
        points.append({"threshold": factor, "wakes_per_min": f["wakes_per_min"],
                       "critical_recall": f["critical_recall"]})
    return points


def cascade_curve(recs: list[Recording], model: Any, th: Thresholds,
                  probs: list[np.ndarray]) -> list[dict[str, float]]:
    points = []
    for death in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.01):
        t = Thresholds(death=death, drop=th.drop, event=th.event, gap_s=th.gap_s)
        f = figures(recs, cascade_events(recs, model, t, adapt=False, probs=probs))
        points.append({"threshold": death, "wakes_per_min": f["wakes_per_min"],
                       "critical_recall": f["critical_recall"]})
    return points


def plot(result: dict[str, Any], path: str) -> None:
    """Mean critical recall against wakes per minute, both variants (Pillow; no plotting library)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 420, 56
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    curves = {name: v["curve"] for name, v in result["variants"].items()}
    xmax = max([p["wakes_per_min"] for c in curves.values() for p in c] + [1.0]) * 1.05

    def xy(x: float, y: float) -> tuple[float, float]:
        return m + (w - 2 * m) * x / xmax, h - m - (h - 2 * m) * y

    d.rectangle([m, m, w - m, h - m], outline="black")
    for i in range(6):
        y = i / 5
        d.text((8, xy(0, y)[1] - 6), f"{y:.1f}", fill="black")
        x = xmax * i / 5
        d.text((xy(x, 0)[0] - 8, h - m + 6), f"{x:.1f}", fill="black")
    d.text((w / 2 - 60, h - 22), "wakes per minute", fill="black")
    d.text((8, 12), f"mean critical recall, {result['pool_label']} pool", fill="black")
    colours = {"cheap": (200, 60, 40), "cascade": (30, 90, 200)}
    for n, (name, points) in enumerate(curves.items()):
        pts = sorted((p["wakes_per_min"], p["critical_recall"]) for p in points
                     if p["critical_recall"] == p["critical_recall"])
        if len(pts) >= 2:
            d.line([xy(x, y) for x, y in pts], fill=colours.get(name, "black"), width=2)
        for x, y in pts:
            cx, cy = xy(x, y)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colours.get(name, "black"))
        d.text((w - m - 90, m + 8 + 14 * n), name, fill=colours.get(name, "black"))
    img.save(path)


def table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"bench trigger: {result['pool_label']} ({len(result['games'])} recordings)")
    for col in ("variant", "critical recall", "wake precision (pooled)", "wakes/min", "false wakes/min"):
        t.add_column(col, justify="right")
    rows = dict(result["variants"])
    if "cascade_adapted" in result:
        rows["cascade + session"] = result["cascade_adapted"]
    for name, v in rows.items():
        t.add_row(name, f"{v['critical_recall']:.3f}", f"{v['wake_precision_pooled']:.3f}",
                  f"{v['wakes_per_min']:.2f}", f"{v['false_wakes_per_min']:.2f}")
    sep = result.get("separation")
    if sep:
        t.caption = (f"the model's ranking of the candidates (ROC AUC): p_death, death against the rest "
                     f"{sep['auc_death']:.3f}, against a reward {sep['auc_death_vs_reward']:.3f}; p_none, noise "
                     f"among the cheap wakes {sep['auc_noise_among_cheap_wakes']:.3f} "
                     f"({sep['cheap_wakes']['none']} of {sum(sep['cheap_wakes'].values())} cheap wakes are noise)")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="gamecopilot bench trigger", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=None, help="named recordings: " + ", ".join(POOLS) + " (default validation)")
    ap.add_argument("--games", nargs="+", default=[], help="instead of a pool: these games (with --seeds)")
    ap.add_argument("--seeds", nargs="+", type=seed_number, default=[0])
    ap.add_argument("--data", default=str(Path.home() / ".cache" / "gameplay-copilot" / "atari"))
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--jobs", type=positive_int, default=2)
    ap.add_argument("--scorer", default="default", help="default (the shipped model) or a model file")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the recall / wakes-per-minute curves here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-o", "--output", help="also write the JSON here")
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args(argv)
    check_output_path(args.output)
    if args.scorer == "none":
        raise UsageError("--scorer: bench trigger compares the cheap trigger with a model; name one")
    from stages.event_scorer import load_model

    model = load_model(args.scorer)
    pool = args.pool or (None if args.games else "validation")
    wanted = [(g, s, "random") for g, s in selection(pool, args.games, args.seeds)]
    recs = prepare_recordings(wanted, Path(args.data), args.seconds, args.jobs, args.quiet)
    th = Thresholds.from_dict(model.thresholds)
    videos = {r.key: r.truth.with_name(r.truth.name.removesuffix(".truth.jsonl") + ".mp4") for r in recs}
    cheap = figures(recs, [r.events for r in recs])
    probs = model_probabilities(recs, model)
    cascade = figures(recs, cascade_events(recs, model, th, adapt=False, probs=probs))
    adapted = figures(recs, cascade_events(recs, model, th, adapt=True, probs=probs))
    cheap["curve"] = cheap_curve(recs, videos)
    cascade["curve"] = cascade_curve(recs, model, th, probs)
    result = {"games": [r.key for r in recs], "pool_label": pool or "games",
              "model": model.card.get("name", args.scorer), "thresholds": model.thresholds,
              "variants": {"cheap": cheap, "cascade": cascade},
              "cascade_adapted": {k: v for k, v in adapted.items() if k != "per_game"},
              "separation": separation(recs, probs)}
    if args.plot:
        plot(result, args.plot)
    emit_result(result, as_json=args.json, output=args.output, table=table)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench trigger")
