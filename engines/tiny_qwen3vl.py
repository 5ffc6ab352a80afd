"""A tiny random Qwen3-VL, built in a few seconds without a download.

It exists to prove the transformers path (processor, chat template, images, projected tokens,
LoRA, streaming) end to end on a CPU: its weights are random, so what it generates is
gibberish.  Everything that shows it (tests, ``bench reasoner``) labels it a *tiny random
model*.

:func:`build_tiny_qwen3vl` writes a directory that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load offline: a Qwen3VLConfig with two text layers (hidden 64) and a
two-block vision tower with 8-pixel patches, a byte-level BPE tokenizer trained here on a short
built-in text plus the Qwen special tokens, a chat template, and image and video processors
sized for small images.  The same seed gives the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

TINY_LABEL = "tiny random Qwen3-VL (random weights: its output is gibberish)"

# Qwen's special tokens, in the order they get ids after the trained vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template: ChatML turns; an image item becomes <|vision_start|><|image_pad|><|vision_end|>,
# which the processor expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_TEXT = """\
You are a game copilot. Watch the screen, read the HUD and speak up only when it matters.
The player lost a life: the ball went past the paddle on the left side of the screen.
Score 120, lives 2, level 3. The enemy is charging from the right; jump over it and keep moving.
Answer with one JSON object: {"game_state": "...", "analysis": "...", "advice": "..."}.
{"game_state": "health is low and the boss is at half health", "analysis": "the last hit came
from the fire attack you walked into", "advice": "back off, heal, then strike after its swing"}
What just happened and why? The timer is running out; grab the key before the door closes.
Keep the paddle under the ball, aim for the gap in the bricks, and save the bomb for the boss.
"""

SEED = 0
NUM_MERGES = 300


def _train_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (Qwen's pre-tokenizer) trained on :data:`_TEXT`: (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + NUM_MERGES, initial_alphabet=alphabet, min_frequency=1, show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [(m.split(" ", 1)[0], m.split(" ", 1)[1]) if isinstance(m, str) else (m[0], m[1])
              for m in model["merges"]]
    return {str(k): int(v) for k, v in model["vocab"].items()}, merges


def _config(vocab_size: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen3VLConfig

    head_dim = 16
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        # M-RoPE: (temporal, height, width) sections over head_dim / 2 rotary frequencies
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True},
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,  # an 8x8 learned grid, resampled to each image's grid
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_qwen3vl(out_dir: str | os.PathLike[str], seed: int = SEED) -> Path:
    """Write a tiny random Qwen3-VL (model, tokenizer, processor) into ``out_dir``; return it."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = _train_tokenizer()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=cast(Any, merges), model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: int(cast(int, tokenizer.convert_tokens_to_ids(t))) for t in SPECIAL_TOKENS}
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"

    vocab_size = len(tokenizer)
    config = _config(vocab_size, ids)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None

    factor = 8 * 2  # patch_size * merge_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=8, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 2 * factor * factor, "longest_edge": 16 * factor * factor},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=8, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 32 * factor * factor},
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (out / "README.md").write_text(f"# {TINY_LABEL}\n\nBuilt by engines/tiny_qwen3vl.py (seed {seed}); "
                                   "it proves the transformers path only.\n")
    return out
