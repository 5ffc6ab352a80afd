"""``gamecopilot bench hico``: does HiCo keep a long session better than uniform pooling, cheaply?

Ten minutes of real gameplay go through :class:`stages.hico_tokens.HiCo` frame by frame, as the
``hico`` stage would see them.  Without ``--video`` the footage is random play of Breakout (seed 0,
a game of the training pool), recorded once with the project's Atari dataset maker into the cache
directory (``--data``, default ``~/.cache/gameplay-copilot/bench/hico``) and reused afterwards.

Each frame's embedding is its thumbnail (:func:`stages.thumbnail.thumbnail_vector`, 576-d).  The
cost of an update grows with the embedding's width, so with ``--dim`` other than 576 the
thumbnails are lifted to that width by a fixed, seeded Gaussian projection and L2-normalised (the
default 1152 is a SigLIP-sized width): the similarity structure is the thumbnails', the arithmetic
is a real model's.

Reported: the mean cosine between each frame's embedding and the vector of the token whose span
holds it, for HiCo and for uniform temporal pooling at the same budget (``budget`` equal-length
spans over the whole stream, mean-pooled; it knows the stream's length in advance, HiCo does not),
the most tokens HiCo ever held, the update cost per push (p50/p99 ms, this process on this
machine), the time to build a reasoner's context (64 and 8 tokens) and the process's memory.

    gamecopilot bench hico [--video FILE] [--minutes 10] [--budget 1024] [--dim 1152] [--json] [-o F]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import check_output_path, emit_result, run_tool
from copilot.args import OneLineParser
from copilot.errors import UsageError

GAME, SEED = "Breakout", 0  # a training-pool game (bench/pools.py), never one outside Atari-57
THUMB_DIM = 576
PROJECTION_SEED = 20260101
CHUNK = 2048  # frames lifted at a time: the full-width stream never sits in memory whole


def default_data() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gameplay-copilot" / "bench" / "hico"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gamecopilot bench hico", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", metavar="FILE", help="footage to compress (default: 10 min of Breakout, recorded once)")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of footage (default 10)")
    p.add_argument("--budget", type=int, default=1024, help="tokens HiCo may hold (default 1024)")
    p.add_argument("--recent", type=int, default=64, help="newest frames kept as they are (default 64)")
    p.add_argument("--dim", type=int, default=1152,
                   help=f"embedding width; other than {THUMB_DIM} lifts the thumbnails (default 1152)")
    p.add_argument("--data", metavar="DIR", help=f"where the recording is cached (default {default_data()})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", help="also write the JSON here")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}")
    if args.recent < 0:
        raise UsageError(f"--recent must be 0 or more, got {args.recent}")
    if args.budget < args.recent + 2:
        raise UsageError(f"--budget must be at least --recent + 2 = {args.recent + 2} tokens, got {args.budget}")
    if args.dim < 1:
        raise UsageError(f"--dim must be positive, got {args.dim}")
    if args.video is not None and not Path(args.video).is_file():
        raise UsageError(f"{args.video}: no such file")
    check_output_path(args.output)


# -- footage ----------------------------------------------------------------------------------
def _recording_seconds(folder: Path) -> float:
    """How long the cached recording in ``folder`` is (0 when it is missing or incomplete)."""
    import json

    for truth in folder.glob("*_s0.truth.jsonl"):
        video = truth.with_name(truth.name.replace(".truth.jsonl", ".mp4"))
        if not video.is_file():
            continue
        try:
            with open(truth, encoding="utf-8") as fh:
                meta = json.loads(fh.readline())
            return float(meta.get("seconds", 0.0))
        except (OSError, ValueError):
            return 0.0
    return 0.0


def ensure_footage(data: Path, seconds: float) -> Path:
    """The cached Breakout recording at least ``seconds`` long, recorded first if there is none."""
    for folder in sorted(data.glob(f"{GAME.lower()}-s{SEED}-*s")):
        if folder.is_dir() and _recording_seconds(folder) >= seconds - 1e-6:
            return next(folder.glob("*_s0.mp4"))
    try:
        import ale_py  # noqa: F401
    except ImportError:
        raise UsageError("bench hico records its gameplay with ale-py: pip install 'gameplay-copilot[atari]' "
                         "(or give footage with --video FILE)") from None
    from engines.atari_dataset import make_atari_recording

    folder = data / f"{GAME.lower()}-s{SEED}-{seconds:g}s"
    print(f"bench hico: recording {seconds / 60:g} min of {GAME} (random play, seed {SEED}) into {folder} "
          "once; later runs reuse it. This takes a few minutes.", file=sys.stderr)
    rec = make_atari_recording(GAME, seconds, folder, fps=30, seed=SEED, progress=True)
    return rec.video


def _progress(total: int, label: str) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def thumbnails(video: str | Path, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """``(times, thumbs)`` of the video's frames before ``seconds``: media times (s) and 576-d vectors."""
    import av

    from stages.thumbnail import thumbnail_vector

    times: list[float] = []
    vecs: list[np.ndarray] = []
    try:
        with av.open(str(video)) as c:
            if not c.streams.video:
                raise UsageError(f"{video}: no video stream")
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or 30)
            length = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else seconds
            total = max(1, int(min(seconds, length) * rate))
            with _progress(total, "decoding + thumbnails") as bar:
                task = bar.add_task("decode", total=total)
                for k, frame in enumerate(c.decode(stream)):
                    t = frame.time if frame.time is not None else k / rate
                    if t >= seconds - 1e-6:
                        break
                    times.append(float(t))
                    vecs.append(thumbnail_vector(frame.to_ndarray(format="rgb24")))
                    if k % 30 == 29:
                        bar.update(task, completed=k + 1)
    except av.error.FFmpegError as exc:  # type: ignore[attr-defined]
        raise UsageError(f"{video}: cannot decode ({exc})") from None
    if not vecs:
        raise UsageError(f"{video}: no video frames")
    return np.asarray(times, np.float64), np.stack(vecs).astype(np.float32)


