"""``gamecopilot bench soak``: does a live session hold for half an hour?

It sets up what a player's machine has, on a private virtual screen: Xvfb, a user-mode PulseAudio
with a null sink, the windowed Atari game (``bench.games.window``) drawing into a real X window and
playing into the sink; then runs ``gamecopilot live --window TITLE --overlay web --record`` with the
rules reasoner, exactly as a user would, with chromium (Playwright) keeping the overlay page open.

Reported: capture fps over each window of ``--every`` seconds (from the overlay's metrics pushes, the
same figures the latency panel shows) against the target, drops by reason, RSS of every group process
(and the supervisor) after the first minute and at the end, restarts, and the overlay's push latency
(advice emitted -> drawn in the page).  The figures go into the README.

    gamecopilot bench soak [--minutes 30] [--fps 30] [--every 10] [--json] [-o F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.browser import SHOWN_ADVICE, overlay_page
from bench.games.desktop import sound_server, stop, virtual_screen
from bench.output import check_output_path, emit_result, run_tool
from copilot.args import OneLineParser
from copilot.errors import UsageError
from copilot.net import free_port

TITLE = "copilot-soak"
WARMUP_S = 60.0  # RSS growth counts from here: imports, models and buffers have settled by then


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gamecopilot bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the live session runs (default 30)")
    p.add_argument("--fps", type=float, default=30.0, help="the capture rate asked for (default 30)")
    p.add_argument("--every", type=float, default=10.0, help="seconds per fps window and RSS sample (default 10)")
    p.add_argument("--port", type=int, default=0, help="the overlay's port (default: a free one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", help="also write the JSON here")
    return p


def _need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        raise UsageError(f"the soak needs {program} (Debian package {package})")


def group_processes(root: int) -> dict[str, int]:
    """``{name: pid}`` of the copilot's processes: the supervisor (``root``) and each group (its title)."""
    from copilot.testing import descendants

    found = {"supervisor": root}
    for pid in descendants(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("gamecopilot: "):
            found[title.removeprefix("gamecopilot: ").split()[0]] = pid
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class FeedWatcher(threading.Thread):
    """Reads the overlay's WebSocket as a second client: the metrics pushes, with when they came."""

    def __init__(self, url: str) -> None:
        super().__init__(name="soak-feed", daemon=True)
        self.url = url
        self.samples: list[tuple[float, dict[str, Any]]] = []  # (monotonic s, stage -> figures)
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._read())

    async def _read(self) -> None:
        import aiohttp

        from stages.overlay_protocol import MetricsPush, decode_server

        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                try:
                    async with http.ws_connect(self.url) as ws:
                        while not self.stop.is_set():
                            try:
                                msg = await ws.receive(timeout=1.0)
                            except TimeoutError:
                                continue
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            m = decode_server(msg.data)
                            if isinstance(m, MetricsPush):
                                self.samples.append((time.monotonic(), {s.stage: s for s in m.stages}))
                except aiohttp.ClientError:
                    await asyncio.sleep(0.5)


