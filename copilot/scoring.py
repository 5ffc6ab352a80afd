"""Score predicted events against ground truth (``gamecopilot eval``).

Pure Python over the two JSONL files, so it is product code in the core; the trigger
tuning tools in ``bench/`` use the same functions.

Inputs are the events JSONL and ground-truth JSONL of DESIGN.md ("Files the tools
exchange").  :func:`evaluate` returns::

    {"per_kind": {KIND: {"precision", "recall", "f1", "tp", "fp", "fn", "truth", "pred"}},
     "critical": {"moments", "found", "recall"},
     "wake_precision", "wakes_per_min", "false_wakes_per_min",
     "timing_error_s": {"mean", "median", "mean_abs", "n"},
     "counts": {...}, "wakes": [{"index", "t", "outcome"}],
     "duration_s", "tolerance", "critical_window", "pred_kinds": {...}}

The rules are in :data:`MATCHING_RULES` (shown by ``gamecopilot eval --help``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from copilot.errors import UsageError

PRIORITIES = ("critical", "high", "normal", "low")
WAKE_PRIORITIES = frozenset({"critical", "high"})
TRUTH_KINDS = ("reward", "life_lost", "game_over")
CRITICAL_KINDS = frozenset({"life_lost", "game_over"})
_EPS = 1e-6  # times are written with 6 decimals; 1.633333 - 1.133333 is 0.5000000000000002

MATCHING_RULES = """\
Matching: every predicted event (any kind, any priority) may pair with a truth event
within the tolerance (default 0.5 s).  All such pairs are sorted by |pred t - truth t|,
ties going to pairs of equal kind, then to the earlier events, and taken closest first;
each predicted and each truth event is used at most once (one-to-one, greedy).
Per kind (reward, life_lost, game_over and any other truth kind):
  recall    = truth events of that kind matched by any prediction / truth events of it;
  precision = predictions whose kind is that kind and that matched a truth event of
              that kind / predictions of that kind (detectors mostly use other kind
              names, so this is often empty);
  tp = truth events of the kind matched, fn = the rest, fp = predictions of the kind
  that matched nothing or a truth event of another kind.
"all": all predictions against all truth events; tp = pairs, fp = unmatched
  predictions, fn = unmatched truth events.
Zero denominators: recall is 1.0 when there is nothing to find, precision is 1.0 when
  nothing was predicted, F1 is 0.0 when precision + recall is 0.
Critical moments: life_lost and game_over truth events closer than 0.5 s to the previous
  one form one moment.  A wake is a predicted event of priority critical or high (an
  event without a priority counts as critical when its kind is life_lost or game_over,
  high when it is reward, normal otherwise, so a truth file scored against itself is
  perfect).  Wakes match moments one-to-one, closest first, when they fall from 4 s
  before the moment's first event to 1.5 s after its last (ALE's lives counter drops at
  the respawn, often seconds after the death is on screen); a moment takes at most as
  many wakes as it has truth events.  critical.recall = moments with a wake / moments.
Wake precision: wakes left over then match rewards one-to-one within 1.5 s;
  wake_precision = matched wakes / wakes (1.0 without wakes).
Wakes per minute: wakes / minutes of footage (the truth meta "seconds", else the latest
  event time; 0.0 when that is 0).  False wakes: wakes with no truth event within the
  tolerance, in no moment's window and with no reward within 1.5 s; wakes that are
  neither matched nor false are "redundant" (a second wake for the same thing).
Each wake's outcome ("wakes" in the JSON: the index of the predicted event, its t):
  moment or reward (matched), redundant, or false.
Timing error: pred t - truth t over the matched pairs of the "all" matching (negative =
  early): mean, median, mean of |dt|; null when nothing matched."""


# --------------------------------------------------------------------------- loading


def _check_event(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("kind") == "meta":
        return obj
    if "t" not in obj:
        raise UsageError(f'{where}: missing "t" (the event time in seconds)')
    t = obj["t"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise UsageError(f'{where}: "t" must be a finite number of seconds, zero or more, got {t!r}')
    if "kind" not in obj:
        raise UsageError(f'{where}: missing "kind" (what happened, e.g. "life_lost")')
    kind = obj["kind"]
    if not isinstance(kind, str):
        raise UsageError(f'{where}: "kind" must be a string, got {kind!r}')
    priority = obj.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise UsageError(
            f'{where}: "priority" must be one of {"|".join(PRIORITIES)}, got {priority!r}'
        )
    return obj


def _read_jsonl(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line; ``where`` is ``FILE:LINE``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{p}: is a directory, expected a JSONL file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not a UTF-8 text file (expected JSONL)") from None
    except OSError as exc:
        raise UsageError(f"{p}: cannot read ({exc.strerror})") from None
    out: list[tuple[str, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: malformed JSON ({exc.msg})") from None
        out.append((where, _check_event(obj, where)))
    return out


def load_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Predicted events from an events JSONL file; an empty file means no events."""
    return [e for _, e in _read_jsonl(path) if e.get("kind") != "meta"]


