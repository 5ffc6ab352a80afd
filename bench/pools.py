"""Named sets of Atari recordings for tuning and judging the TriggerDetector.

Tuning on the four development games alone overfits them: the detector passed every
acceptance line there and failed on games it had never seen.  So the default profile is
tuned on a wide ``train`` pool and judged on a ``validation`` pool it was never tuned on.

* ``dev``: the development games of the ground-truth issue, seeds 0-2.
* ``train``: ``dev`` plus 41 more games at seed 0; the default profile is tuned on these.
* ``validation``: 12 games at seed 0 drawn at random (``random.Random(20261123)``) from the
  37 Atari-57 games not used before; only ever scored, never tuned on.

Every recording is 90 s of random play made by :func:`engines.atari_dataset.make_atari_recording`
(``gamecopilot dataset atari``), so a pool is rebuilt from nothing but ale-py's ROMs.
"""

from __future__ import annotations

from pathlib import Path

from copilot.errors import UsageError

DEV = ("Breakout", "SpaceInvaders", "DemonAttack", "Pong")
TRAIN_EXTRA = (
    # tuned on from the start of issue 4
    "Alien", "Amidar", "Asterix", "Boxing", "Frostbite", "Jamesbond", "KungFuMaster", "MsPacman", "Riverraid",
    "Seaquest",
    # the first validation set; its figures were seen, so it is training data now
    "Assault", "BankHeist", "Berzerk", "Centipede", "ChopperCommand", "Qbert",
    # the rest of a random split of 37 more Atari-57 games
    "Atlantis", "BeamRider", "Bowling", "Defender", "DoubleDunk", "Enduro", "FishingDerby", "Hero", "IceHockey",
    "Kangaroo", "Krull", "MontezumaRevenge", "NameThisGame", "Phoenix", "PrivateEye", "RoadRunner", "Solaris",
    "StarGunner", "Surround", "Tennis", "TimePilot", "Tutankham", "VideoPinball", "WizardOfWor", "YarsRevenge",
)
VALIDATION = (
    "Asteroids", "BattleZone", "CrazyClimber", "Freeway", "Gopher", "Gravitar", "Pitfall", "Robotank", "Skiing",
    "UpNDown", "Venture", "Zaxxon",
)

POOLS: dict[str, list[tuple[str, int]]] = {
    "dev": [(g, s) for g in DEV for s in (0, 1, 2)],
    "train": [(g, s) for g in DEV for s in (0, 1, 2)] + [(g, 0) for g in TRAIN_EXTRA],
    "validation": [(g, 0) for g in VALIDATION],
}


def pool(name: str) -> list[tuple[str, int]]:
    """The ``(game, seed)`` recordings of a named pool, or :class:`UsageError`."""
    try:
        return list(POOLS[name])
    except KeyError:
        raise UsageError(f"unknown pool {name!r}: choose one of {', '.join(POOLS)}") from None


def selection(name: str | None, games: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The recordings a tool was asked for: a named pool, else every game with every seed."""
    return pool(name) if name else [(g, s) for g in games for s in seeds]


def ensure_recording(game: str, seed: int, data: Path, seconds: float = 90.0,
                     policy: str = "random") -> tuple[Path, Path]:
    """``(video, truth)`` of one recording in ``data``, made first if either file is missing
    (recordings of another ``policy`` than random go in ``data/POLICY``: the names hold no policy)."""
    from engines.atari_dataset import make_atari_recording
    from engines.atari_game import resolve_game

    rom = resolve_game(game)
    if policy != "random":
        data = data / policy
    video, truth = data / f"{rom}_s{seed}.mp4", data / f"{rom}_s{seed}.truth.jsonl"
    if not (video.exists() and truth.exists()):
        make_atari_recording(game, seconds, data, seed=seed, policy=policy, progress=False)
    return video, truth
