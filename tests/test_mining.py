"""Hard-negative mining on hand-made vectors whose every rank and score is known in advance.

The meaning is sentence-transformers' (`tests/test_mining_st.py` compares with it directly): the
rules remove candidates first, then range_min/range_max count ranks among what is left."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from qtune import mining, vector_search
from qtune.mining import (MiningSettings, exact_search, mine_hard_negatives, rule_report, select_negatives,
                          summarize)

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


def _scored_corpus(scores) -> np.ndarray:
    """Unit 2-D docs with exactly these scores against QUERY, in this order. (len(scores), 2)"""
    s = np.asarray(scores, dtype=np.float64)
    return np.stack([s, np.sqrt(1.0 - s ** 2)], axis=1).astype(np.float32)


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
    base = dict(range_min=0, range_max=60, max_score=None, margin=None, num_negatives=5)
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


# ---------------------------------------------------------------- the rules, then the ranks

def test_only_ranks_inside_the_range_are_chosen(backend):
    corpus, at_rank = _ranked_corpus(60)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(range_min=20, range_max=50,
                                                                         num_negatives=30))
    assert result.negatives == [at_rank[20:50]]
    assert result.shortfall == 0
    assert result.candidates.tolist() == [50]  # range_max, plus room for positives (none here)


def test_candidates_above_max_score_are_dropped(backend):
    corpus, at_rank = _ranked_corpus(60)
    # ranks 0-14 score 0.95..0.81 (> 0.805); rank 15 scores 0.80
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(max_score=0.805))
    assert result.negatives == [at_rank[15:20]]
    assert result.dropped_max_score.tolist() == [15]


def test_range_min_counts_ranks_after_the_rules_not_raw_ranks(backend):
    corpus, at_rank = _ranked_corpus(60)
    # The search holds raw ranks 0-29 (range_max, no positives); max_score removes 0-14; of the 15
    # survivors skip the best 10: raw ranks 25-29. Counted on the raw ranking it would be 15-19.
    result = mine_hard_negatives(QUERY, corpus, [set()], None,
                                 _settings(max_score=0.805, range_min=10, range_max=30, num_negatives=5))
    assert result.negatives == [at_rank[25:30]]
    assert result.negative_scores[0] == pytest.approx([0.70, 0.69, 0.68, 0.67, 0.66], abs=1e-6)
    assert result.candidates.tolist() == [30] and result.shortfall == 0


def test_candidates_within_margin_of_the_given_positive_score_are_dropped(backend):
    corpus, at_rank = _ranked_corpus(60)
    # dropped when score + 0.105 > 0.70: ranks 0-35 (0.95..0.60); rank 36 (0.59) is the first kept
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


def test_relative_margin_subtracts_a_share_of_the_positive_scores_magnitude(backend):
    corpus, at_rank = _ranked_corpus(60)
    # 0.8 - 0.8 x 0.305 = 0.556: ranks 0-39 (0.95..0.56) dropped, rank 40 (0.55) is the first kept
    result = mine_hard_negatives(QUERY, corpus, [set()], np.array([0.8]), _settings(relative_margin=0.305))
    assert result.negatives == [at_rank[40:45]]
    assert result.dropped_relative_margin.tolist() == [40]
    # a negative positive score: -0.5 - |-0.5| x 0.2 = -0.6 (not -0.5 x 0.8 = -0.4, which drops nothing)
    scores = [-0.45, -0.55, -0.65, -0.7]
    below = mine_hard_negatives(QUERY, _scored_corpus(scores), [set()], np.array([-0.5]),
                                _settings(relative_margin=0.2, range_max=4, num_negatives=2))
    assert below.negatives == [[2, 3]]
    assert below.dropped_relative_margin.tolist() == [2]


def test_candidates_below_min_score_are_dropped(backend):
    corpus, at_rank = _ranked_corpus(60)
    # below 0.405: ranks 55-59 (0.40..0.36); the best 30 survivors are ranks 0-29, skip 20 -> 20-29
    result = mine_hard_negatives(QUERY, corpus, [set()], None,
                                 _settings(min_score=0.405, range_min=50, num_negatives=10))
    assert result.negatives == [at_rank[50:55]]
    assert result.dropped_min_score.tolist() == [5]
    assert result.shortfall == 1


def test_each_removed_candidate_is_counted_under_its_first_rule(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[0], at_rank[40]}]  # 0.95 (also above max_score) and 0.55 (the margins' score)
    settings = _settings(margin=0.0, relative_margin=0.1, max_score=0.9, min_score=0.455, num_negatives=3)
    result = mine_hard_negatives(QUERY, corpus, positives, None, settings)
    # positive: 2; margin (score > 0.55): ranks 1-39 = 39; relative (> 0.495): ranks 41-45 = 5;
    # max_score: nothing left above 0.9; min_score (< 0.455): ranks 50-59 = 10; left: ranks 46-49
    assert [result.dropped(rule) for rule in mining.RULES] == [2, 39, 5, 0, 10]
    assert result.eligible.tolist() == [4]
    assert result.negatives == [at_rank[46:49]]
    assert rule_report(result) == (
        "of 60 candidates searched, removed: positive 2, margin 39, relative margin 5, max score 0, "
        "min score 10; 4 left; 0 queries got fewer negatives than asked; mean positive score 0.5500, "
        "mean negative score 0.4800 (3 negatives)")


def test_a_query_without_positives_or_a_score_gets_no_margin_rule(backend):
    corpus, at_rank = _ranked_corpus(60)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, _settings(margin=0.5, relative_margin=0.5))
    assert math.isnan(result.positive_scores[0])
    assert result.negatives == [at_rank[0:5]]
    assert result.dropped_margin.tolist() == [0] and result.dropped_relative_margin.tolist() == [0]


def test_positives_are_removed_before_the_ranks_are_counted(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[20], at_rank[22], at_rank[45]}]
    result = mine_hard_negatives(QUERY, corpus, positives, np.array([1.0]),
                                 _settings(range_min=20, range_max=50, num_negatives=30))
    # 53 searched (range_max + 3 positives); the 50 survivors are raw ranks 0-52 less the positives;
    # skipping the best 20 of them leaves raw ranks 21, 23-44 and 46-52
    assert result.candidates.tolist() == [53]
    assert result.negatives == [[at_rank[21]] + at_rank[23:45] + at_rank[46:53]]
    assert result.dropped_positive.tolist() == [3]
    assert result.eligible.tolist() == [50]
    assert result.shortfall == 0


def test_top_returns_the_best_eligible_candidates_in_score_order(backend):
    corpus, at_rank = _ranked_corpus(60)
    positives = [{at_rank[15], at_rank[17]}]
    result = mine_hard_negatives(QUERY, corpus, positives, np.array([1.0]),
                                 _settings(range_min=10, range_max=50, max_score=0.805, num_negatives=4))
    # survivors: raw ranks 16, 18, 19, 20, ...; the 11th of them onwards: raw ranks 27-30
    assert result.negatives == [at_rank[27:31]]
    chosen_scores = (corpus[result.negatives[0]] @ QUERY[0]).tolist()
    assert chosen_scores == pytest.approx([0.68, 0.67, 0.66, 0.65], abs=1e-6)
    assert result.negative_scores[0] == pytest.approx(chosen_scores, abs=1e-7)


def test_rescored_windows_are_ranked_and_judged_by_the_new_scores():
    # two queries' windows given directly, as a reranker rescores them: no longer in score order
    indices = np.array([[10, 11, 12, 13, 14]] * 2)
    scores = np.array([[0.2, 0.9, 0.5, 0.99, 0.4],
                       [0.1, 0.2, 0.3, 0.99, 0.5]], dtype=np.float32)
    settings = MiningSettings(range_min=1, range_max=4, max_score=0.95, margin=0.05, num_negatives=2)
    result = select_negatives(scores, indices, [{12}, set()], np.array([0.6, np.nan]), settings)
    # query 0: 12 is a positive; 11 and 13 are within the margin (+0.05 > 0.6, before max_score
    # looks); left 14 (0.4), 10 (0.2): skip the best one
    assert result.negatives[0] == [10]
    assert result.negative_scores[0] == pytest.approx([0.2])
    # query 1 (no positive score: no margin): 13 above max_score; left 14, 12, 11, 10: skip 14
    assert result.negatives[1] == [12, 11]
    assert result.negative_scores[1] == pytest.approx([0.3, 0.2])
    assert [result.dropped(r) for r in mining.RULES] == [1, 2, 0, 1, 0]
    with pytest.raises(ValueError, match=r"must both be \(queries=2, k\)"):
        select_negatives(scores[:, :3], indices, [set(), set()], np.array([0.6, 0.7]), settings)


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
    corpus, at_rank = _ranked_corpus(58)
    result = mine_hard_negatives(QUERY, corpus, [set()], None,
                                 _settings(range_min=50, sampling="random", num_negatives=10))
    assert result.negatives == [at_rank[50:58]]
    assert result.shortfall == 1


# ---------------------------------------------------------------- shortfall, small corpora, summary

def test_shortfall_counts_exactly_the_queries_with_fewer_negatives(backend):
    corpus, at_rank = _ranked_corpus(60)
    queries = np.repeat(QUERY, 4, axis=0)
    # dropped when score + 0.105 > pos: above 0.895 (6 dropped), all, above 0.395 (4 left), above 0.405 (5 left)
    pos = np.array([1.0, 0.4, 0.5, 0.51])
    settings = _settings(margin=0.105)
    result = mine_hard_negatives(queries, corpus, [set()] * 4, pos, settings)
    assert [len(n) for n in result.negatives] == [5, 0, 4, 5]
    assert result.negatives[2] == at_rank[56:60]
    assert result.shortfall == 2
    assert summarize(result, settings) == ("mined 5 negatives for 2/4 queries; 2 got fewer "
                                           "(ranks 0-60 after the rules, margin 0.105)")


def test_corpus_smaller_than_range_max(backend):
    corpus, at_rank = _ranked_corpus(25)
    settings = _settings(range_min=20, range_max=50, num_negatives=5)
    result = mine_hard_negatives(QUERY, corpus, [set()], None, settings)
    assert result.negatives == [at_rank[20:25]]
    assert result.candidates.tolist() == [25]
    assert result.shortfall == 0

    tiny, _ = _ranked_corpus(15)  # ends before range_min: every candidate is skipped
    none = mine_hard_negatives(np.repeat(QUERY, 2, axis=0), tiny, [set(), set()], None, settings)
    assert none.negatives == [[], []]
    assert none.candidates.tolist() == [15, 15]
    assert none.shortfall == 2


def test_faiss_and_numpy_mine_the_same_negatives(monkeypatch):
    import faiss  # noqa: F401
    q, c = _random_unit(40, 8, seed=3), _random_unit(300, 8, seed=4)
    positives = [{i, (i * 7) % 300} for i in range(40)]
    settings = MiningSettings(range_min=5, range_max=40, max_score=0.9, min_score=-0.2, margin=0.02,
                              relative_margin=0.05, num_negatives=6)
    with_faiss = mine_hard_negatives(q, c, positives, None, settings)
    _use_numpy(monkeypatch)
    without = mine_hard_negatives(q, c, positives, None, settings)
    assert with_faiss.negatives == without.negatives
    assert with_faiss.shortfall == without.shortfall
    assert sum(map(len, with_faiss.negatives)) > 0
    for rule in mining.RULES:
        np.testing.assert_array_equal(getattr(with_faiss, f"dropped_{rule}"), getattr(without, f"dropped_{rule}"))
    np.testing.assert_array_equal(with_faiss.eligible, without.eligible)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, setting", [
    (dict(range_min=-1), "range_min"),
    (dict(range_min=50, range_max=50), "range_max"),
    (dict(range_min=30, range_max=20), "range_max"),
    (dict(num_negatives=0), "num_negatives"),
    (dict(range_min=45, range_max=50, num_negatives=6), "num_negatives"),
    (dict(sampling="best"), "sampling"),
    (dict(margin=-0.1), "margin"),
    (dict(margin=float("nan")), "margin"),
    (dict(relative_margin=-0.05), "relative_margin"),
    (dict(max_score=float("nan")), "max_score"),
    (dict(min_score="low"), "min_score"),
    (dict(max_score=0.5, min_score=0.6), "min_score"),
    (dict(seed=1.5), "seed"),
])
def test_bad_settings_name_the_setting(kw, setting):
    with pytest.raises(ValueError, match=rf"^{setting} must"):
        MiningSettings(**kw)


def test_bad_inputs_are_rejected_with_a_clear_message():
    corpus, _ = _ranked_corpus(10)
    settings = MiningSettings(range_min=0, range_max=8)
    with pytest.raises(ValueError, match="positive_ids has 2 entries for 1 queries"):
        mine_hard_negatives(QUERY, corpus, [set(), set()], None, settings)
    with pytest.raises(ValueError, match=r"positive_ids\[0\] has ids outside the corpus \(size 10\)"):
        mine_hard_negatives(QUERY, corpus, [{10}], None, settings)
    with pytest.raises(ValueError, match=r"positive_scores must have shape \(1,\)"):
        mine_hard_negatives(QUERY, corpus, [set()], np.array([0.5, 0.6]), settings)


def test_default_settings_and_summary():
    s = MiningSettings()
    assert (s.range_min, s.range_max, s.max_score, s.margin, s.num_negatives, s.sampling, s.seed,
            s.min_score, s.relative_margin) == (20, 50, 0.8, 0.1, 7, "top", 42, None, None)
    result = mining.MiningResult(negatives=[[1, 2, 3, 4, 5, 6, 7]] * 940 + [[1]] * 60, shortfall=60)
    assert summarize(result, s) == ("mined 7 negatives for 940/1000 queries; 60 got fewer "
                                    "(ranks 20-50 after the rules, max score 0.8, margin 0.1)")


def mine_settings(argv: list[str]):
    """`qtune mine ARGV`'s settings as the command resolves them (flags over the defaults)."""
    from qtune.cli import build_parser
    from qtune.config import config_from_args
    from qtune.tasks.embedding.config import MineConfig

    return config_from_args(MineConfig, build_parser().parse_args(argv))


