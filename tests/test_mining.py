"""Hard-negative mining on hand-made vectors whose every rank and score is known in advance."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from qtune import mining, vector_search
from qtune.mining import MiningSettings, exact_search, mine_hard_negatives, summarize

QUERY = np.array([[1.0, 0.0]], dtype=np.float32)  # (1, 2)


def _ranked_corpus(num_docs: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Unit 2-D docs scoring 0.95, 0.94, ... against QUERY, stored in shuffled order.

    Returns (corpus (num_docs, 2), at_rank) with at_rank[r] the corpus index of the rank-r doc, so a
    test can say "ranks 20-49" and get the indices without trusting the code under test.
    """
    scores = 0.95 - 0.01 * np.arange(num_docs)
    at_rank = np.random.default_rng(seed).permutation(num_docs)
    corpus = np.zeros((num_docs, 2), dtype=np.float32)
    corpus[at_rank, 0] = scores
    corpus[at_rank, 1] = np.sqrt(1.0 - scores ** 2)
    return corpus, at_rank.tolist()


def _random_unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _use_numpy(monkeypatch) -> None:
    # A None entry makes `import faiss` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "faiss", None)


@pytest.fixture(params=["faiss", "numpy"])
def backend(request, monkeypatch) -> str:
    """Run a test once through faiss (a dev dependency) and once through the numpy fallback."""
    if request.param == "faiss":
        import faiss  # noqa: F401  (a missing faiss must fail, not skip)
    else:
        _use_numpy(monkeypatch)
    return request.param


def _settings(**kw) -> MiningSettings:
    # Rules off unless a test turns one on: every candidate in ranks 0-59, no score limits.
    base = dict(range_min=0, range_max=60, max_score=1.0, margin=0.0, num_negatives=5)
    return MiningSettings(**{**base, **kw})


# ---------------------------------------------------------------- exact_search

def _brute_force(q, c, k):
    s = q.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def test_exact_search_numpy_matches_brute_force_across_batches_and_corpus_chunks(monkeypatch):
    _use_numpy(monkeypatch)
    monkeypatch.setattr(vector_search, "_BLOCK_ELEMENTS", 64)  # 8 queries per batch -> corpus chunks of 8 docs
    q, c = _random_unit(37, 16, seed=1), _random_unit(500, 16, seed=2)
    scores, indices = exact_search(q, c, 10, batch_size=8)
    want_s, want_i = _brute_force(q, c, 10)
    assert scores.dtype == np.float32 and indices.dtype == np.int64 and indices.shape == (37, 10)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_search_faiss_matches_brute_force_and_the_numpy_fallback_exactly(monkeypatch):
    import faiss
    made = []
    real = faiss.IndexFlatIP

    def spy(dim):
        made.append(dim)
        return real(dim)

    monkeypatch.setattr(faiss, "IndexFlatIP", spy)
    q, c = _random_unit(37, 16, seed=1), _random_unit(500, 16, seed=2)
    with_faiss = exact_search(q, c, 10, batch_size=8)
    assert made == [16]  # the faiss path really ran
    np.testing.assert_array_equal(with_faiss[1], _brute_force(q, c, 10)[1])

    _use_numpy(monkeypatch)
    without = exact_search(q, c, 10, batch_size=8)
    assert made == [16]
    np.testing.assert_array_equal(with_faiss[1], without[1])
    np.testing.assert_array_equal(with_faiss[0], without[0])  # same scores bit for bit


def test_exact_search_clips_k_to_the_corpus_and_orders_ties_by_index(backend):
    corpus = np.array([[0.6, 0.8], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    scores, indices = exact_search(QUERY, corpus, 50)
    assert indices.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.6]], atol=1e-7)
    empty_s, empty_i = exact_search(QUERY, corpus, 0)
    assert empty_s.shape == (1, 0) and empty_i.shape == (1, 0)


def test_exact_search_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimension 2 but the corpus has 3"):
        exact_search(QUERY, np.zeros((4, 3), dtype=np.float32), 2)


# ---------------------------------------------------------------- the rules

def test_only_ranks_inside_the_range_are_chosen(backend):
    corpus, at_rank = _ranked_corpus(60)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(range_min=20, range_max=50,
                                                                         num_negatives=30))
    assert result.negatives == [at_rank[20:50]]
    assert result.shortfall == 0
    assert result.candidates.tolist() == [30]


def test_candidates_above_max_score_are_dropped(backend):
    corpus, at_rank = _ranked_corpus(60)
    # ranks 0-14 score 0.95..0.81 (> 0.805); rank 15 scores 0.80
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(max_score=0.805))
    assert result.negatives == [at_rank[15:20]]
    assert result.dropped_max_score.tolist() == [15]


