"""Classification metrics as pure functions of label arrays."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class; 0 where undefined (no prediction / no support)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    precision, recall, f1 = _per_class(matrix)
    total = matrix.sum()
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(matrix[i].sum())}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": matrix.tolist(),
    }


def best_threshold(y_true: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """The threshold on the positive-class score that maximises binary macro-F1.

    A row is predicted positive when score >= threshold. Every distinct score is tried as a
    cut (plus "everything negative"), vectorised over the sorted scores. Returns
    (threshold, macro_f1); ties go to the higher threshold.
    """
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Cut after position k (k = 0..n): the first k rows are predicted positive; only cuts
    # between distinct scores are real thresholds.
    tp = np.concatenate([[0], np.cumsum(y_sorted)])
    fp = np.concatenate([[0], np.cumsum(1 - y_sorted)])
    pos, neg = y.sum(), len(y) - y.sum()
    fn, tn = pos - tp, neg - fp
    f1_pos = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)
    f1_neg = np.divide(2 * tn, 2 * tn + fn + fp, out=np.zeros(len(tn)), where=(2 * tn + fn + fp) > 0)
    macro = (f1_pos + f1_neg) / 2
    valid = np.ones(len(tp), dtype=bool)
    valid[1:-1] = s_sorted[:-1] != s_sorted[1:]
    macro = np.where(valid, macro, -1.0)
    k = int(np.argmax(macro))
    threshold = float(np.nextafter(s_sorted[0], np.inf)) if k == 0 else float(s_sorted[k - 1])
    return threshold, float(macro[k])


def calibrate_threshold(y_true: Sequence[int], scores: Sequence[float], min_precision: float | None = None) -> dict:
    """The score threshold for "relevant" (score >= threshold) from labelled pairs.

    Without `min_precision`: the threshold that maximises F1 of the positive class (ties go to the
    higher threshold). With it: the lowest threshold whose precision is at least `min_precision`,
    which keeps the most recall under that constraint. Every distinct score is a candidate cut.
    Returns threshold, precision, recall, f1 and the counts; raises ValueError when no cut works.
    """
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise ValueError("calibration needs both relevant (1) and not relevant (0) pairs")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Cut after position k (k = 1..n): the first k rows are predicted relevant. Only cuts between
    # distinct scores are thresholds a model can apply.
    tp = np.cumsum(y_sorted)
    k = np.arange(1, len(y) + 1)
    precision = tp / k
    recall = tp / positives
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(k)), where=(precision + recall) > 0)
    valid = np.ones(len(k), dtype=bool)
    valid[:-1] = s_sorted[:-1] != s_sorted[1:]
    if min_precision is None:
        best = int(np.argmax(np.where(valid, f1, -1.0)))
    else:
        ok = valid & (precision >= min_precision)
        if not ok.any():
            raise ValueError(f"no threshold reaches precision {min_precision} "
                             f"(the best is {precision[valid].max():.4f})")
        best = int(np.flatnonzero(ok)[-1])
    return {"threshold": float(s_sorted[best]), "precision": float(precision[best]), "recall": float(recall[best]),
            "f1": float(f1[best]), "pairs": int(len(y)), "relevant": positives, "min_precision": min_precision}


# A threshold whose precision is within this of the share of relevant pairs does about what
# accepting every pair does: it does not tell relevant from not relevant.
SEPARATION_MARGIN = 0.05


def threshold_warning(found: dict, margin: float = SEPARATION_MARGIN) -> str | None:
    """Why a threshold from `calibrate_threshold` does not separate the classes, or None when it does.

    Accepting every pair gives precision = the share of relevant pairs and recall 1; a threshold
    whose precision is not at least `margin` above that share is no better than accepting all.
    """
    rate = found["relevant"] / found["pairs"]
    precision, recall = found["precision"], found["recall"]
    if precision >= rate + margin:
        return None
    if recall == 1.0 and precision <= rate:
        what = (f"it accepts every pair (precision {precision:.2f} = the share of relevant pairs, "
                f"recall {recall:.2f})")
    else:
        what = (f"its precision {precision:.2f} is within {margin:.2f} of the {rate:.2f} that accepting every "
                f"pair gives (recall {recall:.2f})")
    return (f"threshold {found['threshold']:.6f} does not separate relevant from not relevant pairs: {what}, so "
            "documents unrelated to the query are marked relevant; the model does not rank these pairs (train "
            "or pick another reranker) or the labels do not match its scores")


def metrics_from_probs(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str]) -> dict:
    """Report for argmax predictions, plus (two classes) the threshold that maximises macro-F1."""
    report = classification_report(y_true, probs.argmax(axis=1), labels)
    if len(labels) == 2:
        threshold, macro_f1 = best_threshold(y_true, probs[:, 1])
        report["best_threshold"] = threshold
        report["best_threshold_macro_f1"] = macro_f1
    return report
