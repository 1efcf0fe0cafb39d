"""Domain embeddings: contrastive fine-tuning (InfoNCE over in-batch and mined hard negatives).

A batch holds B query groups. Its tensors: `q_*` for the B queries, `p_*` for their B positives
followed by every hard negative of the batch. The sampler never puts the same text twice in one
batch, so no in-batch "negative" is secretly a positive. `--cached` (GradCache) computes the same
loss and gradients in mini-batches, so a batch of thousands fits in little memory.

The contrastive term is InfoNCE, its `--symmetric` form (also passage -> query) or GTE's
`--improved-contrastive` loss. `--distill` adds `--distill-weight` times the KL divergence between
the teacher's softmax over each group's own candidates (its positive and hard negatives, teacher
scores from the data) and the student's (similarities / --temperature); `--distill-only` keeps
that term alone. All of it is a function of the vectors, so GradCache backpropagates it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtune.losses import (distillation_kl, group_similarities, improved_contrastive, info_nce, matryoshka_mean,
                          symmetric_info_nce)
from qtune.modeling.packing import is_packed, split_packed
from qtune.tasks.embedding.model import forward_embeddings

# Batch keys the loss reads besides the `q_` and `p_` model inputs.
CANDIDATE_OWNER = "candidate_owner"  # (B + negatives,) the group each candidate belongs to
TEACHER_SCORES = "teacher_scores"  # (B, 1 + most negatives) teacher score of each group's candidates
TEACHER_INDEX = "teacher_index"  # (B, 1 + most negatives) the candidate row each teacher score is for
TEACHER_PADDING = "teacher_padding"  # (B, 1 + most negatives) True where a group has no candidate


@dataclass(frozen=True)
class ContrastiveSettings:
    pooling: str
    temperature: float = 0.05
    false_negative_offset: float | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    mini_batch_size: int = 32  # GradCache chunk size
    symmetric: bool = False
    improved_contrastive: bool = False
    distill_weight: float | None = None  # None: no distillation
    distill_only: bool = False
    distill_temperature: float = 1.0


def _contrastive(q, p, settings: ContrastiveSettings, batch: dict):
    if settings.improved_contrastive:
        return improved_contrastive(q, p, settings.temperature, settings.false_negative_offset,
                                    batch.get(CANDIDATE_OWNER))
    if settings.symmetric:
        return symmetric_info_nce(q, p, settings.temperature, settings.false_negative_offset)
    return info_nce(q, p, settings.temperature, settings.false_negative_offset)


def _loss_from_vectors(q, p, settings: ContrastiveSettings, batch: dict):
    """The loss of query vectors q (B, dim) and candidate vectors p (B + negatives, dim)."""
    def one(q, p):
        total = 0.0 if settings.distill_only else _contrastive(q, p, settings, batch)
        if settings.distill_weight is not None:
            student = group_similarities(q, p, batch[TEACHER_INDEX])  # (B, 1 + most negatives)
            total = total + settings.distill_weight * distillation_kl(
                student, batch[TEACHER_SCORES], settings.temperature, settings.distill_temperature,
                batch[TEACHER_PADDING])
        return total

    return matryoshka_mean(one, q, p, list(settings.matryoshka_dims or ()))


def loss(model, batch: dict, settings: ContrastiveSettings):
    q = forward_embeddings(model, batch, settings.pooling, "q_")  # (B, dim)
    p = forward_embeddings(model, batch, settings.pooling, "p_")  # (B + negatives, dim)
    return _loss_from_vectors(q, p, settings, batch)


def with_teacher_scores(features: list[dict], teacher: list[tuple[tuple[float, ...], tuple[float, ...]]]) -> list[dict]:
    """Features (from `group_features`) carrying the teacher's scores of their own candidates:
    the first positive's, then those of the negatives the feature holds; `teacher` is
    (pos_scores, neg_scores) per group, in the same order."""
    return [{**f, "teacher": [pos[0], *neg[:len(f["negatives"])]]} for f, (pos, neg) in zip(features, teacher)]


def loss_inputs(features: list[dict]) -> dict:
    """What the loss reads besides the model inputs, laid out as `encode.collate` lays out the
    candidates (the B positives, then each group's negatives in turn)."""
    import torch

    batch = len(features)
    owner = list(range(batch)) + [i for i, f in enumerate(features) for _ in f["negatives"]]
    out = {CANDIDATE_OWNER: torch.tensor(owner, dtype=torch.long)}
    if features and "teacher" in features[0]:
        width = 1 + max(len(f["negatives"]) for f in features)
        scores = torch.zeros(batch, width)
        index = torch.zeros(batch, width, dtype=torch.long)
        padding = torch.ones(batch, width, dtype=torch.bool)
        start = batch
        for i, f in enumerate(features):
            count = len(f["negatives"])
            scores[i, :1 + count] = torch.tensor(f["teacher"], dtype=torch.float32)
            index[i, 0] = i
            index[i, 1:1 + count] = torch.arange(start, start + count)
            padding[i, :1 + count] = False
            start += count
        out.update({TEACHER_SCORES: scores, TEACHER_INDEX: index, TEACHER_PADDING: padding})
    return out


def collate_for_loss(collate, features: list[dict]) -> dict:
    """`collate(features)` plus the `loss_inputs` of the batch."""
    return {**collate(features), **loss_inputs(features)}


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
    value = _loss_from_vectors(vectors["q_"], vectors["p_"], settings, batch)
    (value * scale).backward()
    after = _rng_state(device)
    for prefix, chunks in sides.items():
        grads = vectors[prefix].grad.split(settings.mini_batch_size)
        for chunk, state, grad in zip(chunks, states[prefix], grads):
            _set_rng_state(state, device)
            forward_embeddings(model, chunk, settings.pooling).backward(grad)
    _set_rng_state(after, device)
    return value.detach()
