"""Texts to vectors, exactly as each model family was trained to do it.

- Qwen3-Embedding (decoders): `<|endoftext|>` appended to every text, padding on the LEFT, the
  last token's hidden state; queries read `Instruct: {task}\\nQuery:{query}` (no space after
  `Query:`), documents carry no instruction.
- BERT-family encoders: right padding, pooling from the model's own sentence-transformers config
  (`1_Pooling/config.json`: mean for MiniLM) or the [CLS] token (bge) when there is none.
- Always L2-normalised; Matryoshka `dimensions` truncate first, then normalise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qtune.modeling.family import Family
from qtune.modeling.packing import pack_or_pad
from qtune.records import QueryGroup

QWEN3_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def default_query_instruction(family: Family) -> str | None:
    return QWEN3_QUERY_INSTRUCTION if family.is_decoder else None


def format_text(text: str, *, is_query: bool, instruction: str | None, is_decoder: bool) -> str:
    if not is_query or not instruction:
        return text
    if is_decoder:
        return f"Instruct: {instruction}\nQuery:{text}"
    return f"{instruction}{text}"


def end_token_id(tokenizer) -> int | None:
    """The token a decoder embedder reads its vector from: `<|endoftext|>` for Qwen, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    return tokenizer.eos_token_id


def tokenize_texts(tokenizer, texts: Sequence[str], *, max_length: int, is_decoder: bool) -> list[dict]:
    """Unpadded features; decoders get the end token appended after truncation, so it is never cut."""
    if not texts:
        return []
    if not is_decoder:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    end = end_token_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)
    return [{"input_ids": ids + [end], "attention_mask": [1] * (len(ids) + 1)} for ids in enc["input_ids"]]


def group_features(groups: Sequence[QueryGroup], embed_features, hard_negatives: int) -> list[dict]:
    """Tokenised query, first positive and up to `hard_negatives` negatives per group.

    `embed_features(texts, is_query)` is `Embedder.features`, so training sees texts exactly as
    inference does (instruction, end token, truncation).
    """
    queries = embed_features([g.query for g in groups], True)
    positives = embed_features([g.positives[0] for g in groups], False)
    negative_texts = [list(g.negatives[:hard_negatives]) for g in groups]
    flat = embed_features([t for texts in negative_texts for t in texts], False)
    features, start = [], 0
    for g, q, p, texts in zip(groups, queries, positives, negative_texts):
        features.append({"query": q, "positive": p, "negatives": flat[start:start + len(texts)],
                         "texts": frozenset([g.query, g.positives[0], *texts])})
        start += len(texts)
    return features


def unique_text_batches(features: Sequence[dict], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Seeded batches in which no text (query, positive or negative) occurs twice.

    Groups that clash with the batch being filled wait for a later batch, so every group is
    used once per epoch; only the last batches may be smaller.
    """
    rng = np.random.default_rng([seed, epoch])
    pending = rng.permutation(len(features)).tolist()
    batches = []
    while pending:
        batch, seen, rest = [], set(), []
        for i in pending:
            texts = features[i]["texts"]
            if len(batch) < batch_size and seen.isdisjoint(texts):
                batch.append(i)
                seen |= texts
            else:
                rest.append(i)
        batches.append(batch)
        pending = rest
    return batches


def collate(tokenizer, features: Sequence[dict], packed=False) -> dict:
    """Queries and candidates (positives first, then all hard negatives), each side padded or
    packed (`packed`: True/False or a policy, see `qtune.modeling.packing.wants_packing`)."""
    candidates = [f["positive"] for f in features] + [n for f in features for n in f["negatives"]]
    sides = {"q_": [f["query"] for f in features], "p_": candidates}
    return {prefix + k: v for prefix, rows in sides.items() for k, v in pack_or_pad(tokenizer, rows, packed).items()}
