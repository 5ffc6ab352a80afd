"""Real Atari footage with exact ground truth, from the ROMs bundled with ``ale-py``.

:class:`AtariGame` wraps ``ale_py.ALEInterface`` (no gymnasium): one :meth:`AtariGame.step`
advances one emulator frame (60 Hz) and returns the picture, the 512 audio samples the
console produced during that frame (unsigned 8-bit, 30720 Hz), the reward, the lives and
whether the game ended.  A finished game is reset at once, so the footage goes on.  The
class does no file I/O and a step costs well under a millisecond, so a live stage can drive
it in real time.

:func:`make_atari_recording` writes ``<rom>_s<seed>.mp4`` (H.264 yuv420p, nearest-neighbour
upscaled to 640x480, AAC audio of the console's own sound resampled to 48 kHz) and
``<rom>_s<seed>.truth.jsonl``: a meta line, then one line per event::

    {"t": 12.3, "kind": "reward", "frame": 369, "emu_frame": 739, "value": 1, "score": 7}
    {"t": 20.1, "kind": "life_lost", "frame": 603, "emu_frame": 1207, "lives": 3}
    {"t": 31.0, "kind": "game_over", "frame": 930, "emu_frame": 1861, "score": 12}

Time rule: ``frame`` is the index of the output video frame and ``t = frame / fps`` its
media time (its PTS).  Output frame ``k`` covers the emulator frames ``k*step ..
k*step+step-1`` (``step = 60 / fps``) and shows the last of them; an event that ALE reports
on emulator frame ``e`` (``emu_frame``, counted from 0 over the whole footage) is put on
output frame ``e // step``.  Atari games redraw their HUD during the frame, so depending on
the game the change is on screen on that output frame or, when the redraw lags one emulator
frame, on the next one (at most 1/fps later).  The truth file holds no wall-clock data, so
the same arguments give a byte-identical file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError

EMULATOR_FPS = 60
AUDIO_RATE = 30720  # the ALE's audio: 512 u8 samples per 60 Hz frame
OUTPUT_AUDIO_RATE = 48000  # AAC has no 30720 Hz rate; 48000 / 30720 = 25 / 16
VIDEO_SIZE = (640, 480)
POLICIES = ("random", "sticky")
# "sticky": the agent keeps its action for a geometric number of frames (mean 8, about
# 133 ms, closer to a human's hand) and the ALE repeats the previous action with p=0.25
# (the "sticky actions" of Machado et al. 2018).  "random": a fresh uniform action every
# frame, no repeats.
_STICKY_SWITCH_P = 1.0 / 8.0
_REPEAT_ACTION_P = {"random": 0.0, "sticky": 0.25}
_GYM_DECORATIONS = re.compile(r"^(ale/)?(?P<name>.*?)(noframeskip|deterministic)?(-v\d+)?$")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def rom_ids() -> list[str]:
    """All ROM ids bundled with ale-py (snake_case, e.g. ``space_invaders``)."""
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


def display_name(rom_id: str) -> str:
    """CamelCase name of a ROM id: ``space_invaders`` -> ``SpaceInvaders``."""
    return "".join(part[:1].upper() + part[1:] for part in rom_id.split("_"))


def resolve_game(name: str) -> str:
    """Map a game name to its ale-py ROM id, or raise :class:`UsageError`.

    Case, underscores, dashes and spaces are ignored, so ``SpaceInvaders``,
    ``space_invaders``, ``Space Invaders`` and gym ids like ``ALE/SpaceInvaders-v5`` or
    ``SpaceInvadersNoFrameskip-v4`` all name ``space_invaders``.
    """
    ids = rom_ids()
    by_key = {_key(rid): rid for rid in ids}
    raw = name.strip().lower()
    match = _GYM_DECORATIONS.match(raw)
    candidates = [_key(raw)]
    if match:
        candidates.append(_key(match.group("name")))
    for key in candidates:
        if key and key in by_key:
            return by_key[key]
    close = difflib.get_close_matches(_key(raw), list(by_key), n=3, cutoff=0.6)
    hint = (
        "did you mean " + ", ".join(display_name(by_key[k]) for k in close) + "? " if close else ""
    )
    examples = ", ".join(
        display_name(r) for r in ("breakout", "pong", "space_invaders", "demon_attack") if r in ids
    )
    raise UsageError(
        f"unknown Atari game {name!r}: {hint}valid names include {examples} "
        f"({len(ids)} games bundled with ale-py)"
    )


@dataclass(frozen=True, slots=True)
class AtariStep:
    """What one emulator frame produced."""

    index: int  # emulator frame, counted from 0 over the whole footage
    rgb: np.ndarray  # (210, 160, 3) uint8, owned by the caller
    audio: np.ndarray  # (512,) uint8 at 30720 Hz, 128 is silence
    reward: int | float
    score: int | float  # running score of the current game, this reward included
    lives: int
    life_lost: bool  # the lives counter dropped on this frame
    game_over: bool  # the game ended on this frame (the next step starts a new one)
    episode: int  # games finished before this frame


@dataclass
class AtariGame:
    """A seeded ALE emulator at 60 Hz with a built-in random policy.

    ``policy`` is ``"random"`` (uniform action each frame, no sticky actions) or
    ``"sticky"`` (held actions plus ALE sticky actions, p=0.25).  Everything random comes
    from ``seed``: the same seed and the same calls give the same frames.
    """

    game: str
    seed: int = 0
    policy: str = "random"
    rom_id: str = field(init=False)
    name: str = field(init=False)
    frame_index: int = field(init=False, default=0)
    episode: int = field(init=False, default=0)
    score: int | float = field(init=False, default=0)
    lives: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(
                f"unknown policy {self.policy!r}: expected one of {', '.join(POLICIES)}"
            )
        self.rom_id = resolve_game(self.game)
        self.name = display_name(self.rom_id)
        import ale_py
        from ale_py import roms

        path = roms.get_rom_path(self.rom_id)
        if path is None:  # pragma: no cover - listed but not installed
            raise UsageError(f"the ROM for {self.name} is not installed with ale-py")
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
        ale = ale_py.ALEInterface()
        ale.setInt("random_seed", int(self.seed) & 0x7FFFFFFF)
        ale.setInt("frame_skip", 1)
        ale.setFloat("repeat_action_probability", _REPEAT_ACTION_P[self.policy])
        ale.setBool("sound_obs", True)
        ale.loadROM(str(path))
        self._ale = ale
        self._actions = list(ale.getMinimalActionSet())
        self._rng = np.random.default_rng(self.seed)
        self._action = 0
        self.lives = int(ale.lives())
        h, w = ale.getScreenDims()
        self.screen_shape: tuple[int, int, int] = (int(h), int(w), 3)
        self.audio_samples = int(ale.getAudioSize())

    @property
    def actions(self) -> list[Any]:
        """The game's minimal action set (``ale_py.Action`` values)."""
        return list(self._actions)

    @property
    def repeat_action_probability(self) -> float:
        return _REPEAT_ACTION_P[self.policy]

    def _policy_action(self) -> int:
        if self.policy == "random" or self._rng.random() < _STICKY_SWITCH_P:
            self._action = int(self._rng.integers(len(self._actions)))
        return self._action

    def step(self, action: int | None = None) -> AtariStep:
        """Advance one emulator frame.

        ``action`` indexes :attr:`actions`; ``None`` lets the policy choose.
        """
        ale = self._ale
        idx = self._policy_action() if action is None else action
        reward = ale.act(self._actions[idx])
        rgb = ale.getScreenRGB()
        audio = ale.getAudio()
        lives = int(ale.lives())
        life_lost = lives < self.lives
        self.score += reward
        game_over = bool(ale.game_over())
        result = AtariStep(
            index=self.frame_index,
            rgb=rgb,
            audio=audio,
            reward=reward,
            score=self.score,
            lives=lives,
            life_lost=life_lost,
            game_over=game_over,
            episode=self.episode,
        )
        self.frame_index += 1
        self.lives = lives
        if game_over:
            ale.reset_game()
            self.episode += 1
            self.score = 0
            self.lives = int(ale.lives())
        return result


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True, slots=True)
class AtariRecording:
    video: Path
    truth: Path
    frames: int
    fps: int
    seconds: float
    events: int
    episodes: int


