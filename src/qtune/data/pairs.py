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


def _label_index(row: Row, column: str, labels: Sequence[str], path: str) -> int:
    text = label_text(row.fields, column, path, row.line)
    if text not in labels:
        raise DataError(f"label {text!r} is not one of {list(labels)}", path=str(path), line=row.line, field=column)
    return list(labels).index(text)


def pairs_from_rows(rows: Sequence[Row], path: str | Path, *, text_columns: Sequence[str] = PAIR_COLUMNS,
                    label_column: str = "label", labels: Sequence[str] | None = ("0", "1")) -> list[Pair]:
    """Check and convert rows; `labels=None` reads unlabelled pairs (for prediction)."""
    path = source_name(path)
    first, second = text_columns
    return [
        Pair(_text(row, first, path), _text(row, second, path),
             None if labels is None else _label_index(row, label_column, labels, path), row.line)
        for row in rows
    ]


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
               header: bool | None = None, alternative_columns: Sequence[Sequence[str]] = ()) -> list[Pair]:
    """Read a pair file; every problem is raised as a DataError naming file, line and field.

    `alternative_columns`: other (first, second) text column names read when the file has none of
    `text_columns` (e.g. `QUERY_DOCUMENT` for relevance-labelled files).
    """
    labelled = labels is not None
    wanted = list(text_columns) + ([label_column] if labelled else [])
    rows, names = read_table(path, wanted, header=header, column_flags=pair_column_flags(labelled))
    if any(c not in names for c in text_columns):
        text_columns = _text_columns_of(names, text_columns, alternative_columns, source_name(path), labelled)
    return pairs_from_rows(rows, path, text_columns=text_columns, label_column=label_column, labels=labels)
