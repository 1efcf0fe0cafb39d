"""Embedding models: text format per family, padding invariance, Matryoshka, GradCache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from embedding_cases import assert_gradcache_matches_plain

from qtune.modeling.loading import LoraSettings
from qtune.tasks import load_model
from qtune.tasks.embedding.encode import QWEN3_QUERY_INSTRUCTION
from qtune.tasks.embedding.model import Embedder

TEXTS = ["the cat", "a very big old dog is here now", "my bus", "the small green plane is there", "cow"]


def _embedder(folder, **kwargs) -> Embedder:
    torch.manual_seed(0)
    return Embedder(load_model(folder, task="embedding", device="cpu", **kwargs))


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_a_text_alone_and_inside_a_padded_batch_embed_the_same(family, tiny_bert_dir, tiny_qwen_dir):
    embedder = _embedder(tiny_bert_dir if family == "bert" else tiny_qwen_dir)
    batch = embedder.embed(TEXTS, batch_size=len(TEXTS))
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embedder.embed([text])[0], batch[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    assert batch.dtype == np.float32 and batch.shape == (len(TEXTS), 32)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # not a constant model


def test_qwen_texts_carry_instruction_end_token_and_left_padding(tiny_qwen_dir):
    embedder = _embedder(tiny_qwen_dir)
    tok = embedder.loaded.tokenizer
    assert embedder.loaded.meta.settings.pooling == "last"
    assert tok.padding_side == "left"
    query = embedder.features(["what is a cat"], is_query=True)[0]["input_ids"]
    doc = embedder.features(["a cat is an animal"], is_query=False)[0]["input_ids"]
    assert tok.decode(query) == f"Instruct: {QWEN3_QUERY_INSTRUCTION}\nQuery:what is a cat<|endoftext|>"
    assert tok.decode(doc) == "a cat is an animal<|endoftext|>"
    # truncation keeps the end token
    long = embedder.features(["cat " * 1000], is_query=False)[0]["input_ids"]
    assert len(long) == embedder.loaded.meta.max_length and long[-1] == tok.convert_tokens_to_ids("<|endoftext|>")


def test_bert_pooling_comes_from_the_sentence_transformers_config(tiny_bert_dir, tmp_path):
    import shutil

    assert _embedder(tiny_bert_dir).loaded.meta.settings.pooling == "cls"  # no pooling config: [CLS], as bge
    folder = tmp_path / "mean-model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                  "pooling_mode_cls_token": False}))
    embedder = _embedder(str(folder))
    assert embedder.loaded.meta.settings.pooling == "mean"
    assert embedder.loaded.tokenizer.padding_side == "right"
    # mean pooling by hand over the last hidden states
    enc = embedder.loaded.tokenizer(["the cat is here"], return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.loaded.model(**enc).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    np.testing.assert_allclose(embedder.embed(["the cat is here"])[0], expected, atol=1e-5)


def test_matryoshka_truncates_then_normalises(tiny_qwen_dir):
    embedder = _embedder(tiny_qwen_dir)
    full = embedder.embed(TEXTS)
    short = embedder.embed(TEXTS, dimensions=8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    with pytest.raises(ValueError, match="dimensions must be between 1 and 32"):
        embedder.embed(TEXTS, dimensions=64)


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_gradcache_gives_the_gradients_of_the_plain_loss(family, tiny_bert_dir, tiny_qwen_dir):
    from qtune.records import QueryGroup
    from qtune.tasks.embedding import encode, loss as contrastive

    folder = tiny_bert_dir if family == "bert" else tiny_qwen_dir
    loaded = load_model(folder, task="embedding", device="cpu", trainable=True,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    loaded.model.eval()  # no dropout: both paths see the same network
    embedder = Embedder(loaded)
    groups = [QueryGroup(f"q {w}", (f"the {w} is here",), (f"a {w} there now", "my old bus"))
              for w in ["cat", "dog", "cow", "goat", "tiger", "horse", "mouse"]]
    features = encode.group_features(groups, embedder.features, hard_negatives=1)
    batch = encode.collate(loaded.tokenizer, features)
    settings = contrastive.ContrastiveSettings(pooling=loaded.meta.settings.pooling, temperature=0.05, mini_batch_size=3,
                                        matryoshka_dims=(16,))
    assert_gradcache_matches_plain(loaded.model, batch, settings)


def test_batches_never_repeat_a_text_and_use_every_group():
    from qtune.tasks.embedding.encode import unique_text_batches

    # groups 0 and 1 share a positive, 2 has 0's query as a negative: they must not meet
    texts = [{"q0", "shared"}, {"q1", "shared"}, {"q2", "p2", "q0"}, {"q3", "p3"}, {"q4", "p4"}, {"q5", "p5"}]
    features = [{"texts": frozenset(t)} for t in texts]
    for epoch in range(5):
        batches = unique_text_batches(features, 3, seed=1, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(6))
        for b in batches:
            assert len(b) <= 3
            seen = [t for i in b for t in texts[i]]
            assert len(seen) == len(set(seen))
    assert unique_text_batches(features, 3, seed=1, epoch=0) == unique_text_batches(features, 3, seed=1, epoch=0)
    assert unique_text_batches(features, 3, seed=1, epoch=0) != unique_text_batches(features, 3, seed=1, epoch=1)
