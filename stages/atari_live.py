"""A live Atari game as a source of frames, audio and ground truth: a game beside the copilot,
without a screen or a sound card.

The emulator (:class:`engines.atari_game.AtariGame`, 60 Hz, about 0.1 ms a step) is paced by
the injected clock, so with ``speed`` 1 it plays at the console's own speed, at 2 twice as fast,
and with ``speed`` None (``--speed max``) as fast as the links take it.  Every output frame
carries three things, so video, audio and truth stay in lock-step:

``video``
    :class:`VideoFrame` rgb24, the last emulator frame of the output frame, nearest-neighbour
    upscaled (640x480 by default, the recordings' size; ``width=height=0`` keeps 160x210).
``audio``
    one :class:`AudioChunk` per output frame: the console's u8 samples of every emulator frame
    it covers, as float32 in [-1, 1] shaped (n, 1) at 30720 Hz (no resampling on the hot path).
``truth``
    :class:`Event` payloads ``reward`` (priority high), ``life_lost`` and ``game_over``
    (critical), with the score and lives in the evidence, so a live run can be scored.

Time follows the dataset maker's rule exactly (the same emulator, the same seed, the same
policy give the same events at the same times): output frame ``k`` covers emulator frames
``k*step .. k*step+step-1`` (``step = 60 / fps``), its ``t_media`` is ``k / fps``, and an event
on emulator frame ``e`` is put on output frame ``e // step``.  Frame ``k`` is released when its
media time is due on the clock (``t0 + k / fps / speed``), as a replay releases a frame at its
PTS, and ``t_capture_ns`` is that moment.

Real time is never traded away: due times are absolute, so nothing drifts, and when the stage
is late by more than one frame (a consumer that back-pressures the ordered audio link, a busy
machine) it still emulates every frame and sends its audio and truth, but skips that frame's
picture (counted as ``late``) until it has caught up, instead of falling behind the clock.

``truth_out`` (a param, or the run option of that name, which wins) writes the truth as it
goes in DESIGN.md's ground-truth JSONL format (a meta line, then one line per event, flushed
line by line so an interrupted run keeps what it wrote); on a clean end the meta line is
rewritten with the length actually played.  ``copilot.scoring`` scores against it directly.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import IO, Any, ClassVar

import msgspec
import numpy as np

from copilot.errors import UsageError
from copilot.messages import AudioChunk, Event, Priority, VideoFrame
from copilot.registry import register_stage
from copilot.stage import Source, StageContext
from engines.atari_game import (
    AUDIO_RATE,
    EMULATOR_FPS,
    POLICIES,
    AtariGame,
    AtariStep,
    collect_events,  # the dataset maker's event records: one format, one time rule
    resolve_game,
    upscale_indices,
)

PRIORITY_OF: dict[str, Priority] = {"reward": "high", "life_lost": "critical", "game_over": "critical"}
SOURCE_NAME = "atari_live"


class AtariLiveParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    game: str = "Breakout"
    seed: int = 0
    policy: str = "random"  # random | sticky (see engines.atari_game)
    fps: int = 30  # output video fps; divides the emulator's 60 Hz
    width: int = 640  # 0 with height 0: the console's native 160x210
    height: int = 480
    seconds: float | None = None  # game time to play; None: until stopped
    truth_out: str | None = None  # ground-truth JSONL written as the game goes


class _Upscaler:
    """Nearest-neighbour upscale by two precomputed ``take`` calls (about 0.5 ms for 640x480).

    Returns a fresh array every call: the link sends frames zero-copy, so a buffer handed to
    it must never be overwritten.
    """

    def __init__(self, src_hw: tuple[int, int], dst_wh: tuple[int, int]) -> None:
        self.identity = (dst_wh[1], dst_wh[0]) == src_hw
        self._rows, self._cols = upscale_indices(src_hw, dst_wh)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.identity:
            return np.ascontiguousarray(rgb)
        return rgb.take(self._rows, axis=0).take(self._cols, axis=1)


def check_params(p: AtariLiveParams) -> int:
    """Validate the params (the game name included); return the emulator frames per output frame."""
    fps = p.fps
    if isinstance(fps, bool) or fps <= 0 or EMULATOR_FPS % fps:
        raise UsageError(f"atari: fps must divide the emulator's {EMULATOR_FPS} Hz (60, 30, 20, 15, ...), got {fps}")
    if p.policy not in POLICIES:
        raise UsageError(f"atari: unknown policy {p.policy!r}: expected one of {', '.join(POLICIES)}")
    if (p.width == 0) != (p.height == 0) or p.width < 0 or p.height < 0:
        raise UsageError(f"atari: width and height must both be positive, or both 0 (native size), got "
                         f"{p.width}x{p.height}")
    if p.seconds is not None and not p.seconds > 0:
        raise UsageError(f"atari: seconds must be positive (or left out to play until stopped), got {p.seconds}")
    resolve_game(p.game)  # UsageError naming close matches
    return EMULATOR_FPS // fps


def _writable(path: str) -> Path:
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"atari: truth_out: directory {out.parent} does not exist")
    return out


@register_stage("atari")
class AtariLiveStage(Source[AtariLiveParams]):
    """Source: a seeded Atari game played by a random policy, in real time."""

    Params = AtariLiveParams
    output_ports: ClassVar[tuple[str, ...]] = ("video", "audio", "truth")

    def __init__(self, ctx: StageContext, params: AtariLiveParams) -> None:
        super().__init__(ctx, params)
        self.game: AtariGame | None = None
        self.frames = 0  # output frames played (emulated; video sent or skipped as late)
        self.video_sent = 0
        self.late_frames = 0
        self.audio_samples = 0
        self.truth_events = 0
        self._truth_path: Path | None = None
        self._truth_fh: IO[str] | None = None
        self._meta: dict[str, Any] = {}

    @classmethod
    def check(cls, params: AtariLiveParams) -> None:
        """Called by the CLI before any process starts: bad params end as one clear line."""
        check_params(params)
        if params.truth_out:
            _writable(params.truth_out)

    def truth_path(self) -> str | None:
        p = self.params
        opt = self.ctx.options.get("truth_out")
        return str(opt) if opt else p.truth_out

    async def start(self) -> None:
        p = self.params
        step = check_params(p)
        self.game = AtariGame(p.game, seed=p.seed, policy=p.policy)
        path = self.truth_path()
        if path:
            import ale_py

            h, w = self.game.screen_shape[:2]
            self._meta = {
                "kind": "meta",
                "game": self.game.name,
                "rom": self.game.rom_id,
                "seed": p.seed,
                "policy": p.policy,
                "repeat_action_probability": self.game.repeat_action_probability,
                "fps": p.fps,
                **({} if p.seconds is None else self._length(max(1, round(p.seconds * p.fps)), p.fps)),
                "emulator_fps": EMULATOR_FPS,
                "frame_step": step,
                "width": p.width or w,
                "height": p.height or h,
                "audio_rate": AUDIO_RATE,
                "source_audio_rate": AUDIO_RATE,
                "source": SOURCE_NAME,
                "ale_version": ale_py.__version__,
                "time_rule": "t = frame / fps; frame = emu_frame // frame_step",
            }
            self._truth_path = _writable(path)

    def _open_truth(self) -> None:
        """Open the truth file when the game starts, not at ``start``: a run that fails to start
        (another stage's model does not load) leaves an earlier file of that name as it was."""
        if self._truth_path is None or self._truth_fh is not None:
            return
        # a restarted group appends to what its first incarnation wrote (a new game, the same timeline)
        resume = self.ctx.session_start_ns is not None and self._truth_path.is_file()
        try:
            self._truth_fh = open(self._truth_path, "a" if resume else "w", encoding="utf-8", newline="\n",  # noqa: SIM115
                                  buffering=1)
        except OSError as exc:
            raise UsageError(f"atari: truth_out: cannot write {self._truth_path} ({exc.strerror})") from exc
        if not resume:
            self._truth_fh.write(json.dumps(self._meta) + "\n")

    @staticmethod
    def _length(frames: int, fps: int) -> dict[str, Any]:
        return {"seconds": round(frames / fps, 6), "frames": frames}

    async def produce(self) -> None:
        p = self.params
        game = self.game
        assert game is not None, "start() runs first"
        self._open_truth()
        fps = p.fps
        step = EMULATOR_FPS // fps
        n_frames = None if p.seconds is None else max(1, round(p.seconds * fps))
        h, w = game.screen_shape[:2]
        upscale = _Upscaler((h, w), (p.width or w, p.height or h))
        speed = self.ctx.speed
        frame_ns = None if speed is None else 1e9 / (fps * speed)
        n_audio = step * game.audio_samples
        raw = np.empty(n_audio, np.uint8)
        clock = self.clock
        t0, k = self._timeline(fps)
        while n_frames is None or k < n_frames:
            events: list[tuple[dict[str, Any], AtariStep]] = []
            last: AtariStep | None = None
            for j in range(step):
                s = game.step()
                raw[j * s.audio.size : (j + 1) * s.audio.size] = s.audio
                found: list[dict[str, Any]] = []
                collect_events(s, k, fps, found)
                events.extend((e, s) for e in found)
                last = s
            assert last is not None
            # The frame is played: its truth goes to the file before any await, so a run stopped
            # at any point leaves a file whose events all lie within the frames it counts.
            if self._truth_fh is not None:
                for rec, _ in events:
                    self._truth_fh.write(json.dumps(rec) + "\n")
            self.frames = k + 1
            t_media = k / fps
            if frame_ns is not None:
                due = t0 + round(k * frame_ns)
                if clock.now_ns() < due:
                    await clock.sleep_until_ns(due)
                else:
                    await asyncio.sleep(0)  # overdue: no sleep, but let the loop breathe
                cap = clock.now_ns()
                late = cap - due > frame_ns  # more than one frame behind: drop the picture
            else:
                await asyncio.sleep(0)
                cap = clock.now_ns()
                late = False
            if late:
                self.late_frames += 1
                self.recorder.drop("late")
            else:
                image = upscale(last.rgb)
                await self.emit("video", VideoFrame(image=image, frame_index=k), t_media=t_media, t_capture_ns=cap)
                self.video_sent += 1
            samples = ((raw.astype(np.float32) - 128.0) * (1.0 / 128.0)).reshape(-1, 1)
            await self.emit(
                "audio", AudioChunk(samples=samples, sample_rate=AUDIO_RATE, chunk_index=k),
                t_media=t_media, t_capture_ns=cap,
            )
            self.audio_samples += n_audio
            for rec, s in events:
                await self.emit("truth", self._event(rec, s), t_media=t_media, t_capture_ns=cap)
                self.truth_events += 1
            self.record_emit(cap, t_media)
            k += 1
            self.recorder.media_extent_s = k / fps

    def _timeline(self, fps: int) -> tuple[int, int]:
        """The clock origin and the first output frame: 0 at the run's start; after a restart the
        run's origin and the frame due now (a new game, but the media time goes on)."""
        resumed = self.resume_media_s()
        if resumed is None or self.ctx.session_start_ns is None:
            return self.clock.now_ns(), 0
        # at max speed the frame it had got to; at real time the next frame due
        frame = round(resumed * fps) if self.ctx.speed is None else math.ceil(resumed * fps)
        return self.ctx.session_start_ns, frame

    @staticmethod
    def _event(rec: dict[str, Any], s: AtariStep) -> Event:
        kind = rec["kind"]
        evidence = {key: v for key, v in rec.items() if key not in ("t", "kind")}
        evidence.setdefault("score", int(s.score) if float(s.score).is_integer() else float(s.score))
        evidence.setdefault("lives", s.lives)
        evidence["episode"] = s.episode
        return Event(t=rec["t"], event_kind=kind, priority=PRIORITY_OF[kind], score=1.0, evidence=evidence)

    async def close(self) -> None:
        if self._truth_fh is None:
            return
        self._truth_fh.close()
        self._truth_fh = None
        if self.frames and self._truth_path is not None:
            self._rewrite_meta(self._truth_path, {**self._meta, **self._length(self.frames, self.params.fps)})

    @staticmethod
    def _rewrite_meta(path: Path, meta: dict[str, Any]) -> None:
        """Replace the meta line with the length actually played (atomic: a new file, renamed)."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            tmp = path.with_name(f".{path.name}.partial")
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(json.dumps(meta) + "\n")
                fh.writelines(lines[1:])
            os.replace(tmp, path)
        except OSError:  # the file as written so far is still valid
            pass
