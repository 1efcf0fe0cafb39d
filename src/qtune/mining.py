"""Hard-negative mining over embedding vectors: exact search, then rules that keep likely false negatives out.

Pure functions over L2-normalised vectors (inner product = cosine); embedding the texts happens elsewhere.
faiss is used for the search when it is installed and an exact numpy search otherwise. Both are exact and
both report scores recomputed the same way, so the mined negatives do not depend on which one ran.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

SAMPLING = ("top", "random")

# Most float32 scores one numpy search step holds at once (64 MiB): the score block of a query batch
# against a corpus chunk, and the gathered candidate vectors when scores are recomputed.
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class MiningSettings:
    range_min: int = 20      # skip the top range_min candidates (too likely to be unlabelled positives)
    range_max: int = 50      # look no deeper than this rank (exclusive)
    max_score: float = 0.8   # drop candidates scoring above this (likely false negatives)
    margin: float = 0.1      # drop candidates scoring within `margin` of the positive's score
    num_negatives: int = 5
    sampling: str = "top"    # "top": the best remaining candidates; "random": a seeded sample of them
    seed: int = 42

    def __post_init__(self):
        # Checked on construction so the CLI can turn a bad flag into a message before any model loads.
        if not _is_int(self.range_min) or self.range_min < 0:
            raise ValueError(f"range_min must be an integer >= 0, got {self.range_min!r}")
        if not _is_int(self.range_max) or self.range_max <= self.range_min:
            raise ValueError(f"range_max must be an integer greater than range_min ({self.range_min}), "
                             f"got {self.range_max!r}")
        if not _is_int(self.num_negatives) or self.num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if not isinstance(self.margin, (int, float)) or isinstance(self.margin, bool) or not self.margin >= 0:
            raise ValueError(f"margin must be a number >= 0, got {self.margin!r}")
        if not isinstance(self.max_score, (int, float)) or isinstance(self.max_score, bool) \
                or math.isnan(self.max_score):
            raise ValueError(f"max_score must be a number, got {self.max_score!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_matrix(x, name: str) -> np.ndarray:
    # faiss wants C-contiguous float32; numpy gets the same array so both paths see identical inputs.
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim), got shape {x.shape}")
    return x


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int,
                 batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k: (scores (n, k) float32 descending, indices (n, k) int64).

    k is clipped to the corpus size. Rows are ordered by score, ties by lower corpus index; which of
    several candidates tied at the k-th place gets in is not specified.
    """
    queries, corpus = _as_matrix(queries, "queries"), _as_matrix(corpus, "corpus")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the corpus has {corpus.shape[1]}")
    if not _is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(queries)
    k = min(int(k), len(corpus))
    scores = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    if n == 0 or k == 0:
        return scores, indices

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus)
        top = lambda qb: index.search(qb, k)[1]  # noqa: E731  (b, k) int64
    else:
        top = lambda qb: _numpy_top_k(qb, corpus, k)  # noqa: E731

    for start in range(0, n, batch_size):
        qb = queries[start:start + batch_size]                          # (b, d)
        idx = np.asarray(top(qb), dtype=np.int64)                       # (b, k), any order
        s = _scores_of(qb, corpus, idx)                                 # (b, k)
        # Score descending, then index ascending: one order whatever search produced the set.
        order = np.lexsort((idx, -s), axis=1)
        scores[start:start + len(qb)] = np.take_along_axis(s, order, axis=1)
        indices[start:start + len(qb)] = np.take_along_axis(idx, order, axis=1)
    return scores, indices


def _numpy_top_k(qb: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Indices (b, k) of the k best corpus rows for each query, unordered; corpus scanned in chunks."""
    chunk = max(1, _BLOCK_ELEMENTS // len(qb))
    best_s = np.empty((len(qb), 0), dtype=np.float32)                   # (b, <= k) running best
    best_i = np.empty((len(qb), 0), dtype=np.int64)
    for c0 in range(0, len(corpus), chunk):
        s = np.concatenate([best_s, qb @ corpus[c0:c0 + chunk].T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(c0, c0 + min(chunk, len(corpus) - c0)),
                                                    (len(qb), min(chunk, len(corpus) - c0)))], axis=1)
        if s.shape[1] > k:  # a full sort is never needed: partition keeps the k best, unordered
            keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, i = np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)
        best_s, best_i = s, i
    return best_i


def _scores_of(q: np.ndarray, corpus: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Scores (b, k) float32 of q[r] against corpus[idx[r, j]], summed in float64.

    Recomputed rather than taken from the search, whose float32 sums differ in the last bits between
    faiss and BLAS; this way a pair always gets the same score, so thresholds decide the same way.
    """
    out = np.empty(idx.shape, dtype=np.float32)
    rows = max(1, _BLOCK_ELEMENTS // 2 // max(1, idx.shape[1] * q.shape[1]))  # float64: half the elements
    for r0 in range(0, len(idx), rows):
        cand = corpus[idx[r0:r0 + rows]].astype(np.float64)            # (rows, k, d)
        out[r0:r0 + rows] = (cand * q[r0:r0 + rows, None, :].astype(np.float64)).sum(axis=-1)
    return out


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
    query_vecs, corpus_vecs = _as_matrix(query_vecs, "query_vecs"), _as_matrix(corpus_vecs, "corpus_vecs")
    n, size = len(query_vecs), len(corpus_vecs)
    if query_vecs.shape[1] != corpus_vecs.shape[1]:
        raise ValueError(f"query_vecs have dimension {query_vecs.shape[1]} but corpus_vecs have "
                         f"{corpus_vecs.shape[1]}")
    if len(positive_ids) != n:
        raise ValueError(f"positive_ids has {len(positive_ids)} entries for {n} queries")
    for i, ids in enumerate(positive_ids):
        bad = [j for j in ids if not _is_int(j) or not 0 <= j < size]
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
            out[i] = _scores_of(query_vecs[i:i + 1], corpus_vecs, idx).min()
    return out


def summarize(result: MiningResult, settings: MiningSettings) -> str:
    """One line for the user, e.g. 'mined 5 negatives for 940/1000 queries; 60 got fewer (ranks 20-50, ...)'."""
    total = result.num_queries
    full = total - result.shortfall
    return (f"mined {settings.num_negatives} negatives for {full}/{total} queries; {result.shortfall} got fewer "
            f"(ranks {settings.range_min}-{settings.range_max}, max score {settings.max_score:g}, "
            f"margin {settings.margin:g})")
