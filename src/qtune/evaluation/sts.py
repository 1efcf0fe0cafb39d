"""Pair scoring (STS, AFQMC-style 0/1 matching) for embedders: how well the cosine of two texts'
embeddings orders the pairs as the gold scores do.

Metrics are pure functions of arrays. Correlations follow scipy.stats (`pearsonr`, `spearmanr`
with average ranks for ties); ROC-AUC is the Mann-Whitney statistic (ties count one half), as in
sklearn's `roc_auc_score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from qtune.evaluation.report import markdown_table

STS_COLUMNS = ("sentence1", "sentence2")
SCORE_COLUMNS = ("score", "label")  # the gold column when none is named: the first the file has
STS_METRICS = ("spearman", "pearson", "roc_auc", "best_accuracy", "best_threshold", "pairs")


# -- metrics


def average_ranks(values) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given the mean of the ranks they span ([5, 1, 5] -> [2.5, 1, 2.5])."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    # A tie group spans sorted positions [start, end); each member gets (start + 1 + end) / 2.
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [len(x)]])
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def _check_pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of equal length, got shapes {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("a correlation needs at least two pairs")
    return x, y


def pearson(a, b) -> float:
    """Pearson's r; ValueError when either side is constant (r is undefined)."""
    x, y = _check_pairs(a, b)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0.0:
        raise ValueError("one side is constant: the correlation is undefined")
    return float((dx * dy).sum() / denom)


def spearman(a, b) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    x, y = _check_pairs(a, b)
    return pearson(average_ranks(x), average_ranks(y))


def _binary(labels) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("needs both positive (1) and negative (0) pairs")
    return y.astype(np.int64)


def roc_auc(labels, scores) -> float:
    """P(a random positive scores above a random negative), ties counting one half."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    ranks = average_ranks(s)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def best_accuracy_threshold(labels, scores) -> tuple[float, float]:
    """(threshold, accuracy) of the cut "positive when score >= threshold" with the best accuracy.

    Every distinct score is tried, plus "everything negative" (a threshold just above the highest
    score); ties go to the higher threshold."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Cut after position k (k = 0..n): the first k rows are predicted positive.
    tp = np.concatenate([[0], np.cumsum(y_sorted)])
    fp = np.concatenate([[0], np.cumsum(1 - y_sorted)])
    negatives = len(y) - int(y.sum())
    accuracy = (tp + (negatives - fp)) / len(y)
    valid = np.ones(len(tp), dtype=bool)
    valid[1:-1] = s_sorted[:-1] != s_sorted[1:]  # a cut inside a tie is no threshold
    k = int(np.argmax(np.where(valid, accuracy, -1.0)))
    threshold = float(np.nextafter(s_sorted[0], np.inf)) if k == 0 else float(s_sorted[k - 1])
    return threshold, float(accuracy[k])


def is_binary(gold) -> bool:
    """Gold made only of 0 and 1, both present: matching labels (AFQMC-style), not graded scores."""
    y = np.asarray(gold, dtype=np.float64)
    return bool(np.isin(y, (0.0, 1.0)).all() and 0 < y.sum() < len(y))


def sts_metrics(scores, gold) -> dict:
    """Spearman and Pearson of model `scores` against `gold`; for 0/1 gold also ROC-AUC and the
    accuracy of the best threshold (with it)."""
    out = {"spearman": spearman(scores, gold), "pearson": pearson(scores, gold)}
    if is_binary(gold):
        out["roc_auc"] = roc_auc(gold, scores)
        out["best_threshold"], out["best_accuracy"] = best_accuracy_threshold(gold, scores)
    out["pairs"] = int(len(gold))
    return out