def test_mine_flags_reach_the_settings():
    base = ["mine", "--model", "m", "--queries", "q.jsonl", "--corpus", "c.jsonl", "--output", "o.jsonl"]
    args = mine_settings(base + ["--relative-margin", "0.05", "--min-score", "0.1", "--max-score", "off",
                                 "--absolute-margin", "0.2", "--rescore-with", "rr", "--no-vector-cache"])
    assert (args.relative_margin, args.min_score, args.max_score, args.margin) == (0.05, 0.1, None, 0.2)
    assert args.rescore_with == "rr" and args.no_vector_cache and args.vector_cache == "auto"
    assert args.rules() == MiningSettings(relative_margin=0.05, min_score=0.1, max_score=None, margin=0.2)
    defaults = mine_settings(base)
    assert (defaults.relative_margin, defaults.min_score, defaults.rescore_with, defaults.no_vector_cache) == \
        (None, None, None, False)
    assert defaults.rules() == MiningSettings()  # the defaults are MiningSettings' own, written once
    # --quantize reaches the loader
    assert (defaults.load_precision, mine_settings(base + ["--quantize", "int8"]).load_precision) == ("auto", "int8")
    assert mine_settings(base + ["--range_min", "3"]).range_min == 3  # the underscore spelling, as for every command


def test_mined_negatives_fill_the_default_reranker_group():
    # `qtune mine` then `train reranker` with defaults: nothing is repeated or unused
    from qtune.tasks.embedding.config import EmbeddingConfig
    from qtune.tasks.reranker.config import RerankerConfig

    cli = mine_settings(["mine", "--model", "m", "--queries", "q.jsonl", "--corpus", "c.jsonl", "--output", "o.jsonl"])
    assert cli.num_negatives == MiningSettings().num_negatives
    assert MiningSettings().num_negatives == RerankerConfig.group_size - 1
    # embeddings train on in-batch negatives by default (the measured recipe), the mined ones on request
    assert EmbeddingConfig.hard_negatives == 0
