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

`--cross-device-negatives` (several processes): every rank gathers every rank's vectors and
computes the loss of the whole global batch, laid out as one process would lay it out (all
positives, then each group's negatives in turn); the false-negative mask and the teacher scores
follow the rows. Every rank then holds the same loss; its gradient reaches the rank's own vectors,
scaled so that DDP's average of the ranks' gradients is that loss's gradient
(`qtune.distributed.gather_rows`).
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
    cross_device: bool = False  # gather every rank's vectors: the loss of the global batch


def _contrastive(q, p, settings: ContrastiveSettings, batch: dict):
    if settings.improved_contrastive:
        return improved_contrastive(q, p, settings.temperature, settings.false_negative_offset,
                                    batch.get(CANDIDATE_OWNER))
    if settings.symmetric:
        return symmetric_info_nce(q, p, settings.temperature, settings.false_negative_offset)
    return info_nce(q, p, settings.temperature, settings.false_negative_offset)


def global_batch(q, p, batch: dict):
    """Every rank's query vectors (B_r, dim) and candidates (B_r + negatives_r, dim) gathered into the
    global batch's, laid out as one process lays out a batch of all the groups: the queries in rank
    order, all positives, then all negatives; the batch keys the loss reads re-indexed to match."""
    import torch

    from qtune.distributed import all_gather_objects, gather_rows

    queries, query_counts = gather_rows(q)
    local = q.shape[0]
    positives, _ = gather_rows(p[:local])
    negatives, negative_counts = gather_rows(p[local:])
    rank = torch.distributed.get_rank()
    query_start = sum(query_counts[:rank])
    negative_start = sum(negative_counts[:rank])
    total_queries = sum(query_counts)

    def global_rows(rows):  # local candidate row -> global candidate row
        return torch.where(rows < local, rows + query_start, rows - local + total_queries + negative_start)

    out = {}
    if CANDIDATE_OWNER in batch:
        owners = all_gather_objects(batch[CANDIDATE_OWNER].cpu())
        starts = [sum(query_counts[:r]) for r in range(len(owners))]
        device = batch[CANDIDATE_OWNER].device
        out[CANDIDATE_OWNER] = torch.cat(
            [torch.arange(total_queries)] + [o[query_counts[r]:] + starts[r] for r, o in enumerate(owners)]).to(device)
    if TEACHER_SCORES in batch:
        parts = all_gather_objects({k: batch[k].cpu() for k in (TEACHER_SCORES, TEACHER_PADDING)}
                                   | {TEACHER_INDEX: global_rows(batch[TEACHER_INDEX]).cpu()})
        width = max(part[TEACHER_SCORES].shape[1] for part in parts)

        def widen(t, fill):
            extra = width - t.shape[1]
            return torch.cat([t, torch.full((t.shape[0], extra), fill, dtype=t.dtype)], dim=1) if extra else t

        device = batch[TEACHER_SCORES].device
        out[TEACHER_SCORES] = torch.cat([widen(part[TEACHER_SCORES], 0.0) for part in parts]).to(device)
        out[TEACHER_INDEX] = torch.cat([widen(part[TEACHER_INDEX], 0) for part in parts]).to(device)
        out[TEACHER_PADDING] = torch.cat([widen(part[TEACHER_PADDING], True) for part in parts]).to(device)
    return queries, torch.cat([positives, negatives]), out


def _loss_from_vectors(q, p, settings: ContrastiveSettings, batch: dict):
    """The loss of query vectors q (B, dim) and candidate vectors p (B + negatives, dim)."""
    if settings.cross_device:
        q, p, batch = global_batch(q, p, batch)
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


def cached_backward(replica, batch: dict, settings: ContrastiveSettings, scale: float = 1.0, sync: bool = True):
    """GradCache: the full-batch loss's gradients, computed `mini_batch_size` rows at a time.

    1. embed every chunk without a graph (remembering the RNG state, so dropout repeats);
    2. the loss over all vectors, backpropagated to the vectors only (across ranks with
       --cross-device-negatives);
    3. re-embed each chunk with a graph and push the cached vector gradients through it, through
       the replica (`replica.backward_through`), whose last pass averages the gradients over ranks
       when `sync`. `replica` may also be a plain model (one process).
    Returns the (detached) loss.
    """
    import torch

    model = getattr(replica, "model", replica)
    through = getattr(replica, "backward_through", None)
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
    passes = [(prefix, chunk, state, grad) for prefix, chunks in sides.items()
              for chunk, state, grad in zip(chunks, states[prefix], vectors[prefix].grad.split(settings.mini_batch_size))]
    for i, (prefix, chunk, state, grad) in enumerate(passes):
        _set_rng_state(state, device)
        if through is None:
            forward_embeddings(model, chunk, settings.pooling).backward(grad)
        else:
            through(forward_embeddings, (chunk, settings.pooling), grad, sync=sync and i == len(passes) - 1)
    _set_rng_state(after, device)
    return value.detach()
