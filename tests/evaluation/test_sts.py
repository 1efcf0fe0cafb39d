"""Pair scoring metrics (hand-computed values), the scored-pair reader and `qtune eval sts`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from support import assert_located, assert_user_error, data_error, run, write
from qtune.evaluation.sts import (average_ranks, best_accuracy_threshold, is_binary, pearson, read_scored_pairs,
                                  roc_auc, spearman, sts_metrics)
from qtune.modeling.inference import InferenceModel
from qtune.tasks.embedding.config import StsEvalConfig
from qtune.tasks.embedding.evaluate import evaluate_sts, show_sts


def test_average_ranks_share_ties():
    assert average_ranks([5, 1, 5]).tolist() == [2.5, 1.0, 2.5]
    assert average_ranks([3, 3, 3, 0]).tolist() == [3.0, 3.0, 3.0, 1.0]
    assert average_ranks([0.2, 0.1, 0.4, 0.3]).tolist() == [2.0, 1.0, 4.0, 3.0]


def test_pearson_and_spearman_by_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: deviations (-1, 0, 1) and (-1, 1, 0) -> r = 1 / 2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # ties: ranks of [1, 1, 2] are (1.5, 1.5, 3); with y ranks (1, 2, 3) -> r = 1.5 / sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [10, 20, 30]) == pytest.approx(1.5 / math.sqrt(3.0))


def test_correlations_match_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert average_ranks(x).tolist() == stats.rankdata(x).tolist()


def test_correlation_of_a_constant_side_is_refused():
    with pytest.raises(ValueError, match="one side is constant"):
        pearson([1, 2, 3], [4, 4, 4])
    with pytest.raises(ValueError, match="at least two pairs"):
        spearman([1], [1])


def test_roc_auc_by_hand():
    # positives score 0.9 and 0.4, negatives 0.5 and 0.1: of the 4 (pos, neg) pairs 3 are ordered -> 0.75
    assert roc_auc([1, 0, 1, 0], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    assert roc_auc([1, 1, 0], [0.3, 0.2, 0.1]) == pytest.approx(1.0)
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert roc_auc([1, 1, 0], [0.5, 0.9, 0.5]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both positive"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([2, 0], [0.1, 0.2])


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.3 + rng.random(300), 1)  # rounded: ties
    assert roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_best_accuracy_threshold_by_hand():
    # scores 0.9 0.8 0.7 0.6 with labels 1 0 1 0: the cut at 0.7 gets 3 of 4 right (0.9, 0.7 positive; 0.6
    # negative; 0.8 wrong), as does the cut at 0.9 (0.9 right, 0.8 right, 0.7 wrong, 0.6 right): ties go higher.
    assert best_accuracy_threshold([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == (0.9, 0.75)
    assert best_accuracy_threshold([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6]) == (0.8, 1.0)
    # every pair negative is best: the threshold sits just above the highest score
    threshold, accuracy = best_accuracy_threshold([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6])
    assert threshold > 0.9 and threshold == pytest.approx(0.9) and accuracy == 0.75
    # a tie is never split: 0.5 and 0.5 fall on the same side
    assert best_accuracy_threshold([1, 0, 1], [0.5, 0.5, 0.1]) == (0.1, pytest.approx(2 / 3))


def test_sts_metrics_for_graded_and_binary_gold():
    graded = sts_metrics([0.1, 0.5, 0.3, 0.9], [0.0, 2.5, 4.0, 5.0])
    assert set(graded) == {"spearman", "pearson", "pairs"}
    assert graded["spearman"] == pytest.approx(0.8) and graded["pairs"] == 4
    binary = sts_metrics([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0])
    assert binary["roc_auc"] == pytest.approx(0.75)
    assert (binary["best_threshold"], binary["best_accuracy"]) == (0.9, 0.75)
    assert is_binary([0, 1, 1]) and not is_binary([0, 1, 2]) and not is_binary([1, 1])


def test_reader_takes_score_or_label_and_locates_problems(tmp_path):
    scored = read_scored_pairs(write(tmp_path / "sts.csv", "sentence1,sentence2,score\na,b,4.5\nc,d,0\n"))
    assert scored.first == ("a", "c") and scored.gold.tolist() == [4.5, 0.0] and scored.score_column == "score"
    labelled = read_scored_pairs(write(tmp_path / "afqmc.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n'
                                       '{"sentence1": "c", "sentence2": "d", "label": "0"}\n'))
    assert labelled.gold.tolist() == [1.0, 0.0] and labelled.score_column == "label"
    bad = write(tmp_path / "bad.csv", "sentence1,sentence2,score\na,b,4\nc,d,high\n")
    assert_located(data_error(read_scored_pairs, bad), bad, 3, "score")
    err = data_error(read_scored_pairs, write(tmp_path / "nan.csv", "sentence1,sentence2,score\na,b,nan\n"))
    assert "finite" in str(err)
    err = data_error(read_scored_pairs, write(tmp_path / "none.csv", "sentence1,sentence2,sim\na,b,1\n"))
    assert "no column score or label" in str(err) and "--score-column" in str(err)
    picked = read_scored_pairs(tmp_path / "none.csv", score_column="sim")
    assert picked.gold.tolist() == [1.0]


class WordVectors(InferenceModel):
    """A stub embedder (the inference interface, no model): a fixed unit vector per text."""

    batch_calls = frozenset({"embed"})
    feature_options = ("is_query",)

    def __init__(self, vectors: dict[str, list[float]]):
        super().__init__(loaded=None)
        self.vectors = {t: np.asarray(v, dtype=np.float32) / np.linalg.norm(v) for t, v in vectors.items()}

    def features(self, texts, is_query=False, *, truncate=True):
        return [[0] * len(t.split()) for t in texts]  # its "tokens": the words

    def embed(self, texts, *, is_query=False, batch_size=64, progress=False):
        return np.stack([self.vectors[t] for t in texts])


def test_eval_sts_compares_two_models_and_writes_the_report(tmp_path):
    data = write(tmp_path / "pairs.csv", "sentence1,sentence2,label\nq1,p1,1\nq2,p2,0\nq3,p3,1\nq4,p4,0\n")
    # tuned: matches at cos 1.0 and 0.8, non-matches at 0.6 and 0 -> AUC 1; base: one non-match at cos 1 -> AUC 0.5
    tuned = WordVectors({"q1": [1, 0], "p1": [1, 0], "q2": [1, 0], "p2": [0.6, 0.8], "q3": [1, 0],
                         "p3": [0.8, 0.6], "q4": [1, 0], "p4": [0, 1]})
    base = WordVectors({"q1": [1, 0], "p1": [1, 0], "q2": [1, 0], "p2": [1, 0], "q3": [1, 0], "p3": [0, 1],
                        "q4": [1, 0], "p4": [0, 1]})
    models = {"run/best": tuned, "base": base}
    config = StsEvalConfig(model="run/best", compare="base", data=str(data), output=str(tmp_path / "out"))
    results = evaluate_sts(config, lambda name, task, **_: models[name])
    assert results["run/best"]["roc_auc"] == pytest.approx(1.0)
    assert results["run/best"]["best_accuracy"] == 1.0
    assert results["run/best"]["best_threshold"] == pytest.approx(0.8)
    assert results["base"]["roc_auc"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == results
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith(f"# Pair scoring: {data}")
    assert "| roc_auc | 1.0000 | 0.5000 | +0.5000 |" in report
    assert show_sts(config, results).endswith(f"wrote {tmp_path / 'out'}/metrics.json, report.md")


def test_cli_eval_sts_runs_a_tiny_model(tiny_bert_dir, tmp_path, capsys):
    data = write(tmp_path / "sts.jsonl", "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
                                                 for a, b, s in [("the cat", "a cat", 5.0), ("the cat", "a bus", 0.5),
                                                                 ("my car", "a car", 4.0), ("a dog", "red boat", 1.0)]))
    code, out, err = run(capsys, "eval", "sts", "--model", tiny_bert_dir, "--data", data, "--device", "cpu",
                         "--output", tmp_path / "out")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())[tiny_bert_dir]
    assert metrics["pairs"] == 4 and -1.0 <= metrics["spearman"] <= 1.0 and "roc_auc" not in metrics
    assert "| spearman |" in out
    code, _, err = run(capsys, "eval", "sts", "--model", tiny_bert_dir, "--data", data, "--score-column", "sim")
    assert_user_error(code, err, f"{data}", "no column sim")