def test_candidates_within_margin_of_the_given_positive_score_are_dropped(backend):
    corpus, at_rank = _ranked_corpus(60)
    # 0.70 - 0.105 = 0.595: ranks 0-35 (0.95..0.60) are too close, rank 36 (0.59) is the first kept
    result = mine_hard_negatives(QUERY, corpus, [set()], np.array([0.70]), _settings(margin=0.105,
                                                                                     num_negatives=3))
    assert result.negatives == [at_rank[36:39]]
    assert result.dropped_margin.tolist() == [36]


def test_margin_uses_the_lowest_positive_score_computed_from_ids(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[5], at_rank[30]}]  # scores 0.90 and 0.65: the lowest, 0.65, sets the margin
    result = mine_hard_negatives(QUERY, corpus, positives, None, _settings(margin=0.105, num_negatives=3))
    # 0.65 - 0.105 = 0.545: ranks 0-40 (down to 0.55) are dropped, two of them as positives
    assert result.positive_scores.tolist() == pytest.approx([0.65], abs=1e-6)
    assert result.negatives == [at_rank[41:44]]
    assert result.dropped_positive.tolist() == [2]
    assert result.dropped_margin.tolist() == [39]
    given = mine_hard_negatives(QUERY, corpus, positives, np.array([0.65]), _settings(margin=0.105,
                                                                                     num_negatives=3))
    assert given.negatives == result.negatives


def test_a_query_without_positives_or_a_score_gets_no_margin_rule(backend):
    corpus, at_rank = _ranked_corpus(60)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(margin=0.5))
    assert math.isnan(result.positive_scores[0])
    assert result.negatives == [at_rank[0:5]]
    assert result.dropped_margin.tolist() == [0]


def test_positives_inside_the_range_are_never_returned(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[20], at_rank[22], at_rank[45]}]
    result = mine_hard_negatives(QUERY, corpus, positives, np.array([1.0]),
                                 _settings(range_min=20, range_max=50, num_negatives=30))
    assert result.negatives == [[at_rank[21]] + at_rank[23:45] + at_rank[46:50]]
    assert result.dropped_positive.tolist() == [3]
    assert result.eligible.tolist() == [27]
    assert result.shortfall == 1


def test_top_returns_the_best_eligible_candidates_in_score_order(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[15], at_rank[17]}]
    result = mine_hard_negatives(QUERY, corpus, positives, np.array([1.0]),
                                 _settings(range_min=10, range_max=50, max_score=0.805, num_negatives=4))
    assert result.negatives == [[at_rank[16], at_rank[18], at_rank[19], at_rank[20]]]
    chosen_scores = (corpus[result.negatives[0]] @ QUERY[0]).tolist()
    assert chosen_scores == pytest.approx([0.79, 0.77, 0.76, 0.75], abs=1e-6)


# ---------------------------------------------------------------- random sampling

def test_random_sampling_is_seeded_per_query_and_only_picks_eligible_candidates(backend):
    corpus, at_rank = _ranked_corpus(60)
    queries = np.repeat(QUERY, 3, axis=0)  # three identical queries
    positives = [{at_rank[30]}] * 3
    settings = _settings(max_score=0.805, sampling="random", seed=42)
    nan = np.full(3, np.nan)
    result = mine_hard_negatives(queries, corpus, positives, nan, settings)

    eligible = [d for d in at_rank[15:60] if d != at_rank[30]]  # 44 docs, best first
    for i, chosen in enumerate(result.negatives):
        want = [eligible[p] for p in sorted(random.Random(42 + i).sample(range(44), 5))]
        assert chosen == want
        assert set(chosen) <= set(eligible) and len(set(chosen)) == 5
    assert result.negatives[0] != result.negatives[1]  # each query has its own seed
    assert result.shortfall == 0

    again = mine_hard_negatives(queries, corpus, positives, nan, settings)
    assert again.negatives == result.negatives
    other = mine_hard_negatives(queries, corpus, positives, nan, _settings(max_score=0.805, sampling="random",
                                                                           seed=7))
    assert other.negatives[0] != result.negatives[0]
    alone = mine_hard_negatives(queries[:1], corpus, positives[:1], nan[:1], settings)
    assert alone.negatives == result.negatives[:1]


def test_random_sampling_with_too_few_candidates_takes_them_all(backend):
    corpus, at_rank = _ranked_corpus(60)
    result = mine_hard_negatives(QUERY, corpus, [set()], None,
                                 _settings(range_min=56, sampling="random", num_negatives=10))
    assert result.negatives == [at_rank[56:60]]
    assert result.shortfall == 1


# ---------------------------------------------------------------- shortfall, small corpora, summary

