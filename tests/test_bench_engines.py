"""``gamecopilot bench encoders --tiny``: the engines' report contract, parity and the SAM3 cascade's fraction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from copilot.errors import UsageError

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")


def _check_engine(report: dict[str, Any], name: str) -> None:
    runtimes = report["engines"][name]
    assert {"torch", "onnxruntime"} <= set(runtimes)
    for runtime in ("torch", "onnxruntime"):
        row = runtimes[runtime]
        assert set(row["batch"]) == {"1", "3"}
        for stats in row["batch"].values():
            assert 0 < stats["p50_ms"] <= stats["p99_ms"]
        assert 0 <= row["parity_max_abs"] <= 1e-4
    assert runtimes["torch"]["parity_max_abs"] == 0
    assert report["tiny_random"][name] is True
    # no CUDA or tensorrt here: the runtime is listed with the reason, never silently missing
    assert "tensorrt" in runtimes and ("skipped" in runtimes["tensorrt"] or "batch" in runtimes["tensorrt"])


def test_one_engine_report_has_the_contract_keys() -> None:
    from bench.engines import run_engines

    report = run_engines(tiny=True, only={"siglip2"}, repeats=2, warmup=0, cascade=False)
    assert set(report["engines"]) == {"siglip2"}
    _check_engine(report, "siglip2")
    copy = report["frame_copy"]["host_copy_720p"]
    assert 0 < copy["p50_ms"] <= copy["p99_ms"]


def test_bad_engine_arguments_are_one_line() -> None:
    from bench.encoders import main

    with pytest.raises(UsageError, match=r"^--only: no engine 'clip'"):
        main(["--tiny", "--only", "clip"])
    with pytest.raises(UsageError, match=r"^--engine-model: expected NAME=PATH"):
        main(["--engine-model", "siglip2"])
    with pytest.raises(UsageError, match=r"^--engine-model: no engine 'sam2'"):
        main(["--engine-model", "sam2=/x"])


@pytest.mark.slow
def test_tiny_json_covers_every_engine_and_the_cascade_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.encoders import main

    assert main(["--tiny", "--json", "--repeats", "2", "--warmup", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["engines"]) == {"siglip2", "videomae", "sam3"}
    for name in report["engines"]:
        _check_engine(report, name)
    cas = report["sam3_cascade"]
    assert cas["frames"] > 1000 and cas["segmented"] >= 1
    assert cas["fraction"] == pytest.approx(cas["segmented"] / cas["frames"], abs=1e-5) and cas["fraction"] <= 0.05
