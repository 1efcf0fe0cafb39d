"""Tests for classification metrics (qtune.evaluation.metrics), checked by hand and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from qtune.evaluation.metrics import best_threshold, classification_report, confusion_matrix

# A small 3-class case. Pairs (true, pred):
#   true 0 -> pred 0, 1, 0, 2      row 0 = [2, 1, 1]   support 4
#   true 1 -> pred 1, 2            row 1 = [0, 1, 1]   support 2
#   true 2 -> pred 2, 2, 0, 2      row 2 = [1, 0, 3]   support 4
# predicted per class (column sums) = [3, 2, 5]; correct = 2 + 1 + 3 = 6 of 10 -> accuracy 0.6
# class 0: P = 2/3, R = 2/4 = 1/2, F1 = 2tp/(2tp+fp+fn) = 4/(4+1+2) = 4/7
# class 1: P = 1/2, R = 1/2,       F1 = 2/(2+1+1) = 1/2
# class 2: P = 3/5, R = 3/4,       F1 = 6/(6+2+1) = 2/3
# macro F1 = (4/7 + 1/2 + 2/3) / 3 = (24 + 21 + 28) / 42 / 3 = 73/126
HAND_TRUE = [0, 0, 1, 1, 2, 2, 2, 2, 0, 0]
HAND_PRED = [0, 1, 1, 2, 2, 2, 0, 2, 0, 2]
HAND_MATRIX = [[2, 1, 1], [0, 1, 1], [1, 0, 3]]


def sk_macro_f1(y_true, y_pred, num_classes: int) -> float:
    return skm.f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0)


# --- hand-computed -------------------------------------------------------------------------------

def test_confusion_matrix_by_hand():
    matrix = confusion_matrix(HAND_TRUE, HAND_PRED, 3)
    assert matrix.shape == (3, 3)
    assert matrix.dtype == np.int64
    assert matrix.tolist() == HAND_MATRIX


def test_confusion_matrix_counts_repeats_and_unused_classes():
    # np.add.at, not fancy-index assignment: three identical (1, 0) pairs count 3, not 1
    assert confusion_matrix([1, 1, 1, 0], [0, 0, 0, 0], 4).tolist() == [[1, 0, 0, 0], [3, 0, 0, 0],
                                                                         [0, 0, 0, 0], [0, 0, 0, 0]]


def test_classification_report_by_hand():
    report = classification_report(HAND_TRUE, HAND_PRED, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["macro_f1"] == pytest.approx(73 / 126)
    assert report["confusion_matrix"] == HAND_MATRIX
    expected = {"a": (2 / 3, 1 / 2, 4 / 7, 4), "b": (1 / 2, 1 / 2, 1 / 2, 2), "c": (3 / 5, 3 / 4, 2 / 3, 4)}
    assert list(report["per_class"]) == ["a", "b", "c"]
    for label, (p, r, f1, support) in expected.items():
        got = report["per_class"][label]
        assert got["precision"] == pytest.approx(p)
        assert got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support
        assert type(got["support"]) is int


def test_classification_report_class_never_predicted_by_hand():
    # true [0, 0, 1, 1], pred [0, 0, 0, 0]: class 1 never predicted -> its precision, recall, F1 are 0;
    # class 0: P = 2/4, R = 2/2, F1 = 4/(4+2+0) = 2/3; macro = (2/3 + 0) / 2 = 1/3; accuracy 2/4
    report = classification_report([0, 0, 1, 1], [0, 0, 0, 0], ["neg", "pos"])
    assert report["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["neg"]["precision"] == pytest.approx(0.5)
    assert report["per_class"]["neg"]["recall"] == 1.0
    assert report["macro_f1"] == pytest.approx(1 / 3)
    assert report["accuracy"] == 0.5


def test_classification_report_perfect():
    report = classification_report([0, 1, 2, 1], [0, 1, 2, 1], ["x", "y", "z"])
    assert (report["accuracy"], report["macro_f1"]) == (1.0, 1.0)


def test_classification_report_is_json_serialisable():
    import json

    report = classification_report(HAND_TRUE, HAND_PRED, ["a", "b", "c"])
    assert json.loads(json.dumps(report)) == report


def test_classification_report_empty_input():
    report = classification_report([], [], ["0", "1"])
    assert report["accuracy"] == 0.0 and report["macro_f1"] == 0.0
    assert report["confusion_matrix"] == [[0, 0], [0, 0]]


# --- against scikit-learn --------------------------------------------------------------------------

CASES = [
    # (num_classes, classes drawn for y_true, classes drawn for y_pred, n, seed)
    (2, 2, 2, 50, 0),
    (2, 2, 2, 7, 1),
    (3, 3, 3, 200, 2),
    (3, 3, 2, 60, 3),   # class 2 is never predicted
    (2, 2, 1, 30, 4),   # only class 0 predicted
    (3, 2, 2, 40, 5),   # class 2 neither present nor predicted
]


@pytest.mark.parametrize("num_classes,true_classes,pred_classes,n,seed", CASES)
def test_report_matches_sklearn(num_classes, true_classes, pred_classes, n, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, true_classes, n)
    y_pred = rng.integers(0, pred_classes, n)
    labels = [f"c{i}" for i in range(num_classes)]
    ids = list(range(num_classes))
    report = classification_report(y_true.tolist(), y_pred.tolist(), labels)

    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=ids).tolist()
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(sk_macro_f1(y_true, y_pred, num_classes))
    p, r, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    for i, label in enumerate(labels):
        got = report["per_class"][label]
        assert got["precision"] == pytest.approx(p[i])
        assert got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f1[i])
        assert got["support"] == support[i]


# --- best_threshold ---------------------------------------------------------------------------------

def brute_force(y_true, scores) -> tuple[float, float]:
    """Every distinct score and one above the max as a cut; highest threshold among the best."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=float)
    candidates = sorted(set(scores.tolist()) | {float(np.nextafter(scores.max(), np.inf))}, reverse=True)
    results = [(t, sk_macro_f1(y_true, (scores >= t).astype(int), 2)) for t in candidates]
    best = max(f1 for _, f1 in results)
    return max(t for t, f1 in results if f1 >= best - 1e-12), best