def test_shortfall_counts_exactly_the_queries_with_fewer_negatives(backend):
    corpus, at_rank = _ranked_corpus(60)
    queries = np.repeat(QUERY, 4, axis=0)
    # margin 0.105 below: 0.895 (nothing dropped), 0.295 (all dropped), 0.395 (4 left), 0.405 (5 left)
    pos = np.array([1.0, 0.4, 0.5, 0.51])
    settings = _settings(margin=0.105)
    result = mine_hard_negatives(queries, corpus, [set()] * 4, pos, settings)
    assert [len(n) for n in result.negatives] == [5, 0, 4, 5]
    assert result.negatives[2] == at_rank[56:60]
    assert result.shortfall == 2
    assert summarize(result, settings) == ("mined 5 negatives for 2/4 queries; 2 got fewer "
                                           "(ranks 0-60, max score 1, margin 0.105)")


def test_corpus_smaller_than_range_max(backend):
    corpus, at_rank = _ranked_corpus(25)
    settings = _settings(range_min=20, range_max=50, num_negatives=5)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, settings)
    assert result.negatives == [at_rank[20:25]]
    assert result.candidates.tolist() == [5]
    assert result.shortfall == 0

    tiny, _ = _ranked_corpus(15)  # ends before range_min: no candidates at all
    none = mine_hard_negatives(np.repeat(QUERY, 2, axis=0), tiny, [set(), set()], None, settings)
    assert none.negatives == [[], []]
    assert none.candidates.tolist() == [0, 0]
    assert none.shortfall == 2


def test_faiss_and_numpy_mine_the_same_negatives(monkeypatch):
    import faiss  # noqa: F401
    q, c = _random_unit(40, 8, seed=3), _random_unit(300, 8, seed=4)
    positives = [{i, (i * 7) % 300} for i in range(40)]
    settings = MiningSettings(range_min=5, range_max=40, max_score=0.9, margin=0.02, num_negatives=6)
    with_faiss = mine_hard_negatives(q, c, positives, None, settings)
    _use_numpy(monkeypatch)
    without = mine_hard_negatives(q, c, positives, None, settings)
    assert with_faiss.negatives == without.negatives
    assert with_faiss.shortfall == without.shortfall
    assert sum(map(len, with_faiss.negatives)) > 0
    for name in ("dropped_positive", "dropped_max_score", "dropped_margin", "eligible"):
        np.testing.assert_array_equal(getattr(with_faiss, name), getattr(without, name))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, setting", [
    (dict(range_min=-1), "range_min"),
    (dict(range_min=50, range_max=50), "range_max"),
    (dict(range_min=30, range_max=20), "range_max"),
    (dict(num_negatives=0), "num_negatives"),
    (dict(sampling="best"), "sampling"),
    (dict(margin=-0.1), "margin"),
    (dict(margin=float("nan")), "margin"),
    (dict(max_score=float("nan")), "max_score"),
    (dict(seed=1.5), "seed"),
])
def test_bad_settings_name_the_setting(kw, setting):
    with pytest.raises(ValueError, match=rf"^{setting} must"):
        MiningSettings(**kw)


def test_bad_inputs_are_rejected_with_a_clear_message():
    corpus, _ = _ranked_corpus(10)
    with pytest.raises(ValueError, match="positive_ids has 2 entries for 1 queries"):
        mine_hard_negatives(QUERY, corpus, [set(), set()], None, MiningSettings())
    with pytest.raises(ValueError, match=r"positive_ids\[0\] has ids outside the corpus \(size 10\)"):
        mine_hard_negatives(QUERY, corpus, [{10}], None, MiningSettings())
    with pytest.raises(ValueError, match=r"positive_scores must have shape \(1,\)"):
        mine_hard_negatives(QUERY, corpus, [set()], np.array([0.5, 0.6]), MiningSettings())


def test_default_settings_and_summary():
    s = MiningSettings()
    assert (s.range_min, s.range_max, s.max_score, s.margin, s.num_negatives, s.sampling, s.seed) == \
        (20, 50, 0.8, 0.1, 7, "top", 42)
    result = mining.MiningResult(negatives=[[1, 2, 3, 4, 5, 6, 7]] * 940 + [[1]] * 60, shortfall=60)
    assert summarize(result, s) == ("mined 7 negatives for 940/1000 queries; 60 got fewer "
                                    "(ranks 20-50, max score 0.8, margin 0.1)")


def test_mined_negatives_fill_the_default_reranker_group_and_embedding_negatives():
    # `qtune mine` then `train reranker` / `train embedding` with defaults: nothing is repeated or unused
    from qtune.cli import build_parser
    from qtune.tasks.embedding.config import EmbeddingConfig
    from qtune.tasks.reranker.config import RerankerConfig

    cli = build_parser().parse_args(["mine", "--model", "m", "--queries", "q.jsonl", "--corpus", "c.jsonl",
                                     "--output", "o.jsonl"])
    assert cli.num_negatives == MiningSettings().num_negatives
    assert MiningSettings().num_negatives == RerankerConfig.group_size - 1 == EmbeddingConfig.hard_negatives
