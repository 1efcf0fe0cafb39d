"""Hard-negative mining over embedding vectors, with the meaning of sentence-transformers'
`mine_hard_negatives` (`sentence_transformers.util.mine_hard_negatives`).

Per query:
1. search the corpus for its top `range_max + P` candidates (P: the most positives any query has in
   the corpus, so positives never crowd negatives out of the window);
2. remove candidates by rule, in this order, each counted under the first rule that removed it:
   is a positive; absolute margin (score + margin > positive score); relative margin
   (score > positive score - |positive score| x relative_margin); score > max_score;
   score < min_score. "Positive score" is the LOWEST score among the query's positives;
3. rank what is left by score (at most `range_max` candidates) and skip the best `range_min`;
4. take the first `num_negatives` ("top") or a seeded sample of them ("random").

So `range_min`/`range_max` count ranks among the candidates that survived the rules, not ranks of the
raw search. Scores may be replaced between the search and the rules (a reranker's, see
`qtune.tasks.embedding.mine`); the rules and the ranking then use those.

Pure functions over L2-normalised vectors (inner product = cosine); embedding the texts happens elsewhere.
The search is `qtune.vector_search.exact_search` (faiss when installed, else numpy; both exact, same scores).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from qtune.mining_settings import SAMPLING, MiningSettings, number_or_off  # noqa: F401 (qtune.mining's API)
from qtune.vector_search import as_matrix, exact_search, is_int, scores_of

# The removal rules, in the order they apply (and are counted).
RULES = ("positive", "margin", "relative_margin", "max_score", "min_score")


def _zeros() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class MiningResult:
    negatives: list[list[int]]      # per query: chosen corpus indices, best first (also for "random")
    shortfall: int                  # queries that got fewer than num_negatives
    negative_scores: list[list[float]] = field(default_factory=list)  # per query: the chosen ones' scores
    # Per query (n,): the search window's size and what the rules did to it. Each removed candidate
    # is counted under the first rule that removed it, in RULES order.
    candidates: np.ndarray = field(default_factory=_zeros)
    dropped_positive: np.ndarray = field(default_factory=_zeros)
    dropped_margin: np.ndarray = field(default_factory=_zeros)
    dropped_relative_margin: np.ndarray = field(default_factory=_zeros)
    dropped_max_score: np.ndarray = field(default_factory=_zeros)
    dropped_min_score: np.ndarray = field(default_factory=_zeros)
    eligible: np.ndarray = field(default_factory=_zeros)          # left after all rules
    positive_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # (n,) used

    @property
    def num_queries(self) -> int:
        return len(self.negatives)

    def dropped(self, rule: str) -> int:
        """How many candidates `rule` (one of RULES) removed, over all queries."""
        return int(getattr(self, f"dropped_{rule}").sum())


def window_size(positive_ids: list[set[int]], settings: MiningSettings) -> int:
    """Candidates searched per query: range_max plus room for the most positives any query has."""
    return settings.range_max + max((len(ids) for ids in positive_ids), default=0)


def check_inputs(query_vecs: np.ndarray, corpus_vecs: np.ndarray,
                 positive_ids: list[set[int]]) -> tuple[np.ndarray, np.ndarray]:
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
    return query_vecs, corpus_vecs


def search_candidates(query_vecs: np.ndarray, corpus_vecs: np.ndarray, positive_ids: list[set[int]],
                      settings: MiningSettings) -> tuple[np.ndarray, np.ndarray]:
    """The search window: (scores (n, k) float32 best first, corpus indices (n, k)), k = `window_size`
    clipped to the corpus."""
    query_vecs, corpus_vecs = check_inputs(query_vecs, corpus_vecs, positive_ids)
    _, indices = exact_search(query_vecs, corpus_vecs, window_size(positive_ids, settings))
    # Recomputed per pair so a positive's candidate score equals its own score bit for bit.
    return scores_of(query_vecs, corpus_vecs, indices), indices


def mine_hard_negatives(query_vecs: np.ndarray, corpus_vecs: np.ndarray, positive_ids: list[set[int]],
                        positive_scores: np.ndarray | None, settings: MiningSettings) -> MiningResult:
    """Choose up to num_negatives corpus indices per query, as the module docstring says.

    positive_scores[i] is the lowest score among query i's positives (NaN: unknown, no margin rules).
    If None, it is computed as the lowest query·corpus score over positive_ids[i]; a query with no
    positive ids then gets NaN too, so only the max_score and min_score rules guard it.
    """
    query_vecs, corpus_vecs = check_inputs(query_vecs, corpus_vecs, positive_ids)
    if positive_scores is None:
        positive_scores = lowest_positive_scores(query_vecs, corpus_vecs, positive_ids)
    scores, indices = search_candidates(query_vecs, corpus_vecs, positive_ids, settings)
    return select_negatives(scores, indices, positive_ids, positive_scores, settings)


def select_negatives(scores: np.ndarray, indices: np.ndarray, positive_ids: list[set[int]],
                     positive_scores: np.ndarray, settings: MiningSettings) -> MiningResult:
    """Apply the rules to a search window (scores (n, k), indices (n, k), in any order: rows are
    ranked by score here, ties keeping their given order) and pick the negatives."""
    scores, indices = np.asarray(scores, dtype=np.float32), np.asarray(indices, dtype=np.int64)
    n = len(positive_ids)
    if scores.shape != indices.shape or scores.ndim != 2 or len(scores) != n:
        raise ValueError(f"scores {scores.shape} and indices {indices.shape} must both be (queries={n}, k)")
    positive_scores = np.asarray(positive_scores, dtype=np.float32)
    if positive_scores.shape != (n,):
        raise ValueError(f"positive_scores must have shape ({n},), got {positive_scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, indices = np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)  # (n, k)

    removed = _removals(scores, indices, positive_ids, positive_scores, settings)  # rule -> (n, k) bool
    eligible = ~np.logical_or.reduce(list(removed.values()))
    negatives, negative_scores = [], []
    for i in range(n):
        # Ranks among the survivors: the best range_max, less the best range_min.
        pool = np.flatnonzero(eligible[i])[:settings.range_max][settings.range_min:]
        if settings.sampling == "random" and len(pool) > settings.num_negatives:
            # Seeded per query, so a query's negatives do not depend on its position in a batch.
            picked = random.Random(settings.seed + i).sample(range(len(pool)), settings.num_negatives)
            pool = pool[sorted(picked)]
        pool = pool[:settings.num_negatives]
        negatives.append(indices[i, pool].tolist())
        negative_scores.append(scores[i, pool].tolist())

    return MiningResult(
        negatives=negatives,
        negative_scores=negative_scores,
        shortfall=sum(len(neg) < settings.num_negatives for neg in negatives),
        candidates=np.full(n, scores.shape[1], dtype=np.int64),
        **{f"dropped_{rule}": mask.sum(axis=1).astype(np.int64) for rule, mask in removed.items()},
        eligible=eligible.sum(axis=1).astype(np.int64),
        positive_scores=positive_scores,
    )


def _removals(scores: np.ndarray, indices: np.ndarray, positive_ids: list[set[int]],
              positive_scores: np.ndarray, settings: MiningSettings) -> dict[str, np.ndarray]:
    """rule -> (n, k) mask of the candidates that rule removed (none an earlier rule removed)."""
    n, k = scores.shape
    s = scores.astype(np.float64)
    pos = positive_scores.astype(np.float64)[:, None]  # (n, 1); NaN compares False: no margin rules
    tests = {
        "positive": lambda: np.array([[j in positive_ids[i] for j in row] for i, row in enumerate(indices.tolist())],
                                     dtype=bool).reshape(n, k),
        "margin": lambda: s + settings.margin > pos,
        "relative_margin": lambda: s > pos - np.abs(pos) * settings.relative_margin,
        "max_score": lambda: s > settings.max_score,
        "min_score": lambda: s < settings.min_score,
    }
    alive = np.ones((n, k), dtype=bool)
    removed = {}
    for rule in RULES:
        off = rule != "positive" and getattr(settings, rule) is None
        removed[rule] = np.zeros((n, k), dtype=bool) if off else alive & tests[rule]()
        alive &= ~removed[rule]
    return removed


def lowest_positive_scores(query_vecs: np.ndarray, corpus_vecs: np.ndarray,
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
    rules = [f"{name} {value:g}" for name, value in (("max score", settings.max_score),
                                                      ("min score", settings.min_score),
                                                      ("margin", settings.margin),
                                                      ("relative margin", settings.relative_margin))
             if value is not None]
    return (f"mined {settings.num_negatives} negatives for {full}/{total} queries; {result.shortfall} got fewer "
            f"(ranks {settings.range_min}-{settings.range_max} after the rules"
            + "".join(f", {r}" for r in rules) + ")")


def rule_report(result: MiningResult, positive_scores: np.ndarray | None = None) -> str:
    """What each rule removed and the mean scores, e.g. 'of 1300 candidates searched, removed: positive
    12, margin 340, ...'. The mean positive score is over `positive_scores` (every positive's score)
    when given, else over each query's lowest."""
    searched = int(result.candidates.sum())
    parts = [f"{rule.replace('_', ' ')} {result.dropped(rule)}" for rule in RULES]
    chosen = [s for row in result.negative_scores for s in row]
    pos = np.asarray(result.positive_scores if positive_scores is None else positive_scores, dtype=np.float64)
    pos = pos[~np.isnan(pos)]
    mean_pos = f"{pos.mean():.4f}" if len(pos) else "n/a"
    mean_neg = f"{np.mean(chosen):.4f}" if chosen else "n/a"
    return (f"of {searched} candidates searched, removed: {', '.join(parts)}; {int(result.eligible.sum())} left; "
            f"{result.shortfall} queries got fewer negatives than asked; mean positive score {mean_pos}, "
            f"mean negative score {mean_neg} ({len(chosen)} negatives)")