def _fmt_t(t: float) -> float:
    return round(t, 6)


def _number(x: int | float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def upscale_indices(src_hw: tuple[int, int], dst_wh: tuple[int, int]) -> tuple[Any, Any]:
    """Row and column indices for a nearest-neighbour resize (pixel centres)."""
    (h, w), (out_w, out_h) = src_hw, dst_wh
    rows = ((np.arange(out_h) + 0.5) * h / out_h).astype(np.intp)
    cols = ((np.arange(out_w) + 0.5) * w / out_w).astype(np.intp)
    return rows, cols


# BT.601 limited range, what decoders assume for untagged SD video (as swscale does).
_RGB_TO_YUV = (
    np.array(
        [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]],
        np.float32,
    ).T
    / 255.0
)
_YUV_OFFSET = np.array([16.0, 128.0, 128.0], np.float32) + 0.5  # + 0.5: round, not floor


class Yuv420Upscaler:
    """RGB screen -> nearest-neighbour upscaled yuv420p planes, in one (H*3/2, W) array.

    The colour conversion runs at the console's resolution and the planes are gathered
    with precomputed indices: about 0.6 ms a frame, ten times faster than upscaling RGB and
    converting with swscale.
    """

    def __init__(self, src_hw: tuple[int, int], dst_wh: tuple[int, int]) -> None:
        w_out, h_out = dst_wh
        if w_out % 2 or h_out % 2:
            raise ValueError("yuv420p needs an even width and height")
        rows, cols = upscale_indices(src_hw, dst_wh)
        src_w = src_hw[1]
        self._y = rows[:, None] * src_w + cols[None, :]
        self._c = rows[::2][:, None] * src_w + cols[::2][None, :]
        self._h = h_out
        self._out = np.empty((h_out * 3 // 2, w_out), np.uint8)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The planes for ``rgb``; the returned buffer is reused by the next call."""
        yuv = (rgb.reshape(-1, 3).astype(np.float32) @ _RGB_TO_YUV + _YUV_OFFSET).astype(np.uint8)
        h, out = self._h, self._out
        quarter = h // 4  # rows of the output buffer per chroma plane
        out[:h] = yuv[:, 0].take(self._y)
        out[h : h + quarter].reshape(-1)[:] = yuv[:, 1].take(self._c).reshape(-1)
        out[h + quarter :].reshape(-1)[:] = yuv[:, 2].take(self._c).reshape(-1)
        return out


def _check_args(seconds: float, fps: float, policy: str) -> int:
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise UsageError(f"--seconds must be a positive number, got {seconds!r}")
    if isinstance(fps, float) and fps.is_integer():
        fps = int(fps)
    if not isinstance(fps, int) or fps <= 0 or EMULATOR_FPS % fps:
        raise UsageError(
            f"--fps must divide the emulator's {EMULATOR_FPS} Hz (60, 30, 20, 15, ...), got {fps!r}"
        )
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
    return fps


def make_atari_recording(
    game: str,
    seconds: float,
    out_dir: str | os.PathLike[str],
    fps: int = 30,
    seed: int = 0,
    policy: str = "random",
    progress: bool = True,
) -> AtariRecording:
    """Play ``game`` for ``seconds`` and write the MP4 and its truth JSONL into ``out_dir``.

    See the module docstring for the file formats and the time rule.  Files are written
    under temporary names and renamed when complete.
    """
    import av

    fps = _check_args(seconds, fps, policy)
    atari = AtariGame(game, seed=seed, policy=policy)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only or virtual file system
        raise UsageError(f"cannot create output directory {out} ({exc.strerror})") from None
    stem = f"{atari.rom_id}_s{seed}"
    video_path, truth_path = out / f"{stem}.mp4", out / f"{stem}.truth.jsonl"
    for path in (video_path, truth_path):  # checked now, not after the whole recording was made
        if path.is_dir():
            raise UsageError(f"cannot write {path}: it is a directory")
    if not os.access(out, os.W_OK):
        raise UsageError(f"cannot write into output directory {out} (permission denied)")
    tmp_video, tmp_truth = out / f".{stem}.mp4.partial", out / f".{stem}.truth.partial"

    step = EMULATOR_FPS // fps
    n_frames = max(1, round(seconds * fps))
    width, height = VIDEO_SIZE
    to_yuv = Yuv420Upscaler(atari.screen_shape[:2], VIDEO_SIZE)
    events: list[dict[str, Any]] = []
    chunk = np.empty(step * atari.audio_samples, np.uint8)

    try:
        with av.open(str(tmp_video), mode="w", format="mp4") as container:
            vstream = container.add_stream(
                "libx264",
                rate=fps,
                options={"crf": "23", "preset": "veryfast", "g": str(2 * fps)},
            )
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            astream = container.add_stream("aac", rate=OUTPUT_AUDIO_RATE, layout="mono")
            astream.bit_rate = 96_000
            with _progress_bar(progress, f"{atari.name} s{seed}", n_frames) as advance:
                for k in range(n_frames):
                    last: AtariStep | None = None
                    for j in range(step):
                        s = atari.step()
                        chunk[j * s.audio.size : (j + 1) * s.audio.size] = s.audio
                        collect_events(s, k, fps, events)
                        last = s
                    assert last is not None
                    vframe = av.VideoFrame.from_ndarray(to_yuv(last.rgb), format="yuv420p")
                    vframe.pts = k
                    for packet in vstream.encode(vframe):
                        container.mux(packet)
                    aframe = av.AudioFrame.from_ndarray(
                        chunk.reshape(1, -1), format="u8", layout="mono"
                    )
                    aframe.sample_rate = AUDIO_RATE
                    aframe.pts = k * chunk.size
                    for packet in astream.encode(aframe):
                        container.mux(packet)
                    if k % 15 == 14 or k == n_frames - 1:
                        advance(k + 1)
            for packet in vstream.encode(None):
                container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)

        import ale_py

        meta: dict[str, Any] = {
            "kind": "meta",
            "game": atari.name,
            "rom": atari.rom_id,
            "seed": seed,
            "policy": policy,
            "repeat_action_probability": atari.repeat_action_probability,
            "fps": fps,
            "seconds": _fmt_t(n_frames / fps),
            "frames": n_frames,
            "emulator_fps": EMULATOR_FPS,
            "frame_step": step,
            "width": width,
            "height": height,
            "audio_rate": OUTPUT_AUDIO_RATE,
            "source_audio_rate": AUDIO_RATE,
            "video": video_path.name,
            "events": len(events),
            "episodes": atari.episode,
            "ale_version": ale_py.__version__,
            "time_rule": "t = frame / fps; frame = emu_frame // frame_step",
        }
        with open(tmp_truth, "w", encoding="utf-8", newline="\n") as fh:
            for obj in [meta, *events]:
                fh.write(json.dumps(obj) + "\n")
        os.replace(tmp_video, video_path)
        os.replace(tmp_truth, truth_path)
    finally:
        for tmp in (tmp_video, tmp_truth):
            tmp.unlink(missing_ok=True)
    return AtariRecording(
        video=video_path,
        truth=truth_path,
        frames=n_frames,
        fps=fps,
        seconds=n_frames / fps,
        events=len(events),
        episodes=atari.episode,
    )


def collect_events(s: AtariStep, frame: int, fps: int, events: list[dict[str, Any]]) -> None:
    t = _fmt_t(frame / fps)
    if s.reward:
        events.append(
            {
                "t": t,
                "kind": "reward",
                "frame": frame,
                "emu_frame": s.index,
                "value": _number(s.reward),
                "score": _number(s.score),
            }
        )
    if s.life_lost:
        events.append(
            {"t": t, "kind": "life_lost", "frame": frame, "emu_frame": s.index, "lives": s.lives}
        )
    if s.game_over:
        events.append(
            {
                "t": t,
                "kind": "game_over",
                "frame": frame,
                "emu_frame": s.index,
                "score": _number(s.score),
            }
        )


class _progress_bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self._enabled, self._label, self._total = enabled, label, total
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self._enabled:
            return lambda done: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._progress.__enter__()
        task = self._progress.add_task(self._label, total=self._total)
        progress = self._progress
        return lambda done: progress.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.datasets.atari --game NAME --seconds N -o DIR`` (a test aid)."""
    ap = argparse.ArgumentParser(prog="python -m bench.datasets.atari")
    ap.add_argument("--game", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", choices=POLICIES, default="random")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    try:
        rec = make_atari_recording(
            args.game, args.seconds, args.out, fps=args.fps, seed=args.seed, policy=args.policy
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{rec.video}\n{rec.truth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
