"""Domain embeddings: contrastive fine-tuning (InfoNCE over in-batch and mined hard negatives).

A batch holds B query groups. Its tensors: `q_*` for the B queries, `p_*` for their B positives
followed by every hard negative of the batch. The sampler never puts the same text twice in one
batch, so no in-batch "negative" is secretly a positive. `--cached` (GradCache) computes the same
loss and gradients in mini-batches, so a batch of thousands fits in little memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qtune.losses import matryoshka_info_nce
from qtune.modeling.embedding import forward_embeddings
from qtune.modeling.packing import is_packed, pack_or_pad, split_packed
from qtune.records import QueryGroup


@dataclass(frozen=True)
class ContrastiveSettings:
    pooling: str
    temperature: float = 0.05
    false_negative_offset: float | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    mini_batch_size: int = 32  # GradCache chunk size


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


def _loss_from_vectors(q, p, settings: ContrastiveSettings):
    return matryoshka_info_nce(q, p, list(settings.matryoshka_dims or ()), settings.temperature,
                               settings.false_negative_offset)


def loss(model, batch: dict, settings: ContrastiveSettings):
    q = forward_embeddings(model, batch, settings.pooling, "q_")  # (B, dim)
    p = forward_embeddings(model, batch, settings.pooling, "p_")  # (B + negatives, dim)
    return _loss_from_vectors(q, p, settings)


def _chunks(batch: dict, prefix: str, size: int) -> list[dict]:
    """Row slices of one side of the batch, each cut down to its own padded width (or re-packed)."""
    side = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    if is_packed(side):
        return split_packed(side, size)
    rows = side["attention_mask"].shape[0]
    chunks = []
    for start in range(0, rows, size):
        part = {k: v[start:start + size] for k, v in side.items()}
        keep = part["attention_mask"].any(dim=0)  # columns some row of this chunk uses
        chunks.append({k: v[:, keep] for k, v in part.items()})
    return chunks


def _rng_state(device):
    import torch

    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(model, batch: dict, settings: ContrastiveSettings, scale: float = 1.0):
    """GradCache: the full-batch loss's gradients, computed `mini_batch_size` rows at a time.

    1. embed every chunk without a graph (remembering the RNG state, so dropout repeats);
    2. the loss over all vectors, backpropagated to the vectors only;
    3. re-embed each chunk with a graph and push the cached vector gradients through it.
    Returns the (detached) loss.
    """
    import torch

    device = next(model.parameters()).device
    sides = {prefix: _chunks(batch, prefix, settings.mini_batch_size) for prefix in ("q_", "p_")}
    states, vectors = {}, {}
    with torch.no_grad():
        for prefix, chunks in sides.items():
            states[prefix], parts = [], []
            for chunk in chunks:
                states[prefix].append(_rng_state(device))
                parts.append(forward_embeddings(model, chunk, settings.pooling))
            vectors[prefix] = torch.cat(parts).requires_grad_(True)  # (rows, dim)
    value = _loss_from_vectors(vectors["q_"], vectors["p_"], settings)
    (value * scale).backward()
    after = _rng_state(device)
    for prefix, chunks in sides.items():
        grads = vectors[prefix].grad.split(settings.mini_batch_size)
        for chunk, state, grad in zip(chunks, states[prefix], grads):
            _set_rng_state(state, device)
            forward_embeddings(model, chunk, settings.pooling).backward(grad)
    _set_rng_state(after, device)
    return value.detach()
