"""Measure the whole default pipeline against Atari ground truth: issue 4's acceptance.

For each game and seed it makes (or reuses from ``--data``) a recording of random play
(640x480, 30 fps, the game's audio, ``engines.atari_dataset``), runs::

    gamecopilot annotate FILE -o EVENTS --metrics-out METRICS -q --profile PROFILE

(the real pipeline at max speed, in its own processes), scores the events with
``copilot.scoring.evaluate_files`` and prints one row per recording, the averages, and PASS or
FAIL for each acceptance line:

* critical-moment recall >= 0.9 on average and >= 0.75 on every game;
* wake precision >= 0.8 on average;
* wakes/min - truth critical moments/min <= 4 on every game;
* annotations (all events vs all truth events, 0.5 s): recall >= 0.7 at precision >= 0.5
  on average;
* ``realtime_factor`` >= 4 (from the metrics JSON) on every run.

Usage::

    python -m bench.annotate_eval --games Breakout SpaceInvaders DemonAttack Pong --seeds 0 1 2
    python -m bench.annotate_eval --pool validation --data /tmp/atari   # games never tuned on

Per-game figures are averaged over seeds first, so "every game" means every game.
Runs are sequential so the realtime factor is not shared with another run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.output import run_tool
from bench.pools import POOLS, ensure_recording, selection
from copilot.args import OneLineParser, seed_number

DEV_GAMES = ["Breakout", "SpaceInvaders", "DemonAttack", "Pong"]


def run_one(video: Path, truth: Path, out_dir: Path, profile: str, config: str | None) -> dict[str, Any]:
    """Annotate ``video`` with the CLI and score it; the row of figures."""
    from copilot.scoring import evaluate_files, wake_figures

    events = out_dir / f"{video.stem}.events.jsonl"
    metrics = out_dir / f"{video.stem}.metrics.json"
    cmd = [sys.executable, "-m", "copilot", "annotate", str(video), "-o", str(events), "--metrics-out", str(metrics),
           "-q", "--profile", profile]
    if config:
        cmd += ["--config", config]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"annotate failed on {video} (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    res = evaluate_files(events, truth)
    m = json.loads(metrics.read_text())
    trig = m.get("stages", {}).get("trigger", {})
    return {
        **wake_figures(res),
        "events": res["counts"]["pred"],
        "truth": res["counts"]["truth"],
        "rtf": float(m.get("realtime_factor", 0.0)),
        "delay_p99_ms": (trig.get("decision_delay_ms") or {}).get("p99"),
        "wall_s": wall,
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(float(r[key]) for r in rows)


def verdicts(per_game: dict[str, dict[str, float]], runs: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    games = list(per_game.values())
    avg = {k: statistics.fmean(g[k] for g in games) for k in games[0]}
    worst_crit = min(games, key=lambda g: g["crit_recall"])["crit_recall"]
    worst_excess = max(g["excess_wakes"] for g in games)
    min_rtf = min(r["rtf"] for r in runs)
    delays = [r["delay_p99_ms"] for r in runs if r["delay_p99_ms"] is not None]
    return [
        ("critical recall >= 0.9 on average", avg["crit_recall"] >= 0.9, f"{avg['crit_recall']:.3f}"),
        ("critical recall >= 0.75 on every game", worst_crit >= 0.75, f"worst {worst_crit:.3f}"),
        ("wake precision >= 0.8 on average", avg["wake_precision"] >= 0.8, f"{avg['wake_precision']:.3f}"),
        ("wakes/min - moments/min <= 4 on every game", worst_excess <= 4.0, f"worst {worst_excess:+.2f}"),
        ("annotations recall >= 0.7 at precision >= 0.5 (average)",
         avg["ann_recall"] >= 0.7 and avg["ann_precision"] >= 0.5,
         f"recall {avg['ann_recall']:.3f}, precision {avg['ann_precision']:.3f}"),
        ("realtime factor >= 4 on every run", min_rtf >= 4.0, f"min {min_rtf:.2f}x"),
        ("decision delay p99 <= 500 ms", bool(delays) and max(delays) <= 500.0,
         f"max p99 {max(delays):.0f} ms" if delays else "not reported"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m bench.annotate_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=None, help="a named set of recordings (bench.pools): " + ", ".join(POOLS))
    ap.add_argument("--games", nargs="+", default=DEV_GAMES)
    ap.add_argument("--seeds", nargs="+", type=seed_number, default=[0])
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--data", default="/tmp/copilot_trigger_data", help="recordings are cached here")
    ap.add_argument("--out", default=None, help="events and metrics go here (default: DATA/annotate)")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--config", default=None)
    ap.add_argument("--json", default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)

    wanted = selection(args.pool, args.games, args.seeds)
    games = list(dict.fromkeys(g for g, _ in wanted))
    data = Path(args.data)
    out = Path(args.out) if args.out else data / "annotate"
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    header = (f"{'game':<14}{'seed':>5}{'moments':>8}{'crit R':>8}{'wake P':>8}{'wakes/m':>8}{'excess':>8}"
              f"{'ann R':>7}{'ann P':>7}{'events':>7}{'truth':>6}{'rtf':>7}{'delay99':>8}")
    print(header)
    for game, seed in wanted:
        video, truth = ensure_recording(game, seed, data, args.seconds)
        r = run_one(video, truth, out, args.profile, args.config) | {"game": game, "seed": seed}
        runs.append(r)
        d = r["delay_p99_ms"]
        print(f"{game:<14}{seed:>5}{r['moments']:>8}{r['crit_recall']:>8.2f}{r['wake_precision']:>8.2f}"
              f"{r['wakes_per_min']:>8.1f}{r['excess_wakes']:>+8.1f}{r['ann_recall']:>7.2f}{r['ann_precision']:>7.2f}"
              f"{r['events']:>7}{r['truth']:>6}{r['rtf']:>6.1f}x{(f'{d:.0f}' if d is not None else '-'):>8}",
              flush=True)
    keys = ("crit_recall", "wake_precision", "excess_wakes", "ann_recall", "ann_precision", "wakes_per_min")
    per_game = {g: {k: _mean([r for r in runs if r["game"] == g], k) for k in keys} for g in games}
    print("\nper game (mean over seeds)")
    for g, v in per_game.items():
        print(f"  {g:<14} crit R {v['crit_recall']:.2f}  wake P {v['wake_precision']:.2f}"
              f"  excess {v['excess_wakes']:+.2f}  ann R {v['ann_recall']:.2f} P {v['ann_precision']:.2f}")
    avg = {k: statistics.fmean(v[k] for v in per_game.values()) for k in keys}
    print(f"  {'average':<14} crit R {avg['crit_recall']:.2f}  wake P {avg['wake_precision']:.2f}"
          f"  excess {avg['excess_wakes']:+.2f}  ann R {avg['ann_recall']:.2f} P {avg['ann_precision']:.2f}")
    print("\nacceptance (issue 4)")
    results = verdicts(per_game, runs)
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "per_game": per_game, "average": avg,
                                               "acceptance": [{"line": n, "pass": ok, "detail": d}
                                                              for n, ok, d in results]}, indent=2))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    run_tool(main, "python -m bench.annotate_eval")
