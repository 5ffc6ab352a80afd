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
  (:class:`engines.event_scorer.SessionSignature`).

``--json`` prints ``{"games", "variants": {"cheap", "cascade"}, ...}``; ``--plot FILE.png`` draws the
curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.output import check_output_path, emit_result, run_tool
from bench.pools import POOLS, selection
from bench.train_scorer import Recording, figures, prepare_recordings
from bench.tune_trigger import cache_paths, observations, replay_detector, with_trigger
from copilot.args import OneLineParser, positive_int, seed_number
from copilot.errors import UsageError
from copilot.profile import load_profile, resolve_profile
from engines.event_scorer import Cascade, Thresholds, model_inputs, session_probabilities


def cascade_events(recs: list[Recording], model: Any, th: Thresholds, adapt: bool) -> list[list[dict[str, Any]]]:
    out = []
    names = model_inputs()  # the columns of Recording.X
    missing = [n for n in model.feature_names if n not in names]
    if missing:
        raise UsageError(f"bench trigger: the model reads {len(missing)} feature(s) this build's training does not "
                         f"compute ({', '.join(missing[:3])}...): train it again with `gamecopilot train scorer`")
    cols = [names.index(n) for n in model.feature_names]  # in the model's order
    for r in recs:
        x = r.X[:, cols]
        probs = model.predict_proba(x) if len(x) else np.zeros((0, 3))
        if adapt:
            probs = session_probabilities(r.events, x, probs, th)
        cascade = Cascade(th, model.card.get("name", "model"))
        out.append([cascade.rescore(e, p) for e, p in zip(r.events, probs, strict=True)])
    return out


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


def cascade_curve(recs: list[Recording], model: Any, th: Thresholds) -> list[dict[str, float]]:
    points = []
    for death in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.01):
        t = Thresholds(death=death, drop=th.drop, event=th.event, gap_s=th.gap_s)
        f = figures(recs, cascade_events(recs, model, t, adapt=False))
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
    cascade = figures(recs, cascade_events(recs, model, th, adapt=False))
    adapted = figures(recs, cascade_events(recs, model, th, adapt=True))
    cheap["curve"] = cheap_curve(recs, videos)
    cascade["curve"] = cascade_curve(recs, model, th)
    result = {"games": [r.key for r in recs], "pool_label": pool or "games",
              "model": model.card.get("name", args.scorer), "thresholds": model.thresholds,
              "variants": {"cheap": cheap, "cascade": cascade},
              "cascade_adapted": {k: v for k, v in adapted.items() if k != "per_game"}}
    if args.plot:
        plot(result, args.plot)
    emit_result(result, as_json=args.json, output=args.output, table=table)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench trigger")
