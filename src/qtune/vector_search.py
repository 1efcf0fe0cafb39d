"""Exact inner-product top-k search over L2-normalised vectors (inner product = cosine).

faiss is used when it is installed and an exact numpy search otherwise. Both are exact and both
report scores recomputed the same way, so what is found does not depend on which one ran.
"""

from __future__ import annotations

import numpy as np

# Most float32 scores one numpy search step holds at once (64 MiB): the score block of a query batch
# against a corpus chunk, and the gathered candidate vectors when scores are recomputed.
_BLOCK_ELEMENTS = 1 << 24


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def as_matrix(x, name: str) -> np.ndarray:
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
    queries, corpus = as_matrix(queries, "queries"), as_matrix(corpus, "corpus")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the corpus has {corpus.shape[1]}")
    if not is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not is_int(batch_size) or batch_size < 1:
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
        s = scores_of(qb, corpus, idx)                                 # (b, k)
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


def scores_of(q: np.ndarray, corpus: np.ndarray, idx: np.ndarray) -> np.ndarray:
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
