"""The named recording pools the trigger is tuned and judged on (``bench.pools``)."""

from __future__ import annotations

import pytest

from bench.pools import POOLS, pool
from copilot.errors import UsageError

pytest.importorskip("ale_py")


def test_every_pool_names_real_games_and_validation_never_overlaps_training() -> None:
    from engines.atari_game import resolve_game

    for name, entries in POOLS.items():
        roms = [(resolve_game(g), s) for g, s in entries]  # raises on a name ale-py does not know
        assert len(set(roms)) == len(roms), f"{name} lists a recording twice"
    train = {resolve_game(g) for g, _ in pool("train")}
    validation = {resolve_game(g) for g, _ in pool("validation")}
    assert train.isdisjoint(validation)
    assert {resolve_game(g) for g, _ in pool("dev")} <= train


def test_an_unknown_pool_is_a_usage_error_naming_the_choices() -> None:
    with pytest.raises(UsageError, match="dev, train, validation"):
        pool("holdout")