def read_truth(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The meta line (or None) and the events of a ground-truth JSONL file."""
    meta: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    lines = _read_jsonl(path)
    if not lines:
        # a truth file with nothing to find still says so with its meta line; an empty file is a
        # failed or unfinished recording, and scoring against it would report a perfect recall
        raise UsageError(f"{path}: empty ground truth (expected a meta line, then the events)")
    for where, obj in lines:
        if obj.get("kind") == "meta":
            if meta is None:
                _check_seconds(obj, where)
                meta = obj
            continue
        if not obj.get("kind"):
            raise UsageError(f'{where}: a truth event needs a "kind"')
        events.append(obj)
    return meta, events


def _check_seconds(meta: dict[str, Any], where: str) -> None:
    """The meta line's footage length, when given, is what wakes per minute are divided by."""
    seconds = meta.get("seconds")
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise UsageError(f'{where}: "seconds" must be the footage length, a positive number, got {seconds!r}')


def load_truth(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Ground-truth events (the meta line skipped)."""
    return read_truth(path)[1]


# --------------------------------------------------------------------------- matching


def _greedy(
    a_t: Sequence[float],
    b_t: Sequence[float | tuple[float, float]],
    lo: Sequence[float],
    hi: Sequence[float],
    *,
    key_extra: Callable[[int, int], int] | None = None,
) -> list[tuple[int, int]]:
    """One-to-one greedy matching of ``a`` to ``b``.

    ``a[i]`` may pair with ``b[j]`` when ``lo[j] <= a_t[i] <= hi[j]``; pairs are taken by
    increasing distance from ``a_t[i]`` to ``b_t[j]`` (a time, or a ``(start, end)`` span
    whose inside is distance 0), then by ``key_extra(i, j)``, then by the earlier ``a``,
    then by the earlier ``b``.
    """
    order = sorted(range(len(a_t)), key=lambda i: a_t[i])
    sorted_a = [a_t[i] for i in order]
    b_start = [b if isinstance(b, (int, float)) else b[0] for b in b_t]
    cands: list[tuple[float, int, float, int, float, int]] = []
    for j in range(len(b_t)):
        start = bisect_left(sorted_a, lo[j] - _EPS)
        stop = bisect_right(sorted_a, hi[j] + _EPS)
        for pos in range(start, stop):
            i = order[pos]
            dist = _distance(a_t[i], b_t[j])
            extra = key_extra(i, j) if key_extra else 0
            cands.append((dist, extra, a_t[i], i, b_start[j], j))
    cands.sort()
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for *_, i, _, j in cands:
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((i, j))
    return pairs


def _distance(t: float, ref: float | tuple[float, float]) -> float:
    if isinstance(ref, tuple):
        start, end = ref
        return 0.0 if start <= t <= end else min(abs(t - start), abs(t - end))
    return abs(t - ref)


def _priority(e: dict[str, Any]) -> str:
    p = e.get("priority")
    if isinstance(p, str):
        return p
    kind = e.get("kind")
    if kind in CRITICAL_KINDS:
        return "critical"
    return "high" if kind == "reward" else "normal"


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _validated(events: Iterable[Any], what: str) -> list[dict[str, Any]]:
    return [_check_event(e, f"{what} event #{n}") for n, e in enumerate(events, start=1)]


def evaluate(
    pred: list[dict[str, Any]],
    truth: list[dict[str, Any]],
    tolerance: float = 0.5,
    critical_window: tuple[float, float] = (4.0, 1.5),
    *,
    reward_window: float = 1.5,
    moment_merge: float = 0.5,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Score ``pred`` against ``truth`` by :data:`MATCHING_RULES`.

    ``truth`` may still hold its meta line; its ``seconds`` gives the footage duration
    unless ``duration_s`` is given.
    """
    if tolerance < 0 or min(critical_window) < 0 or reward_window < 0:
        raise UsageError("tolerance and windows must not be negative")
    before, after = critical_window
    preds = [e for e in _validated(pred, "predicted") if e.get("kind") != "meta"]
    meta = next((e for e in truth if isinstance(e, dict) and e.get("kind") == "meta"), None)
    truths = [e for e in _validated(truth, "truth") if e.get("kind") != "meta"]
    pt = [float(e["t"]) for e in preds]
    tt = [float(e["t"]) for e in truths]
    pk = [str(e.get("kind", "")) for e in preds]
    tk = [str(e.get("kind", "")) for e in truths]

    # -- the "all" matching
    pairs = _greedy(
        pt,
        tt,
        [t - tolerance for t in tt],
        [t + tolerance for t in tt],
        key_extra=lambda i, j: int(pk[i] != tk[j]),
    )
    pred_to_truth = dict(pairs)
    truth_matched = {j for _, j in pairs}

    kinds = list(TRUTH_KINDS) + sorted(set(tk) - set(TRUTH_KINDS))
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        n_truth = sum(1 for k in tk if k == kind)
        tp = sum(1 for j in truth_matched if tk[j] == kind)
        mine = [i for i, k in enumerate(pk) if k == kind]
        good = sum(1 for i in mine if i in pred_to_truth and tk[pred_to_truth[i]] == kind)
        precision = _ratio(good, len(mine), 1.0)
        recall = _ratio(tp, n_truth, 1.0)
        per_kind[kind] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "tp": tp,
            "fp": len(mine) - good,
            "fn": n_truth - tp,
            "truth": n_truth,
            "pred": len(mine),
        }
    precision = _ratio(len(pairs), len(preds), 1.0)
    recall = _ratio(len(pairs), len(truths), 1.0)
    per_kind["all"] = {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "tp": len(pairs),
        "fp": len(preds) - len(pairs),
        "fn": len(truths) - len(pairs),
        "truth": len(truths),
        "pred": len(preds),
    }
    pred_kinds: dict[str, dict[str, int]] = {}
    for i, k in enumerate(pk):
        entry = pred_kinds.setdefault(k, {"count": 0, "matched": 0})
        entry["count"] += 1
        entry["matched"] += int(i in pred_to_truth)

    # -- critical moments and wakes
    crit = sorted(tt[j] for j in range(len(truths)) if tk[j] in CRITICAL_KINDS)
    moments: list[list[float]] = []
    for t in crit:
        if moments and t - moments[-1][-1] <= moment_merge + _EPS:
            moments[-1].append(t)
        else:
            moments.append([t])
    # a moment with n truth events is n slots with the same window
    slots = [(m[0], m[-1]) for m in moments for _ in m]
    slot_moment = [n for n, m in enumerate(moments) for _ in m]
    wakes = [i for i in range(len(preds)) if _priority(preds[i]) in WAKE_PRIORITIES]
    wt = [pt[i] for i in wakes]
    moment_pairs = _greedy(wt, slots, [s - before for s, _ in slots], [e + after for _, e in slots])
    found = {slot_moment[j] for _, j in moment_pairs}
    used_wakes = {i for i, _ in moment_pairs}
    rewards = [tt[j] for j in range(len(truths)) if tk[j] == "reward"]
    rest = [n for n in range(len(wakes)) if n not in used_wakes]
    reward_pairs = _greedy(
        [wt[n] for n in rest],
        rewards,
        [t - reward_window for t in rewards],
        [t + reward_window for t in rewards],
    )
    matched_wakes = len(moment_pairs) + len(reward_pairs)

    def justified(t: float) -> bool:
        if any(abs(t - x) <= tolerance + _EPS for x in tt):
            return True
        if any(s - before - _EPS <= t <= e + after + _EPS for s, e in slots):
            return True
        return any(abs(t - x) <= reward_window + _EPS for x in rewards)

    by_reward = {rest[n] for n, _ in reward_pairs}
    outcomes = [
        {"index": i, "t": pt[i],
         "outcome": "moment" if n in used_wakes else "reward" if n in by_reward
         else "redundant" if justified(pt[i]) else "false"}
        for n, i in enumerate(wakes)
    ]
    false_wakes = sum(1 for o in outcomes if o["outcome"] == "false")  # a matched wake is always justified

    if duration_s is None and meta is not None:
        seconds = meta.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            duration_s = float(seconds)
    if duration_s is None:
        duration_s = max([*pt, *tt], default=0.0)
    minutes = duration_s / 60.0

    def per_min(n: int) -> float:
        return n / minutes if minutes > 0 else 0.0

    dts = [pt[i] - tt[j] for i, j in pairs]
    timing: dict[str, Any] = {
        "mean": statistics.fmean(dts) if dts else None,
        "median": statistics.median(dts) if dts else None,
        "mean_abs": statistics.fmean(abs(d) for d in dts) if dts else None,
        "n": len(dts),
    }
    return {
        "per_kind": per_kind,
        "critical": {
            "moments": len(moments),
            "found": len(found),
            "recall": _ratio(len(found), len(moments), 1.0),
        },
        "wake_precision": _ratio(matched_wakes, len(wakes), 1.0),
        "wakes_per_min": per_min(len(wakes)),
        "false_wakes_per_min": per_min(false_wakes),
        "timing_error_s": timing,
        "counts": {
            "pred": len(preds),
            "truth": len(truths),
            "wakes": len(wakes),
            "matched_wakes": matched_wakes,
            "false_wakes": false_wakes,
            "redundant_wakes": len(wakes) - matched_wakes - false_wakes,
        },
        "pred_kinds": pred_kinds,
        "wakes": outcomes,
        "duration_s": duration_s,
        "tolerance": tolerance,
        "critical_window": [before, after],
    }


def evaluate_files(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    tolerance: float = 0.5,
    critical_window: tuple[float, float] = (4.0, 1.5),
) -> dict[str, Any]:
    """:func:`evaluate` on two files; the duration comes from the truth meta line."""
    meta, truth = read_truth(truth_path)
    pred = load_events(pred_path)
    return evaluate(pred, [meta, *truth] if meta else truth, tolerance, critical_window)


def wake_figures(result: dict[str, Any]) -> dict[str, float]:
    """The figures the trigger's acceptance is judged on, from an :func:`evaluate` result.

    ``excess_wakes`` is wakes per minute beyond truth critical moments per minute.
    """
    minutes = result["duration_s"] / 60.0
    return {
        "crit_recall": result["critical"]["recall"],
        "moments": result["critical"]["moments"],
        "wake_precision": result["wake_precision"],
        "wakes_per_min": result["wakes_per_min"],
        "excess_wakes": result["wakes_per_min"] - result["critical"]["moments"] / minutes if minutes else 0.0,
        "ann_recall": result["per_kind"]["all"]["recall"],
        "ann_precision": result["per_kind"]["all"]["precision"],
    }


# --------------------------------------------------------------------------- report


def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


# Under the table: a detector names its events hud_change, sound ..., not reward or life_lost, so a
# truth kind's row reads "pred 0, tp 17", which looks like a contradiction without this note.
PER_KIND_NOTE = (
    "per-kind rows: truth, tp, fn and recall count truth events of that kind matched by a prediction of any",
    "kind; pred, fp and precision count only predictions named that kind (pred 0 beside a tp over 0: the",
    "detector names its events otherwise, e.g. hud_change).  all: every prediction against every truth event.",
)


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate` result."""
    from rich.cells import cell_len  # a kind in a wide script takes two columns a character

    width = max([12, *(cell_len(k) + 1 for k in result["per_kind"])])

    def left(text: str) -> str:
        return text + " " * (width - cell_len(text))

    lines = [
        f"{left('kind')}{'truth':>7}{'pred':>7}{'tp':>6}{'fp':>6}{'fn':>6}"
        f"{'precision':>11}{'recall':>8}{'f1':>8}"
    ]
    for kind, m in result["per_kind"].items():
        if kind == "all":
            lines.append("-" * len(lines[0]))
        lines.append(
            f"{left(kind)}{m.get('truth', '-'):>7}{m.get('pred', '-'):>7}{m['tp']:>6}"
            f"{m['fp']:>6}{m['fn']:>6}{_num(m['precision']):>11}{_num(m['recall']):>8}"
            f"{_num(m['f1']):>8}"
        )
    lines += ["", *PER_KIND_NOTE]
    crit = result["critical"]
    counts = result.get("counts", {})
    timing = result["timing_error_s"]
    tol = result.get("tolerance")
    lines += [
        "",
        f"tolerance               {_num(tol, '.2f')} s",
        f"critical moments        {crit.get('found', '-')}/{crit['moments']} found, "
        f"recall {_num(crit['recall'])}",
        f"wakes (critical|high)   {counts.get('wakes', '-')}, "
        f"{_num(result['wakes_per_min'], '.2f')}/min",
        f"wake precision          {_num(result['wake_precision'])}",
        f"false wakes             {counts.get('false_wakes', '-')}, "
        f"{_num(result['false_wakes_per_min'], '.2f')}/min",
        f"timing error (pred-gt)  mean {_num(timing['mean'], '+.3f')} s, "
        f"median {_num(timing['median'], '+.3f')} s over {timing.get('n', '-')} pairs",
    ]
    return "\n".join(lines)