class Lift:
    """Thumbnails at another width: a fixed seeded Gaussian projection, then unit norm (a zero
    thumbnail, a flat frame, stays zero).  At the thumbnail's own width it is the identity."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix = None if dim == THUMB_DIM else (
            np.random.default_rng(PROJECTION_SEED).standard_normal((THUMB_DIM, dim)).astype(np.float32))

    def __call__(self, thumbs: np.ndarray) -> np.ndarray:
        if self.matrix is None:
            return thumbs.astype(np.float32)
        x = thumbs @ self.matrix
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(n > 1e-9, x / np.maximum(n, 1e-9), 0.0).astype(np.float32)


def _rss_mb(field: str = "VmRSS") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cosines(vectors: np.ndarray, recon_unit: np.ndarray, which: np.ndarray) -> np.ndarray:
    dots = np.einsum("ij,ij->i", vectors.astype(np.float64), recon_unit[which])
    return np.where(np.linalg.norm(vectors, axis=1) > 1e-9, dots, 0.0)  # rows are unit or zero


def _unit(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return np.where(n > 1e-12, m / np.maximum(n, 1e-12), 0.0)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from stages.hico_tokens import HiCo

    seconds = args.minutes * 60.0
    if args.video:
        video = Path(args.video)
    else:
        data = Path(args.data) if args.data else default_data()
        if data.exists() and not data.is_dir():
            raise UsageError(f"--data {data}: not a directory")
        video = ensure_footage(data, seconds)
    times, thumbs = thumbnails(video, seconds)
    n = times.size
    lift = Lift(args.dim)
    hico = HiCo(args.dim, args.budget, args.recent)
    push_ms = np.empty(n, np.float64)
    k_uni = max(1, min(args.budget, n))
    uni_which = (np.arange(n, dtype=np.int64) * k_uni) // n
    uni_sums = np.zeros((k_uni, args.dim), np.float64)
    with _progress(n, f"HiCo at {args.dim}-d") as bar:
        task = bar.add_task("push", total=n)
        for s in range(0, n, CHUNK):
            block = lift(thumbs[s : s + CHUNK])
            np.add.at(uni_sums, uni_which[s : s + CHUNK], block)
            for r in range(block.shape[0]):
                t0 = time.perf_counter_ns()
                hico.push(times[s + r], block[r])
                push_ms[s + r] = (time.perf_counter_ns() - t0) / 1e6
            bar.update(task, completed=min(n, s + CHUNK))
    t0 = time.perf_counter_ns()
    hico.contexts([64, 8], t_now=hico.end)
    context_ms = (time.perf_counter_ns() - t0) / 1e6
    # each frame against its token (HiCo) and against its equal-length span (uniform)
    hico_unit = _unit(hico.tokens.astype(np.float64))
    hico_which = hico.locate(times)
    uni_unit = _unit(uni_sums)
    cos_h = cos_u = 0.0
    for s in range(0, n, CHUNK):
        block = lift(thumbs[s : s + CHUNK])
        cos_h += float(_cosines(block, hico_unit, hico_which[s : s + CHUNK]).sum())
        cos_u += float(_cosines(block, uni_unit, uni_which[s : s + CHUNK]).sum())
    spans = hico.spans
    return {
        "video": str(video), "media_s": round((hico.end or 0.0) - float(times[0]), 2),
        "budget": args.budget, "recent": args.recent, "frames": int(n), "dim": args.dim,
        "lifted": lift.matrix is not None, "tokens": len(hico), "max_tokens": hico.max_len,
        "max_level": max(hico.levels), "longest_span_frames": max(s[2] for s in spans),
        "cosine": {"hico": round(cos_h / n, 5), "uniform": round(cos_u / n, 5)},
        "update_ms": {"p50": round(float(np.percentile(push_ms, 50)), 4),
                      "p99": round(float(np.percentile(push_ms, 99)), 4),
                      "max": round(float(push_ms.max()), 3)},
        "context_ms": round(context_ms, 2),
        "state_mb": round(hico.nbytes / 2**20, 2), "rss_mb": _rss_mb("VmRSS"), "rss_peak_mb": _rss_mb("VmHWM"),
    }


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    width = (f"thumbnails lifted to {result['dim']}-d by a fixed random projection" if result["lifted"]
             else f"{result['dim']}-d thumbnails")
    t = Table(title=f"HiCo: {Path(result['video']).name}, {result['frames']} frames ({result['media_s']:.0f} s), "
              f"budget {result['budget']}, {width}", title_justify="left",
              caption="cosine: each frame against the token holding it; uniform: budget equal spans, mean-pooled",
              caption_justify="left")
    for col in ("cosine HiCo", "cosine uniform", "max tokens", "update p50 ms", "update p99 ms", "context ms",
                "RSS MB"):
        t.add_column(col, justify="right")
    rss = result.get("rss_mb")
    t.add_row(f"{result['cosine']['hico']:.4f}", f"{result['cosine']['uniform']:.4f}", str(result["max_tokens"]),
              f"{result['update_ms']['p50']:.3f}", f"{result['update_ms']['p99']:.3f}", f"{result['context_ms']:.1f}",
              "-" if rss is None else f"{rss:.0f}")
    return t


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    result = run_bench(args)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench hico")