def fps_windows(samples: list[tuple[float, dict[str, Any]]], stage: str, every: float) -> list[float]:
    """The stage's rate over consecutive windows of about ``every`` seconds."""
    points = [(t, figs[stage].frames) for t, figs in samples if stage in figs]
    out: list[float] = []
    if not points:
        return out
    t0, n0 = points[0]
    for t, n in points[1:]:
        if t - t0 >= every:
            out.append((n - n0) / (t - t0))
            t0, n0 = t, n
    return out


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    for program, package in (("Xvfb", "xvfb"), ("pulseaudio", "pulseaudio"), ("xdotool", "xdotool"),
                             ("pacat", "pulseaudio-utils")):
        _need(program, package)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp_dir, contextlib.ExitStack() as desktop:
        tmp = Path(tmp_dir)
        try:
            display = desktop.enter_context(virtual_screen())
            env = desktop.enter_context(sound_server(tmp, "copilot_soak"))
        except RuntimeError as exc:  # (the programs are there: they failed to start)
            raise UsageError(f"the soak's desktop did not come up: {exc}") from None
        env = dict(env, DISPLAY=display, PYTHONUNBUFFERED="1")
        game = subprocess.Popen([sys.executable, "-m", "bench.games.window", "--game", "Breakout", "--seconds",
                                 str(seconds + 120), "--seed", "1", "--position", "0,0", "--title", TITLE],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert game.stdout is not None
            if "window ready" not in game.stdout.readline():
                raise UsageError("the windowed game did not start")
            return _session(args, env, tmp, seconds)
        finally:
            stop(game)


def _session(args: argparse.Namespace, env: dict[str, str], tmp: Path, seconds: float) -> dict[str, Any]:
    port = args.port or free_port()
    metrics, advice, record = tmp / "m.json", tmp / "a.jsonl", tmp / "r.mp4"
    cmd = [sys.executable, "-m", "copilot", "live", "--window", TITLE, "--fps", str(args.fps), "--until",
           str(seconds), "--reasoner", "rules", "--overlay", "web", "--overlay-port", str(port), "--record",
           str(record), "--advice-out", str(advice), "--events-out", str(tmp / "e.jsonl"),
           "--metrics-out", str(metrics), "-q"]
    live = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    feed = FeedWatcher(f"ws://127.0.0.1:{port}/ws")
    rss: dict[str, list[tuple[float, float]]] = {}
    wakes: set[str] = set()
    try:
        with overlay_page(f"http://127.0.0.1:{port}/", until_serving=live) as page:
            t0 = time.monotonic()
            feed.start()
            next_sample = t0
            while live.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample += args.every
                    for name, pid in group_processes(live.pid).items():
                        mb = rss_mb(pid)
                        if mb is not None:
                            rss.setdefault(name, []).append((now - t0, mb))
                shown = page.evaluate(SHOWN_ADVICE)
                if shown:
                    wakes.add(shown.split("|")[0])
                page.wait_for_timeout(500)
    finally:
        feed.stop.set()
        if live.poll() is None:
            live.terminate()
        _, err = live.communicate(timeout=120)
    if live.returncode != 0:
        raise UsageError(f"the live session failed (exit {live.returncode}): {err.strip().splitlines()[-1:]}")
    report = json.loads(metrics.read_text())
    capture = report["stages"]["capture"]
    windows = fps_windows(feed.samples, "capture", args.every)
    memory = {}
    for name, points in rss.items():
        after = [mb for t, mb in points if t >= WARMUP_S] or [points[-1][1]]
        memory[name] = {"start_mb": round(points[0][1], 1), "after_1min_mb": round(after[0], 1),
                        "end_mb": round(points[-1][1], 1),
                        "growth_after_1min_pct": round(100 * (points[-1][1] - after[0]) / after[0], 2)}
    drops = {stage: m["dropped_by_reason"] for stage, m in report["stages"].items() if m.get("dropped")}
    overlay = report["stages"].get("overlay", {})
    return {
        "minutes": args.minutes, "target_fps": args.fps, "wall_s": report["wall_s"],
        "capture_fps": capture["fps"],
        "capture_fps_windows": {"min": round(min(windows), 2) if windows else None,
                                "p5": round(float(np.percentile(windows, 5)), 2) if windows else None,
                                "max": round(max(windows), 2) if windows else None, "n": len(windows),
                                "within_10pct": sum(abs(w - args.fps) <= 0.1 * args.fps for w in windows)},
        "drops": drops, "rss": memory, "restarts": report["restarts"],
        "advice_written": len(advice.read_text().splitlines()), "advice_shown": len(wakes),
        "push_ms": overlay.get("push_ms"), "record_mb": round(record.stat().st_size / 2**20, 1),
    }


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    w = result["capture_fps_windows"]
    push = result.get("push_ms") or {}
    t = Table(title=f"soak: {result['minutes']:g} min live beside the windowed game, overlay in chromium",
              title_justify="left", caption=(
                  f"capture {result['capture_fps']} fps (target {result['target_fps']:g}); per window: min {w['min']}, "
                  f"p5 {w['p5']}, max {w['max']}, {w['within_10pct']}/{w['n']} within 10%\n"
                  f"restarts {sum(result['restarts'].values())}; drops {result['drops'] or 'none'}\n"
                  f"advice {result['advice_written']} written, {result['advice_shown']} shown in the page; push p50 "
                  f"{push.get('p50')}, p95 {push.get('p95')}, p99 {push.get('p99')} ms"), caption_justify="left")
    for col in ("process", "RSS start MB", "after 1 min", "end", "growth after 1 min %"):
        t.add_column(col, justify="left" if col == "process" else "right")
    for name, m in result["rss"].items():
        t.add_row(name, str(m["start_mb"]), str(m["after_1min_mb"]), str(m["end_mb"]), str(m["growth_after_1min_pct"]))
    return t


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.minutes > 0 or not args.fps > 0 or not args.every > 0:
        raise UsageError("--minutes, --fps and --every must be positive")
    check_output_path(args.output)
    result = run_soak(args)
    emit_result(result, as_json=args.json, output=args.output, table=_table)
    return 0


if __name__ == "__main__":
    run_tool(main, "gamecopilot bench soak")
