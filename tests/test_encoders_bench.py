"""``bench encoders``: runs every importable encoder kind through the registry on real frames
and audio, and reports p50/p95/p99 per encoder and input (no timing asserts: figures vary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import encoders

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    rep = encoders.run_bench(n_frames=6, audio_s=1.0, warmup=1)
    json.dumps(rep)  # the report must be plain JSON
    return rep


def test_every_encoder_runs_on_both_sizes_and_audio(report: dict[str, Any]) -> None:
    rows = report["encoders"]
    by = {(r["encoder"], r["input"]): r for r in rows}
    for enc in encoders.VIDEO_ENCODERS:
        for w, h in encoders.RESOLUTIONS:
            assert (enc.label, f"{w}x{h}") in by
    for enc in encoders.AUDIO_ENCODERS:
        assert any(r["encoder"] == enc.label and r["input"].startswith("audio") for r in rows)
    # the existing kinds and this module's own must never be skipped
    for r in rows:
        if r["kind"] in ("frame_diff", "audio_level", "hud_ocr", "vad", "audio_mel", "event_scorer"):
            assert "skipped" not in r, r
    for r in rows:
        if "skipped" in r:
            continue
        lat = r["latency_ms"]
        if r["input"].startswith("audio"):
            assert r["count"] >= 40  # 1 s of 1024-sample chunks at 48 kHz, less the warm-up
        elif r["input"] == "candidate":
            assert r["kind"] == "event_scorer" and r["count"] == 200  # windows scored by the shipped model
        else:
            assert r["count"] == 6
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def test_ocr_variants_do_real_work(report: dict[str, Any]) -> None:
    rows = {(r["encoder"], r["input"]): r for r in report["encoders"]}
    every = rows[("hud_ocr+every", "640x480")]
    assert every["extra_ms"]["ocr_ms"]["p50"] > 0  # a read per frame
    assert rows[("hud_ocr", "640x480")]["emitted"] == 0  # default profile: nothing to read
    kw = rows[("hud_ocr+keywords", "640x480")]
    assert kw["extra_ms"]["keywords_ms"]["p50"] > 0
    vad = next(r for r in report["encoders"] if r["encoder"] == "vad")
    assert vad["emitted"] > 0  # one message per 32 ms window


def test_main_prints_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert encoders.main(["--json", "--frames", "3", "--audio-seconds", "0.5", "--warmup", "0",
                          "--only", "frame_diff,audio_level"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {r["encoder"] for r in rep["encoders"]} == {"frame_diff", "audio_level"}
    assert encoders.main(["--frames", "3", "--audio-seconds", "0.5", "--only", "vad"]) == 0
    table = capsys.readouterr().out
    assert "p50 ms" in table and "vad" in table


def test_a_kind_that_fails_is_reported_not_fatal() -> None:
    rep = {"source": "x", "frames": 1, "audio_s": 1, "machine": {"cpus": 2},
           "encoders": [{"encoder": "nope", "kind": "nope", "input": "640x480", "skipped": "UsageError: unknown"}]}
    assert "skipped: UsageError" in encoders.format_table(rep)


def test_bad_arguments_are_usage_errors() -> None:
    from copilot.errors import UsageError

    with pytest.raises(UsageError):
        encoders.main(["--frames", "0"])
    with pytest.raises(UsageError, match="--audio-seconds"):
        encoders.main(["--audio-seconds", "nan"])
    with pytest.raises(UsageError, match=r"--only: no encoder 'nonsense' \(encoders: .*audio_features"):
        encoders.main(["--only", "motion,nonsense"])  # an empty table would look like success
    with pytest.raises(UsageError, match="-o: directory"):
        encoders.main(["--only", "motion", "-o", "/no/such/dir/r.json"])
    with pytest.raises(UsageError, match="--audio-seconds: at least"):  # not a row of zeros
        encoders.main(["--only", "audio_level", "--audio-seconds", "0.001"])


def test_the_bus_bench_times_as_many_hops_as_asked() -> None:
    from bench.bus import run_bench

    result = run_bench(19, ("inproc", "tcp+curve"))  # not a multiple of its rounds
    for transport in ("inproc", "tcp+curve"):
        assert result["transports"][transport]["ours"]["n"] == 19
        assert result["transports"][transport]["raw"]["n"] == 19


def test_a_figure_that_could_not_be_measured_is_null_in_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN is not JSON: strict readers refused ``bench atari --json`` when nothing was measured."""
    from bench.output import emit_result

    out = tmp_path / "r.json"
    emit_result({"fps": 30.0, "interval_ms": {"p50": float("nan"), "max": float("inf")}, "n": [1, float("nan")]},
                as_json=True, output=str(out), table=lambda r: r)
    expected = {"fps": 30.0, "interval_ms": {"p50": None, "max": None}, "n": [1, None]}
    assert json.loads(capsys.readouterr().out) == expected
    assert json.loads(out.read_text()) == expected
