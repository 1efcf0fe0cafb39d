"""Losses as pure functions of tensors.

`info_nce` is the contrastive loss behind domain embeddings:

    >>> q = F.normalize(torch.randn(4, 8), dim=-1)          # 4 queries
    >>> p = F.normalize(torch.randn(4 + 3, 8), dim=-1)      # their 4 positives, then 3 hard negatives
    >>> info_nce(q, p, temperature=0.05)

Inputs: L2-normalised query vectors (batch, dim) and candidates (batch + negatives, dim) whose
first `batch` rows are the queries' positives, in order. Every other row is a negative for every
query: the other queries' positives (in-batch negatives) and all hard negatives.

Variants on the same inputs: `symmetric_info_nce` (also passage -> query), `improved_contrastive`
(GTE's one softmax over query-passage, query-query, passage-query and passage-passage pairs), and
`distillation_kl`, which matches a teacher's score distribution over each query's own candidates
(`group_similarities` picks those out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(similarity: torch.Tensor, offset: float) -> torch.Tensor:
    """True where a candidate must not count as a negative.

    `similarity` (batch, candidates) holds cosine similarities with the positives on the diagonal.
    A candidate scoring above its query's positive plus `offset` is most likely an unlabelled
    positive (the Qwen3-Embedding recipe uses offset 0.1); the positive itself is never masked.
    """
    batch = similarity.shape[0]
    positive = similarity[torch.arange(batch), torch.arange(batch)]  # (batch,)
    mask = similarity > (positive[:, None] + offset)  # (batch, candidates)
    mask[torch.arange(batch), torch.arange(batch)] = False
    return mask


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.05,
             false_negative_offset: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of picking each query's positive among all candidates.

    queries (batch, dim), candidates (batch + negatives, dim), both L2-normalised.
    """
    similarity = queries @ candidates.T  # (batch, batch + negatives)
    logits = similarity / temperature
    if false_negative_offset is not None:
        logits = logits.masked_fill(false_negative_mask(similarity.detach(), false_negative_offset), float("-inf"))
    targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, targets)


def symmetric_info_nce(queries: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.05,
                       false_negative_offset: float | None = None) -> torch.Tensor:
    """The mean of query -> passage InfoNCE and passage -> query InfoNCE.

    queries (batch, dim), candidates (batch + negatives, dim) as in `info_nce`. In the backward
    direction each positive picks its own query among all the batch's queries (hard negatives have
    no query of their own, so they take no part in it); the false-negative mask hides queries that
    score above the pair's similarity plus the offset.
    """
    positives = candidates[:queries.shape[0]]  # (batch, dim)
    forward = info_nce(queries, candidates, temperature, false_negative_offset)
    backward = info_nce(positives, queries, temperature, false_negative_offset)
    return (forward + backward) / 2


def improved_contrastive(queries: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.05,
                         false_negative_offset: float | None = None,
                         candidate_owner: torch.Tensor | None = None) -> torch.Tensor:
    """GTE's improved contrastive loss (Li et al. 2023, "Towards General Text Embeddings with
    Multi-stage Contrastive Learning"): one softmax per pair (q_i, d_i) whose denominator is

        sum_j e^{s(q_i, d_j)/t} + sum_{j != i} e^{s(q_i, q_j)/t}
          + sum_j e^{s(q_j, d_i)/t} + sum_{j != i} e^{s(d_j, d_i)/t}

    so other queries and other passages are negatives on both sides, and the pair itself appears
    in the first and third sums (as in the paper). queries (batch, dim) and candidates
    (batch + negatives, dim) are laid out as in `info_nce`; hard negatives count as passages d_j.
    `candidate_owner` (batch + negatives,) gives the query each candidate belongs to: a positive's
    own hard negatives stay out of its passage-passage sum (without it only d_i itself does). With
    `false_negative_offset`, every term scoring above s(q_i, d_i) plus the offset is dropped (the
    Qwen3-Embedding rule), the pair itself never.
    """
    batch = queries.shape[0]
    rows = torch.arange(batch, device=queries.device)
    positives = candidates[:batch]  # (batch, dim)
    if candidate_owner is None:
        candidate_owner = torch.full((candidates.shape[0],), -1, dtype=torch.long, device=queries.device)
        candidate_owner[:batch] = rows
    same_query = candidate_owner[None, :] == rows[:, None]  # (batch, batch + negatives)
    eye = torch.eye(batch, dtype=torch.bool, device=queries.device)
    blocks = [queries @ candidates.T,  # (batch, batch + negatives): q_i -> d_j, the positive at column i
              queries @ queries.T,  # (batch, batch): q_i -> q_j
              positives @ queries.T,  # (batch, batch): d_i -> q_j
              positives @ candidates.T]  # (batch, batch + negatives): d_i -> d_j
    excluded = [torch.zeros_like(same_query), eye, torch.zeros_like(eye), same_query]
    similarity = torch.cat(blocks, dim=1)  # (batch, 2 * (batch + negatives) + 2 * batch)
    drop = torch.cat(excluded, dim=1)
    if false_negative_offset is not None:
        positive = similarity.detach()[rows, rows]  # (batch,)
        above = similarity.detach() > (positive[:, None] + false_negative_offset)
        pair = torch.zeros_like(above)
        pair[rows, rows] = True  # the q_i -> d_i term
        pair[rows, candidates.shape[0] + batch + rows] = True  # the d_i -> q_i term: the same pair
        drop = drop | (above & ~pair)
    logits = (similarity / temperature).masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, rows)


def group_similarities(queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each query's similarity to its own candidates: (batch, group) from queries (batch, dim),
    candidates (rows, dim) and `index` (batch, group) naming a row of `candidates` per slot."""
    return (queries[:, None, :] * candidates[index]).sum(dim=-1)  # (batch, group)


def distillation_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
                    teacher_temperature: float = 1.0, padding: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between softmaxes over each row's candidates, averaged over rows.

    student_scores (rows, group): the student's scores (cosine similarities, or reranker logits),
    divided by `temperature` (the student's own: the InfoNCE one for embedders);
    teacher_scores (rows, group): the teacher's scores for the same candidates, divided by
    `teacher_temperature` (FlagEmbedding softmaxes raw teacher scores: 1.0);
    padding (rows, group): True where a slot holds no candidate (rows with fewer candidates).
    Zero when the two distributions agree; gradients reach the student only.
    """
    student = student_scores / temperature
    teacher = teacher_scores.detach().to(student.dtype) / teacher_temperature
    if padding is not None:
        student = student.masked_fill(padding, float("-inf"))
        teacher = teacher.masked_fill(padding, float("-inf"))
    log_teacher = F.log_softmax(teacher, dim=-1)  # (rows, group)
    log_student = F.log_softmax(student, dim=-1)
    terms = log_teacher.exp() * (log_teacher - log_student)
    if padding is not None:
        terms = terms.masked_fill(padding, 0.0)  # 0 * (-inf - -inf) would be NaN
    return terms.sum(dim=-1).mean()


def matryoshka_mean(loss_fn, queries: torch.Tensor, candidates: torch.Tensor,
                    dimensions: list[int] | None) -> torch.Tensor:
    """`loss_fn(queries, candidates)` averaged over the full vectors and each Matryoshka prefix
    (truncated, renormalised) shorter than them."""
    losses = [loss_fn(queries, candidates)]
    for d in dimensions or ():
        if d < queries.shape[1]:
            losses.append(loss_fn(F.normalize(queries[:, :d], dim=-1), F.normalize(candidates[:, :d], dim=-1)))
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