def test_best_threshold_obvious_cut():
    threshold, f1 = best_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.9])
    assert threshold == 0.7
    assert f1 == 1.0


def test_best_threshold_unsorted_input():
    threshold, f1 = best_threshold([1, 0, 1, 0, 0], [0.9, 0.3, 0.7, 0.1, 0.2])
    assert (threshold, f1) == (0.7, 1.0)


def test_best_threshold_by_hand_ties_go_to_the_higher_threshold():
    # sorted scores 4, 3, 2, 1 with labels 1, 0, 1, 0:
    #   t > 4: all negative  -> F1+ 0,   F1- 4/6 -> 1/3
    #   t = 4: tp1 fn1 tn2   -> F1+ 2/3, F1- 4/5 -> 11/15
    #   t = 3: tp1 fp1 fn1   -> 1/2,     1/2     -> 1/2
    #   t = 2: tp2 fp1 tn1   -> F1+ 4/5, F1- 2/3 -> 11/15
    #   t = 1: all positive  -> F1+ 4/6, F1- 0   -> 1/3
    threshold, f1 = best_threshold([1, 0, 1, 0], [4.0, 3.0, 2.0, 1.0])
    assert threshold == 4.0
    assert f1 == pytest.approx(11 / 15)


def test_best_threshold_does_not_cut_between_equal_scores():
    # A cut after the first 0.5 would separate the classes perfectly but is not a threshold.
    #   t > 0.9: F1+ 0, F1- 2*2/(2*2+2) = 2/3                  -> 1/3
    #   t = 0.9: tp1 fn1 tn2 -> F1+ 2/3, F1- 4/5                 -> 11/15
    #   t = 0.5: all positive -> F1+ 4/6, F1- 0                  -> 1/3
    y, s = [1, 0, 0, 1], [0.5, 0.5, 0.5, 0.9]
    threshold, f1 = best_threshold(y, s)
    assert threshold == 0.9
    assert f1 == pytest.approx(11 / 15)


def test_best_threshold_all_scores_equal():
    threshold, f1 = best_threshold([0, 1, 1], [0.5, 0.5, 0.5])
    # t = 0.5: all positive -> F1+ 4/5, F1- 0 -> 0.4; t > 0.5: all negative -> F1+ 0, F1- 2/5 -> 0.2
    assert threshold == 0.5
    assert f1 == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [5, 40, 150])
def test_best_threshold_matches_brute_force(seed, n):
    rng = np.random.default_rng([seed, n])
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    decimals = 1 if seed % 2 else 6  # coarse scores give many ties
    scores = np.round(rng.random(n) * 0.5 + y * rng.random() * 0.5, decimals)
    threshold, f1 = best_threshold(y.tolist(), scores.tolist())
    expected_threshold, expected_f1 = brute_force(y, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold
    # the returned threshold really achieves the returned score
    assert sk_macro_f1(y, (scores >= threshold).astype(int), 2) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0, 0, 0], [1], [0]])
def test_best_threshold_single_class(y):
    scores = np.linspace(0.2, 0.8, len(y)).tolist()
    threshold, f1 = best_threshold(y, scores)
    assert math.isfinite(threshold) and math.isfinite(f1)
    # only one class exists, so the best is predicting it everywhere: that class F1 = 1, the other 0
    assert f1 == pytest.approx(0.5)
    assert f1 == pytest.approx(brute_force(y, scores)[1])
    predicted = (np.asarray(scores) >= threshold).astype(int)
    assert predicted.tolist() == y


def test_best_threshold_returns_python_floats():
    threshold, f1 = best_threshold(np.array([0, 1]), np.array([0.25, 0.75], dtype=np.float32))
    assert type(threshold) is float and type(f1) is float
    assert (threshold, f1) == (0.75, 1.0)
