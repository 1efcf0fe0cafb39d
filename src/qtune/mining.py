"""Hard-negative mining over embedding vectors: exact search, then rules that keep likely false negatives out.

Pure functions over L2-normalised vectors (inner product = cosine); embedding the texts happens elsewhere.
The search is `qtune.vector_search.exact_search` (faiss when installed, else numpy; both exact, same scores).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from qtune.vector_search import as_matrix, exact_search, is_int, scores_of

SAMPLING = ("top", "random")


@dataclass(frozen=True)
class MiningSettings:
    range_min: int = 20      # skip the top range_min candidates (too likely to be unlabelled positives)
    range_max: int = 50      # look no deeper than this rank (exclusive)
    max_score: float = 0.8   # drop candidates scoring above this (likely false negatives)
    margin: float = 0.1      # drop candidates scoring within `margin` of the positive's score
    num_negatives: int = 7   # fills a default reranker group (--group-size 8) and --hard-negatives 7
    sampling: str = "top"    # "top": the best remaining candidates; "random": a seeded sample of them
    seed: int = 42

    def __post_init__(self):
        # Checked on construction so the CLI can turn a bad flag into a message before any model loads.
        if not is_int(self.range_min) or self.range_min < 0:
            raise ValueError(f"range_min must be an integer >= 0, got {self.range_min!r}")
        if not is_int(self.range_max) or self.range_max <= self.range_min:
            raise ValueError(f"range_max must be an integer greater than range_min ({self.range_min}), "
                             f"got {self.range_max!r}")
        if not is_int(self.num_negatives) or self.num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if not isinstance(self.margin, (int, float)) or isinstance(self.margin, bool) or not self.margin >= 0:
            raise ValueError(f"margin must be a number >= 0, got {self.margin!r}")
        if not isinstance(self.max_score, (int, float)) or isinstance(self.max_score, bool) \
                or math.isnan(self.max_score):
            raise ValueError(f"max_score must be a number, got {self.max_score!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class MiningResult:
    negatives: list[list[int]]      # per query: chosen corpus indices, best first (also for "random")
    shortfall: int                  # queries that got fewer than num_negatives
    # Per query (n,): what happened to the candidates in the rank window. Each dropped candidate is
    # counted under the first rule that removed it, in this order: positive, max_score, margin.
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dropped_positive: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dropped_max_score: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dropped_margin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eligible: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    positive_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # (n,) used

    @property
    def num_queries(self) -> int:
        return len(self.negatives)


def mine_hard_negatives(query_vecs: np.ndarray, corpus_vecs: np.ndarray, positive_ids: list[set[int]],
                        positive_scores: np.ndarray | None, settings: MiningSettings) -> MiningResult:
    """Choose up to num_negatives corpus indices per query from ranks [range_min, range_max).

    positive_scores[i] is the lowest score among query i's positives (NaN: unknown, no margin rule).
    If None, it is computed as the lowest query·corpus score over positive_ids[i]; a query with no
    positive ids then gets NaN too, so only the max_score rule guards it.
    """
    query_vecs, corpus_vecs = as_matrix(query_vecs, "query_vecs"), as_matrix(corpus_vecs, "corpus_vecs")
    n, size = len(query_vecs), len(corpus_vecs)
    if query_vecs.shape[1] != corpus_vecs.shape[1]:
        raise ValueError(f"query_vecs have dimension {query_vecs.shape[1]} but corpus_vecs have "
                         f"{corpus_vecs.shape[1]}")
    if len(positive_ids) != n:
        raise ValueError(f"positive_ids has {len(positive_ids)} entries for {n} queries")
    for i, ids in enumerate(positive_ids):
        bad = [j for j in ids if not is_int(j) or not 0 <= j < size]
        if bad:
            raise ValueError(f"positive_ids[{i}] has ids outside the corpus (size {size}): {sorted(map(str, bad))}")
    if positive_scores is None:
        positive_scores = _lowest_positive_scores(query_vecs, corpus_vecs, positive_ids)
    else:
        positive_scores = np.asarray(positive_scores, dtype=np.float32)
        if positive_scores.shape != (n,):
            raise ValueError(f"positive_scores must have shape ({n},), got {positive_scores.shape}")

    lo = settings.range_min
    window = max(0, min(settings.range_max, size) - lo)                # candidates per query
    if window > 0:
        scores, indices = exact_search(query_vecs, corpus_vecs, lo + window)
        scores, indices = scores[:, lo:], indices[:, lo:]                # (n, window)
    else:  # the corpus ends before range_min: nothing to search for
        scores = np.empty((n, 0), dtype=np.float32)
        indices = np.empty((n, 0), dtype=np.int64)

    # Rules as (n, window) masks, in float64 so the margin subtraction adds no float32 rounding.
    s64 = scores.astype(np.float64)
    is_positive = np.array([[j in positive_ids[i] for j in row] for i, row in enumerate(indices.tolist())],
                           dtype=bool).reshape(n, window)
    too_high = ~is_positive & (s64 > settings.max_score)
    # NaN positive score compares False: no margin rule for that query.
    too_close = ~is_positive & ~too_high & (s64 > positive_scores.astype(np.float64)[:, None] - settings.margin)
    eligible = ~(is_positive | too_high | too_close)

    negatives: list[list[int]] = []
    for i in range(n):
        ranked = indices[i][eligible[i]].tolist()                       # best first
        if settings.sampling == "random" and len(ranked) > settings.num_negatives:
            # Seeded per query, so a query's negatives do not depend on its position in a batch.
            picked = random.Random(settings.seed + i).sample(range(len(ranked)), settings.num_negatives)
            ranked = [ranked[p] for p in sorted(picked)]
        negatives.append(ranked[:settings.num_negatives])

    return MiningResult(
        negatives=negatives,
        shortfall=sum(len(neg) < settings.num_negatives for neg in negatives),
        candidates=np.full(n, window, dtype=np.int64),
        dropped_positive=is_positive.sum(axis=1).astype(np.int64),
        dropped_max_score=too_high.sum(axis=1).astype(np.int64),
        dropped_margin=too_close.sum(axis=1).astype(np.int64),
        eligible=eligible.sum(axis=1).astype(np.int64),
        positive_scores=positive_scores,
    )


def _lowest_positive_scores(query_vecs: np.ndarray, corpus_vecs: np.ndarray,
                            positive_ids: list[set[int]]) -> np.ndarray:
    """(n,) float32: min over positive_ids[i] of query_vecs[i]·corpus_vecs[j]; NaN where there are none."""
    out = np.full(len(query_vecs), np.nan, dtype=np.float32)
    for i, ids in enumerate(positive_ids):
        if ids:
            idx = np.array(sorted(int(j) for j in ids), dtype=np.int64)[None, :]  # (1, p)
            # Same arithmetic as the candidates' scores, so a positive compares equal to itself.
            out[i] = scores_of(query_vecs[i:i + 1], corpus_vecs, idx).min()
    return out


def summarize(result: MiningResult, settings: MiningSettings) -> str:
    """One line for the user, e.g. 'mined 7 negatives for 940/1000 queries; 60 got fewer (ranks 20-50, ...)'."""
    total = result.num_queries
    full = total - result.shortfall
    return (f"mined {settings.num_negatives} negatives for {full}/{total} queries; {result.shortfall} got fewer "
            f"(ranks {settings.range_min}-{settings.range_max}, max score {settings.max_score:g}, "
            f"margin {settings.margin:g})")
