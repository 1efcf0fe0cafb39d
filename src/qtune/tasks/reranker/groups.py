"""Reranker training: groups of (query, positive, k hard negatives) from `qtune mine` output.

Each training feature is one group of `group_size` pairs: the query with its first positive, then
`group_size - 1` of its negatives in file order (mined files list the hardest first). A group
with fewer negatives repeats them (training says how many groups do, `short_groups`); a group
without any cannot teach a ranking and is left out.

Losses, on the logits of `qtune.tasks.reranker.model.forward_logits` (sigmoid = the served score):
- listwise: softmax cross-entropy over each group, the positive being the target;
- pointwise: binary cross-entropy of every pair against 1 (positive) or 0 (negative);
- with --distill, plus `distill_weight` times the KL divergence between the teacher's softmax over
  the group (its scores from the data, / `distill_temperature`) and the model's softmax over its
  logits; `distill_only` keeps that term alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qtune.data.teacher_scores import group_teacher_scores
from qtune.errors import QtuneError
from qtune.losses import distillation_kl
from qtune.records import QueryGroup
from qtune.tasks.reranker.model import forward_logits

LOSSES = ("listwise", "pointwise")


def group_features(groups: Sequence[QueryGroup], encode, group_size: int,
                   teacher_from: str | None = None) -> tuple[list[dict], int]:
    """(features, groups left out for lack of negatives); `encode(query, doc)` gives one pair's ids.
    With `teacher_from` (the file's name, for errors) each feature also carries the teacher's
    scores of its pairs, in the same order (repeated negatives repeat their scores)."""
    features, dropped = [], 0
    for group in groups:
        if not group.negatives:
            dropped += 1
            continue
        picked = [i % len(group.negatives) for i in range(group_size - 1)]
        pairs = [encode(group.query, doc) for doc in (group.positives[0], *(group.negatives[i] for i in picked))]
        feature = {"pairs": pairs, "length": sum(len(p["input_ids"]) for p in pairs)}
        if teacher_from is not None:
            pos, neg = group_teacher_scores(group, teacher_from)
            feature["teacher"] = [pos[0], *(neg[i] for i in picked)]
        features.append(feature)
    if not features:
        raise QtuneError("no training group has a negative: mine some first (`qtune mine`)")
    return features, dropped


def short_groups(groups: Sequence[QueryGroup], group_size: int) -> int:
    """How many groups have some negatives but fewer than `group_size - 1` (theirs are repeated)."""
    return sum(1 for g in groups if 0 < len(g.negatives) < group_size - 1)


def training_pairs(groups: Sequence[QueryGroup], group_size: int) -> list[tuple[str, str]]:
    """The distinct (query, document) pairs `group_features` encodes: each group's first positive
    and up to `group_size - 1` negatives, for the groups that have negatives."""
    return [(g.query, doc) for g in groups if g.negatives for doc in (g.positives[0], *g.negatives[:group_size - 1])]


def collate(tokenizer, features: Sequence[dict], packed=False) -> dict:
    """All pairs of the batch's groups, padded (or packed) together; `group_labels` (groups,
    group_size) marks the positive (column 0)."""
    import torch

    from qtune.modeling.packing import pack_or_pad

    flat = [pair for f in features for pair in f["pairs"]]
    batch = pack_or_pad(tokenizer, flat, packed)
    size = len(features[0]["pairs"])
    labels = torch.zeros(len(features), size)
    labels[:, 0] = 1.0
    batch["group_labels"] = labels
    if "teacher" in features[0]:
        batch["teacher_scores"] = torch.tensor([f["teacher"] for f in features], dtype=torch.float32)  # (groups, size)
    return batch


def group_loss(logits, group_labels, kind: str, teacher_scores=None, distill_weight: float = 1.0,
               distill_temperature: float = 1.0, distill_only: bool = False):
    """The loss of one batch from its (rows,) logits laid out group after group; with
    `teacher_scores` (groups, group_size), plus `distill_weight` x KL(teacher || model) over each
    group (the model's logits at temperature 1, the teacher's scores / `distill_temperature`)."""
    import torch.nn.functional as F

    if kind not in LOSSES:
        raise QtuneError(f"unknown reranker loss {kind!r}; use one of {', '.join(LOSSES)}")
    scores = logits.view(group_labels.shape)  # (groups, group_size)
    total = 0.0
    if not distill_only:
        total = (F.cross_entropy(scores, group_labels.argmax(dim=1)) if kind == "listwise"
                 else F.binary_cross_entropy_with_logits(scores, group_labels))
    if teacher_scores is not None:
        total = total + distill_weight * distillation_kl(scores, teacher_scores, 1.0, distill_temperature)
    return total


def loss(model, batch: dict, *, prompt, kind: str, distill_weight: float = 1.0, distill_temperature: float = 1.0,
         distill_only: bool = False):
    """`group_loss` of a collated batch (`kind`: listwise or pointwise); distils when the batch
    carries `teacher_scores`."""
    return group_loss(forward_logits(model, batch, prompt), batch["group_labels"], kind, batch.get("teacher_scores"),
                      distill_weight, distill_temperature, distill_only)


def random_order_metrics(candidates: Sequence[int]) -> dict:
    """The expected `group_ranking_metrics` of ranking each group's candidates (these counts, the
    positive among them) in random order: accuracy@1 1/n and MRR H(n)/n, averaged over groups."""
    n = np.asarray(candidates, dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(k) + 1)) for k in n])
    return {"accuracy@1": float((1.0 / n).mean()), "mrr": float((harmonic / n).mean()), "groups": len(n)}


def group_ranking_metrics(scores: Sequence[np.ndarray]) -> dict:
    """How well each group's positive (index 0) is ranked among its own candidates:
    accuracy@1 (the positive is first) and MRR. Ties count against the positive."""
    ranks = np.array([1 + int((s[1:] >= s[0]).sum()) for s in scores], dtype=np.float64)
    return {"accuracy@1": float((ranks == 1).mean()), "mrr": float((1.0 / ranks).mean()), "groups": len(ranks)}
