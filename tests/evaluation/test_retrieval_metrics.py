"""Tests for the ranking metrics (qtune.evaluation.retrieval_metrics): hand-computed cases and a
comparison with pytrec_eval (trec_eval's own C code) on random runs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from qtune.evaluation.retrieval_metrics import METRIC_NAMES, mean_margin, per_query_metrics, retrieval_metrics

L3 = math.log2(3)  # discount at rank 2
L5 = math.log2(5)  # discount at rank 4


def docs(*names: str) -> list[str]:
    return list(names)


# --- hand-computed cases ---------------------------------------------------------------------------

def test_graded_ndcg_mrr_map_recall():
    # Relevant: a (grade 2), b (grade 1). Ranking: x a y b z -> gains 0 2 0 1 0.
    qrels = {"q": {"a": 2, "b": 1, "x": 0}}
    got = per_query_metrics({"q": docs("x", "a", "y", "b", "z")}, qrels)["q"]
    ideal = 2 / 1 + 1 / L3  # ideal ranking a b: 2/log2(2) + 1/log2(3) = 2.6309...
    assert got["ndcg@1"] == 0.0  # rank 1 holds x (grade 0); ideal@1 = 2
    assert got["ndcg@3"] == pytest.approx((2 / L3) / ideal)  # 1.26186 / 2.63093 = 0.47962
    assert got["ndcg@5"] == pytest.approx((2 / L3 + 1 / L5) / ideal)  # (1.26186 + 0.43068) / 2.63093 = 0.64332
    assert got["ndcg@10"] == pytest.approx(got["ndcg@5"])  # nothing relevant after rank 5
    assert got["ndcg@3"] == pytest.approx(0.479625, abs=1e-6)
    assert got["ndcg@5"] == pytest.approx(0.643322, abs=1e-6)
    assert got["recall@1"] == 0.0  # 0 of 2 relevant in the top 1
    assert got["recall@10"] == 1.0 and got["recall@100"] == 1.0  # 2 of 2
    assert got["mrr@10"] == 0.5  # first relevant (a) at rank 2
    assert got["map@100"] == pytest.approx(0.5)  # (P@2 = 1/2 + P@4 = 2/4) / 2 relevant = 0.5


def test_linear_not_exponential_gain():
    # Grades 3 and 1 in the wrong order: linear gain gives (1 + 3/log2 3) / (3 + 1/log2 3);
    # the exponential 2^g - 1 gain would give (1 + 7/log2 3) / (7 + 1/log2 3) instead.
    got = per_query_metrics({"q": docs("b", "a")}, {"q": {"a": 3, "b": 1}})["q"]
    assert got["ndcg@3"] == pytest.approx((1 + 3 / L3) / (3 + 1 / L3))  # 2.89279 / 3.63093 = 0.79671
    assert got["ndcg@3"] != pytest.approx((1 + 7 / L3) / (7 + 1 / L3))
    assert got["ndcg@1"] == pytest.approx(1 / 3)  # gain 1 where the ideal has 3


def test_relevant_doc_beyond_the_cut():
    # The only relevant doc at rank 11: outside every cut of 10 or less, inside 100.
    ranking = [f"n{i}" for i in range(10)] + ["r"]
    got = per_query_metrics({"q": ranking}, {"q": {"r": 1}})["q"]
    assert got["ndcg@10"] == 0.0 and got["recall@10"] == 0.0 and got["mrr@10"] == 0.0
    assert got["recall@100"] == 1.0
    assert got["map@100"] == pytest.approx(1 / 11)  # P@11 = 1/11, one relevant doc


def test_relevant_doc_beyond_100_counts_in_map_denominator():
    # Relevant at ranks 1 and 101: AP@100 = (P@1 = 1) / 2 relevant = 0.5; recall@100 = 1/2.
    ranking = ["r1"] + [f"n{i}" for i in range(99)] + ["r2"]
    got = per_query_metrics({"q": ranking}, {"q": {"r1": 1, "r2": 1}})["q"]
    assert got["map@100"] == pytest.approx(0.5)
    assert got["recall@100"] == pytest.approx(0.5)
    assert got["recall@1"] == pytest.approx(0.5)
    # nDCG@10: dcg = 1 (rank 1), ideal = 1 + 1/log2(3) = 1.63093 -> 0.61315
    assert got["ndcg@10"] == pytest.approx(1 / (1 + 1 / L3))


def test_unretrieved_relevant_docs():
    # Three relevant, one retrieved at rank 3: recall 1/3, AP = (1/3) / 3 = 1/9, RR = 1/3.
    got = per_query_metrics({"q": docs("x", "y", "a")}, {"q": {"a": 1, "b": 1, "c": 1}})["q"]
    assert got["recall@10"] == pytest.approx(1 / 3)
    assert got["map@100"] == pytest.approx(1 / 9)
    assert got["mrr@10"] == pytest.approx(1 / 3)
    # nDCG@3 = (1/log2 4) / (1 + 1/log2 3 + 1/log2 4) = 0.5 / 2.13093 = 0.23464
    assert got["ndcg@3"] == pytest.approx(0.5 / (1 + 1 / L3 + 0.5))


def test_means_skip_queries_without_relevant_docs_and_zero_missing_runs():
    qrels = {
        "perfect": {"a": 1},  # a at rank 1: every metric 1
        "half": {"b": 1},  # b at rank 2: ndcg@1 0, ndcg@3 1/log2(3) = 0.63093, mrr 0.5, map 0.5
        "no-relevant": {"c": 0},  # no grade > 0: not scored at all
        "no-run": {"d": 2},  # not in the run: scores 0 on every metric
    }
    run = {"perfect": docs("a", "z"), "half": docs("z", "b"), "no-relevant": docs("c"),
           "not-judged": docs("a")}  # a run without qrels is ignored
    per_query = per_query_metrics(run, qrels)
    assert set(per_query) == {"perfect", "half", "no-run"}
    assert all(v == 0.0 for v in per_query["no-run"].values())
    mean = retrieval_metrics(run, qrels)
    assert list(mean) == list(METRIC_NAMES)
    assert mean["ndcg@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert mean["ndcg@3"] == pytest.approx((1 + 1 / L3 + 0) / 3)  # (1 + 0.63093) / 3 = 0.54364
    assert mean["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert mean["map@100"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert mean["recall@1"] == pytest.approx(1 / 3)
    assert mean["recall@10"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in mean.values())


def test_repeated_doc_counts_once():
    # a, a, b -> a, b: b is at rank 2, and a cannot earn its gain twice.
    got = per_query_metrics({"q": docs("a", "a", "b")}, {"q": {"a": 1, "b": 1}})["q"]
    assert got["ndcg@10"] == pytest.approx(1.0)
    assert got["map@100"] == pytest.approx(1.0)


def test_nothing_to_score():
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics({"q": ["a"]}, {"q": {"a": 0}})


# --- against trec_eval (pytrec_eval) ---------------------------------------------------------------

def random_case(seed: int, n_queries: int = 60, n_docs: int = 150):
    rng = random.Random(seed)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        judged = rng.sample(doc_ids, rng.randint(1, 12))
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        # Rankings of 0-140 docs: some shorter than 10, many past 100; the sample is biased
        # towards judged docs so relevant ones land at every depth.
        pool = judged * 3 + rng.sample(doc_ids, 60)
        run[f"q{q}"] = list(dict.fromkeys(rng.sample(pool, rng.randint(0, len(pool)))))[:140]
    return run, qrels


def as_trec_run(run: dict[str, list[str]], depth: int | None = None) -> dict[str, dict[str, float]]:
    # pytrec_eval orders docs by score: give strictly decreasing scores in ranking order.
    return {q: {d: float(len(ranking) - i) for i, d in enumerate(ranking[:depth])} for q, ranking in run.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytrec_eval(seed):
    import pytrec_eval  # the reference implementation (a dev dependency: missing must fail)
    run, qrels = random_case(seed)
    ours = per_query_metrics(run, qrels)
    measures = {"ndcg_cut.1,3,5,10", "recall.1,10,100", "map_cut.100"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(as_trec_run(run))
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(as_trec_run(run, depth=10))
    names = {"ndcg@1": "ndcg_cut_1", "ndcg@3": "ndcg_cut_3", "ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10",
             "recall@1": "recall_1", "recall@10": "recall_10", "recall@100": "recall_100", "map@100": "map_cut_100"}
    compared = 0
    for qid, metrics in ours.items():
        if qid not in ref:  # trec_eval leaves out queries with an empty ranking; we score them 0
            assert all(v == 0.0 for v in metrics.values())
            continue
        for ours_name, ref_name in names.items():
            assert metrics[ours_name] == pytest.approx(ref[qid][ref_name], abs=1e-6), (qid, ours_name)
        assert metrics["mrr@10"] == pytest.approx(ref_rr[qid]["recip_rank"], abs=1e-6), qid
        compared += 1
    assert compared > 40
    # trec_eval scores a query without relevant docs too (as 0); we leave it out instead.
    assert set(ours) == {q for q, j in qrels.items() if any(g > 0 for g in j.values())}


# --- mean_margin -----------------------------------------------------------------------------------

def test_mean_margin():
    # Triplets: (0.9 - 0.1) + (0.5 - 0.7) + (0.3 - 0.3) = 0.8 - 0.2 + 0 = 0.6, mean 0.2.
    assert mean_margin(np.array([0.9, 0.5, 0.3]), np.array([0.1, 0.7, 0.3])) == pytest.approx(0.2)
    assert isinstance(mean_margin([1.0], [0.5]), float)


@pytest.mark.parametrize("pos,neg", [([1.0, 2.0], [1.0]), ([[1.0]], [[1.0]]), ([], [])])
def test_mean_margin_rejects_bad_shapes(pos, neg):
    with pytest.raises(ValueError):
        mean_margin(pos, neg)
