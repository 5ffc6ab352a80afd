"""``gamecopilot devices``: what ``live`` can capture here, with the values its options take.

- monitors (mss), numbered as ``--monitor`` numbers them (1 the first; 0, all of them together, is
  not listed), with their geometry;
- windows (X11, through xdotool): visible windows with a title, their id, title and geometry
  (``--window`` takes a part of the title);
- audio devices: soundcard's microphones and loopback monitors (``loopback``; ``default`` marks the
  one ``--audio default`` records) and, when PyAudio is installed, PortAudio's input devices
  (``backend: pyaudio``); ``id`` is the value ``--audio`` takes.

A plain aligned table by default; ``--json`` prints ``{"monitors": [{index, left, top, width,
height}], "windows": [{id, title, left, top, width, height}], "audio": [{name, id, loopback,
backend, ...}]}``.  Each section fails soft: no display means no monitors and no windows, no sound
server no soundcard devices, each said in one note on stderr, exit code 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from copilot.args import OneLineParser
from copilot.errors import UsageError, first_line
from stages.capture import shell_geometry

PROG = "gamecopilot devices"
XDOTOOL_TIMEOUT_S = 5.0


def list_monitors() -> tuple[list[dict[str, int]], str | None]:
    """The monitors mss sees (``--monitor`` numbering), or a note saying why there are none."""
    try:
        from stages.capture import screen_grabber

        with screen_grabber() as grabber:
            monitors = list(grabber.monitors)
    except ImportError:
        return [], "no monitors: mss is not installed (pip install 'gameplay-copilot[capture]')"
    except Exception as exc:
        return [], f"no monitors: cannot open the screen ({_no_display(exc)})"
    return [{"index": i, "left": int(m["left"]), "top": int(m["top"]), "width": int(m["width"]),
             "height": int(m["height"])} for i, m in enumerate(monitors) if i > 0], None


def _no_display(exc: BaseException) -> str:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        return "DISPLAY is not set"
    return first_line(exc)


def _xdotool(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=XDOTOOL_TIMEOUT_S)


def _window(exe: str, wid: str) -> dict[str, Any] | None:
    """One window's title and geometry (one xdotool call), or None when it went away or has no title."""
    try:
        out = _xdotool(exe, "getwindowname", wid, "getwindowgeometry", "--shell", wid)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    lines = out.stdout.splitlines()
    # the title comes first (it may hold several lines), then KEY=VALUE lines from WINDOW= on
    start = max((i for i, ln in enumerate(lines) if ln.startswith("WINDOW=")), default=None)
    if start is None:
        return None
    title = "\n".join(lines[:start]).strip()
    geo = shell_geometry(lines[start:])
    if geo is None or not title:
        return None
    return {"id": int(wid), "title": title, **geo}


def list_windows() -> tuple[list[dict[str, Any]], str | None]:
    """Visible X11 windows with a title, or a note saying why there are none."""
    if not os.environ.get("DISPLAY"):
        return [], "no windows: DISPLAY is not set (windows are listed on X11 only)"
    exe = shutil.which("xdotool")
    if exe is None:
        return [], "no windows: listing them needs xdotool (Debian package xdotool)"
    try:
        found = _xdotool(exe, "search", "--onlyvisible", "--name", ".")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"no windows: xdotool failed ({first_line(exc)})"
    if found.returncode != 0 and found.stderr.strip():  # exit 1 with no output: no window matched
        return [], f"no windows: xdotool failed ({first_line(Exception(found.stderr))})"
    windows = [w for w in (_window(exe, wid) for wid in found.stdout.split() if wid.isdigit()) if w is not None]
    return windows, None


def soundcard_devices() -> tuple[list[dict[str, Any]], str | None]:
    """soundcard's microphones and loopback monitors, or a note saying why there are none."""
    try:
        import soundcard as sc
    except ImportError:
        return [], "no soundcard devices: soundcard is not installed (pip install 'gameplay-copilot[capture]')"
    except Exception as exc:  # soundcard connects to the sound server on import
        return [], f"no soundcard devices: no sound server answered ({first_line(exc)})"
    try:
        mics = list(sc.all_microphones(include_loopback=True))
    except Exception as exc:
        return [], f"no soundcard devices: {first_line(exc)}"
    try:
        default_id = str(sc.get_microphone(id=str(sc.default_speaker().name), include_loopback=True).id)
    except Exception:
        default_id = None
    return [{"name": str(m.name), "id": str(m.id), "loopback": bool(m.isloopback), "backend": "soundcard",
             "channels": int(m.channels), "default": str(m.id) == default_id} for m in mics], None


def pyaudio_devices() -> tuple[list[dict[str, Any]], str | None]:
    """PortAudio's input devices (``pyaudio:...`` ids); none, without a note, when PyAudio is not installed."""
    from stages.capture_audio import portaudio, pyaudio_id, pyaudio_inputs

    try:
        import pyaudio  # noqa: F401
    except ImportError:
        return [], None
    try:
        with portaudio() as pa:
            inputs = pyaudio_inputs(pa)
    except Exception as exc:
        return [], f"no PyAudio devices: {first_line(exc)}"
    return [{"name": d.name, "id": pyaudio_id(d, inputs), "loopback": False, "backend": "pyaudio",
             "channels": d.channels, "rate": d.rate, "host_api": d.host_api} for d in inputs], None


def collect() -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Everything ``devices`` lists, and its notes."""
    monitors, n1 = list_monitors()
    windows, n2 = list_windows()
    cards, n3 = soundcard_devices()
    ports, n4 = pyaudio_devices()
    notes = [n for n in (n1, n2, n3, n4) if n]
    return {"monitors": monitors, "windows": windows, "audio": cards + ports}, notes


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def render(found: dict[str, list[dict[str, Any]]]) -> str:
    """The readable listing: one aligned table per section."""
    out = ["monitors (--monitor N; 0: all of them together)"]
    if found["monitors"]:
        rows = [["N", "left", "top", "width", "height"]]
        rows += [[str(m[k]) for k in ("index", "left", "top", "width", "height")] for m in found["monitors"]]
        out += _table(rows, right={0, 1, 2, 3, 4})
    else:
        out.append("  (none)")
    out += ["", "windows (--window TITLE)"]
    if found["windows"]:
        rows = [["id", "left", "top", "width", "height", "title"]]
        rows += [[str(w[k]) for k in ("id", "left", "top", "width", "height")] + [w["title"].replace("\n", " ")]
                 for w in found["windows"]]
        out += _table(rows, right={1, 2, 3, 4})
    else:
        out.append("  (none)")
    out += ["", "audio (--audio ID)"]
    if found["audio"]:
        rows = [["id", "backend", "loopback", "name"]]
        for a in found["audio"]:
            name = a["name"] + (" [default]" if a.get("default") else "")
            if a.get("host_api"):
                name += f" ({a['host_api']})"
            rows.append([a["id"], a.get("backend", ""), "yes" if a["loopback"] else "no", name])
        out += _table(rows, right=set())
    else:
        out.append("  (none)")
    return "\n".join(out)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="List what `gamecopilot live` can capture here: monitors "
                      "(--monitor), windows (--window) and audio devices (--audio), with their geometry.")
    p.add_argument("--json", action="store_true",
                   help='print {"monitors": [...], "windows": [...], "audio": [...]} instead of tables')
    return p


def main(argv: list[str] | None = None) -> int:
    """``gamecopilot devices [--json]``: exit 0 even when a section is empty (a note says why)."""
    args = build_parser().parse_args(argv)
    try:
        found, notes = collect()
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(json.dumps(found, indent=2) if args.json else render(found), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
