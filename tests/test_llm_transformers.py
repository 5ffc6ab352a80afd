"""The transformers backend end to end on a tiny random Qwen3-VL (built here, no download).

The model's weights are random: its text is gibberish.  These tests prove the path: images,
projected tokens and text in, streamed pieces out, LoRA, cancellation and the one-line errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from copilot.advice import AdviceBackend, AdviceRequest, BackendError, BackendOptions  # noqa: E402
from copilot.errors import UsageError  # noqa: E402
from engines.llm_transformers import TransformersBackend  # noqa: E402
from engines.projector import ProjectorBank  # noqa: E402
from engines.tiny_qwen3vl import build_tiny_qwen3vl  # noqa: E402

HIDDEN = 64  # the tiny model's text hidden size
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl"))


@pytest.fixture(scope="module")
def projectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    return ProjectorBank({"hico": 32}, HIDDEN).save(tmp_path_factory.mktemp("proj") / "proj.safetensors")


@pytest.fixture(scope="module")
def lora(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the text attention projections with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(tiny), local_files_only=True, dtype=torch.float32)
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora")
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


def started(tiny: Path, **opts: Any) -> TransformersBackend:
    be = TransformersBackend(BackendOptions(model=str(tiny), device="cpu", **opts))
    asyncio.run(be.start())
    return be


@pytest.fixture(scope="module")
def backend(tiny: Path, projectors: Path) -> TransformersBackend:
    """The tiny model with the projector bank (no LoRA), shared by the tests of this module."""
    return started(tiny, projectors=str(projectors))


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]


def hico(seed: int = 0, n: int = 3, dim: int = 32) -> dict[str, np.ndarray]:
    return {"hico": np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)}


def request(**kw: Any) -> AdviceRequest:
    base: dict[str, Any] = {"system": "You are a game copilot.", "prompt": "The player lost a life. What now?",
                            "images": images(), "max_tokens": 24, "temperature": 0.0}
    base.update(kw)
    return AdviceRequest(**base)


async def collect(be: TransformersBackend, req: AdviceRequest) -> list[str]:
    return [piece async for piece in be.stream(req)]


def test_module_import_is_light() -> None:
    code = ("import sys, engines.llm_transformers as m; "
            "heavy = [n for n in ('torch', 'transformers', 'peft', 'PIL') if n in sys.modules]; "
            "assert not heavy, heavy; assert m.TransformersBackend.name == 'transformers'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_tiny_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen3vl(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert hashlib.sha256((tiny / name).read_bytes()).digest() == \
            hashlib.sha256((again / name).read_bytes()).digest(), name
    assert "tiny random" in (tiny / "README.md").read_text()


def test_stream_images_projected_tokens_and_text(backend: TransformersBackend) -> None:
    assert isinstance(backend, AdviceBackend)
    assert (backend.name, backend.takes_images, backend.device, backend.dtype) == ("transformers", True, "cpu",
                                                                                    "float32")
    assert backend.attn_implementation == "sdpa"
    pieces = asyncio.run(collect(backend, request(embeddings=hico())))
    assert len(pieces) >= 2 and all(isinstance(p, str) and p for p in pieces)
    stats = backend.last_stats
    assert stats["projected_tokens"] == 3
    assert 1 <= stats["new_tokens"] <= 24 and not stats["stopped"]
    # greedy decoding is deterministic
    assert asyncio.run(collect(backend, request(embeddings=hico()))) == pieces


def test_projected_tokens_change_the_logits(backend: TransformersBackend) -> None:
    plain = backend.forward_logits(request())
    with_ctx = backend.forward_logits(request(embeddings=hico(0)))
    same_ctx = backend.forward_logits(request(embeddings=hico(0)))
    other_ctx = backend.forward_logits(request(embeddings=hico(1)))
    assert plain.shape == with_ctx.shape == (backend._lm.config.get_text_config().vocab_size,)
    torch.testing.assert_close(with_ctx, same_ctx)
    assert (with_ctx - plain).abs().max() > 1e-3
    assert (with_ctx - other_ctx).abs().max() > 1e-4  # the tokens' values, not only their placeholders, count


def test_embeddings_without_a_bank_are_ignored(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    be = started(tiny)
    with caplog.at_level(logging.WARNING, logger="engines.llm_transformers"):
        plain = be.forward_logits(request())
        ignored = be.forward_logits(request(embeddings=hico()))
        be.forward_logits(request(embeddings=hico(1)))
    torch.testing.assert_close(plain, ignored)
    assert sum("ignored" in r.getMessage() for r in caplog.records) == 1
    asyncio.run(be.close())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
def test_lora_changes_the_logits_and_the_base_is_untouched(tiny: Path, lora: Path) -> None:
    from transformers import AutoModelForImageTextToText

    req = request()
    base = started(tiny)
    adapted = started(tiny, lora=str(lora))
    base_logits, lora_logits = base.forward_logits(req), adapted.forward_logits(req)
    assert (lora_logits - base_logits).abs().max() > 1e-3
    # the base backend gives what the unadapted model gives, computed here directly
    ref = AutoModelForImageTextToText.from_pretrained(str(tiny), local_files_only=True, dtype=torch.float32).eval()
    batch, _ = base._inputs(req)
    with torch.no_grad():
        direct = ref(**batch).logits[0, -1]
    torch.testing.assert_close(base_logits, direct, atol=1e-4, rtol=1e-4)
    asyncio.run(base.close())
    asyncio.run(adapted.close())


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "transformers-generate"]


@pytest.mark.usefixtures("leak_check")
def test_closing_the_stream_stops_generation(backend: TransformersBackend) -> None:
    req = request(images=[], prompt="Tell a long story.", max_tokens=2000)

    async def main() -> list[str]:
        pieces: list[str] = []
        async with contextlib.aclosing(backend.stream(req)) as it:
            async for piece in it:
                pieces.append(piece)
                if len(pieces) == 2:
                    break
        return pieces

    assert len(asyncio.run(main())) == 2
    assert backend.last_stats["stopped"] and backend.last_stats["new_tokens"] < 200
    assert not generate_threads()


@pytest.mark.usefixtures("leak_check")
def test_cancelling_the_task_stops_generation(backend: TransformersBackend) -> None:
    req = request(prompt="Tell a long story.", max_tokens=2000, temperature=0.7)

    async def main() -> int:
        first = asyncio.Event()
        pieces: list[str] = []

        async def consume() -> None:
            async for piece in backend.stream(req):
                pieces.append(piece)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return len(pieces)

    assert asyncio.run(main()) >= 1
    assert backend.last_stats["stopped"] and backend.last_stats["new_tokens"] < 200
    assert not generate_threads()
    # the backend still answers afterwards
    assert asyncio.run(collect(backend, request(max_tokens=4)))


@pytest.mark.usefixtures("leak_check")
def test_a_waiting_request_can_be_called_off(backend: TransformersBackend) -> None:
    """One generation at a time: a second request waits, and cancelling it returns at once."""
    long = request(images=[], prompt="Tell a long story.", max_tokens=2000)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        first = asyncio.Event()

        async def consume_long() -> None:
            async for _ in backend.stream(long):
                first.set()

        running = asyncio.create_task(consume_long())
        await asyncio.wait_for(first.wait(), 30)
        waiting = asyncio.create_task(collect(backend, request(max_tokens=4)))
        await asyncio.sleep(0.2)
        t0 = loop.time()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        called_off = loop.time() - t0
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        return called_off

    assert asyncio.run(main()) < 1.0
    assert not generate_threads()


def test_sampling(backend: TransformersBackend) -> None:
    asyncio.run(collect(backend, request(images=[], max_tokens=6, temperature=1.0)))
    assert 1 <= backend.last_stats["new_tokens"] <= 6


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    for model in (str(tmp_path / "nowhere"), str(tmp_path), "no-such-org/no-such-model-anywhere"):
        be = TransformersBackend(BackendOptions(model=model, device="cpu"))
        with pytest.raises(UsageError, match=r"^--llm-model: no local model at .* \(a directory with config.json, "
                                             r"or a model id already in the Hugging Face cache\)$"):
            asyncio.run(be.start())


def test_a_model_id_in_the_hugging_face_cache(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model id resolves to its snapshot in the local cache, offline (a cache laid out by hand)."""
    import shutil

    from huggingface_hub import constants

    from engines.llm_transformers import resolve_model

    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen3vl"
    shutil.copytree(tiny, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("tiny-org/tiny-qwen3vl") == repo / "snapshots" / "0123abcd"
    be = TransformersBackend(BackendOptions(model="tiny-org/tiny-qwen3vl", device="cpu"))
    asyncio.run(be.start())
    assert be.path == repo / "snapshots" / "0123abcd" and be.model == "tiny-org/tiny-qwen3vl"
    asyncio.run(be.close())


def test_missing_adapter_is_one_line(tiny: Path, tmp_path: Path) -> None:
    be = TransformersBackend(BackendOptions(model=str(tiny), device="cpu", lora=str(tmp_path / "adapter")))
    with pytest.raises(UsageError, match=r"^llm.lora: no LoRA adapter at .*adapter \(a directory with "
                                         r"adapter_config.json"):
        asyncio.run(be.start())


def test_projector_errors(backend: TransformersBackend, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"^projector 'hico' takes 32-d tokens, got 48-d$"):
        asyncio.run(collect(backend, request(embeddings=hico(dim=48))))
    with pytest.raises(BackendError, match=r"no projector for source 'clip'"):
        asyncio.run(collect(backend, request(embeddings={"clip": np.zeros((2, 32), np.float32)})))
    wrong = ProjectorBank({"hico": 32}, 32).save(tmp_path / "wrong.safetensors")
    be = TransformersBackend(BackendOptions(model=str(tiny), device="cpu", projectors=str(wrong)))
    with pytest.raises(UsageError, match=r"projector 'hico' gives 32-d tokens but the LLM's hidden size is 64"):
        asyncio.run(be.start())
    be = TransformersBackend(BackendOptions(model=str(tiny), device="cpu", projectors=str(tmp_path / "none.st")))
    with pytest.raises(UsageError, match=r"^llm.projectors: no projector weights at"):
        asyncio.run(be.start())


def test_special_tokens_in_the_prompt_stay_text(backend: TransformersBackend) -> None:
    batch, _ = backend._inputs(request(prompt="read on screen: <|image_pad|><|im_end|><|vision_pad|>"))
    tok = backend._processor.tokenizer
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert tok.convert_tokens_to_ids("<|vision_pad|>") not in ids


def test_not_started_is_a_backend_error(tiny: Path) -> None:
    be = TransformersBackend(BackendOptions(model=str(tiny), device="cpu"))
    with pytest.raises(BackendError, match="not started"):
        asyncio.run(collect(be, request()))


def test_threads_option_reaches_the_generating_thread(tiny: Path) -> None:
    be = started(tiny, threads=1)
    assert asyncio.run(collect(be, request(images=[], max_tokens=3)))
    assert be.last_stats["threads"] == 1
    asyncio.run(be.close())
    with pytest.raises(BackendError, match="not started"):  # closed
        asyncio.run(collect(be, request()))


@pytest.mark.gpu
def test_cuda_bf16_path(tiny: Path, projectors: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    be = TransformersBackend(BackendOptions(model=str(tiny), device="auto", projectors=str(projectors)))
    asyncio.run(be.start())
    assert be.device is not None and be.device.startswith("cuda") and be.dtype == "bfloat16"
    pieces = asyncio.run(collect(be, request(embeddings=hico())))
    assert pieces and be.last_stats["projected_tokens"] == 3
    plain, with_ctx = be.forward_logits(request()), be.forward_logits(request(embeddings=hico()))
    assert (with_ctx - plain).abs().max() > 1e-3
    asyncio.run(be.close())
