"""An Atari game from the ROMs bundled with ``ale-py``, stepped one emulator frame at a time.

:class:`AtariGame` wraps ``ale_py.ALEInterface`` (no gymnasium): one :meth:`AtariGame.step`
advances one emulator frame (60 Hz) and returns the picture, the 512 audio samples the
console produced during that frame (unsigned 8-bit, 30720 Hz), the reward, the lives and
whether the game ended.  A finished game is reset at once, so the footage goes on.  The
class does no file I/O and a step costs well under a millisecond, so a live stage can drive
it in real time (``stages.atari_live``) and :mod:`engines.atari_dataset` can write it to a
recording.

:func:`collect_events` turns a step into the ground-truth records both of them write (one
format, one time rule: see :mod:`engines.atari_dataset`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from copilot.errors import UsageError

EMULATOR_FPS = 60
AUDIO_RATE = 30720  # the ALE's audio: 512 u8 samples per 60 Hz frame
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


def upscale_indices(src_hw: tuple[int, int], dst_wh: tuple[int, int]) -> tuple[Any, Any]:
    """Row and column indices for a nearest-neighbour resize (pixel centres)."""
    (h, w), (out_w, out_h) = src_hw, dst_wh
    rows = ((np.arange(out_h) + 0.5) * h / out_h).astype(np.intp)
    cols = ((np.arange(out_w) + 0.5) * w / out_w).astype(np.intp)
    return rows, cols


# --------------------------------------------------------------------------- truth records


def truth_time(t: float) -> float:
    """A media time as the truth files write it (6 decimals)."""
    return round(t, 6)


def _number(x: int | float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def collect_events(s: AtariStep, frame: int, fps: int, events: list[dict[str, Any]]) -> None:
    """Append the truth records of step ``s``, shown on output frame ``frame`` at ``fps``."""
    t = truth_time(frame / fps)
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
