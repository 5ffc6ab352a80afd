"""ProjectorBank: shapes, the fixed source order, save/load, and one-line errors.

(The bank's tokens reaching a model's logits is tested with the tiny Qwen3-VL in
tests/test_llm_transformers.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from copilot.errors import UsageError  # noqa: E402
from engines.projector import ProjectorBank  # noqa: E402

HIDDEN = 64


def tokens(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> ProjectorBank:
    torch.manual_seed(0)
    return ProjectorBank({"thumb": 16, "hico": 32}, HIDDEN).eval()


def test_project_shapes_and_fixed_order(bank: ProjectorBank) -> None:
    assert bank.sources == ("hico", "thumb")
    assert bank.dims == {"hico": 32, "thumb": 16}
    hico, thumb = tokens(3, 32), tokens(2, 16, seed=1)
    with torch.no_grad():
        out = bank.project({"thumb": thumb, "hico": hico})
        again = bank.project({"hico": hico, "thumb": thumb})
        only_hico = bank.project({"hico": hico})
        only_thumb = bank.project({"thumb": thumb})
    assert out.shape == (5, HIDDEN) and out.dtype == torch.float32
    torch.testing.assert_close(out, again)  # the dict's order does not matter
    torch.testing.assert_close(out[:3], only_hico)  # sources sorted by name: hico, then thumb
    torch.testing.assert_close(out[3:], only_thumb)


def test_one_token_and_empty(bank: ProjectorBank) -> None:
    with torch.no_grad():
        one = bank.project({"hico": tokens(1, 32)[0]})  # a 1-D array is one token
        assert one.shape == (1, HIDDEN)
        assert bank.project({}).shape == (0, HIDDEN)
        assert bank.project({"hico": np.zeros((0, 32), np.float32)}).shape == (0, HIDDEN)


def test_errors_name_the_source_and_sizes(bank: ProjectorBank) -> None:
    with pytest.raises(UsageError, match=r"^projector 'hico' takes 32-d tokens, got 48-d$"):
        bank.project({"hico": tokens(3, 48)})
    with pytest.raises(UsageError, match=r"no projector for source 'clip' \(the bank has: hico, thumb\)"):
        bank.project({"clip": tokens(1, 32)})
    with pytest.raises(UsageError, match=r"projector 'thumb' takes \(n, 16\) tokens, got shape \(1, 2, 16\)"):
        bank.project({"thumb": np.zeros((1, 2, 16), np.float32)})
    with pytest.raises(ValueError, match=r"source 'a\.b'"):
        ProjectorBank({"a.b": 4}, HIDDEN)
    with pytest.raises(ValueError, match="dimension must be positive"):
        ProjectorBank({"hico": 0}, HIDDEN)
    with pytest.raises(ValueError, match="at least one source"):
        ProjectorBank({}, HIDDEN)


def test_save_load_round_trip(bank: ProjectorBank, tmp_path: Path) -> None:
    path = bank.save(tmp_path / "proj.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header
    loaded = ProjectorBank.load(path, HIDDEN)
    assert loaded.dims == bank.dims and loaded.hidden_size == HIDDEN
    batch = {"hico": tokens(3, 32), "thumb": tokens(2, 16)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.project(batch), bank.project(batch))


def test_torch_save_fallback(bank: ProjectorBank, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    path = bank.save(tmp_path / "proj.pt")
    assert path.read_bytes()[:4] == b"PK\x03\x04"  # torch.save's zip
    loaded = ProjectorBank.load(path, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.project({"thumb": tokens(2, 16)}), bank.project({"thumb": tokens(2, 16)}))


def test_load_errors(bank: ProjectorBank, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^llm.projectors: no projector weights at .*missing.safetensors"):
        ProjectorBank.load(tmp_path / "missing.safetensors", HIDDEN)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a weights file" * 10)
    with pytest.raises(UsageError, match=r"^llm.projectors: .*junk.safetensors is not a projector weights file"):
        ProjectorBank.load(junk, HIDDEN)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UsageError, match=r"unexpected tensor 'encoder.weight'"):
        ProjectorBank.load(other, HIDDEN)
    half = tmp_path / "half.safetensors"
    state = {k: v for k, v in bank.state_dict().items() if not k.startswith("proj.hico.2.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(half))
    with pytest.raises(UsageError, match=r"projector 'hico' is missing 2.bias, 2.weight"):
        ProjectorBank.load(half, HIDDEN)
    path = bank.save(tmp_path / "proj.safetensors")
    with pytest.raises(UsageError, match=r"projector 'hico' gives 64-d tokens but the LLM's hidden size is 128"):
        ProjectorBank.load(path, 128)
