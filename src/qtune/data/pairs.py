"""Sentence pairs for semantic matching (AFQMC / LCQMC style)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qtune.data.sources import source_name
from qtune.data.tables import Row, label_text, read_table, required_text
from qtune.errors import DataError
from qtune.records import Pair

PAIR_COLUMNS = ("sentence1", "sentence2")
QUERY_DOCUMENT = ("query", "document")  # how relevance-labelled (query, document, label) files name them


def _text(row: Row, column: str, path: str) -> str:
    return required_text(row.fields, column, path, row.line)


# Label spellings whose side is clear, so a hint can put the negative first (class order) without guessing.
NEGATIVE_LABELS = {"0", "no", "n", "false", "f", "negative", "neg", "irrelevant", "not_relevant", "different",
                   "not_duplicate", "not_paraphrase", "dissimilar", "unrelated", "bad"}
POSITIVE_LABELS = {"1", "yes", "y", "true", "t", "positive", "pos", "relevant", "same", "duplicate", "paraphrase",
                   "similar", "related", "good"}


def _label_index(row: Row, column: str, labels: Sequence[str], path: str) -> int:
    text = label_text(row.fields, column, path, row.line)
    if text not in labels:
        raise DataError(f"label {text!r} is not one of {list(labels)}", path=str(path), line=row.line, field=column)
    return list(labels).index(text)


def _class_order(values: Sequence[str]) -> list[str] | None:
    """Two label values, negative first, when their spellings say which is which; else None."""
    a, b = sorted(values)
    if a.lower() in NEGATIVE_LABELS and b.lower() in POSITIVE_LABELS:
        return [a, b]
    if b.lower() in NEGATIVE_LABELS and a.lower() in POSITIVE_LABELS:
        return [b, a]
    return None


def label_hint(rows: Sequence[Row], column: str, labels: Sequence[str], labels_flag: str | None) -> str:
    """What to do when a file's labels are not `labels`: the `labels_flag` value that names two of
    them, another task for more, or how to rewrite them when the command has no such flag."""
    found = sorted({str(value).strip() for value in (row.fields.get(column) for row in rows)
                    if isinstance(value, (str, int)) and not isinstance(value, bool)})
    if len(found) < 2 or set(found) <= set(labels):
        return ""
    shown = ", ".join(found)
    expected = f"this command reads the labels {', '.join(labels)}"
    if len(found) > len(labels):
        if not labels_flag:
            return f"; the file holds {len(found)} label values ({shown}), {expected}"
        return (f"; the file holds {len(found)} label values ({shown}), a pair classifier reads 2 unless told: "
                f"for one text per row and more classes use `qtune train classify`; for a pair classifier of "
                f"{len(found)} classes name them in class order with `{labels_flag} {' '.join(found)}`")
    if len(found) != len(labels) or len(found) != 2:
        return f"; the file's labels are {shown}, {expected}"
    ordered = _class_order(found)
    if labels_flag:
        if ordered is None:
            return f"; the file's labels are {shown}: name them with `{labels_flag} NEGATIVE POSITIVE`"
        return f"; the file's labels are {shown}: pass `{labels_flag} {' '.join(ordered)}` (negative first)"
    if ordered is None:
        return f"; the file's labels are {shown}, {expected}"
    mapping = ", ".join(f"{value} as {label}" for value, label in zip(ordered, labels))
    return f"; the file's labels are {shown}, {expected}: write {mapping}"


def pairs_from_rows(rows: Sequence[Row], path: str | Path, *, text_columns: Sequence[str] = PAIR_COLUMNS,
                    label_column: str = "label", labels: Sequence[str] | None = ("0", "1"),
                    labels_flag: str | None = "--labels") -> list[Pair]:
    """Check and convert rows; `labels=None` reads unlabelled pairs (for prediction). `labels_flag`:
    the flag that names the labels, for the hint of a file labelled otherwise (None: the command
    has none, e.g. `qtune calibrate` reads 0/1)."""
    path = source_name(path)
    first, second = text_columns
    pairs = []
    for row in rows:
        a, b = _text(row, first, path), _text(row, second, path)
        label = None
        if labels is not None:
            try:
                label = _label_index(row, label_column, labels, path)
            except DataError as e:
                hint = label_hint(rows, label_column, labels, labels_flag) if e.field == label_column else ""
                raise DataError(e.reason + hint, path=e.path, line=e.line, field=e.field) from None
        pairs.append(Pair(a, b, label, row.line))
    return pairs


def pair_column_flags(labelled: bool) -> str:
    """The flags that pick a pair file's columns (the `text_columns` and `label_column` settings)."""
    return "--text-columns COL1 COL2" + (" and --label-column COL" if labelled else "")


def _text_columns_of(names: Sequence[str], text_columns: Sequence[str], alternatives: Sequence[Sequence[str]],
                     path: str, labelled: bool) -> tuple[str, str]:
    """`text_columns` when the file has them, else the first of `alternatives` it has; otherwise a
    DataError saying which columns the file has and which flags pick them."""
    for candidate in (text_columns, *alternatives):
        if all(c in names for c in candidate):
            first, second = candidate
            return first, second
    missing = [c for c in text_columns if c not in names]
    nor = "".join(f" (nor {', '.join(alt)})" for alt in alternatives)
    raise DataError(f"no columns {', '.join(text_columns)}{nor}: the file has {', '.join(names)}; pick them with "
                    f"{pair_column_flags(labelled)}", path=str(path), field=missing[0])


def read_pairs(path: str | Path, *, text_columns: Sequence[str] = PAIR_COLUMNS,
               label_column: str = "label", labels: Sequence[str] | None = ("0", "1"),
               header: bool | None = None, alternative_columns: Sequence[Sequence[str]] = (),
               labels_flag: str | None = "--labels") -> list[Pair]:
    """Read a pair file; every problem is raised as a DataError naming file, line and field.

    `alternative_columns`: other (first, second) text column names read when the file has none of
    `text_columns` (e.g. `QUERY_DOCUMENT` for relevance-labelled files); `labels_flag`: see
    `pairs_from_rows`.
    """
    labelled = labels is not None
    wanted = list(text_columns) + ([label_column] if labelled else [])
    rows, names = read_table(path, wanted, header=header, column_flags=pair_column_flags(labelled))
    if any(c not in names for c in text_columns):
        text_columns = _text_columns_of(names, text_columns, alternative_columns, source_name(path), labelled)
    return pairs_from_rows(rows, path, text_columns=text_columns, label_column=label_column, labels=labels,
                           labels_flag=labels_flag)