def pair_cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, dim) arrays of unit vectors -> (n,)."""
    return (first * second).sum(axis=1).astype(np.float64)


# -- data


@dataclass(frozen=True)
class ScoredPairs:
    """Text pairs with a gold similarity (STS 0-5, or 0/1 labels)."""

    first: tuple[str, ...]
    second: tuple[str, ...]
    gold: np.ndarray  # (pairs,) float64
    score_column: str


def _gold_value(fields: dict, column: str, path: str, line: int) -> float:
    from qtune.errors import DataError

    value = fields.get(column)
    if isinstance(value, bool) or value is None:
        raise DataError(f"expected a number, got {value!r}", path=path, line=line, field=column)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise DataError(f"expected a number, got {value!r}", path=path, line=line, field=column) from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise DataError(f"expected a number, got {value!r}", path=path, line=line, field=column)
    if not math.isfinite(number):
        raise DataError(f"expected a finite number, got {value!r}", path=path, line=line, field=column)
    return number


def read_scored_pairs(path: str | Path, *, text_columns: Sequence[str] = STS_COLUMNS,
                      score_column: str | None = None) -> ScoredPairs:
    """Read a CSV/TSV/JSONL/Parquet pair file with a gold score; every problem is a DataError naming
    file, line and field. Without `score_column`, the first of `SCORE_COLUMNS` the file has."""
    from qtune.data.sources import source_name
    from qtune.data.tables import read_table, required_text
    from qtune.errors import DataError

    first, second = text_columns
    wanted = [first, second, score_column or SCORE_COLUMNS[0]]
    rows, names = read_table(path, wanted, column_flags="--text-columns COL1 COL2 and --score-column COL")
    name = source_name(path)
    column = score_column or next((c for c in SCORE_COLUMNS if c in names), None)
    if column is None or column not in names:
        wanted_text = column or " or ".join(SCORE_COLUMNS)
        raise DataError(f"no column {wanted_text}: the file has {', '.join(names)}; pick it with --score-column",
                        path=name, field=column or SCORE_COLUMNS[0])
    a = tuple(required_text(r.fields, first, name, r.line) for r in rows)
    b = tuple(required_text(r.fields, second, name, r.line) for r in rows)
    gold = np.array([_gold_value(r.fields, column, name, r.line) for r in rows], dtype=np.float64)
    return ScoredPairs(a, b, gold, column)


# -- running and reporting


def score_pairs(embedder, pairs: ScoredPairs, *, batch_size: int = 64, progress: bool = False,
                sharded: bool = False) -> np.ndarray:
    """Cosine of each pair's two embeddings (each distinct text embedded once, as a passage) -> (pairs,).
    `sharded`: the embedding is shared over the launched ranks (every rank must call)."""
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    index = {t: i for i, t in enumerate(texts)}
    if sharded:
        from qtune.evaluation.sharded import sharded_call

        vectors = sharded_call(embedder, "embed", texts, batch_size=batch_size, progress=progress)  # (texts, dim)
    else:
        vectors = embedder.embed(texts, batch_size=batch_size, progress=progress)  # (texts, dim)
    return pair_cosines(vectors[[index[t] for t in pairs.first]], vectors[[index[t] for t in pairs.second]])


def sts_report(results: dict[str, dict], data: str) -> str:
    """Models side by side; two models (--model, --compare) get a change column: the first minus the second."""
    names = list(results)
    keys = [k for k in STS_METRICS if any(k in results[n] for n in names)]
    header = ["metric", *names] + (["change"] if len(names) == 2 else [])
    rows = []
    for k in keys:
        row = [k] + [results[n].get(k, "") for n in names]
        if len(names) == 2:
            a, b = results[names[0]].get(k), results[names[1]].get(k)
            row.append(f"{a - b:+.4f}" if isinstance(a, float) and isinstance(b, float) and k != "best_threshold"
                       else "")
        rows.append(row)
    note = ("Score: cosine of the two texts' embeddings. best_threshold: the cosine at or above which a "
            "pair is called a match (best accuracy).")
    return "\n".join([f"# Pair scoring: {data}", "", markdown_table(header, rows), "", note, ""])


def write_sts_outputs(results: dict[str, dict], data: str, output: str | Path) -> None:
    from qtune.io import write_json, write_text

    output = Path(output)
    write_json(output / "metrics.json", results)
    write_text(output / "report.md", sts_report(results, data))

