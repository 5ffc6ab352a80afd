"""``gamecopilot bench overlay``: how soon advice appears in a real browser, and a picture of it.

The default pipeline replays a clip at real time with ``--overlay web`` (rules answer, so the figure
is the overlay's, not a model's), exactly as a user runs it, while chromium (Playwright) keeps the
page open.  The page sends a receipt for each advice push once it has drawn it; the overlay stage
times each from the reasoner's emission of the advice (its trace stamp) to the receipt: its
``push_ms`` (emitted -> rendered, p50/p95/p99, both ends on this machine's monotonic clock).

With ``--screenshot PNG`` it also writes what the page looked like the first time advice showed,
composited over the game frame of that moment (the page is transparent outside its boxes): the
README's picture is made this way.

    gamecopilot bench overlay [FILE] [--until 60] [--screenshot PNG] [--port N] [--json] [-o F]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.browser import SHOWN_ADVICE, overlay_page
from bench.output import check_output_path, emit_result, run_tool
from copilot.args import OneLineParser
from copilot.errors import UsageError, check_writable
from copilot.net import free_port

SCALE = 2  # the page is shot at twice the clip's size, the frame upscaled to match


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gamecopilot bench overlay", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="the replay (default: the bundled sample clip)")
    p.add_argument("--until", type=float, default=60.0, help="media seconds to replay (default 60)")
    p.add_argument("--screenshot", metavar="PNG", help="write the page over the game frame the first time advice shows")
    p.add_argument("--port", type=int, default=0, help="the overlay's port (default: a free one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", help="also write the JSON here")
    return p


def _frame_at(file: str, t: float) -> np.ndarray:
    """The clip's RGB frame at media time ``t`` (the last one before it)."""
    import av

    best = None
    with av.open(file) as c:
        stream = c.streams.video[0]
        for frame in c.decode(stream):
            if frame.time is not None and frame.time > t and best is not None:
                break
            best = frame.to_ndarray(format="rgb24")
    if best is None:
        raise UsageError(f"{file}: no video frame to draw the overlay over")
    return best


def composite(page_rgba: np.ndarray, frame_rgb: np.ndarray) -> np.ndarray:
    """The transparent page over the game frame (upscaled to the page's size, nearest neighbour)."""
    h, w = page_rgba.shape[:2]
    ys = np.arange(h) * frame_rgb.shape[0] // h
    xs = np.arange(w) * frame_rgb.shape[1] // w
    under = frame_rgb[ys][:, xs].astype(np.float32)
    alpha = page_rgba[..., 3:4].astype(np.float32) / 255.0
    return (page_rgba[..., :3].astype(np.float32) * alpha + under * (1 - alpha)).astype(np.uint8)


def _frame_size(file: str) -> tuple[int, int]:
    import av

    with av.open(file) as c:
        s = c.streams.video[0]
        return int(s.codec_context.width), int(s.codec_context.height)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from copilot.commands import sample_clip

    file = args.file or str(sample_clip())
    if not Path(file).is_file():
        raise UsageError(f"{file}: no such file")
    width, height = _frame_size(file)
    port = args.port or free_port()
    with tempfile.TemporaryDirectory(prefix="bench-overlay-") as tmp:
        metrics, advice = Path(tmp) / "m.json", Path(tmp) / "a.jsonl"
        cmd = [sys.executable, "-m", "copilot", "replay", file, "--until", str(args.until), "--reasoner", "rules",
               "--overlay", "web", "--overlay-port", str(port), "--metrics-out", str(metrics),
               "--advice-out", str(advice), "-q"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        shown: list[str] = []
        shot: dict[str, Any] = {}
        try:
            with overlay_page(f"http://127.0.0.1:{port}/", until_serving=proc,
                              width=width * SCALE, height=height * SCALE) as page:
                while proc.poll() is None:
                    now_shown = page.evaluate(SHOWN_ADVICE)
                    if now_shown and now_shown not in shown:  # (a wake's partial text and its final count once)
                        shown = [s for s in shown if s.split("|")[0] != now_shown.split("|")[0]] + [now_shown]
                        if args.screenshot and not shot:
                            page.wait_for_timeout(900)  # the box's fade-in
                            shot = {"png": page.screenshot(omit_background=True),
                                    "head": page.evaluate("document.getElementById('advice-head').textContent")}
                    time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.terminate()
            _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise UsageError(f"the replay failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
        report = json.loads(metrics.read_text())
        written = [json.loads(line) for line in advice.read_text().splitlines()]
    overlay = report["stages"].get("overlay", {})
    result = {
        "file": file, "media_s": report["media_s"], "advice_written": len(written),
        "advice_shown": len(shown),  # distinct wakes seen in the page
        "pushes": overlay.get("count", 0), "push_ms": overlay.get("push_ms"),
        "realtime_factor": report.get("realtime_factor"),
    }
    if args.screenshot and shot:
        from PIL import Image

        page_rgba = np.asarray(Image.open(io.BytesIO(shot["png"])).convert("RGBA"))
        t = _media_time(shot["head"], written)
        Image.fromarray(composite(page_rgba, _frame_at(file, t))).save(args.screenshot, optimize=True)
        result["screenshot"] = args.screenshot
    elif args.screenshot:
        result["screenshot"] = None
    return result


def _media_time(head: str, written: list[dict[str, Any]]) -> float:
    """The moment the shot shows: the media time the shown advice became final (+ the fade-in)."""
    for a in written:
        if a["event_kind"] in head:
            return float(a["t_media"]) + 1.0
    return float(written[0]["t_media"]) + 1.0 if written else 0.0


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"overlay: {Path(result['file']).name}, {result['media_s']:.0f} s at real time, "
              "rules answering, chromium on the page", title_justify="left",
              caption="push: the reasoner emitting advice -> the page drawing it (its receipt), ms",
              caption_justify="left")
    for col in ("advice written", "shown in the page", "push p50", "push p95", "push p99"):
        t.add_column(col, justify="right")
    push = result.get("push_ms") or {}
    t.add_row(str(result["advice_written"]), str(result["advice_shown"]),
              *(f"{push[k]:.1f}" if push.get(k) is not None else "-" for k in ("p50", "p95", "p99")))
    return t


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.until > 0:
        raise UsageError("--until must be positive")
    check_output_path(args.output)
    if args.screenshot:
        check_writable(args.screenshot, "--screenshot")
    result = run_bench(args)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    if result.get("screenshot"):
        print(f"wrote {result['screenshot']}", file=sys.stderr)
    elif args.screenshot:
        print("no advice showed: no screenshot written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench overlay")
