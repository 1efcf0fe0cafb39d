"""Ranking metrics as pure functions of a run and relevance judgements.

Definitions follow trec_eval / pytrec_eval (and so BEIR, which calls it): a document is relevant
when its grade is > 0; nDCG uses the linear gain grade / log2(rank + 1) as `ndcg_cut` does.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

NDCG_CUTS = (1, 3, 5, 10)
RECALL_CUTS = (1, 10, 100)
MRR_CUT = 10
MAP_CUT = 100
METRIC_NAMES = (*(f"ndcg@{k}" for k in NDCG_CUTS), *(f"recall@{k}" for k in RECALL_CUTS), f"mrr@{MRR_CUT}",
                f"map@{MAP_CUT}")


def _dcg(gains: Sequence[float], k: int) -> float:
    # rank r (1-based) is discounted by log2(r + 1); gains[i] sits at rank i + 1.
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def _query_metrics(ranking: Sequence[str], judged: Mapping[str, int]) -> dict[str, float]:
    relevant = {d: g for d, g in judged.items() if g > 0}
    # A run scores each document once: a repeat of a document is dropped (it keeps its best rank).
    ranking = list(dict.fromkeys(ranking))
    gains = [relevant.get(d, 0) for d in ranking]
    hits = [g > 0 for g in gains]
    ideal = sorted(relevant.values(), reverse=True)
    out = {}
    for k in NDCG_CUTS:
        out[f"ndcg@{k}"] = _dcg(gains, k) / _dcg(ideal, k)
    for k in RECALL_CUTS:
        out[f"recall@{k}"] = sum(hits[:k]) / len(relevant)
    first = next((i for i, h in enumerate(hits[:MRR_CUT]) if h), None)
    out[f"mrr@{MRR_CUT}"] = 0.0 if first is None else 1.0 / (first + 1)
    # Average precision cut at MAP_CUT: precision at each relevant rank within the cut, summed and
    # divided by all relevant documents (those never retrieved contribute 0).
    found, precision_sum = 0, 0.0
    for i, hit in enumerate(hits[:MAP_CUT]):
        if hit:
            found += 1
            precision_sum += found / (i + 1)
    out[f"map@{MAP_CUT}"] = precision_sum / len(relevant)
    return out


def per_query_metrics(run: Mapping[str, Sequence[str]],
                      qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """{query id: {metric: value}} for every query in `qrels` with at least one grade > 0.

    `run` maps query id -> doc ids ranked best first. A scored query missing from `run` gets 0 on
    every metric; queries in `run` but not in `qrels`, or with no relevant document, are skipped.
    Metric names are in METRIC_NAMES.
    """
    return {qid: _query_metrics(run.get(qid, ()), judged)
            for qid, judged in qrels.items() if any(g > 0 for g in judged.values())}


def retrieval_metrics(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Each metric of `per_query_metrics`, averaged over the scored queries."""
    scores = per_query_metrics(run, qrels)
    if not scores:
        raise ValueError("no query in qrels has a relevant document (grade > 0); nothing to score")
    return {name: float(sum(s[name] for s in scores.values()) / len(scores)) for name in METRIC_NAMES}


def mean_margin(pos_scores, neg_scores) -> float:
    """Mean of sim(q, pos) - sim(q, neg) over (query, positive, negative) triplets.

    `pos_scores` and `neg_scores` are 1-D arrays of the same length T, one entry per triplet:
    ``pos_scores[t] = sim(q_t, pos_t)`` and ``neg_scores[t] = sim(q_t, neg_t)``. A query with
    several negatives therefore appears in several triplets (its positive score repeated), so each
    triplet, not each query, weighs the same. Positive when positives score higher on average.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise ValueError(f"expected two 1-D arrays of equal length, got shapes {pos.shape} and {neg.shape}")
    if pos.size == 0:
        raise ValueError("no triplets to average")
    return float((pos - neg).mean())
