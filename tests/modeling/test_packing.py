"""Packed (padding-free) batches give the padded results: outputs, losses and gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qtune
from qtune.errors import QtuneError
from qtune.modeling import packing
from qtune.data.batching import sorted_batches
from qtune.modeling.loading import LoraSettings
from qtune.tasks import load_model
from qtune.records import ExtractionExample, QueryGroup

from support import synthetic_pairs

NO_DROPOUT = LoraSettings(r=4, alpha=8, dropout=0.0)  # both paths see the same network
TEXTS = ["the cat", "a much longer sentence about my old red bus that is here now", "x",
         "the tiger is there", "my plane"]


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    value = loss_fn(model, batch)
    value.backward()
    return value.item(), _grads(model)


def _assert_same_training_signal(model, loss_fn, padded, packed):
    padded_loss, padded_grads = _loss_and_grads(model, loss_fn, padded)
    packed_loss, packed_grads = _loss_and_grads(model, loss_fn, packed)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-6)
    assert max(g.abs().max().item() for g in padded_grads) > 1e-5  # the comparison is not of zeros
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the batch itself


def test_pack_lays_sequences_end_to_end_with_restarting_positions():
    batch = packing.pack([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]},
                          {"input_ids": [9, 10], "labels": [9, 10]}], labels_key="labels")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    # the first token of each sequence predicts nothing across the boundary
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 10]]
    assert packing.count_tokens(batch) == 6
    with pytest.raises(ValueError, match="empty"):
        packing.pack([{"input_ids": []}])


def test_split_packed_keeps_each_sequence_whole():
    batch = packing.pack([{"input_ids": list(range(n))} for n in (3, 1, 4, 2, 5)])
    parts = packing.split_packed(batch, 2)
    assert [p["cu_seq_lens_q"].tolist() for p in parts] == [[0, 3, 4], [0, 4, 6], [0, 5]]
    assert [p["max_length_q"] for p in parts] == [3, 4, 5]
    assert torch.cat([p["input_ids"] for p in parts], dim=1).tolist() == batch["input_ids"].tolist()
    assert torch.cat([p["position_ids"] for p in parts], dim=1).tolist() == batch["position_ids"].tolist()


def test_sorted_batches_respect_rows_and_the_token_budget():
    lengths = [100, 60, 50, 20, 20, 10, 5]  # longest first, as run_sorted orders them
    assert sorted_batches(lengths, 3) == [(0, 3), (3, 6), (6, 7)]
    # 120 padded tokens: one 100-row, then two rows of <= 60, then six rows of <= 20 (capped at batch_size 4)
    assert sorted_batches(lengths, 4, max_tokens=120) == [(0, 1), (1, 3), (3, 7)]
    assert sorted_batches([500, 4], 8, max_tokens=100) == [(0, 1), (1, 2)]  # too long still runs, alone
    with pytest.raises(ValueError):
        sorted_batches(lengths, 0)


def test_pool_packed_matches_padded_pooling():
    from qtune.modeling.pooling import pool

    torch.manual_seed(0)
    lengths = [3, 1, 4]
    hidden = torch.randn(sum(lengths), 8)
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    padded = torch.zeros(3, 4, 8)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for i, (start, n) in enumerate(zip([0, 3, 4], lengths)):
        padded[i, :n] = hidden[start:start + n]
        mask[i, :n] = 1
    for mode in ("mean", "cls", "last"):
        torch.testing.assert_close(packing.pool_packed(hidden, cu, mode), pool(padded, mask, mode))


# ---------------------------------------------------------------- each task, packed vs padded


def test_embeddings_packed_equal_padded(tiny_qwen_dir):
    packed = qtune.load(tiny_qwen_dir, task="embedding", device="cpu")
    padded = qtune.load(tiny_qwen_dir, task="embedding", device="cpu", packing=False)
    assert packed.loaded.packed and not padded.loaded.packed
    assert packed.loaded.model.config._attn_implementation == packing.ATTENTION
    assert packed.loaded.packs(packed.features(TEXTS, True))  # lengths this mixed are packed, even on a CPU
    reference = padded.embed(TEXTS, is_query=True, batch_size=len(TEXTS))
    assert np.ptp(reference[:, 0]) > 1e-3  # the texts embed differently
    for options in ({"batch_size": len(TEXTS)}, {"batch_size": 2}, {"batch_size": 64, "max_tokens": 40}):
        np.testing.assert_allclose(packed.embed(TEXTS, is_query=True, **options), reference, atol=1e-5)
    np.testing.assert_allclose(packed.embed(TEXTS, dimensions=16), padded.embed(TEXTS, dimensions=16), atol=1e-5)


def test_pair_classification_packed_equals_padded(tiny_qwen_dir):
    from qtune.records import Pair
    from qtune.modeling.heads import class_loss, collate_labelled
    from qtune.tasks.pair_cls.encode import PairEncoder
    from qtune.tasks.pair_cls.model import PairClassifier

    loaded = load_model(tiny_qwen_dir, task="pair-cls", device="cpu", trainable=True, lora=NO_DROPOUT)
    loaded.model.eval()
    with torch.no_grad():  # a sharper head, so a wrong pooled row shows
        packing.head_model(loaded.model).score.modules_to_save["default"].weight.normal_(0.0, 3.0)
    encoder = PairEncoder(loaded.tokenizer, True, 32)
    features = encoder.encode_pairs([Pair(a, b, label) for a, b, label in synthetic_pairs(6, seed=3)])
    _assert_same_training_signal(loaded.model, class_loss, collate_labelled(loaded.tokenizer, features),
                                 collate_labelled(loaded.tokenizer, features, packed=True))
    probs = PairClassifier(loaded).predict_features(features, batch_size=4)
    loaded.packed = False
    np.testing.assert_allclose(probs, PairClassifier(loaded).predict_features(features, batch_size=4), atol=1e-5)


@pytest.mark.parametrize("model, pooling", [("tiny_qwen_dir", "last"), ("tiny_bert_dir", "mean")])
def test_contrastive_loss_and_gradcache_packed_equal_padded(request, model, pooling):
    """A decoder and a BERT encoder (which packs as an embedder, with token type 0)."""
    from qtune.tasks.embedding import encode
    from qtune.tasks.embedding import loss as contrastive
    from qtune.tasks.embedding.model import Embedder

    loaded = load_model(request.getfixturevalue(model), task="embedding", device="cpu", trainable=True,
                        lora=NO_DROPOUT)
    loaded.model.eval()
    groups = [QueryGroup(f"q {w}", (f"the {w} is here",), (f"a {w} there now", "my old bus"))
              for w in ["cat", "dog", "cow", "goat", "tiger"]]
    features = encode.group_features(groups, Embedder(loaded).features, hard_negatives=1)
    settings = contrastive.ContrastiveSettings(pooling=pooling, temperature=0.05, mini_batch_size=2)
    padded = encode.collate(loaded.tokenizer, features)
    packed = encode.collate(loaded.tokenizer, features, packed=True)
    assert packed["p_cu_seq_lens_q"].shape == (len(groups) * 2 + 1,)  # positives + one negative each
    loss = lambda model, batch: contrastive.loss(model, batch, settings)  # noqa: E731
    _assert_same_training_signal(loaded.model, loss, padded, packed)
    cached = lambda model, batch: contrastive.cached_backward(model, batch, settings)  # noqa: E731
    loaded.model.zero_grad(set_to_none=True)
    padded_loss = contrastive.loss(loaded.model, padded, settings)
    padded_loss.backward()
    reference = _grads(loaded.model)
    loaded.model.zero_grad(set_to_none=True)
    assert cached(loaded.model, packed).item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for a, b in zip(reference, _grads(loaded.model)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny_qwen_dir", "tiny_bert_dir"])
def test_reranker_group_loss_packed_equals_padded(request, model):
    """A yes/no decoder and a BERT cross-encoder (packed with each pair's token types, scored from
    its [CLS] row)."""
    from qtune.tasks.reranker import groups as task
    from qtune.tasks.reranker.model import Reranker

    loaded = load_model(request.getfixturevalue(model), task="reranker", device="cpu", trainable=True,
                        lora=NO_DROPOUT)
    loaded.model.eval()
    reranker = Reranker(loaded)
    groups = [QueryGroup("which animal", ("the cat is here",), ("my old bus", "a red car there now")),
              QueryGroup("a vehicle", ("the tram",), ("a small green cow",))]
    features, _ = task.group_features(groups, reranker.formatter.encode, group_size=3)
    loss = lambda model, batch: task.loss(model, batch, prompt=reranker.formatter.prompt, kind="listwise")  # noqa: E731
    _assert_same_training_signal(loaded.model, loss, task.collate(loaded.tokenizer, features),
                                 task.collate(loaded.tokenizer, features, packed=True))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_extraction_loss_packed_equals_padded(tiny_qwen_dir, checkpointing):
    from qtune.tasks.extraction import encode as task
    from qtune.tasks.extraction.model import loss as sft_loss

    loaded = load_model(tiny_qwen_dir, task="extract", device="cpu", trainable=True, lora=NO_DROPOUT)
    if checkpointing:  # recomputed blocks get the packing arguments again in the backward pass
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert packing.transformer_body(loaded.model).gradient_checkpointing
    loaded.model.train(checkpointing)  # checkpointing only acts in training mode; no dropout either way
    builder = task.PromptBuilder(loaded.tokenizer)
    features = [builder.encode(ExtractionExample(input=f"{name} phone {phone}", instruction="name and phone as JSON",
                                                 output=json.dumps({"name": name, "phone": phone})))
                for name, phone in [("张伟", "138"), ("Alice Smith", "555-0101"), ("Bob", "1")]]
    packed = task.collate(loaded.tokenizer, features, packed=True)
    answer_tokens = sum(sum(t != -100 for t in f["labels"]) for f in features)
    assert len(packed["answer_positions"]) == answer_tokens  # exactly the answer tokens are predicted
    _assert_same_training_signal(loaded.model, sft_loss, task.collate(loaded.tokenizer, features), packed)


def test_generation_is_unchanged_by_the_packing_attention(tiny_qwen_dir):
    """Generation runs padded (left padding, a KV cache) through the same attention function."""
    from qtune.tasks.extraction.model import generate

    prompts = [[9707, 11, 1879], [1, 2, 3, 4, 5, 6, 7], [42]]
    runs = {}
    for packed in (True, False):
        loaded = load_model(tiny_qwen_dir, task="extract", device="cpu", packing=packed)
        runs[packed] = [(g.text, g.tokens) for g in generate(loaded, prompts, batch_size=3, max_new_tokens=6)]
    assert runs[True] == runs[False]
    assert len({text for text, _ in runs[True]}) > 1


def test_packed_training_matches_padded_training(tiny_qwen_dir, synthetic_files, tmp_path, monkeypatch):
    from qtune.tasks import get
    from qtune.tasks.pair_cls.config import PairClsConfig

    monkeypatch.setattr(packing, "MIN_PADDING_WITHOUT_KERNEL", 0.0)  # pack every batch, even on a CPU
    packed_batches = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda rows, *a, **k: packed_batches.append(len(rows)) or real_pack(rows, *a, **k))
    results = {}
    for packed in (True, False):
        config = PairClsConfig(model=tiny_qwen_dir, train=str(synthetic_files["train"]), eval=str(synthetic_files["eval"]),
                               output=str(tmp_path / str(packed)), epochs=0.2, batch_size=16, lr=5e-3, max_length=32,
                               lora_dropout=0.0, device="cpu", packing=packed)
        before = len(packed_batches)
        loaded, results[packed] = get("pair-cls").train(config)
        assert loaded.packed is packed
        assert (len(packed_batches) > before) is packed  # the packed run really packed its batches
    assert results[True]["train"]["tokens"] == results[False]["train"]["tokens"] > 0
    for name in ("accuracy", "macro_f1", "eval_loss"):
        if name in results[False]["last"]:
            assert results[True]["last"][name] == pytest.approx(results[False]["last"][name], abs=1e-4)


# ---------------------------------------------------------------- the attention function


def test_packed_batches_need_the_packing_attention(tiny_qwen_dir):
    from qtune.tasks.embedding.model import forward_embeddings

    loaded = load_model(tiny_qwen_dir, task="embedding", device="cpu", packing=False)
    with pytest.raises(QtuneError, match="attn_implementation='qtune_varlen'"):
        forward_embeddings(loaded.model, packing.pack([{"input_ids": [1, 2]}]), "last")


def test_without_the_gpu_kernel_only_batches_with_enough_padding_are_packed(tiny_qwen_dir):
    loaded = load_model(tiny_qwen_dir, task="embedding", device="cpu")
    rows = lambda *lengths: [{"input_ids": [1] * n} for n in lengths]  # noqa: E731
    assert packing.padding_share([10, 5]) == 0.25 and packing.padding_share([]) == 0.0
    assert loaded.packs(rows(10, 5)) and not loaded.packs(rows(10, 10, 9)) and not loaded.packs([])
    assert packing.is_packed(loaded.collate(rows(10, 5))) and not packing.is_packed(loaded.collate(rows(10, 10, 9)))
    loaded.packed = False
    assert not loaded.packs(rows(10, 1))


def test_bert_embedders_pack_and_other_encoder_models_stay_padded(tiny_bert_dir, tmp_path):
    """A BERT embedder and cross-encoder pack (positions from 0); a BERT classifier reads its head
    from a padded batch, and an encoder whose positions do not start
    at 0 for every sequence (XLM-R counts from its padding id) stays padded."""
    assert load_model(tiny_bert_dir, task="embedding", device="cpu").packed
    assert not load_model(tiny_bert_dir, task="embedding", device="cpu", packing=False).packed
    assert load_model(tiny_bert_dir, task="reranker", device="cpu").packed  # a cross-encoder: its [CLS] rows
    for task in ("pair-cls", "classify"):
        assert not load_model(tiny_bert_dir, task=task, device="cpu").packed, task
    assert "xlm-roberta" not in packing.PACKED_ENCODERS and "bert" in packing.PACKED_ENCODERS


def test_bert_cross_encoder_scores_packed_equal_padded(tiny_bert_dir):
    reranker = qtune.load(tiny_bert_dir, task="reranker", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # a sharper new head, so a wrong row or segment shows
        packing.head_model(reranker.loaded.model).classifier.weight.normal_(0.0, 3.0)
    pairs = [(q, d) for q in ("the cat", "a long question about my old red bus") for d in TEXTS]
    features = reranker.features(pairs)
    assert reranker.loaded.packs(features)
    batch = reranker.loaded.collate(features)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and batch["token_type_ids"].max() == 1
    packed = [reranker.score(pairs, batch_size=size) for size in (len(pairs), 3)]
    reranker.loaded.packed = False
    reference = reranker.score(pairs, batch_size=len(pairs))
    assert np.ptp(reference) > 1e-4  # the pairs score differently (by more than the tolerance)
    for scores in packed:
        np.testing.assert_allclose(scores, reference, atol=1e-5)


def test_bert_embeddings_packed_equal_padded(tiny_bert_dir):
    packed = qtune.load(tiny_bert_dir, task="embedding", device="cpu")
    padded = qtune.load(tiny_bert_dir, task="embedding", device="cpu", packing=False)
    assert packed.loaded.packs(packed.features(TEXTS))
    reference = padded.embed(TEXTS, batch_size=len(TEXTS))
    assert np.ptp(reference[:, 0]) > 1e-3
    for options in ({"batch_size": len(TEXTS)}, {"batch_size": 2}):
        np.testing.assert_allclose(packed.embed(TEXTS, **options), reference, atol=1e-5)


@pytest.mark.parametrize("new_signature", [True, False])
def test_flash_kernel_gets_causality_scale_and_shared_heads_right(monkeypatch, new_signature):
    """The GPU kernel cannot run here: a reference kernel with either torch signature stands in
    (2.10: `is_causal` only; later: `window_size`, `scale`, `enable_gqa`)."""
    import torch.nn.functional as F

    calls = []

    def reference(q, k, v, cu_q, max_q, causal, scale=None, enable_gqa=False):
        calls.append((enable_gqa, causal, max_q, scale))
        if not enable_gqa:
            assert q.shape[1] == k.shape[1]  # without enable_gqa the shared heads arrive expanded
        return packing._repadded(q, k, v, cu_q, max_q, scale, causal, 0.0)

    if new_signature:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False, window_size=(-1, -1)):
            return reference(q, k, v, cu_q, max_q, window_size == (-1, 0), scale, enable_gqa)
    else:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
            return reference(q, k, v, cu_q, max_q, is_causal)
    params = frozenset(("scale", "enable_gqa", "window_size") if new_signature else ("is_causal",))
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: (kernel, params))
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    scale = 0.5 if new_signature else 8 ** -0.5  # the old kernel always uses 1/sqrt(head_dim)
    out = packing._flash_varlen(q, k, v, cu, 4, scale, causal=True)
    assert calls == [(new_signature, True, 4, scale if new_signature else None)]
    for start, end in [(0, 3), (3, 7)]:  # each sequence alone, causal, GQA by hand
        kk, vv = (t[start:end].repeat_interleave(2, dim=1).transpose(0, 1) for t in (k, v))
        expected = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), kk, vv, is_causal=True, scale=scale)
        torch.testing.assert_close(out[start:end], expected.transpose(0, 1))


def test_a_failing_flash_kernel_falls_back_to_padded_attention(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(packing, "_varlen_kernel", lambda: (broken, frozenset({"window_size", "scale"})))
    monkeypatch.setattr(packing, "_kernel_failed", [])
    monkeypatch.setattr(packing, "_flash_dtype", lambda q, dropout, scaling: torch.float32)  # as if on a GPU
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    with caplog.at_level("WARNING"):
        out, _ = packing.varlen_attention(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=cu, max_length_q=4)
    expected = packing._repadded(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, 4, 0.5, True, 0.0)
    torch.testing.assert_close(out[0], expected)
    assert "fall back to padded sdpa" in caplog.text and packing._kernel() is None  # not tried again


def test_length_buckets_keep_padding_within_the_slack():
    lengths = [500, 30, 40, 100, 90, 480, 8, 8]
    buckets = packing.length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert buckets[0] == [0, 5] and [6, 7] in buckets
    for bucket in buckets:
        top = max(lengths[i] for i in bucket)
        assert len(bucket) * top ** 2 <= packing.BUCKET_SLACK * sum(lengths[i] ** 2 for i in bucket)
    assert packing.length_buckets([7, 7, 7]) == [[0, 1, 2]]


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_in_length_buckets_equals_each_sequence_alone(causal):
    """Mixed lengths (several buckets, some of one length, one of a single sequence): values and
    gradients equal sdpa run on each sequence by itself, with shared key/value heads."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    lengths = [9, 1, 5, 5, 2, 30]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    n = int(cu[-1])
    q = torch.randn(n, 4, 8, requires_grad=True)
    k, v = (torch.randn(n, 2, 8, requires_grad=True) for _ in range(2))
    assert len(packing.length_buckets(lengths)) > 2
    out = packing._repadded(q, k, v, cu, max(lengths), 0.3, causal, 0.0)
    expected = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (t[start:end].repeat_interleave(2, dim=1).transpose(0, 1) for t in (k, v))
        expected.append(F.scaled_dot_product_attention(q[start:end].transpose(0, 1), kk, vv, is_causal=causal,
                                                       scale=0.3).transpose(0, 1))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
