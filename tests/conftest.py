"""Shared pytest fixtures: leak checks and a small real recording.

``leak_check`` fails a test that leaves child processes, threads, ZeroMQ sockets or pending
asyncio tasks behind (see :class:`copilot.testing.LeakCheck`); use it with
``pytestmark = pytest.mark.usefixtures("leak_check")`` or as a test argument.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from copilot.testing import LeakCheck


@pytest.fixture
def leak_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeakCheck]:
    lc = LeakCheck()
    monkeypatch.setattr(asyncio, "run", lc.wrap_asyncio_run(asyncio.run))
    yield lc
    monkeypatch.undo()
    lc.check()


@pytest.fixture(scope="session")
def atari_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 s Breakout recording (640x480 30 fps H.264 + AAC) with its ground truth."""
    pytest.importorskip("ale_py")
    from engines.atari_dataset import make_atari_recording

    rec = make_atari_recording("Breakout", 12, tmp_path_factory.mktemp("clip"), fps=30, seed=0, progress=False)
    return Path(rec.video)
