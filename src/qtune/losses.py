"""Losses as pure functions of tensors.

`info_nce` is the contrastive loss behind domain embeddings:

    >>> q = F.normalize(torch.randn(4, 8), dim=-1)          # 4 queries
    >>> p = F.normalize(torch.randn(4 + 3, 8), dim=-1)      # their 4 positives, then 3 hard negatives
    >>> info_nce(q, p, temperature=0.05)

Inputs: L2-normalised query vectors (batch, dim) and candidates (batch + negatives, dim) whose
first `batch` rows are the queries' positives, in order. Every other row is a negative for every
query: the other queries' positives (in-batch negatives) and all hard negatives.
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


def matryoshka_info_nce(queries: torch.Tensor, candidates: torch.Tensor, dimensions: list[int] | None,
                        temperature: float = 0.05, false_negative_offset: float | None = None) -> torch.Tensor:
    """InfoNCE averaged over the full vector and each Matryoshka prefix (truncated, renormalised)."""
    if not dimensions:
        return info_nce(queries, candidates, temperature, false_negative_offset)
    losses = [info_nce(queries, candidates, temperature, false_negative_offset)]
    for d in dimensions:
        if d < queries.shape[1]:
            losses.append(info_nce(F.normalize(queries[:, :d], dim=-1), F.normalize(candidates[:, :d], dim=-1),
                                   temperature, false_negative_offset))
    return torch.stack(losses).mean()
