"""Feed-forward blocks with the activation fused into the first linear layer (CPU inference): the
same outputs as the plain blocks, taken only where nothing but speed can change."""

from __future__ import annotations

import pytest
import torch

from qtune.modeling import cpu_fusion
from qtune.tasks import load_model

pytestmark = pytest.mark.skipif(not cpu_fusion.fused_linear_available(), reason="torch built without oneDNN")


def _blocks(model):
    return [m for m in model.modules() if hasattr(m, "_qtune_unfused_forward")]


@pytest.fixture
def calls(monkeypatch):
    """How often oneDNN's fused linear runs."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    class Counting:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: seen.append(a[3]) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(torch.ops, "mkldnn", Counting(), raising=False)
    return seen


def test_bert_intermediate_fused_with_identical_outputs(tiny_bert_dir, calls):
    loaded = load_model(tiny_bert_dir, task="embedding", device="cpu")
    blocks = _blocks(loaded.model)
    assert len(blocks) == 2  # one per layer of the tiny BERT
    x = torch.randn(1, 7, 32)
    with loaded.inference():
        fused = [b(x) for b in blocks]
        plain = [b._qtune_unfused_forward(x) for b in blocks]
    assert calls == ["gelu", "gelu"]
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    # the whole model: the same embeddings as with every block's own forward
    from qtune.tasks.embedding.model import Embedder

    texts = ["the cat", "a much longer sentence about my old red bus", "x"]
    fused_vectors = Embedder(loaded).embed(texts)
    assert len(calls) >= 4  # and the two layers again for each batch of the texts
    for block in blocks:
        block.forward = block._qtune_unfused_forward
    plain_vectors = Embedder(loaded).embed(texts)
    assert abs(fused_vectors - plain_vectors).max() < 1e-6


def test_qwen_gated_block_fused_within_float_rounding(tiny_qwen_dir, calls):
    loaded = load_model(tiny_qwen_dir, task="embedding", device="cpu")
    blocks = _blocks(loaded.model)
    assert blocks and all(hasattr(b, "gate_proj") for b in blocks)
    hidden = blocks[0].gate_proj.in_features
    x = torch.randn(1, 5, hidden)
    with loaded.inference():
        fused, plain = blocks[0](x), blocks[0]._qtune_unfused_forward(x)
    assert calls == ["swish"]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_plain_path_while_training_or_recording_gradients(tiny_bert_dir, calls):
    loaded = load_model(tiny_bert_dir, task="embedding", device="cpu")
    block = _blocks(loaded.model)[0]
    x = torch.randn(1, 3, 32)
    block.train()
    with torch.no_grad():
        block(x)  # training mode (dropout may act): the block's own forward
    block.eval()
    y = block(x)  # gradients recorded: the plain operations autograd knows
    assert calls == []
    assert y.requires_grad


def test_lora_wrapped_blocks_are_left_alone(tiny_qwen_dir):
    from qtune.modeling.loading import LoraSettings

    loaded = load_model(tiny_qwen_dir, task="embedding", device="cpu",
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0, targets=["gate_proj", "up_proj"]))
    assert _blocks(loaded.model) == []
    assert cpu_fusion.fuse_feed_forward(loaded.model) == 0


def test_idempotent(tiny_bert_dir):
    loaded = load_model(tiny_bert_dir, task="embedding", device="cpu")
    assert cpu_fusion.fuse_feed_forward(loaded.model) == 0  # load already fused both blocks
    assert len(_blocks(loaded.model)) == 2
