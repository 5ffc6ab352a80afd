"""The model registry (engines/model_registry.py) and ``gamecopilot models`` (engines/models_tool.py).

Model lookup is offline by default: a local path wins, then the Hugging Face cache (a fake one
built here, in the layout huggingface_hub reads), and a miss is one line naming the cache and
``--allow-download``; nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copilot.errors import UsageError
from engines import model_registry as mr
from engines.models_tool import main as models_main


def fake_hub_cache(root: Path, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache holding ``repo_id`` (refs/main -> snapshots/COMMIT/config.json)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_local_path_wins(tmp_path: Path, hub: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    assert mr.resolve_model(str(d)) == d
    f = tmp_path / "scorer.npz"
    f.write_bytes(b"x")
    assert mr.resolve_model(str(f)) == f


def test_hub_id_found_in_the_cache_offline(hub: Path) -> None:
    snap = fake_hub_cache(hub, "org/tiny-model")
    assert mr.resolve_model("org/tiny-model") == snap
    assert mr.locate("org/tiny-model") == str(snap)


def test_hub_cache_follows_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert mr.hf_cache_dir() == str(tmp_path / "hf" / "hub")
    snap = fake_hub_cache(tmp_path / "hf" / "hub", "org/other")
    assert mr.resolve_model("org/other") == snap


def test_missing_id_is_one_line_naming_the_cache_and_the_flag(hub: Path) -> None:
    with pytest.raises(UsageError) as err:
        mr.resolve_model("org/not-here")
    text = str(err.value)
    assert "\n" not in text
    assert "org/not-here" in text and f"HF_HUB_CACHE={hub}" in text and "--allow-download" in text
    assert mr.locate("org/not-here") is None


def test_offline_forbids_the_download_even_when_allowed(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        mr.resolve_model("org/not-here", allow_download=True)


def test_missing_path_is_not_asked_of_the_hub(tmp_path: Path, hub: Path) -> None:
    for text in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(UsageError, match="no such file or directory"):
            mr.resolve_model(text)
    with pytest.raises(UsageError, match="no model given"):
        mr.resolve_model("  ")


def test_export_dir_is_per_engine_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = mr.export_dir("siglip", "google/siglip2-so400m-patch14-384")
    assert a.parent == tmp_path / "gameplay-copilot" / "siglip"
    assert a == mr.export_dir("siglip", "google/siglip2-so400m-patch14-384")
    assert a != mr.export_dir("siglip", "google/siglip2-base-patch16-224")
    assert mr.export_dir("videomae", "google/siglip2-so400m-patch14-384").parent.name == "videomae"


def test_configured_models_reads_stages(tmp_path: Path, hub: Path) -> None:
    fake_hub_cache(hub, mr.DEFAULT_MODELS["videomae"])
    local = tmp_path / "sam"
    local.mkdir()
    scorer = tmp_path / "s.npz"
    scorer.write_bytes(b"x")
    cfg = {"stages": [
        {"name": "a", "kind": "motion"},
        {"name": "sem", "kind": "semantic", "params": {"runtime": "onnxruntime", "dtype": "float16"}},
        {"name": "clip", "kind": "stages.clip_embed:ClipEmbedStage"},
        {"name": "seg", "kind": "segment", "params": {"model": str(local), "runtime": "torch"}},
        {"name": "r", "kind": "reasoner", "params": {"llm": {"model": "org/llm", "url": "http://127.0.0.1:8080/v1"}}},
        {"name": "sc", "kind": "event_scorer", "params": {"model": str(scorer)}},
        {"name": "sc2", "kind": "event_scorer", "params": {"model": "none"}},
    ]}
    got = mr.configured_models(cfg)
    assert [e.role.split()[0] for e in got] == ["semantic", "clip_embed", "segment", "reasoner", "event_scorer"]
    sem, clip, seg, llm, sc = got
    assert (sem.id, sem.found, sem.path, sem.runtime, sem.dtype) == (
        mr.DEFAULT_MODELS["siglip2"], False, None, "onnxruntime", "float16")
    assert clip.found and clip.path is not None and clip.path.startswith(str(hub))
    assert (seg.id, seg.found, seg.path, seg.runtime) == (str(local), True, str(local), "torch")
    assert (llm.runtime, llm.found) == ("openai", True)
    assert (sc.found, sc.path) == (True, str(scorer))


def test_configured_models_defaults_without_a_config_or_any_model(hub: Path) -> None:
    ids = [e.id for e in mr.configured_models(None)]
    assert ids == [mr.DEFAULT_MODELS[k] for k in ("siglip2", "videomae", "sam3")]
    assert [e.id for e in mr.configured_models({"stages": [{"name": "m", "kind": "motion"}]})] == ids


@pytest.mark.parametrize("data, where", [
    ({"stages": "x"}, "stages"),
    ({"stages": ["x"]}, "stages[0]"),
    ({"stages": [{"kind": "semantic", "params": [1]}]}, "stages[0].params"),
])
def test_malformed_config_names_the_key(data: dict[str, object], where: str) -> None:
    with pytest.raises(UsageError) as err:
        mr.configured_models(data, source="pipe.yaml")
    assert str(err.value).startswith(f"pipe.yaml: {where}:")


# -- gamecopilot models -----------------------------------------------------------------------------------------


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_models_json(tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = fake_hub_cache(hub, "org/sig")
    cfg = write_yaml(tmp_path / "p.yaml", "stages:\n  - name: s\n    kind: semantic\n"
                                          "    params: {model: org/sig, runtime: torch, dtype: float32}\n"
                                          "  - name: v\n    kind: clip_embed\n")
    assert models_main(["--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [list(d)[:5] for d in out] == [["id", "path", "found", "runtime", "dtype"]] * 2
    assert out[0] == {"id": "org/sig", "path": str(snap), "found": True, "runtime": "torch", "dtype": "float32",
                      "role": "semantic (SigLIP2)"}
    assert out[1]["id"] == mr.DEFAULT_MODELS["videomae"] and out[1]["found"] is False and out[1]["path"] is None


def test_models_table_and_default_config(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main([]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0].split() == ["role", "model", "where", "runtime", "dtype"]
    assert any(mr.DEFAULT_MODELS["siglip2"] in line and "not found" in line for line in lines[1:])
    assert "not found here" in cap.err


@pytest.mark.parametrize("text", ["stages: [\n", "stages: 3\n", "- a\n- b\n"])
def test_models_bad_config_is_one_line_exit_2(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_yaml(tmp_path / "bad.yaml", text)
    assert models_main(["--config", str(cfg)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert len(cap.err.strip().splitlines()) == 1 and str(cfg) in cap.err


def test_models_missing_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
